"""Sweep files, overrides, the trial plan, packs, dry runs and refusals: fast, no Ray started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.plan.packing import auto_pack_size, estimate_memory, packs_of
from launcher.plan.schema import MAX_AUTO_PACK, expand_datasets, load_sweep
from launcher.plan.trials import grid_points, plan_trials, select_best, stage1_unfinished
from launcher.run import commands
from synqt.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parent.parent
CI = REPO / "configs" / "sweeps" / "ci.yaml"


def _write(tmp_path: Path, data: dict, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory) -> Path:
    """Two small synthetic tasks on disk (validation reads their list files) + a checkpoint file."""
    from synqt.data.synthetic import write_benchmark

    root = tmp_path_factory.mktemp("bench")
    write_benchmark(root / "data", tasks=["syn_count", "syn_blobs"], n_train=40, n_val=10, n_test=30)
    import torch
    from safetensors.torch import save_file

    # a real (if tiny) safetensors file: the pre-flight reads its header, a placeholder is refused
    save_file({"x": torch.zeros(2)}, str(root / "ckpt.safetensors"))
    return root


def test_overrides_one_syntax_for_sweep_and_trial_keys(tmp_path):
    s = load_sweep(
        CI,
        [
            f"storage_path={tmp_path}/x",
            "grid.lr=[1e-3,5e-4]",
            "seeds=[42]",
            "resources.gpus=0.5",
            "epochs=5",
            "backbone_kwargs.img_size=48",
            "grid.token_nums=[1,4]",
            "name=ci2",
        ],
    )
    assert s.storage_path == str(tmp_path / "x")
    assert s.grid == {"lr": [1e-3, 5e-4], "token_nums": [1, 4]}
    assert s.seeds == [42]
    assert s.resources == {"cpus": 1, "gpus": 0.5, "devices": 1}
    assert s.trial["epochs"] == 5
    # a dotted trial key merges into the file's backbone_kwargs instead of replacing them
    assert s.trial["backbone_kwargs"] == {"img_size": 48, "patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3}
    assert s.sweep_dir == tmp_path / "x" / "ci2"
    trials = plan_trials(s)
    assert len(trials) == 2 * 4 * 1
    cfg = trials[0].config
    assert cfg.epochs == 5 and cfg.backbone_kwargs["img_size"] == 48 and cfg.seed == 42
    assert {t.config.lr for t in trials} == {1e-3, 5e-4}


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"name": "x", "datasets": ["dtd"], "bogus": 1}, "unknown key 'bogus'"),
        ({"name": "x", "datasets": ["dtd"], "grid": {"learning_rate": [1]}}, "grid key 'learning_rate'"),
        ({"name": "x", "datasets": ["dtd"], "trial": {"epoch": 3}}, "unknown trial key 'epoch'"),
        ({"name": "x", "datasets": ["dtd"], "resources": {"gpu": 1}}, "unknown key 'gpu' under 'resources'"),
        ({"name": "x", "datasets": ["dtd"], "resources": {"cpus": 0}}, "resources.cpus"),
        ({"name": "x", "datasets": ["dtd"], "protocol": "honest"}, "key 'protocol'"),
        ({"name": "x", "datasets": ["dtd"], "pack": "many"}, "key 'pack'"),
        ({"name": "x", "datasets": []}, "key 'datasets'"),
        ({"name": "x", "datasets": ["dtd"], "seeds": [1, 1]}, "key 'seeds'"),
        ({"name": "x", "datasets": ["dtd"], "grid": {"seed": [1, 2]}}, "grid key 'seed'"),
        ({"name": "x", "datasets": ["dtd"], "per_dataset": {"cifar": {"lr": 1}}}, "per_dataset names 'cifar'"),
        ({"name": "x", "datasets": ["dtd"], "asha": {"max_t": 5}}, "only with protocol: vtab"),
        ({"name": "x", "datasets": ["dtd"], "grid": {"lr": ["fast"]}}, "lr"),
    ],
)
def test_bad_sweep_files_name_key_and_file(tmp_path, data, needle):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        plan_trials(load_sweep(path))
    assert needle in str(err.value)
    assert "s.yaml" in str(err.value)


def test_unknown_key_lists_allowed_keys(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_sweep(_write(tmp_path, {"name": "x", "datasets": ["dtd"], "seed": 3}))
    assert "seeds" in str(err.value) and "storage_path" in str(err.value)
    with pytest.raises(ConfigError, match="command line: unknown key 'nonsense'"):
        load_sweep(CI, ["nonsense=3"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_sweep(CI, ["epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")


def test_group_expansion():
    def ds(entries):
        return expand_datasets(entries)

    assert len(ds(["vtab1k"])) == 19
    assert ds(["natural"]) == ["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"]
    assert len(ds(["specialized"])) == 4 and len(ds(["structured"])) == 8
    assert len(ds(["fgvc"])) == 5
    from synqt.data.synthetic import DEMO_TASKS

    assert ds(["demo"]) == list(DEMO_TASKS) and "syn_count" in ds(["demo"])
    assert ds(["dtd", "natural"])[0] == "dtd" and len(ds(["dtd", "natural"])) == 7  # no duplicates


def test_paper_plan_counts_names_and_precedence(tmp_path):
    data = {
        "name": "p",
        "datasets": ["dtd", "cifar"],
        "protocol": "paper",
        "grid": {"lr": [1e-3, 5e-4], "weight_decay": [1e-2]},
        "seeds": [42, 44],
        "storage_path": str(tmp_path),
        "trial": {"epochs": 7, "warmup_epochs": 1, "ffn_scale": 0.5, "eval_every": 7},
        "per_dataset": {"cifar": {"epochs": 3, "eval_every": 3}},
    }
    s = load_sweep(_write(tmp_path, data))
    trials = plan_trials(s)
    assert len(trials) == 2 * 2 * 2
    assert [t.run_name for t in trials[:3]] == [
        "final-dtd-lr0.001_wd0.01-s42",
        "final-dtd-lr0.001_wd0.01-s44",
        "final-dtd-lr0.0005_wd0.01-s42",
    ]
    assert trials[0].run_dir(s) == tmp_path / "p" / "runs" / "final-dtd-lr0.001_wd0.01-s42"
    dtd = trials[0].config
    cifar = next(t.config for t in trials if t.dataset == "cifar")
    assert dtd.epochs == 7 and cifar.epochs == 3  # per_dataset beats trial
    assert cifar.token_nums == 4 and dtd.token_nums == 1  # shipped per-task settings (spec table)
    assert dtd.ffn_scale == 0.5  # sweep trial beats the shipped config
    assert dtd.protocol == "paper" and dtd.stage == "final"
    assert [t.run_name for t in plan_trials(s)] == [t.run_name for t in trials]  # deterministic


def test_vtab_two_stage_plan_and_selection(tmp_path):
    data = {
        "name": "v",
        "datasets": ["dtd", "cifar"],
        "protocol": "vtab",
        "grid": {"lr": [1e-3, 5e-4, 1e-4]},
        "storage_path": str(tmp_path),
    }
    s = load_sweep(_write(tmp_path, data))
    assert s.seeds == [42, 44, 82, 100, 800]  # vtab default
    search = plan_trials(s)
    assert len(search) == 2 * 3 and {t.seed for t in search} == {42}
    assert all(t.stage == "search" and t.config.stage == "search" and t.config.protocol == "vtab" for t in search)
    # stage-1 results: dtd has a tie between the 2nd and 3rd point -> the earlier grid point wins;
    # cifar's third point diverged (a search result: it takes no part, the others still select)
    accs = {"dtd": [50.0, 70.0, 70.0], "cifar": [90.0, 10.0, None]}
    for t in search:
        acc = accs[t.dataset][[1e-3, 5e-4, 1e-4].index(t.hparams["lr"])]
        d = t.run_dir(s)
        d.mkdir(parents=True)
        status = "ok" if acc is not None else "failed"
        error = None if acc is not None else "non-finite training loss (nan) at epoch 3, step 90"
        (d / "metrics.json").write_text(json.dumps({"dataset": t.dataset, "status": status, "val_acc": acc,
                                                    "error": error}))
    best = select_best(s, search)
    assert best == {"dtd": {"lr": 5e-4}, "cifar": {"lr": 1e-3}}
    final = plan_trials(s, "final")
    assert len(final) == 2 * 5
    assert {t.seed for t in final} == {42, 44, 82, 100, 800}
    assert all(t.stage == "final" and t.config.stage == "final" for t in final)
    assert {t.config.lr for t in final if t.dataset == "dtd"} == {5e-4}
    assert final[0].run_name == "final-dtd-lr0.0005-s42"
    with pytest.raises(ConfigError, match="no search stage"):
        plan_trials(load_sweep(CI), "search")


@pytest.mark.parametrize("kind", ["missing", "raised"])
def test_select_best_never_on_partial_stage1(tmp_path: Path, kind: str) -> None:
    """A dataset with a stage-1 point that did not finish (never wrote metrics, or raised) is not selected."""
    data = {"name": "v", "datasets": ["dtd", "cifar"], "protocol": "vtab", "grid": {"lr": [1e-3, 5e-4]},
            "storage_path": str(tmp_path)}
    s = load_sweep(_write(tmp_path, data))
    search = plan_trials(s)
    unfinished = {"cifar-lr0.0005"}  # cifar's second point: the best of the finished ones is cifar lr=1e-3
    for t in search:
        d = t.run_dir(s)
        d.mkdir(parents=True)
        key = f"{t.dataset}-lr{t.hparams['lr']:g}"
        if key in unfinished:
            if kind == "raised":
                (d / "metrics.json").write_text(json.dumps(
                    {"dataset": t.dataset, "status": "failed", "val_acc": None, "error": "RuntimeError: worker died"}))
            continue
        (d / "metrics.json").write_text(json.dumps({"dataset": t.dataset, "status": "ok",
                                                    "val_acc": 60.0 if "0.001" in key else 40.0}))
    assert stage1_unfinished(s, search) == {"cifar": ["search-cifar-lr0.0005-s42"]}
    assert select_best(s, search) == {"dtd": {"lr": 1e-3}}
    assert [t.dataset for t in plan_trials(s, "final")] == ["dtd"] * 5


def test_random_search_samples_distinct_grid_points(tmp_path):
    data = {
        "name": "r",
        "datasets": ["dtd"],
        "protocol": "vtab",
        "search": "random",
        "num_samples": 3,
        "grid": {"lr": [1e-3, 5e-4, 1e-4], "weight_decay": [1e-2, 1e-4]},
        "storage_path": str(tmp_path),
    }
    s = load_sweep(_write(tmp_path, data))
    pts = grid_points(s)
    assert len(pts) == 3 and len({json.dumps(p) for p in pts}) == 3
    assert pts == grid_points(s)


def test_packs_group_by_pack_key(tmp_path):
    base = {
        "name": "k",
        "datasets": ["dtd", "cifar"],
        "grid": {"lr": [1e-3, 5e-4, 1e-4], "token_nums": [1, 4]},
        "seeds": [42, 44],
        "storage_path": str(tmp_path),
        "resources": {"cpus": 4},
    }
    off = plan_trials(load_sweep(_write(tmp_path, {**base, "pack": "off"})))
    assert len(packs_of(off)) == len(off) == 24
    two = plan_trials(load_sweep(_write(tmp_path, {**base, "pack": 2})))
    packs = packs_of(two)
    # 2 datasets x 2 seeds = 4 pack keys of 6 grid points each -> 3 packs of 2 each
    assert len(packs) == 12 and all(len(p) == 2 for p in packs)
    for p in packs:
        assert len({(t.dataset, t.seed) for t in p}) == 1
    auto = plan_trials(load_sweep(_write(tmp_path, {**base, "pack": "auto"})))
    assert all(len({(t.dataset, t.seed) for t in p}) == 1 for p in packs_of(auto))
    assert len(packs_of(auto)) < 24
    # a fixed data order lets runs that differ only in seed share a pack
    fixed = plan_trials(load_sweep(_write(tmp_path, {**base, "pack": 4, "trial": {"data_seed": 0}})))
    assert any(len({t.seed for t in p}) == 2 for p in packs_of(fixed))
    # different epochs never share a pack
    per = plan_trials(
        load_sweep(
            _write(
                tmp_path,
                {
                    **base,
                    "pack": 12,
                    "datasets": ["dtd"],
                    "per_dataset": {"dtd": {"epochs": 3, "warmup_epochs": 1, "eval_every": 3}},
                },
            )
        )
    )
    assert all(t.config.epochs == 3 for t in per)


def test_auto_pack_size_follows_the_memory_budget(tmp_path):
    base = {
        "name": "m",
        "datasets": ["dtd"],
        "grid": {"weight_decay": [0.1, 0.05, 0.01, 0.005, 1e-3, 5e-4, 1e-4, 0]},
        "pack": "auto",
        "storage_path": str(tmp_path),
    }
    big = load_sweep(_write(tmp_path, {**base, "pack_memory_gb": 1000}))
    small = load_sweep(_write(tmp_path, {**base, "pack_memory_gb": 0.001}))
    cfg = plan_trials(big)[0].config
    assert auto_pack_size(big, cfg) == MAX_AUTO_PACK
    assert auto_pack_size(small, cfg) == 1
    assert estimate_memory(cfg, 4) > estimate_memory(cfg, 1)


def _synqt(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_dry_run_counts_text_and_json(tmp_path, bench_root):
    args = [
        "sweep",
        str(CI),
        f"storage_path={tmp_path}",
        f"data_root={bench_root / 'data'}",
        "datasets=[syn_count,syn_blobs]",
        "--dry-run",
    ]
    out = _synqt(*args)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "8 trial(s) in 4 Ray trial(s)" in text
    assert "syn_count                4" in text and "syn_blobs                4" in text
    assert "cpus=1 gpus=0 devices=1" in text
    # 4 packs x (2 epochs x 50 train800val200 images + 2 evals x 30 test images)
    assert "live: 640 packed, 1,280 if every trial ran alone" in text
    js = _synqt(*args, "--json")
    assert js.returncode == 0, js.stderr
    plan = json.loads(js.stdout)
    assert plan["sweep_dir"] == str(tmp_path / "ci")
    assert len(plan["trials"]) == 8 and plan["stage2_pending"] is False
    assert set(plan["trials"][0]) >= {"index", "run_name", "stage", "dataset", "seed", "hparams", "epochs", "pack"}
    assert not (tmp_path / "ci").exists()  # a dry run writes nothing


def test_vtab_dry_run_shows_both_stages(tmp_path):
    out = _synqt("sweep", "configs/sweeps/vtab1k_search.yaml", f"storage_path={tmp_path}", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "stage search: 76 trial(s)" in out.stdout
    assert "stage final (after stage 1): 95 trial(s)" in out.stdout
    js = json.loads(
        _synqt("sweep", "configs/sweeps/vtab1k_search.yaml", f"storage_path={tmp_path}", "--dry-run", "--json").stdout
    )
    assert js["stage2_pending"] is True and len(js["trials"]) == 76


# Published test-set sizes (VTAB-1k: the VTAB test splits, Zhai et al. 2019, as used by VPT / NOAH / SynQT;
# FGVC: VPT's dataset table, train / val / test), typed here from the papers (issue 21 item 4).
VTAB1K_TEST = {
    "caltech101": 6084, "cifar": 10000, "dtd": 1880, "oxford_flowers102": 6149, "oxford_iiit_pet": 3669,
    "svhn": 26032, "sun397": 21750, "patch_camelyon": 32768, "eurosat": 5400, "resisc45": 6300,
    "diabetic_retinopathy": 42670, "clevr_count": 15000, "clevr_dist": 15000, "dmlab": 22735, "kitti": 711,
    "dsprites_loc": 73728, "dsprites_ori": 73728, "smallnorb_azi": 12150, "smallnorb_ele": 12150,
}  # fmt: skip
FGVC_TRAIN_VAL_TEST = {
    "cub": (5394, 600, 5794), "nabirds": (21536, 2393, 24633), "oxford_flowers": (1020, 1020, 6149),
    "stanford_dogs": (10800, 1200, 8580), "stanford_cars": (7329, 815, 8041),
}  # fmt: skip


def test_the_registry_knows_each_tasks_official_split_sizes():
    from synqt.data.splits import official_split_size

    for task, n in VTAB1K_TEST.items():
        assert official_split_size(task, "test") == n, task
        assert [official_split_size(task, s) for s in ("train800", "val200", "train800val200")] == [800, 200, 1000]
    for task, (train, val, test) in FGVC_TRAIN_VAL_TEST.items():
        assert official_split_size(task, "train800") == train, task
        assert official_split_size(task, "val200") == val, task
        assert official_split_size(task, "train800val200") == train + val, task
        assert official_split_size(task, "test") == test, task
    assert official_split_size("pets", "test") == 3669  # an alias folder has its task's sizes
    assert official_split_size("my_own_data", "test") is None


def _img_line(lines: list[str], task: str) -> str:
    return next(line for line in lines if line.lstrip().startswith(f"{task} ") and "img" in line)


def test_dry_run_without_data_uses_the_official_split_sizes(tmp_path):
    """No data_root: d5b98fd estimated every test set and every FGVC split at ~1000 images (and showed a 6.76 GiB
    cached test set for cifar, whose 10,000 test images run live)."""
    out = _synqt("sweep", "vtab1k", f"storage_path={tmp_path}", "datasets=[cifar,kitti,dsprites_loc,cub]",
                 "--dry-run")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for task in ("cifar", "kitti", "dsprites_loc"):
        line = _img_line(lines, task)
        assert "train800val200 1000 img" in line and f"test {VTAB1K_TEST[task]} img" in line, line
    assert "(live)" in _img_line(lines, "dsprites_loc").split("test")[1]  # 73,728 images: over kv_cache_max_gb
    train, val, test = FGVC_TRAIN_VAL_TEST["cub"]
    cub = _img_line(lines, "cub")
    assert f"train800val200 {train + val} img" in cub and f"test {test} img" in cub, cub
    assert "assumed" not in out.stdout
    # the live count from the published sizes: 50 epochs x train800val200 + 5 evaluations x test, per task
    live = sum(50 * 1000 + 5 * VTAB1K_TEST[t] for t in ("cifar", "kitti", "dsprites_loc"))
    live += 50 * (train + val) + 5 * test
    assert f"{live:,} if every trial ran alone" in out.stdout


def test_vtab_dry_run_counts_both_stages(tmp_path):
    """d5b98fd counted stage 1 only (train800 / val200) and did not say so."""
    out = _synqt("sweep", "vtab1k_search", f"storage_path={tmp_path}", "datasets=[kitti,dtd]", "--dry-run")
    assert out.returncode == 0, out.stderr
    # stage 1: 4 grid points x (50 epochs x 800 + one val200 evaluation); stage 2: 5 seeds x (50 x 1000 + one test)
    stage1 = sum(4 * (50 * 800 + 200) for _ in ("kitti", "dtd"))
    stage2 = sum(5 * (50 * 1000 + VTAB1K_TEST[t]) for t in ("kitti", "dtd"))
    line = next(x for x in out.stdout.splitlines() if x.startswith("estimated images"))
    assert "both stages" in line and f"{stage1 + stage2:,} if every trial ran alone" in line, line
    assert "stage 1:" in line and "stage 2:" in line
    lines = out.stdout.splitlines()
    assert f"test {VTAB1K_TEST['kitti']} img" in _img_line(lines, "kitti (final)")
    assert "train800 800 img" in _img_line(lines, "kitti (search)")


def test_dry_run_of_a_plan_that_would_be_refused_exits_2(tmp_path, bench_root):
    """d5b98fd flagged a misspelled dataset ('<- not a known task') and exited 0."""
    out = _synqt("sweep", "vtab1k", f"storage_path={tmp_path}", "datasets=[cifr]", "--dry-run")
    assert out.returncode == 2 and "did you mean 'cifar'" in out.stderr and "Traceback" not in out.stderr
    assert "trials per dataset" in out.stdout  # the plan is still shown
    # with a data_root: a folder that is not there; a checkpoint that is not there
    ov = [f"storage_path={tmp_path}", f"data_root={bench_root / 'data'}"]
    out = _synqt("sweep", str(CI), *ov, "datasets=[syn_count,syn_nope]", "--dry-run")
    assert out.returncode == 2 and "syn_nope" in out.stderr
    out = _synqt("sweep", str(CI), *ov, "datasets=[syn_count]", f"checkpoint={tmp_path}/none.npz", "--dry-run",
                 "--json")
    assert out.returncode == 2 and "none.npz" in json.loads(out.stdout)["refused"]
    # what is not set yet is a preview, not a refusal (the README's dry runs): no data_root, no checkpoint
    assert _synqt("sweep", "vtab1k", f"storage_path={tmp_path}", "datasets=[cifar]", "--dry-run").returncode == 0
    assert not (tmp_path / "ci").exists() and not (tmp_path / "vtab1k").exists()


def test_alias_and_its_task_in_one_sweep_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"'pets' and 'oxford_iiit_pet' are both the task 'oxford_iiit_pet'"):
        expand_datasets(["pets", "oxford_iiit_pet"])
    with pytest.raises(ConfigError, match=r"'pets' and 'natural' are both the task 'oxford_iiit_pet'"):
        expand_datasets(["pets", "natural"])
    assert expand_datasets(["cifar", "cifar"]) == ["cifar"]  # the same folder twice: one trial set
    out = _synqt("sweep", "vtab1k", "--dry-run", "datasets=[pets,oxford_iiit_pet]", "checkpoint=random",
                 f"storage_path={tmp_path}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "'pets' and 'oxford_iiit_pet' are both the task 'oxford_iiit_pet'" in out.stderr


def test_missing_dataset_and_checkpoint_refused_before_ray(tmp_path, bench_root):
    import ray

    ov = [
        f"storage_path={tmp_path}",
        f"data_root={bench_root / 'data'}",
        f"checkpoint={bench_root / 'ckpt.safetensors'}",
    ]
    with pytest.raises(DataError, match="syn_texture"):
        commands.run_sweep_command(str(CI), [*ov, "datasets=[syn_count,syn_texture]"])
    with pytest.raises(ConfigError, match="nothing.safetensors"):
        commands.run_sweep_command(str(CI), [*ov, "datasets=[syn_count]", f"checkpoint={tmp_path}/nothing.safetensors"])
    assert not ray.is_initialized()
    assert not (tmp_path / "ci").exists()
    # the CLI prints the error without a traceback and exits 2
    out = _synqt("sweep", str(CI), *ov, "datasets=[syn_count,syn_texture]")
    assert out.returncode == 2 and "syn_texture" in out.stderr and "Traceback" not in out.stderr


def test_bad_list_file_refused(tmp_path, bench_root):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(bench_root / "data" / "syn_count", root / "syn_count")
    (root / "syn_count" / "test.json").write_text("{not json")
    with pytest.raises(DataError, match="syn_count"):
        commands.run_sweep_command(
            str(CI),
            [
                f"storage_path={tmp_path}",
                f"data_root={root}",
                "datasets=[syn_count]",
                f"checkpoint={bench_root / 'ckpt.safetensors'}",
            ],
        )


def test_existing_sweep_is_not_overwritten(tmp_path, bench_root):
    import ray

    ov = [
        f"storage_path={tmp_path}",
        f"data_root={bench_root / 'data'}",
        "datasets=[syn_count]",
        f"checkpoint={bench_root / 'ckpt.safetensors'}",
    ]
    (tmp_path / "ci").mkdir()
    (tmp_path / "ci" / "plan.json").write_text("{}")
    with pytest.raises(ConfigError, match="--resume"):
        commands.run_sweep_command(str(CI), ov)
    assert (tmp_path / "ci" / "plan.json").read_text() == "{}"
    with pytest.raises(ConfigError, match="no sweep at"):
        commands.run_sweep_command(str(CI), [*ov, f"storage_path={tmp_path}/other"], resume=True)
    assert not ray.is_initialized()


def test_launcher_sweep_does_not_import_ray():
    code = "import sys, launcher.plan, launcher.run.stages; assert 'ray' not in sys.modules, 'ray imported'"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_sequential_refuses_asha_before_anything_runs(tmp_path, bench_root):
    ov = [
        f"storage_path={tmp_path}",
        f"data_root={bench_root / 'data'}",
        "datasets=[syn_count]",
        f"checkpoint={bench_root / 'ckpt.safetensors'}",
        "protocol=vtab",
        "asha.max_t=2",
        "asha.grace_period=1",
    ]
    with pytest.raises(ConfigError, match="asha needs Ray Tune"):
        commands.run_sweep_command(str(CI), ov, sequential=True)
    assert not (tmp_path / "ci").exists()


SHIPPED_SWEEPS = sorted((Path(__file__).resolve().parent.parent / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_SWEEPS, ids=[p.stem for p in SHIPPED_SWEEPS])
def test_every_shipped_sweep_dry_runs(path, tmp_path):
    """`synqt sweep FILE --dry-run` plans every shipped sweep; the trial count is recomputed from the file."""
    raw = yaml.safe_load(path.read_text())
    configs = path.parent.parent
    per_group = {"vtab1k": len(list((configs / "vtab").glob("*.yaml"))),
                 "fgvc": len(list((configs / "fgvc").glob("*.yaml"))), "demo": 6}
    n_datasets = sum(per_group.get(d, 1) for d in raw["datasets"])
    n_points = 1
    for values in (raw.get("grid") or {}).values():
        n_points *= len(values)
    if raw.get("search") == "random":
        n_points = min(n_points, raw["num_samples"])
    seeds = raw.get("seeds") or ([42] if raw.get("protocol", "paper") == "paper" else [42, 44, 82, 100, 800])
    stage1 = n_datasets * n_points * (len(seeds) if raw.get("protocol", "paper") == "paper" else 1)
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "sweep", str(path), f"storage_path={tmp_path}",
                          "--dry-run", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert len(plan["trials"]) == stage1
    assert len({t["run_name"] for t in plan["trials"]}) == stage1
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def _estimate(out: str) -> dict[str, int]:
    import re

    line = next(x for x in out.splitlines() if x.startswith("estimated images through the backbone"))
    nums = [int(n.replace(",", "")) for n in re.findall(r"(\d[\d,]*) (?:as planned|packed|if every)", line)]
    return dict(zip(("planned", "packed", "unpacked"), nums, strict=True))


def test_dry_run_counts_images_through_the_backbone_with_the_kv_cache_and_deferred_evaluation(demo_assets, tmp_path):
    """The CI sweep (2 datasets x 2 lr x 2 seeds, 2 epochs, an evaluation every epoch, packs of the 2 lr): the
    expected counts are computed here from the list files. Cached: each split passes the backbone once per
    dataset; live with deferred evaluation: every epoch's train images plus one pass over the test images per
    pack; live and periodic: one test pass per evaluation epoch; alone: twice that (two trials per pack)."""
    data_root, ckpt = demo_assets
    sizes = {d: (len(json.loads((data_root / d / "train800val200.json").read_text())),
                 len(json.loads((data_root / d / "test.json").read_text())))
             for d in ("syn_colour_shape", "syn_count")}
    base = ["sweep", "configs/sweeps/ci.yaml", f"storage_path={tmp_path}", f"data_root={data_root}",
            f"checkpoint={ckpt}", "--dry-run"]
    seeds, epochs, evals = 2, 2, 2
    packed = sum(seeds * (epochs * tr + evals * te) for tr, te in sizes.values())
    expected = {
        "kv_cache=auto": sum(tr + te for tr, te in sizes.values()),
        "kv_cache=off": sum(seeds * (epochs * tr + te) for tr, te in sizes.values()),
        "deferred_eval=false": packed,
    }
    for override, planned in expected.items():
        extra = [override, "kv_cache=off"] if override == "deferred_eval=false" else [override]
        out = _synqt(*base, *extra)
        assert out.returncode == 0, out.stderr
        assert _estimate(out.stdout) == {"planned": planned, "packed": packed, "unpacked": 2 * packed}, override


def test_a_misspelled_dataset_is_pointed_at_its_known_name(tmp_path):
    """'cifarr' is no registered task or alias: the dry run marks it and exits 2 (the sweep would be refused: issue
    21 item 4), and the real start, whose data folder is missing, names the close registered task; a registered
    name gets no hint."""
    out = _synqt("sweep", "vtab1k", "datasets=[cifarr,dtd]", f"storage_path={tmp_path}", "--dry-run")
    assert out.returncode == 2 and "did you mean 'cifar'" in out.stderr, out.stderr
    lines = out.stdout.splitlines()
    assert "not a known task (did you mean 'cifar'?)" in next(x for x in lines if x.lstrip().startswith("cifarr "))
    assert "did you mean" not in next(x for x in lines if x.lstrip().startswith("dtd "))
    (tmp_path / "data").mkdir()
    out = _synqt("sweep", "vtab1k", "datasets=[cifarr]", f"storage_path={tmp_path}", "checkpoint=random",
                 f"data_root={tmp_path / 'data'}")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"folder {tmp_path / 'data' / 'cifarr'} does not exist" in out.stderr
    assert "(did you mean 'cifar'?)" in out.stderr
