"""The device checks of ``scripts/gpu_check.sh`` (issue 22; docs/gpu.md): every CUDA path against a reference.

Marked ``gpu``: the normal run deselects them (tests/conftest.py). ``scripts/gpu_check.sh`` runs them with
``pytest -m gpu`` on CUDA; ``scripts/gpu_check.sh --cpu`` runs the same tests on the CPU at small sizes,
minus the ``cuda_only`` ones (``-m "gpu and not cuda_only"``), inside the normal suite
(tests/test_gpu_check.py), so they cannot rot between GPU runs.

Environment (set by ``launcher.run.gpu_check``): ``SYNQT_CHECK_DEVICE`` (``cuda``, the default, or ``cpu``),
``SYNQT_CHECK_SIZE`` (``full``: ViT-B/16 for the numerics and memory checks; ``small``: tiny ViTs),
``SYNQT_CHECK_FIGURES`` (a folder: each check writes ``<name>.json`` with its figures for the summary table).
Run by hand on a machine without CUDA, ``pytest -m gpu`` fails every test naming the missing device.

References (all from outside the code under test): the CPU fp32 forward/backward of the same weights; the
live-stream trial (``kv_cache=off``) on the same device; four solo trials; the periodic-evaluation trial; an
uninterrupted DeepSpeed trial; the saved-activation figures ``synqt bench`` measured on CPU (docs/bench.md)
and the K/V byte count from the geometry.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch
from engine_helpers import (  # noqa: F401 - _one_thread_no_progress is an autouse fixture
    _one_thread_no_progress,
    max_weight_diff,
    tiny_cfg,
    write_tiny_assets,
)

pytestmark = pytest.mark.gpu

DEVICE = os.environ.get("SYNQT_CHECK_DEVICE", "cuda")
FULL = os.environ.get("SYNQT_CHECK_SIZE", "full" if DEVICE == "cuda" else "small") == "full"
FIGURES = os.environ.get("SYNQT_CHECK_FIGURES")
WEIGHT_TOL = 1e-5  # issues 7 and 15: max abs difference of trainable weights
# tolerances of the device-vs-CPU-fp32 check: relative Frobenius error of the logits / of all branch gradients.
# fp32: matmuls are full fp32 on CUDA (torch's default allow_tf32=False) but cuDNN convolutions (the patch
# embedding) may use TF32 (torch's default), a 10-bit mantissa: ~1e-3. bf16 autocast: 8 significant bits
# through every block, ~1e-2 (synqt's own bf16 K/V tolerance is 2e-2 on gradients, tests/test_memory.py).
NUMERIC_TOL = {"no": {"logits": 5e-3, "grads": 5e-3}, "bf16": {"logits": 5e-2, "grads": 1e-1}}
# docs/bench.md, "ViT-B/16, CPU": saved activations of one step at batch 64, 224 px, fp32, token_nums 1, counted
# by synqt.model.memory.saved_activation_bytes on CPU (GiB)
CPU_SAVED_GIB = {"keep": 0.95471, "kv_bf16": 0.522, "recompute": 0.036}


def record(name: str, **figures) -> None:
    """Hand a check's figures to the summary table (launcher.run.gpu_check)."""
    if FIGURES:
        Path(FIGURES).mkdir(parents=True, exist_ok=True)
        (Path(FIGURES) / f"{name}.json").write_text(json.dumps(figures, indent=1, default=str))


@pytest.fixture(scope="session")
def device() -> torch.device:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.fail("the gpu checks run on CUDA and no CUDA device is visible here (torch.cuda.is_available() is "
                    "False). Run them on a GPU node with scripts/gpu_check.sh, or their CPU variant with "
                    "scripts/gpu_check.sh --cpu (docs/gpu.md)", pytrace=False)
    return torch.device(DEVICE)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_assets")
    data_root, ckpt = write_tiny_assets(root)
    return data_root, ckpt, root


def _cfg(assets, **kw):
    data_root, ckpt, root = assets
    base = dict(backbone_drop_path=False, precision="no", kv_cache="off", kv_cache_dtype="fp32", epochs=4,
                eval_every=2, device=DEVICE)
    base.update(kw)
    return tiny_cfg(data_root, ckpt, root / "cache", **base)


def _run(cfg, run_dir: Path) -> dict:
    from synqt.training import run_trial

    metrics = run_trial(cfg, run_dir, resume=False)
    assert metrics["status"] == "ok", metrics["error"]
    return metrics


