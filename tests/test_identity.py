"""Issue 20, kind 1: two different trials are never counted as one.

A trial's identity is every key that can change its result (``synqt.config.RESULT_KEYS``, the list the
resume check compares), the backbone weights by content. Runs that differ in it are different rows in
``synqt aggregate``, ``synqt status`` and ``synqt compare``, and stage-2 selection never takes another
configuration's result for a planned trial's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from engine_helpers import (  # noqa: F401 - _one_thread_no_progress is an autouse fixture
    TASK,
    TINY_BACKBONE,
    TINY_KW,
    _one_thread_no_progress,
    read_json,
    write_tiny_assets,
)

from launcher.cli import main

COMMON = [f"backbone={TINY_BACKBONE}", *[f"backbone_kwargs.{k}={v}" for k, v in TINY_KW.items()], "epochs=2",
          "warmup_epochs=1", "batch_size=16", "eval_every=1", "device=cpu", "seed=42", "kv_cache=off"]


@pytest.fixture(scope="module")
def hand_runs(tmp_path_factory):
    """Three hand-run `synqt train` trials of one task and seed: the tiny backbone file, checkpoint=random, and
    the backbone file with backbone_drop_path=false; plus an exact copy of the first (a duplicate)."""
    root = tmp_path_factory.mktemp("ident")
    data_root, ckpt = write_tiny_assets(root)
    runs = root / "runs"
    variants = {"ckpt": [f"checkpoint={ckpt}", "backbone_drop_path=true"],
                "random": ["checkpoint=random", "backbone_drop_path=true"],
                "nodrop": [f"checkpoint={ckpt}", "backbone_drop_path=false"]}
    for name, extra in variants.items():
        code = main(["train", "--dataset", TASK, "--data-root", str(data_root), "--out", str(runs / name),
                     *COMMON, *extra, f"cache_dir={root / 'cache'}"])
        assert code == 0
    shutil.copytree(runs / "ckpt", root / "copy" / "ckpt")  # the same trial twice: counted once
    return root, runs


def test_aggregate_shows_each_configuration_as_its_own_row(hand_runs, tmp_path):
    from launcher.results.aggregate import aggregate

    _, runs = hand_runs
    test_acc = {name: read_json(runs / name / "metrics.json")["test_acc"] for name in ("ckpt", "random", "nodrop")}
    results = aggregate(runs, out_dir=tmp_path)
    rows = {k: d for k, d in results["datasets"].items() if d["task"] == TASK}
    assert len(rows) == 3, list(rows)
    by_label = {}
    for key, d in rows.items():
        assert d["status"] == "ok" and d["n_runs"] == 1 and d["seeds"] == [42]
        assert set(d["configuration"]) == {"checkpoint", "backbone_drop_path"}, d["configuration"]
        by_label[(d["configuration"]["checkpoint"].split(" ")[0], d["configuration"]["backbone_drop_path"])] = d
        assert key.startswith(f"{TASK} [") and "checkpoint=" in key and "backbone_drop_path=" in key
    assert by_label[("random", "True")]["accuracy"] == pytest.approx(test_acc["random"])
    assert by_label[("tiny_backbone.safetensors", "True")]["accuracy"] == pytest.approx(test_acc["ckpt"])
    assert by_label[("tiny_backbone.safetensors", "False")]["accuracy"] == pytest.approx(test_acc["nodrop"])
    # no run is a duplicate of another, and a mean over the task would mix trials: left empty, with the reason
    assert results["runs"]["superseded"] == []
    assert results["mean_of_tasks"] is None
    assert results["configurations"][0]["differ_in"] == ["backbone_drop_path", "checkpoint"]
    table = (tmp_path / "results.md").read_text()
    for key in rows:
        assert f"| {key} |" in table
    assert "several configurations" in table
    runs_csv = (tmp_path / "runs.csv").read_text()
    assert runs_csv.count(f"{TASK} [") == 3


def test_an_exact_copy_is_still_one_trial(hand_runs):
    from launcher.results.aggregate import build_results

    root, runs = hand_runs
    both = root / "both"
    if not both.exists():
        shutil.copytree(runs, both / "runs")
        shutil.copytree(root / "copy", both / "copy")
    results = build_results(both)
    assert len([d for d in results["datasets"].values() if d["task"] == TASK]) == 3
    superseded = results["runs"]["superseded"]
    assert len(superseded) == 1 and Path(superseded[0]["path"]).name == "ckpt"


def test_status_counts_each_configuration(hand_runs):
    from launcher.results.status import collect_status, status_text

    _, runs = hand_runs
    st = collect_status(runs)
    assert st["counts"]["done"] == 3 and st["superseded"] == []
    assert "duplicates" not in status_text(runs, st)


def test_compare_keeps_the_configurations_apart(hand_runs, tmp_path):
    from launcher.results.compare import load_source

    _, runs = hand_runs
    (src,) = load_source(str(runs))
    assert len(src.acc) == 3
    expected = sorted(read_json(runs / n / "metrics.json")["test_acc"] for n in ("ckpt", "random", "nodrop"))
    assert sorted(src.acc.values()) == pytest.approx(expected)


def test_identity_is_every_result_key_and_the_checkpoint_by_content(tmp_path):
    """The identity compares exactly the keys the resume check compares; the checkpoint by content, so the same
    file under two paths is one trial and another file under one name is another."""
    from synqt.config import CONFIG_KEYS, RESULT_KEYS, RESULT_NEUTRAL_KEYS, TrialConfig, config_to_dict
    from synqt.run.rundir import trial_identity
    from synqt.weights.compat import config_changes

    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    a.write_bytes(b"weights-1")
    shutil.copy(a, b)
    base = config_to_dict(TrialConfig(checkpoint=str(a), seed=42))
    alternatives = {"dataset": "x", "data_root": "/elsewhere", "group": "Natural", "layout": "vtab_txt",
                    "num_classes": 3, "image_size": 64, "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5],
                    "std": [0.5, 0.5, 0.5], "backbone": "vit_small_patch16_224", "backbone_kwargs": {"img_size": 32},
                    "checkpoint": "random", "drop_path_rate": 0.2, "backbone_drop_path": False, "token_nums": 2,
                    "feat_scale": 2.0, "attn_scale": 2.0, "ffn_scale": 2.0, "memory_mode": "recompute",
                    "branch_dropout": 0.2, "branch_attn_dropout": 0.2, "head_drop_path": 0.2, "kv_cache": "off",
                    "kv_cache_dtype": "fp32", "kv_cache_max_gb": 1.0, "deferred_eval": False, "protocol": "vtab",
                    "stage": "search", "epochs": 7, "warmup_epochs": 3.0, "lr": 0.5, "min_lr": 1e-7,
                    "weight_decay": 0.5, "batch_size": 8, "grad_accum_steps": 2, "eval_every": 3,
                    "precision": "bf16", "seed": 1, "data_seed": 5, "init_seed": 6, "trainer": "deepspeed",
                    "num_devices": 2, "deepspeed_config": "/x.json", "device": "cpu",
                    "cache_dir": "/c", "eval_batch_size": 3, "checkpoint_every": 4, "log_every": 2}
    assert set(alternatives) == set(CONFIG_KEYS)  # a new key: add it here
    for key, value in alternatives.items():
        other = {**base, key: value}
        if key == "stage":  # the paper protocol ignores stage (splits_for): compare under vtab
            base_v, other = {**base, "protocol": "vtab"}, {**base, "protocol": "vtab", key: value}
        else:
            base_v = base
        changed = trial_identity(base_v) != trial_identity(other)
        assert changed == (key not in RESULT_NEUTRAL_KEYS), key
        assert changed == bool(config_changes(base_v, other)), key  # the resume check's list
    assert set(RESULT_KEYS) == set(CONFIG_KEYS) - RESULT_NEUTRAL_KEYS
    # the same bytes under another path: one trial; other bytes under the first path: another trial
    assert trial_identity(base) == trial_identity({**base, "checkpoint": str(b)})
    before = trial_identity(base)
    a.write_bytes(b"weights-2-longer")
    assert trial_identity(base) != before
    assert trial_identity(base, checkpoint_sha256="ab") == trial_identity({**base, "checkpoint": "/gone"}, "ab")


def test_stage2_selection_never_takes_another_configurations_result(tmp_path):
    """A stage-1 run directory holding a result of another configuration (other backbone weights, same names)
    is not the planned trial's result: its dataset is held back instead of selected on it."""
    import yaml

    from launcher.plan.schema import load_sweep
    from launcher.plan.trials import plan_trials, select_best, stage1_unfinished
    from synqt.config import config_to_dict

    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"weights")
    data = {"name": "v", "datasets": ["syn_count", "syn_blobs"], "protocol": "vtab", "seeds": [42],
            "grid": {"lr": [1e-3, 1e-2]}, "storage_path": str(tmp_path), "checkpoint": str(ckpt),
            "data_root": str(tmp_path / "data")}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    s = load_sweep(tmp_path / "s.yaml")
    trials = plan_trials(s, "search")
    import hashlib

    sha = hashlib.sha256(b"weights").hexdigest()
    for i, t in enumerate(trials):
        d = t.run_dir(s)
        d.mkdir(parents=True)
        other = t.dataset == "syn_blobs" and t.hparams["lr"] == 1e-2  # trained on other weights, same path
        (d / "metrics.json").write_text(json.dumps({
            "dataset": t.dataset, "protocol": "vtab", "stage": "search", "seed": 42, "hparams": t.hparams,
            "status": "ok", "val_acc": 50.0 + i, "config": config_to_dict(t.config),
            "provenance": {"backbone_checkpoint_sha256": "0" * 64 if other else sha}}))
    assert stage1_unfinished(s, trials) == {"syn_blobs": ["search-syn_blobs-lr0.01-s42"]}
    assert select_best(s, trials) == {"syn_count": {"lr": 1e-2}}


