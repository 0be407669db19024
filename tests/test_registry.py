"""The dataset registry (synqt/data/registry.py): shipped order, groups and classes, and the folder names other
releases use for the VTAB-1k tasks resolving to the task's recipe, group and class count."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from launcher.plan.schema import load_sweep
from launcher.plan.trials import plan_trials
from launcher.results.aggregate import aggregate, format_table
from synqt.config import load_config
from synqt.data import registry
from synqt.run.rundir import METRIC_KEYS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = yaml.safe_load((CONFIGS / "datasets.yaml").read_text())

# Folder names used by tfds, VPT's task strings, NOAH and public mirrors -> the VTAB-1k task (issue 12, item 5).
KNOWN = {
    "pets": "oxford_iiit_pet", "cifar100": "cifar", "clevr_count_all": "clevr_count",
    "clevr_closest_object_distance": "clevr_dist", "dsprites_location": "dsprites_loc",
    "dsprites_orientation": "dsprites_ori", "smallnorb_azimuth": "smallnorb_azi",
    "smallnorb_elevation": "smallnorb_ele", "diabetic_retinopathy_detection": "diabetic_retinopathy",
    "resisc45": "resisc45", "nwpu_resisc45": "resisc45", "eurosat": "eurosat", "kitti_dist": "kitti",
    "dmlab": "dmlab", "flowers102": "oxford_flowers102", "svhn_cropped": "svhn", "pcam": "patch_camelyon",
    "Oxford-IIIT-Pet": "oxford_iiit_pet", "CIFAR-100": "cifar",
}  # fmt: skip


def recipe(task: str) -> dict:
    return yaml.safe_load((CONFIGS / "vtab" / f"{task}.yaml").read_text())


def test_registry_order_groups_and_classes_come_from_the_shipped_files():
    vtab = registry.datasets("vtab1k")
    assert [d.name for d in vtab] == list(SHIPPED["vtab1k"])
    for d in vtab:
        r = recipe(d.name)
        assert (d.group, d.num_classes, d.benchmark) == (r["group"], r["num_classes"], "vtab1k")
    assert [d.name for d in registry.datasets("fgvc")] == list(SHIPPED["fgvc"])
    assert all(d.group is None for d in registry.datasets("fgvc"))


def test_every_alias_names_one_task_and_no_alias_is_another_tasks_name():
    names = {t for tasks in SHIPPED.values() for t in tasks}
    seen: dict[str, str] = {}
    for tasks in SHIPPED.values():
        for task, entry in tasks.items():
            aliases = entry.get("aliases") if isinstance(entry, dict) else entry  # {title, sizes, aliases} or a list
            for alias in aliases or []:
                key = alias.lower().replace("-", "_")
                assert key not in names, alias
                assert seen.setdefault(key, task) == task, f"{alias} names {seen[key]} and {task}"
                assert registry.canonical(alias) == task


@pytest.mark.parametrize("folder,task", sorted(KNOWN.items()))
def test_alias_folder_trains_with_its_tasks_recipe(folder, task, caplog):
    caplog.set_level(logging.WARNING, logger="synqt.data.registry")
    registry._logged.clear()
    cfg = load_config([], [f"dataset={folder}"])
    r = recipe(task)
    assert cfg.dataset == folder  # the folder read stays the folder given
    assert (cfg.group, cfg.num_classes, cfg.token_nums) == (r["group"], r["num_classes"], r["token_nums"])
    assert (cfg.feat_scale, cfg.attn_scale, cfg.ffn_scale) == (r["feat_scale"], r["attn_scale"], r["ffn_scale"])
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "synqt.data.registry"]
    assert len(lines) == (0 if folder == task else 1)
    if folder != task:
        assert repr(folder) in lines[0] and repr(task) in lines[0]


def test_sweep_over_an_alias_folder_plans_the_tasks_recipe(tmp_path):
    sweep = load_sweep(CONFIGS / "sweeps" / "vtab1k.yaml", ["datasets=[pets]", f"storage_path={tmp_path}"])
    (trial,) = plan_trials(sweep)
    r = recipe("oxford_iiit_pet")
    assert (trial.config.dataset, trial.config.group, trial.config.token_nums) == ("pets", "Natural", r["token_nums"])


def _metrics(root: Path, name: str, dataset: str, acc: float, group: str | None = None) -> None:
    m = dict.fromkeys(METRIC_KEYS)
    m.update(dataset=dataset, group=group, protocol="paper", stage="final", seed=42, hparams={"lr": 0.001},
             test_acc=acc, status="ok", run_name=name)
    (root / name).mkdir(parents=True)
    (root / name / "metrics.json").write_text(json.dumps(m))


def test_alias_runs_join_their_vtab_group_and_unknown_names_are_other_never_fgvc(tmp_path):
    runs = tmp_path / "runs"
    _metrics(runs, "a", "pets", 80.0)  # as an older release recorded it: no group
    _metrics(runs, "b", "mystery_set", 60.0)
    _metrics(runs, "c", "cub", 70.0)
    res = aggregate(tmp_path, out_dir=tmp_path / "out")
    ds = res["datasets"]
    assert set(ds) == {"oxford_iiit_pet", "mystery_set", "cub"}
    assert res["groups"]["Natural"] == pytest.approx(80.0)
    assert ds["mystery_set"]["group"] is None and ds["mystery_set"]["benchmark"] == "other"
    assert res["mean_fgvc"] == pytest.approx(70.0)  # cub alone, not (60 + 70) / 2
    assert res["labels"]["mean_fgvc"] == "plain mean of the 1 FGVC tasks (not part of any VTAB mean)"
    table = format_table(res)
    assert "| mystery_set | other |" in table and "| cub | FGVC |" in table
