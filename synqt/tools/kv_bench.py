"""`synqt bench --kv-cache`: the cached train step, the cache build rate and a paper trial's cost.

Measured parts (per image, at the config's backbone, batch size and precision, random weights unless
``checkpoint`` is set):

- ``forward``: one no-grad forward of the backbone (timm ``forward_features``): the unit of cost.
- ``full step``: a SynQT training step through the live image stream (what every epoch costs today).
- ``cached step``: the same step reading K/V from a node cache file (``synqt.training.kv_cache``, memory-mapped,
  random batches, ``kv_cache_dtype`` storage): the same query-stream code.
- ``build``: writing the cache (eval-mode image stream + storage cast + write), images/s.
- ``eval x1`` / ``eval x5``: a no-grad live pass feeding 1 branch (a periodic evaluation) or 5 branches
  (the deferred evaluation of the paper protocol's five snapshots).

Trial cost (paper protocol: ``epochs`` over ``n_train`` images, test every ``eval_every`` epochs over
``n_test`` images), in units of one no-grad forward over the trial's ``n_train + n_test`` images:

- today: ``epochs * n_train * full + evals * n_test * eval_x1``;
- cached + deferred: ``n_train * build + epochs * n_train * cached + n_test * eval_x5``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from synqt.model.stream import PackedSynQT, build_backbone, new_branch
from synqt.training.kv_cache import GIB, KVCache, _hold_in_memory, compute_kv, format_bytes, geometry
from synqt.training.schedule import adamw


def _timed(fn: Callable[[], Any], repeats: int, device: torch.device | None = None) -> float:
    """Mean seconds of ``fn`` over ``repeats`` calls after one warm-up call.

    On CUDA the device is synchronised before the clock starts and before it stops: kernels run
    asynchronously, so without it the time would be that of launching them, not of running them.
    """
    sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else (
        lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def bench_kv_cache(cfg: Any, *, steps: int = 3, n_train: int = 1000, n_test: int = 1000, epochs: int = 50,
                   eval_every: int = 10, device: torch.device | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """The figures above; ``cfg`` gives backbone, batch_size, precision, token_nums, kv_cache_dtype."""
    from synqt.model.memory import _image_size
    from synqt.model.precision import autocast_for

    device = device or torch.device("cpu")
    backbone = build_backbone(cfg.backbone, drop_path_rate=cfg.drop_path_rate, checkpoint=cfg.checkpoint,
                              **dict(cfg.backbone_kwargs)).to(device)
    size = _image_size(cfg, backbone)
    B = int(cfg.batch_size)
    torch.manual_seed(0)
    branch = new_branch(backbone, 100, token_nums=cfg.token_nums).to(device)
    model = PackedSynQT(backbone, [branch], drop_path_rate=cfg.drop_path_rate, backbone_drop_path=False,
                        memory_mode=cfg.memory_mode).to(device)
    opt = adamw(branch.parameters(), lr=1e-4, weight_decay=1e-2)
    images_u8 = np.random.default_rng(0).integers(0, 256, (B, size, size, 3), dtype=np.uint8)
    from synqt.data.images import to_tensor_batch

    x = to_tensor_batch(images_u8[:B], cfg.mean, cfg.std).to(device)
    y = torch.randint(0, 100, (B,), device=device)
    amp = lambda: autocast_for(device, cfg.precision)  # noqa: E731

    def train_step(**inputs: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = F.cross_entropy(model(**inputs)[0].float(), y)
        loss.backward()
        opt.step()

    geom = geometry(backbone, size)
    dtype = cfg.kv_cache_dtype
    out: dict[str, Any] = {"backbone": cfg.backbone, "image_size": size, "batch_size": B, "precision": cfg.precision,
                           "kv_cache_dtype": dtype, "bytes_per_image": geom.bytes_per_image(dtype),
                           "threads": torch.get_num_threads()}

    log("bench kv: no-grad backbone forward ...")
    with torch.no_grad():
        def fwd() -> None:
            with amp():
                backbone.forward_features(x)
        out["forward_s_per_image"] = _timed(fwd, steps, device) / B

    log("bench kv: cache build ...")
    with tempfile.TemporaryDirectory(prefix="synqt-kv-bench-") as tmp:
        path = Path(tmp) / "bench.kv.npy"
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.int16 if dtype == "bf16" else np.float32,
                                        shape=(B, *geom.shape))
        t0 = time.perf_counter()
        compute_kv(model, images_u8, cfg.mean, cfg.std, arr, dtype=dtype, device=device, batch_size=B, autocast=amp)
        arr.flush()
        out["build_s_per_image"] = (time.perf_counter() - t0) / B
        del arr
        cache = KVCache(np.load(path, mmap_mode="r"), dtype, device, "disk", path, "bench")
        rng = np.random.default_rng(1)

        log("bench kv: full (live) train step ...")
        model.train()
        out["full_step_s_per_image"] = _timed(lambda: train_step(images=x), steps, device) / B
        log("bench kv: cached train step ...")
        out["cached_step_s_per_image"] = _timed(
            lambda: train_step(kv=cache.batch(rng.permutation(B))), max(steps, 5), device) / B
        # kv_cache=memory: the array held in process memory (on a GPU: on the device when it fits), as a trial
        # holds it; on a GPU this step has no host-to-device copy, unlike the memory-mapped one above
        held, where = _hold_in_memory(np.load(path, mmap_mode="r"), dtype, device)
        mem = KVCache(held, dtype, device, where, None, "bench")
        log(f"bench kv: cached train step, cache in {where} memory ...")
        out["memory_cached_step_s_per_image"] = _timed(
            lambda: train_step(kv=mem.batch(rng.permutation(B))), max(steps, 5), device) / B
        out["memory_cache_where"] = where
        cache.array = None  # drop the memory map before the folder goes
    log("bench kv: evaluation passes (1 and 5 branches) ...")
    model.eval()
    five = [new_branch(backbone, 100, token_nums=cfg.token_nums).to(device).eval() for _ in range(5)]
    with torch.no_grad():
        def eval_pass(branches: list) -> None:
            with amp():
                model.forward_branches(branches, x)
        out["eval_x1_s_per_image"] = _timed(lambda: eval_pass([branch]), steps, device) / B
        out["eval_x5_s_per_image"] = _timed(lambda: eval_pass(five), steps, device) / B
    f = out["forward_s_per_image"]
    evals = epochs // eval_every
    today = epochs * n_train * out["full_step_s_per_image"] + evals * n_test * out["eval_x1_s_per_image"]
    cached = (n_train * out["build_s_per_image"] + epochs * n_train * out["cached_step_s_per_image"]
              + n_test * out["eval_x5_s_per_image"])
    unit = (n_train + n_test) * f
    out.update({
        "cached_vs_full_step": out["full_step_s_per_image"] / out["cached_step_s_per_image"],
        "build_images_per_s": 1.0 / out["build_s_per_image"],
        "trial": {"n_train": n_train, "n_test": n_test, "epochs": epochs, "evaluations": evals,
                  "forward_pass_s": unit, "today_s": today, "cached_deferred_s": cached,
                  "today_x_forward": today / unit, "cached_x_forward": cached / unit,
                  "cache_bytes": geom.bytes_per_image(dtype) * n_train},
    })
    return out


def format_kv(r: dict[str, Any]) -> str:
    t = r["trial"]
    ms = lambda s: f"{1000 * s:.2f} ms"  # noqa: E731
    return "\n".join([
        f"K/V cache ({r['backbone']} at {r['image_size']} px, batch {r['batch_size']}, precision {r['precision']}, "
        f"{r['kv_cache_dtype']} storage, {r['threads']} threads): {format_bytes(r['bytes_per_image'])} per image, "
        f"{format_bytes(t['cache_bytes'])} for {t['n_train']} images",
        f"  per image: no-grad forward {ms(r['forward_s_per_image'])}, full train step "
        f"{ms(r['full_step_s_per_image'])}, cached train step {ms(r['cached_step_s_per_image'])} "
        f"({r['cached_vs_full_step']:.1f}x faster; from {r.get('memory_cache_where', 'host')} memory "
        f"{ms(r.get('memory_cached_step_s_per_image', float('nan')))}), cache build {ms(r['build_s_per_image'])} "
        f"({r['build_images_per_s']:.1f} img/s), eval 1 branch {ms(r['eval_x1_s_per_image'])}, "
        f"eval 5 branches {ms(r['eval_x5_s_per_image'])}",
        f"  paper trial ({t['epochs']} epochs x {t['n_train']} train, {t['evaluations']} evaluations x {t['n_test']} "
        f"test): today {t['today_x_forward']:.1f}x one no-grad forward over its {t['n_train'] + t['n_test']} images, "
        f"cached + deferred evaluation {t['cached_x_forward']:.2f}x",
    ])


__all__ = ["bench_kv_cache", "format_kv", "GIB"]