@pytest.fixture(scope="module")
def live(assets, device, tmp_path_factory):
    """The reference of the cache and deferred-evaluation checks: the live image stream on the device."""
    d = tmp_path_factory.mktemp("live") / "run"
    return d, _run(_cfg(assets), d)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu().flatten(), b.detach().double().cpu().flatten()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_logits_and_gradients_match_the_cpu_fp32_result(device, precision):
    """SynQT's logits and every branch gradient on the device (fp32, or under bf16 autocast) against the same
    weights and images in fp32 on the CPU."""
    from synqt.model.precision import autocast_for, check_precision
    from synqt.model.stream import build_model

    check_precision(precision, device)
    if FULL:
        name, kw, size, batch = "vit_base_patch16_224", {}, 224, 8
    else:
        name, kw, size, batch = "vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                                num_heads=2), 32, 8
    torch.manual_seed(0)
    ref = build_model(name, 10, checkpoint="random", drop_path_rate=0.0, backbone_drop_path=False, **kw)
    with torch.no_grad():  # a fresh head is near zero: give every trainable tensor random values
        for p in ref.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.eval()  # no dropout: the same function on both devices
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(batch) % 10
    dev = copy.deepcopy(ref).to(device)

    def run(model, x, y, amp):
        model.zero_grad(set_to_none=True)
        with amp:
            logits = model(x)
        torch.nn.functional.cross_entropy(logits.float(), y).backward()
        return logits.float(), torch.cat([p.grad.flatten() for p in model.trainable_parameters()])

    logits_ref, grads_ref = run(ref, images, labels, torch.autocast("cpu", enabled=False))
    logits_dev, grads_dev = run(dev, images.to(device), labels.to(device), autocast_for(device, precision))
    err = {"logits": _relative(logits_dev, logits_ref), "grads": _relative(grads_dev, grads_ref)}
    record(f"numerics_{precision}", backbone=name, batch=batch, device=str(device), relative_error=err,
           tolerance=NUMERIC_TOL[precision])
    assert torch.isfinite(logits_dev).all() and torch.isfinite(grads_dev).all()
    for what, tol in NUMERIC_TOL[precision].items():
        assert err[what] <= tol, f"{what}: relative error {err[what]:.3g} > {tol:g} ({precision} on {device})"


# ----------------------------------------------------------------------------------------- K/V cache


@pytest.mark.parametrize("place", ["device", pytest.param("pinned", marks=pytest.mark.cuda_only)])
def test_memory_cache_trial_equals_the_live_trial(assets, live, device, tmp_path, place, caplog, monkeypatch):
    """kv_cache=memory with fp32 storage: the cache on the device (CPU: host memory), or forced into pinned
    host memory with the next batch copied ahead on a side stream, ends with the live trial's weights
    (<= 1e-5) and evaluation history."""
    import synqt.training.kv_cache

    if place == "pinned":
        monkeypatch.setattr(synqt.training.kv_cache, "fits_on_device", lambda nbytes, dev: False)
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="synqt.training.kv_cache"):
        metrics = _run(_cfg(assets, kv_cache="memory"), run)
    where = "host" if device.type == "cpu" else place
    held = [r.getMessage() for r in caplog.records if r.getMessage().startswith("K/V cache ")]
    assert len(held) == 2 and all(f"({where})" in m for m in held), held  # train and eval split, held there
    diff = max_weight_diff(run, live[0])
    record(f"kv_memory_{place}", where=where, max_weight_diff=diff, eval_history=metrics["eval_history"])
    assert metrics["eval_history"] == live[1]["eval_history"]
    assert diff <= WEIGHT_TOL


# ------------------------------------------------------------------------------------- packs and evaluation

PACK = [  # four branches that differ in every per-branch setting (tests/test_pack.py)
    dict(token_nums=1, feat_scale=1.0, attn_scale=0.1, ffn_scale=0.1, lr=1e-3, weight_decay=1e-2),
    dict(token_nums=2, feat_scale=0.5, attn_scale=1.0, ffn_scale=0.5, lr=3e-3, weight_decay=0.0),
    dict(token_nums=1, feat_scale=2.0, attn_scale=0.5, ffn_scale=1.0, lr=5e-4, weight_decay=5e-2),
    dict(token_nums=3, feat_scale=1.0, attn_scale=0.2, ffn_scale=0.3, lr=2e-3, weight_decay=1e-3),
]


