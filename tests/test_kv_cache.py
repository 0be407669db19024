"""The frozen-stream K/V cache and deferred evaluation (issue 15), on a tiny ViT on CPU.

Reference for every exactness test: the same trial with ``kv_cache=off`` (the live image stream),
``backbone_drop_path=false``, fp32 cache storage. Tolerance for trainable weights: 1e-5 (issue 15).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import (  # noqa: F401 - _one_thread_no_progress is an autouse fixture
    N_TEST,
    N_TRAIN,
    N_VAL,
    Interrupt,
    _one_thread_no_progress,
    comparable,
    event_accumulator,
    interrupt_after,
    max_weight_diff,
    quiet_single_thread,
    read_json,
    tiny_cfg,
    write_tiny_assets,
)

from synqt.config import load_config
from synqt.errors import ConfigError
from synqt.training import run_pack, run_trial

TOL = 1e-5
# three branches of different shape and optimiser settings for the pack tests
PACK = [
    dict(token_nums=1, feat_scale=1.0, attn_scale=0.1, ffn_scale=0.1, lr=1e-3),
    dict(token_nums=2, feat_scale=0.5, attn_scale=1.0, ffn_scale=0.5, lr=3e-3),
    dict(token_nums=3, feat_scale=1.0, attn_scale=0.2, ffn_scale=0.3, lr=2e-3),
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("kv_assets")
    data_root, ckpt = write_tiny_assets(root)
    return data_root, ckpt, root


def _cfg(assets, cache_name: str = "cache", **kw):
    data_root, ckpt, root = assets
    base = dict(backbone_drop_path=False, precision="no", kv_cache_dtype="fp32", epochs=4, eval_every=2)
    base.update(kw)
    return tiny_cfg(data_root, ckpt, root / cache_name, **base)


def _run(cfg, run_dir: Path, **kw) -> dict:
    with quiet_single_thread():
        return run_trial(cfg, run_dir, resume=kw.pop("resume", False), **kw)


def _builds(cache_dir: Path) -> list[list[str]]:
    log = cache_dir / "kv" / "builds.log"
    return [line.split("\t") for line in log.read_text().splitlines()] if log.is_file() else []


@pytest.fixture(scope="module")
def live(assets, tmp_path_factory):
    d = tmp_path_factory.mktemp("live") / "run"
    return d, _run(_cfg(assets, kv_cache="off"), d)


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cached_trial_ends_equal_to_the_live_trial(assets, live, tmp_path, mode):
    live_dir, live_metrics = live
    cfg = _cfg(assets, f"cache-{mode}", kv_cache=mode)
    metrics = _run(cfg, tmp_path / "run")
    assert metrics["status"] == "ok"
    assert metrics["eval_history"] == live_metrics["eval_history"]
    assert [e["epoch"] for e in metrics["eval_history"]] == [2, 4]
    assert metrics["test_acc"] == live_metrics["test_acc"]
    assert comparable(metrics) == comparable(live_metrics)
    assert max_weight_diff(live_dir, tmp_path / "run") <= TOL
    builds = _builds(Path(cfg.cache_dir))
    if mode == "disk":  # one build per split, read back memory-mapped
        assert sorted(b[3] for b in builds) == ["test", "train800val200"]
        arr = np.load(next((Path(cfg.cache_dir) / "kv").glob("*train800val200*.kv.npy")), mmap_mode="r")
        assert arr.shape == (N_TRAIN + N_VAL, 2, 2, 2, 5, 16) and arr.dtype == np.float32  # [n, L, 2, H, N, d]
    else:  # a memory cache writes nothing to disk
        assert builds == []


def test_pack_of_three_cached_ends_equal_to_the_live_pack(assets, tmp_path):
    cfgs_live = [_cfg(assets, kv_cache="off", **s) for s in PACK]
    cfgs_disk = [_cfg(assets, "cache-pack", kv_cache="disk", **s) for s in PACK]
    with quiet_single_thread():
        a = run_pack(cfgs_live, [tmp_path / f"live{i}" for i in range(3)], resume=False)
        b = run_pack(cfgs_disk, [tmp_path / f"disk{i}" for i in range(3)], resume=False)
    for i in range(3):
        assert a[i]["status"] == b[i]["status"] == "ok"
        assert comparable(a[i]) == comparable(b[i])
        assert max_weight_diff(tmp_path / f"live{i}", tmp_path / f"disk{i}") <= TOL
    # the three branches differ (a pack that trained one branch three times would pass the test above too)
    assert max_weight_diff(tmp_path / "disk0", tmp_path / "disk2") > 1e-3 or a[0]["trainable_params"] != a[2][
        "trainable_params"]


def test_resumed_cached_run_equals_an_uninterrupted_one(assets, live, tmp_path):
    live_dir, live_metrics = live
    cfg = _cfg(assets, "cache-resume", kv_cache="disk")
    run = tmp_path / "run"
    with pytest.raises(Interrupt), quiet_single_thread():
        run_trial(cfg, run, resume=False, report=interrupt_after(3))
    # epoch 2's evaluation is deferred: its weight snapshot waits on disk, listed in resume.pt
    assert (run / "eval_snapshots" / "epoch00002.safetensors").is_file()
    assert [tuple(p)[0] for p in torch.load(run / "resume.pt", weights_only=True)["pending_evals"]] == [2]
    metrics = _run(cfg, run, resume=True)
    assert comparable(metrics) == comparable(live_metrics)
    assert max_weight_diff(live_dir, run) <= TOL
    assert not (run / "eval_snapshots").exists()


@pytest.mark.parametrize("kv_cache", ["off", "disk"])
def test_deferred_evaluation_reproduces_periodic_evaluation(assets, tmp_path, kv_cache):
    common = dict(kv_cache=kv_cache, epochs=5, eval_every=1)
    periodic = _run(_cfg(assets, "cache-defer", deferred_eval=False, **common), tmp_path / "periodic")
    deferred = _run(_cfg(assets, "cache-defer", deferred_eval=True, **common), tmp_path / "deferred")
    assert [e["epoch"] for e in deferred["eval_history"]] == [1, 2, 3, 4, 5]
    assert deferred["eval_history"] == periodic["eval_history"]  # exactly, not approximately
    assert deferred["best_of_test"] == periodic["best_of_test"] and deferred["test_acc"] == periodic["test_acc"]
    assert len({e["acc"] for e in deferred["eval_history"]}) > 1  # the five snapshots really differ
    # TensorBoard (its own reader): the deferred run's test accuracies at the steps and values the periodic
    # run wrote them (x: the optimizer step at the end of each evaluation epoch, 4 steps per epoch)
    events = [(e.step, round(e.value, 6)) for e in event_accumulator(tmp_path / "deferred").Scalars("eval/test_acc")]
    assert events == [(e.step, round(e.value, 6)) for e in event_accumulator(tmp_path / "periodic").Scalars(
        "eval/test_acc")]
    assert events == [(4 * h["epoch"], round(h["acc"], 6)) for h in periodic["eval_history"]]
    assert not (tmp_path / "deferred" / "eval_snapshots").exists()  # tiny files, deleted after use


def test_two_trials_started_together_build_the_cache_once(assets, tmp_path):
    data_root, ckpt, _ = assets
    cache = tmp_path / "shared-cache"
    start = time.time() + 12.0  # both processes import torch first, then start their trial at the same moment
    script = textwrap.dedent(f"""
        import logging, sys, time, torch
        logging.basicConfig(level=logging.INFO)
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        torch.set_num_threads(1)
        from engine_helpers import tiny_cfg
        from synqt.training import run_trial
        from pathlib import Path
        cfg = tiny_cfg(Path({str(data_root)!r}), Path({str(ckpt)!r}), Path({str(cache)!r}), backbone_drop_path=False,
                       kv_cache="disk", kv_cache_dtype="fp32", epochs=2, eval_every=2, seed=int(sys.argv[2]))
        time.sleep(max(0.0, {start!r} - time.time()))
        m = run_trial(cfg, Path(sys.argv[1]), resume=False)
        print("STATUS", m["status"])
    """)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "SYNQT_NO_PROGRESS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"run{i}"), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all("STATUS ok" in o for o in outs), outs
    builds = _builds(cache)
    assert sorted(b[3] for b in builds) == ["test", "train800val200"], builds  # one build per split, not two
    # both trials read that one cache (different seeds, same data): each logged it
    assert all("K/V cache syn_count/train800val200" in o for o in outs), outs


def _only_cache(cache_dir: Path, split: str) -> tuple[Path, Path]:
    data = next((cache_dir / "kv").glob(f"*-{split}-*.kv.npy"))
    return data, data.with_name(data.name.replace(".kv.npy", ".kv.json"))


@pytest.mark.parametrize("damage", ["corrupt", "foreign", "no_manifest"])
def test_corrupt_or_foreign_cache_is_rebuilt_not_read(assets, live, tmp_path, damage, caplog):
    live_dir, live_metrics = live
    cfg = _cfg(assets, "cache-damage-" + damage, kv_cache="disk")
    _run(cfg, tmp_path / "first")
    data, manifest = _only_cache(Path(cfg.cache_dir), "train800val200")
    if damage == "corrupt":  # garbage in the last image's K/V (a sampled row)
        arr = np.load(data, mmap_mode="r+")
        arr[-1] = 1e3
        arr.flush()
        del arr
    elif damage == "foreign":  # a manifest claiming another backbone
        meta = json.loads(manifest.read_text())
        meta["identity"]["backbone"]["name"] = "someone_else"
        manifest.write_text(json.dumps(meta))
    else:
        manifest.unlink()
    caplog.set_level(logging.WARNING, logger="synqt.training.kv_cache")
    metrics = _run(cfg, tmp_path / "second")
    assert "rebuilding it" in caplog.text
    assert [b[3] for b in _builds(Path(cfg.cache_dir))].count("train800val200") == 2
    assert comparable(metrics) == comparable(live_metrics)  # the damaged values were never read
    assert max_weight_diff(live_dir, tmp_path / "second") <= TOL


@pytest.mark.parametrize("package", ["torch", "timm"])
def test_a_cache_written_under_another_torch_or_timm_is_rebuilt(assets, tmp_path, package, monkeypatch):
    """The frozen blocks run through torch's kernels and timm's modules: a cache from another version of either
    is not mixed with this one's stream (one build per split per version, as counted in builds.log)."""
    import importlib.metadata

    cfg = _cfg(assets, "cache-versions-" + package, kv_cache="disk", epochs=1, eval_every=1)
    assert _run(cfg, tmp_path / "first")["status"] == "ok"
    if package == "torch":
        monkeypatch.setattr(torch, "__version__", "0.0.1-another")
    else:
        real = importlib.metadata.version
        monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.1" if name == "timm" else real(name))
    assert _run(cfg, tmp_path / "second")["status"] == "ok"
    builds = [b[3] for b in _builds(Path(cfg.cache_dir))]
    assert builds.count("train800val200") == 2 and builds.count("test") == 2, builds