def test_a_resumed_sweep_reruns_a_finished_trial_whose_weights_file_changed(tmp_path, capsys):
    """The same checkpoint path with other content is another trial: `--resume` moves the old result aside
    and reruns it, instead of keeping a result trained on other weights."""
    import hashlib

    import yaml

    from launcher.plan.resume import reconcile
    from launcher.plan.schema import load_sweep
    from launcher.plan.trials import plan_trials
    from synqt.config import config_to_dict, save_config

    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"weights-v1")
    data = {"name": "r", "datasets": ["syn_count", "syn_blobs"], "seeds": [42], "storage_path": str(tmp_path),
            "checkpoint": str(ckpt), "data_root": str(tmp_path / "data")}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    s = load_sweep(tmp_path / "s.yaml")
    trials = plan_trials(s)
    for t in trials:
        d = t.run_dir(s)
        d.mkdir(parents=True)
        save_config(t.config, d / "config.yaml")
        (d / "metrics.json").write_text(json.dumps({
            "dataset": t.dataset, "protocol": "paper", "stage": "final", "seed": 42, "hparams": t.hparams,
            "status": "ok", "test_acc": 50.0, "config": config_to_dict(t.config),
            "provenance": {"backbone_checkpoint_sha256": hashlib.sha256(b"weights-v1").hexdigest()}}))
    assert reconcile(s, trials, "final").kept_finished == [t.run_name for t in trials]
    ckpt.write_bytes(b"weights-v2")  # re-downloaded other weights under the same name
    out = reconcile(s, trials, "final")
    assert [name for name, _, _ in out.changed] == [t.run_name for t in trials] and out.kept_finished == []
    assert "checkpoint: sha256:" + hashlib.sha256(b"weights-v1").hexdigest() in out.changed[0][1]
    assert not trials[0].run_dir(s).exists()