def test_pack_of_four_equals_four_solo_trials(assets, device, tmp_path):
    from synqt.training import run_pack

    cfgs = [_cfg(assets, epochs=3, **s) for s in PACK]
    solo = [_run(c, tmp_path / f"solo{i}") for i, c in enumerate(cfgs)]
    packed = run_pack(cfgs, [tmp_path / f"pack{i}" for i in range(4)], resume=False)
    diffs = [max_weight_diff(tmp_path / f"pack{i}", tmp_path / f"solo{i}") for i in range(4)]
    record("pack_of_4", max_weight_diff=max(diffs), per_branch=diffs)
    for s, p in zip(solo, packed, strict=True):
        assert p["status"] == "ok", p["error"]
        assert p["eval_history"] == s["eval_history"]
    assert max(diffs) <= WEIGHT_TOL


def test_deferred_evaluation_equals_periodic(assets, device, tmp_path):
    """Paper protocol, 4 epochs, an evaluation every epoch: the snapshots scored in one pass at the end give the
    periodic run's accuracies at the same epochs (the cache on the device, as the GPU trial runs)."""
    periodic = _run(_cfg(assets, eval_every=1, deferred_eval=False, kv_cache="memory"), tmp_path / "periodic")
    deferred = _run(_cfg(assets, eval_every=1, deferred_eval=True, kv_cache="memory"), tmp_path / "deferred")
    record("deferred_eval", periodic=periodic["eval_history"], deferred=deferred["eval_history"])
    assert [e["epoch"] for e in deferred["eval_history"]] == [1, 2, 3, 4]
    assert deferred["eval_history"] == periodic["eval_history"]
    assert not (tmp_path / "deferred" / "eval_snapshots").exists()


# ------------------------------------------------------------------------------------------------- memory


@pytest.mark.cuda_only
def test_peak_cuda_memory_per_memory_mode_beside_the_cpu_saved_activations(device):
    """torch.cuda.max_memory_allocated of one ViT-B/16 training step at batch 64 (224 px, fp32) per memory mode,
    beside the saved activations synqt bench counted on CPU (docs/bench.md)."""
    from synqt.tools.bench import bench_config, bench_models

    cfg = bench_config(["backbone=vit_base_patch16_224", "batch_size=64", "device=cuda", "precision=no"])
    rows = {r["name"].split()[-1]: r for r in bench_models(cfg, list(CPU_SAVED_GIB), steps=1, baselines=False,
                                                           log=lambda _: None)["rows"]}
    kv_fp32 = 2 * 12 * 64 * 197 * 768 * 4  # K and V of 12 blocks, 197 tokens, width 768, fp32
    figures = {m: {"peak_cuda_gib": r["peak_gib"], "saved_gib_cuda": r["saved_gib"], "saved_gib_cpu": CPU_SAVED_GIB[m],
                   "peak_kind": r["peak_kind"], "train_images_per_s": r["train_images_per_s"]}
               for m, r in rows.items()}
    record("peak_memory_vitb16_b64", gpu=torch.cuda.get_device_name(device), modes=figures)
    for mode, r in rows.items():
        assert r["peak_kind"] == "cuda max_memory_allocated"
        # the same activations are kept on either device (fused attention kernels may add a little)
        assert abs(r["saved_gib"] - CPU_SAVED_GIB[mode]) <= 0.05 * CPU_SAVED_GIB[mode] + 0.01, (mode, r["saved_gib"])
        # what is saved is resident at the step's peak, plus bounded transients: one block's image-stream
        # activations, AdamW state, and under recompute the K/V its backward recomputes (on CPU its RSS peak was
        # above keep's: docs/bench.md)
        assert r["saved_bytes"] <= r["peak_bytes"] <= r["saved_bytes"] + kv_fp32 + 2**30, (mode, r["peak_gib"])
    assert rows["keep"]["saved_bytes"] >= kv_fp32
    assert rows["recompute"]["saved_bytes"] < 0.1 * 2**30
    assert rows["kv_bf16"]["peak_bytes"] < rows["keep"]["peak_bytes"]


# ---------------------------------------------------------------------------------------------- DeepSpeed


def _sigkill_once_after_epoch_1(payload: dict) -> None:
    """train_worker's report (module level: the spawned process unpickles it by name): SIGKILL this rank after
    epoch 1's DeepSpeed checkpoint, once (a marker file remembers)."""
    marker = Path(os.environ["SYNQT_CHECK_KILL_MARKER"])
    if payload["epoch"] == 1 and not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