def test_cache_over_budget_falls_back_to_live_with_one_message(assets, live, tmp_path, caplog):
    live_dir, live_metrics = live
    cfg = _cfg(assets, "cache-budget", kv_cache="disk", kv_cache_max_gb=1e-6)  # ~1 KiB: nothing fits
    caplog.set_level(logging.INFO, logger="synqt.training.kv_cache")
    metrics = _run(cfg, tmp_path / "run")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "kv_cache_max_gb=1e-06" in w]) == 2  # once per split, naming the budget
    assert "train800val200" in warnings[0] and "live image stream" in warnings[0]
    assert comparable(metrics) == comparable(live_metrics)
    assert not (Path(cfg.cache_dir) / "kv").exists()


def test_auto_runs_live_with_stochastic_depth_and_says_why_once(assets, tmp_path, caplog):
    cfg = _cfg(assets, "cache-auto", kv_cache="auto", backbone_drop_path=True, epochs=1)
    caplog.set_level(logging.INFO, logger="synqt.training.kv_cache")
    assert _run(cfg, tmp_path / "run")["status"] == "ok"
    said = [r.getMessage() for r in caplog.records if "backbone_drop_path=true" in r.getMessage()]
    assert len(said) == 1 and "live" in said[0]
    assert not (Path(cfg.cache_dir) / "kv").exists()


