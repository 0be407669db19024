"""Packed trials (issue 7): k query branches over one frozen image stream end exactly as k solo trials.

CPU, tiny ViT, fp32, no stochastic depth on the frozen stream (the query branches keep their own
dropout and drop path, drawn from per-branch generators).
"""

from __future__ import annotations

import math
import shutil

import pytest
from engine_helpers import (  # noqa: F401 - _one_thread_no_progress is an autouse fixture
    N_TRAIN,
    N_VAL,
    Interrupt,
    _one_thread_no_progress,
    comparable,
    file_kinds,
    interrupt_after,
    max_weight_diff,
    quiet_single_thread,
    read_json,
    scalar_steps,
    tiny_cfg,
    trainable_tensors,
    write_tiny_assets,
)

from synqt.errors import ConfigError
from synqt.training import run_pack, run_trial

# four branches that differ in every per-branch setting: token_nums, the three scales, lr, weight decay
SETTINGS = [
    dict(token_nums=1, feat_scale=1.0, attn_scale=0.1, ffn_scale=0.1, lr=1e-3, weight_decay=1e-2),
    dict(token_nums=2, feat_scale=0.5, attn_scale=1.0, ffn_scale=0.5, lr=3e-3, weight_decay=0.0),
    dict(token_nums=1, feat_scale=2.0, attn_scale=0.5, ffn_scale=1.0, lr=5e-4, weight_decay=5e-2),
    dict(token_nums=3, feat_scale=1.0, attn_scale=0.2, ffn_scale=0.3, lr=2e-3, weight_decay=1e-3),
]
TOL = 1e-5  # issue 7: max abs difference of trainable weights
STEPS = math.ceil((N_TRAIN + N_VAL) / 16) * 3


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack_assets")
    data_root, ckpt = write_tiny_assets(root)
    return data_root, ckpt, root / "cache"


def _cfgs(assets, settings=SETTINGS):
    data_root, ckpt, cache = assets
    return [tiny_cfg(data_root, ckpt, cache, backbone_drop_path=False, precision="no", **s) for s in settings]


@pytest.fixture(scope="module")
def solo(assets, tmp_path_factory):
    """Each setting trained alone: list of (run_dir, metrics)."""
    root = tmp_path_factory.mktemp("solo")
    out = []
    with quiet_single_thread():
        for i, cfg in enumerate(_cfgs(assets)):
            out.append((root / f"b{i}", run_trial(cfg, root / f"b{i}", resume=False)))
    return out


@pytest.fixture(scope="module")
def packed(assets, tmp_path_factory):
    """The four settings trained as one pack: list of (run_dir, metrics)."""
    root = tmp_path_factory.mktemp("packed")
    dirs = [root / f"b{i}" for i in range(len(SETTINGS))]
    with quiet_single_thread():
        results = run_pack(_cfgs(assets), dirs, resume=False)
    return list(zip(dirs, results, strict=True))


def test_pack_of_four_ends_equal_to_four_solo_runs(solo, packed):
    for i, ((solo_dir, solo_m), (pack_dir, pack_m)) in enumerate(zip(solo, packed, strict=True)):
        assert solo_m["status"] == pack_m["status"] == "ok", (i, solo_m["error"], pack_m["error"])
        assert comparable(pack_m) == comparable(solo_m), f"branch {i}"
        diff = max_weight_diff(solo_dir, pack_dir)
        assert diff <= TOL, f"branch {i}: trainable weights differ by {diff:.3g}"
        assert pack_m["provenance"]["packed_with"] == len(SETTINGS) and solo_m["provenance"]["packed_with"] == 1
    # the settings took effect: each branch has its own shapes and ends somewhere else
    assert [tuple(trainable_tensors(d)["queries"].shape)[1] for d, _ in packed] == [s["token_nums"] for s in SETTINGS]
    assert max_weight_diff(packed[0][0], packed[2][0]) > 1e-3


def test_every_branch_leaves_exactly_the_files_of_a_solo_run(solo, packed):
    for (solo_dir, _), (pack_dir, _) in zip(solo, packed, strict=True):
        assert file_kinds(pack_dir) == file_kinds(solo_dir)
        assert {"config.yaml", "metrics.json", "events.out.tfevents.*", "trainable.safetensors"} <= file_kinds(pack_dir)
        for tag in ("train/loss", "train/lr", "train/epoch", "eval/test_acc", "perf/images_per_s",
                    "perf/process_peak_cpu_rss_mib"):
            assert scalar_steps(pack_dir, tag) == scalar_steps(solo_dir, tag), tag
        assert (pack_dir / "config.yaml").read_text() == (solo_dir / "config.yaml").read_text()


def test_a_nan_branch_fails_alone_and_its_pack_mates_finish_unchanged(assets, solo, tmp_path):
    nan = dict(SETTINGS[0], lr=1e38)
    cfgs = _cfgs(assets, [SETTINGS[0], nan, SETTINGS[1]])
    dirs = [tmp_path / "ok0", tmp_path / "nan", tmp_path / "ok1"]
    results = run_pack(cfgs, dirs)
    assert [m["status"] for m in results] == ["ok", "failed", "ok"]
    assert "non-finite training loss" in results[1]["error"]
    assert read_json(dirs[1] / "metrics.json")["status"] == "failed"
    assert not (dirs[1] / "trainable.safetensors").exists()
    for pack_dir, m, (solo_dir, solo_m) in ((dirs[0], results[0], solo[0]), (dirs[2], results[2], solo[1])):
        assert comparable(m) == comparable(solo_m)
        assert max_weight_diff(solo_dir, pack_dir) <= TOL


def test_interrupted_pack_resumes_unfinished_branches_and_skips_finished_ones(assets, solo, packed, tmp_path):
    dirs = [tmp_path / f"b{i}" for i in range(len(SETTINGS))]
    shutil.copytree(solo[0][0], dirs[0])  # branch 0 already finished (e.g. by an earlier attempt)
    finished_metrics = (dirs[0] / "metrics.json").read_bytes()
    finished_files = sorted(p.name for p in dirs[0].iterdir())

    with pytest.raises(Interrupt):
        run_pack(_cfgs(assets), dirs, report=interrupt_after(2))
    for d in dirs[1:]:
        assert (d / "resume.pt").is_file() and read_json(d / "progress.json")["epoch"] == 2

    results = run_pack(_cfgs(assets), dirs, resume=True)
    assert [m["status"] for m in results] == ["ok"] * len(SETTINGS)
    for i, (d, m) in enumerate(zip(dirs, results, strict=True)):
        ref_dir, ref_m = packed[i]
        assert comparable(m) == comparable(ref_m), f"branch {i}"
        assert max_weight_diff(ref_dir, d) <= TOL, f"branch {i}"
        assert not (d / "resume.pt").exists() and not (d / "progress.json").exists()
    for d in dirs[1:]:  # resumed, not restarted: every optimizer step logged once over both attempts
        assert sorted(scalar_steps(d, "train/lr")) == list(range(1, STEPS + 1))
    # the finished branch was skipped: not retrained, not rewritten
    assert (dirs[0] / "metrics.json").read_bytes() == finished_metrics
    assert sorted(p.name for p in dirs[0].iterdir()) == finished_files


def test_pack_refuses_trials_that_cannot_share_batches(assets, tmp_path):
    data_root, ckpt, cache = assets
    a = _cfgs(assets, SETTINGS[:1])[0]
    b = tiny_cfg(data_root, ckpt, cache, backbone_drop_path=False, batch_size=32)
    with pytest.raises(ConfigError, match="batch_size"):
        run_pack([a, b], [tmp_path / "a", tmp_path / "b"])