def test_deepspeed_trial_is_killed_and_resumes(assets, device, tmp_path, monkeypatch, caplog):
    """A one-process DeepSpeed trial (NCCL on CUDA, gloo on CPU) SIGKILLed after epoch 1 is restarted by
    run_local from its epoch checkpoint and ends exactly as an uninterrupted run."""
    from synqt.training.deepspeed import run_local

    cfg = _cfg(assets, trainer="deepspeed", num_devices=1, epochs=3, eval_every=1, checkpoint_every=1)
    ref = run_local(cfg, tmp_path / "uninterrupted", nprocs=1)
    marker = tmp_path / "killed.pid"
    monkeypatch.setenv("SYNQT_CHECK_KILL_MARKER", str(marker))
    with caplog.at_level(logging.WARNING):
        metrics = run_local(cfg, tmp_path / "killed", nprocs=1, retries=1, report=_sigkill_once_after_epoch_1)
    backend = metrics["deepspeed"].get("backend")
    record("deepspeed_kill_resume", backend=backend, resumed_after_epoch=metrics["provenance"]["resumed_after_epoch"],
           eval_history=metrics["eval_history"], initialize_s=metrics["deepspeed"].get("initialize_s"))
    assert marker.is_file(), "the rank was never killed"
    assert "terminated with signal SIGKILL; retrying from the last checkpoint" in caplog.text
    assert backend == ("nccl" if device.type == "cuda" else "gloo")
    assert metrics["status"] == ref["status"] == "ok" and metrics["provenance"]["resumed_after_epoch"] == 1
    assert metrics["eval_history"] == ref["eval_history"]
    # the same kernels on the same shapes: equal weights (bitwise on CPU; 1e-5 leaves room for a GPU's kernels)
    assert max_weight_diff(tmp_path / "killed", tmp_path / "uninterrupted") <= WEIGHT_TOL


# ---------------------------------------------------------------------------------------------------- fp16


@pytest.mark.cuda_only
def test_fp16_pack_keeps_one_loss_scaler_per_branch(assets, device, tmp_path):
    """precision=fp16 on CUDA: a pack of two trains, each branch with its own GradScaler; and driven by hand on
    the same model, an overflowing branch backs off only its own scale while its pack-mate steps as alone."""
    from synqt.model.stream import PackedSynQT, new_branch
    from synqt.training import run_pack
    from synqt.training.build import frozen_backbone
    from synqt.training.loop import BranchScaler

    cfgs = [_cfg(assets, precision="fp16", epochs=2, **s) for s in PACK[:2]]
    results = run_pack(cfgs, [tmp_path / "a", tmp_path / "b"], resume=False)
    assert [r["status"] for r in results] == ["ok", "ok"], [r["error"] for r in results]

    backbone = frozen_backbone(cfgs[0])
    torch.manual_seed(5)
    a, b = new_branch(backbone, 6), new_branch(backbone, 6)
    b_alone = copy.deepcopy(b)
    packed = PackedSynQT(backbone, [a, b], backbone_drop_path=False).to(device).eval()
    alone = PackedSynQT(backbone, [b_alone], backbone_drop_path=False).to(device).eval()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (a, b, b_alone)]
    scalers = [BranchScaler(True, "cuda") for _ in opts]
    x = torch.randn(8, 3, 16, 16, device=device)
    y = torch.arange(8, device=device) % 6
    steps = []
    for _ in range(3):
        for o in opts:
            o.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            la, lb = packed(x)
            (lb_alone,) = alone(x)
        loss_a = torch.nn.functional.cross_entropy(la.float(), y) * 1e30  # overflows once scaled: inf gradients
        loss_b = torch.nn.functional.cross_entropy(lb.float(), y)
        torch.stack([scalers[0].scale(loss_a), scalers[1].scale(loss_b)]).sum().backward()
        scalers[2].scale(torch.nn.functional.cross_entropy(lb_alone.float(), y)).backward()
        steps.append([s.step(o) for s, o in zip(scalers, opts, strict=True)])
    scales = [s.scaler.get_scale() for s in scalers]
    diff = max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(b.parameters(), b_alone.parameters(),
                                                                              strict=True))
    record("fp16_branch_scalers", steps=steps, scales=scales, pack_mate_vs_alone=diff)
    assert steps == [[False, True, True]] * 3
    assert scales[0] == 2.0**16 / 8 and scales[1] == scales[2] == 2.0**16
    # a skipped step would leave b ~1e-2 per step away from b alone; fp16 kernels of a pack of 2 and of 1 may
    # differ in the last bits
    assert diff <= 1e-3