def test_cache_with_backbone_drop_path_is_a_config_error_naming_both_keys(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("kv_cache: disk\nbackbone_drop_path: true\n")
    with pytest.raises(ConfigError) as err:
        load_config([user])
    assert "kv_cache=disk" in str(err.value) and "backbone_drop_path=true" in str(err.value)
    assert str(user) in str(err.value)


def test_bf16_storage_tolerance(assets, live, tmp_path):
    """bf16 storage rounds each K/V value to 8 significant bits (relative error <= 2^-9 of the fp32 value), and the
    query-only attention reads it as stored (its two matmuls in bf16, the softmax in fp32).

    Stated tolerance for a trial: eval accuracies within 1 image of the fp32 run, trainable weights
    within 2e-3 (max abs) after 4 epochs; the cache itself within 2^-8 relative of the fp32 cache.
    """
    live_dir, live_metrics = live
    fp32 = _cfg(assets, "cache-bf16", kv_cache="disk", kv_cache_dtype="fp32")
    bf16 = _cfg(assets, "cache-bf16", kv_cache="disk", kv_cache_dtype="bf16")
    _run(fp32, tmp_path / "fp32")
    metrics = _run(bf16, tmp_path / "bf16")
    files = sorted((Path(fp32.cache_dir) / "kv").glob("*-train800val200-*.kv.npy"))
    arrs = [np.load(f) for f in files]
    f32 = next(torch.from_numpy(x) for x in arrs if x.dtype == np.float32)
    b16 = next(torch.from_numpy(x).view(torch.bfloat16).float() for x in arrs if x.dtype == np.int16)
    assert len(files) == 2 and b16.shape == f32.shape
    assert float(((b16 - f32).abs() / f32.abs().clamp_min(1e-30)).max()) <= 2**-8
    assert float((b16 - f32).abs().max()) > 0  # really rounded
    one_image = 100.0 / N_TEST
    for e_live, e_bf16 in zip(live_metrics["eval_history"], metrics["eval_history"], strict=True):
        assert abs(e_live["acc"] - e_bf16["acc"]) <= one_image + 1e-9
    assert max_weight_diff(live_dir, tmp_path / "bf16") <= 2e-3


def test_branch_dropout_keys_reach_the_model(assets):
    from synqt.training.build import frozen_backbone, seeded_branch

    cfg = _cfg(assets, branch_dropout=0.0, branch_attn_dropout=0.25, head_drop_path=0.0, epochs=1)
    backbone = frozen_backbone(cfg)
    branch = seeded_branch(cfg, backbone, 6)
    assert branch.query_drop == 0.0 and branch.head.drop == 0.0 and branch.head.token_drop_path == 0.0
    assert all(blk.attn.attn_drop == 0.25 and blk.attn.out_drop == 0.0 and blk.ffn.drop == 0.0
               for blk in branch.qsm_blocks)
    assert all(ffn.drop == 0.0 for ffn in branch.prompt_ffns)
    # the official defaults: dropout 0.1 everywhere, head drop path 0.3 (spec sections 1-3)
    official = seeded_branch(_cfg(assets, epochs=1), backbone, 6)
    assert official.query_drop == 0.1 and official.head.token_drop_path == 0.3
    assert all(blk.attn.attn_drop == 0.1 for blk in official.qsm_blocks)


def test_bf16_autocast_cached_equals_live(assets, tmp_path):
    """Under precision=bf16 the live K/V are already bf16 (frozen matmuls under autocast), so a bf16 cache holds
    exactly them: the cached trial ends as the live one."""
    live = _run(_cfg(assets, kv_cache="off", precision="bf16"), tmp_path / "live")
    cached = _run(_cfg(assets, "cache-amp", kv_cache="disk", precision="bf16", kv_cache_dtype="bf16"),
                  tmp_path / "cached")
    assert comparable(cached) == comparable(live)
    assert max_weight_diff(tmp_path / "live", tmp_path / "cached") <= TOL


def test_gradient_accumulation_from_the_cache_equals_live(assets, tmp_path):
    """grad_accum_steps=4 reads four cached micro-batches per step: same result as the live single batch."""
    # every random op off (the frozen blocks' drop path also acts on the query stream), as in test_engine
    common = dict(branch_dropout=0.0, branch_attn_dropout=0.0, head_drop_path=0.0, drop_path_rate=0.0)
    a = _run(_cfg(assets, kv_cache="off", **common), tmp_path / "live")
    b = _run(_cfg(assets, "cache-accum", kv_cache="disk", grad_accum_steps=4, **common), tmp_path / "accum")
    assert a["status"] == b["status"] == "ok"
    assert max_weight_diff(tmp_path / "live", tmp_path / "accum") <= 1e-4  # summation order differs
    assert [e["acc"] for e in a["eval_history"]] == [e["acc"] for e in b["eval_history"]]


def test_feed_names_the_next_steps_first_micro_batch_for_the_copy_ahead():
    """A pinned cache copies the next batch ahead on a side stream (GPU): the last micro-batch of a step
    must name the next step's first one, or nothing is ever prefetched with grad_accum_steps=1."""
    from synqt.training.kv_cache import feed

    class Recorder:  # records the (batch, copy-ahead) pairs a trainer asks for
        calls: list = []

        def batch(self, idx, next_idx=None):
            self.calls.append((list(idx), None if next_idx is None else list(next_idx)))
            return torch.zeros(1)

    rec = Recorder()
    micro = [np.array([0, 1]), np.array([2, 3])]
    assert len(list(feed(rec, lambda idx: torch.zeros(1), micro, then=np.array([4, 5])))) == 2
    assert rec.calls == [([0, 1], [2, 3]), ([2, 3], [4, 5])]
    rec.calls.clear()
    list(feed(rec, lambda idx: torch.zeros(1), micro[:1]))  # the epoch's last step: nothing to copy ahead
    assert rec.calls == [([0, 1], None)]


def test_a_packs_deferred_evaluation_passes_the_test_images_once_with_periodic_numbers(assets, tmp_path,
                                                                                       monkeypatch):
    """A pack of 2 branches (two lr), live image stream, 4 epochs, evaluated every epoch: deferred, both branches'
    4 snapshots share ONE pass of the test images through the frozen backbone (counted at the patch
    embedding), periodic needs one per evaluation epoch; both give the same eval_history for each branch."""
    from synqt.model.stream import _FrozenStream

    embedded: list[int] = []  # images per pass through the frozen stream in eval mode (evaluation)
    real = _FrozenStream._embed

    def counting(self, images):
        if not self.training:
            embedded.append(int(images.shape[0]))
        return real(self, images)

    monkeypatch.setattr(_FrozenStream, "_embed", counting)
    runs = {}
    for mode in ("periodic", "deferred"):
        cfgs = [_cfg(assets, "cache-pack-defer", kv_cache="off", deferred_eval=mode == "deferred", epochs=4,
                     eval_every=1, lr=lr) for lr in (1e-3, 3e-3)]
        embedded.clear()
        runs[mode] = run_pack(cfgs, [tmp_path / mode / f"b{i}" for i in range(2)], resume=False)
        runs[mode + "_test_images"] = sum(embedded)
    for periodic, deferred in zip(runs["periodic"], runs["deferred"], strict=True):
        assert [e["epoch"] for e in deferred["eval_history"]] == [1, 2, 3, 4]
        assert deferred["eval_history"] == periodic["eval_history"]
    assert runs["deferred_test_images"] == N_TEST  # once, for both branches and all four epochs
    assert runs["periodic_test_images"] == 4 * N_TEST
