"""Measure what a training step keeps for its backward pass, and the process's peak memory.

``saved_activation_bytes`` counts every tensor autograd saves (``saved_tensors_hooks``), each
underlying storage once, so views of one buffer (e.g. K and V sliced from one ``[2, B, H, N, d]``
tensor) are not double counted and a view of a big buffer is charged the whole buffer it keeps
alive. Parameters and buffers are excluded: they exist whether or not one trains.

Note: ``torch.utils.checkpoint`` (the ``recompute`` memory mode) installs its own inner hooks, so
the tensors it holds for recomputation (the input batch) are not seen here; the input batch is held
by the caller anyway.
"""

from __future__ import annotations

import functools
import gc
import os
import resource
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch

GIB = float(1 << 30)


def _storage_key(t: torch.Tensor) -> tuple[int, str] | None:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return None
    return storage.data_ptr(), str(t.device)


def saved_activation_bytes(fn: Callable[[], torch.Tensor],
                           exclude: Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]] = (),
                           *, top: int = 8, backward: bool = False) -> dict[str, Any]:
    """Run ``fn`` (a forward returning a loss) and count the storages autograd saves for backward.

    ``exclude``: tensors (parameters, buffers) whose storages are not counted, or a callable giving
    them, called after ``fn`` (so weight copies the forward creates can be excluded too). Returns
    ``{"bytes", "gib", "tensors", "by_shape"}``; ``by_shape`` lists the ``top`` largest contributions
    as ``{"shape", "dtype", "count", "bytes"}``. The hook returns each tensor unchanged, so the graph
    keeps them alive while they are counted; ``backward=True`` then runs ``loss.backward()`` to free
    the graph (otherwise it is freed when the returned loss goes out of scope here).
    """
    seen: dict[tuple[int, str], tuple[int, tuple[int, ...], str]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is not None and key not in seen:
            seen[key] = (t.untyped_storage().nbytes(), tuple(t.shape), str(t.dtype).replace("torch.", ""))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    excluded = {k for k in (_storage_key(t) for t in (exclude() if callable(exclude) else exclude)) if k is not None}
    shapes: dict[tuple[tuple[int, ...], str], list[int]] = {}
    total = count = 0
    for key, (nbytes, shape, dtype) in seen.items():
        if key in excluded:
            continue
        total += nbytes
        count += 1
        entry = shapes.setdefault((shape, dtype), [0, 0])
        entry[0] += 1
        entry[1] += nbytes
    if backward and isinstance(loss, torch.Tensor) and loss.requires_grad:
        loss.backward()
    del loss
    entries = [{"shape": list(s), "dtype": d, "count": c, "bytes": b} for (s, d), (c, b) in shapes.items()]
    by_shape = sorted(entries, key=lambda e: -e["bytes"])[:top]
    return {"bytes": int(total), "gib": total / GIB, "tensors": count, "by_shape": by_shape}


def model_tensors(*modules: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter, buffer and cached weight copy of ``modules``: the ``exclude`` argument for a model."""
    out: list[torch.Tensor] = []
    for m in modules:
        out.extend(m.parameters())
        out.extend(m.buffers())
        for sub in m.modules():  # SynQT's cached low-precision copies of its frozen weights
            cached = getattr(sub, "cast_cache_tensors", None)
            if callable(cached):
                out.extend(cached())
    return out


def _rss_high_water() -> int:
    """The process's peak resident set size in bytes (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _rss_now() -> int:
    try:
        with open(f"/proc/{os.getpid()}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _rss_high_water()


@functools.cache
def _glibc() -> Any:
    """The C library if it is glibc (mallopt / malloc_trim exist), else None; loaded once."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>


def keep_freed_host_memory(device: torch.device | str | None = None) -> bool:
    """Let glibc keep freed memory for reuse instead of handing it back to the kernel every step.

    ``device``: the device a trainer computes on; anything but a CPU leaves glibc alone (host memory
    is then not where the activations live) and returns False.

    By default glibc serves large tensors with mmap (threshold adaptive up to 32 MiB) and trims the heap
    as soon as 128 KiB are free at its top, so a CPU training step can fault in its activations afresh
    every time. Measured on the 2-core CPU, ViT-B/16 batch 8 fp32: 1.31 s instead of 1.40 s per step,
    and which of two models ran first no longer changes their timings. Memory freed by one step stays
    in the process for the next one (as CUDA's caching allocator does). True when the setting took.
    """
    libc = _glibc()
    if libc is None or (device is not None and torch.device(device).type != "cpu"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_host_memory() -> None:
    """Return glibc's free heap memory to the kernel (``malloc_trim``), so RSS shows live memory only."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def peak_memory(fn: Callable[[], Any], device: torch.device | str | None = None,
                interval: float = 0.002) -> dict[str, Any]:
    """Peak memory of ``fn()`` above the memory in use before it (CUDA allocator peak, or CPU RSS peak).

    On CPU a thread samples the process's resident set size every ``interval`` seconds (the
    kernel's ``ru_maxrss`` high water only moves past earlier peaks, so it is used only when it
    grows); ``kind`` says which was measured. RSS includes allocator caching, so it is an upper
    bound of the tensors alive.
    """
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        result = fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        used = int(peak - before)
        return {"bytes": used, "gib": used / GIB, "kind": "cuda max_memory_allocated", "result": result}
    gc.collect()
    release_freed_host_memory()  # memory kept from earlier work would hide this call's growth
    before = _rss_now()
    high_before = _rss_high_water()
    sampled = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            sampled[0] = max(sampled[0], _rss_now())
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        stop.set()
        thread.join()
    peak = max(sampled[0], _rss_now())
    high_after = _rss_high_water()
    if high_after > high_before:
        peak = max(peak, high_after)
    delta = max(0, peak - before)
    return {"bytes": int(delta), "gib": delta / GIB, "kind": "cpu rss peak delta (sampled)", "result": result}


# ---------------------------------------------------------------------------------------------------------------
# the memory estimate (the sweep planner sizes packs with it; `synqt bench` prints it beside the measurements)


def _image_size(cfg: Any, backbone: torch.nn.Module) -> int:
    if cfg.image_size:
        return int(cfg.image_size)
    size = backbone.patch_embed.img_size
    return int(size[0] if isinstance(size, list | tuple) else size)


def _geometry(cfg: Any) -> dict[str, int]:
    """C, L, N, H and the image size of ``cfg.backbone`` from a parameter-free (meta device) build."""
    import json

    return dict(_geometry_of(cfg.backbone, json.dumps(dict(cfg.backbone_kwargs), sort_keys=True), cfg.image_size))


@functools.lru_cache(maxsize=64)
def _geometry_of(backbone: str, kwargs_json: str, image_size: int | None) -> dict[str, int]:
    # cached: the planner sizes every pack of a sweep with it, and a meta build of ViT-B takes ~1 s
    import json
    import types

    import timm

    with torch.device("meta"):
        bb = timm.create_model(backbone, pretrained=False, num_classes=0, **json.loads(kwargs_json))
    size = _image_size(types.SimpleNamespace(image_size=image_size), bb)
    grid = bb.patch_embed.dynamic_feat_size((size, size)) if hasattr(bb.patch_embed, "dynamic_feat_size") \
        else bb.patch_embed.grid_size
    tokens = int(grid[0] * grid[1]) + int(getattr(bb, "num_prefix_tokens", 1))
    return {"C": int(bb.embed_dim), "L": len(bb.blocks), "N": tokens, "image_size": size,
            "backbone_params": int(sum(p.numel() for p in bb.parameters()))}


# calibrated on ViT-B/16 and a tiny ViT (keep mode, fp32): the query path of one branch saves about
# this many values per sample, block and channel per query token, plus a T-independent head part
QUERY_PATH_VALUES_PER_TOKEN = 34.0
QUERY_PATH_VALUES_FIXED = 6.0


def estimate_trial_memory(cfg: Any, n_branches: int = 1) -> int:
    """Bytes one training process of a pack of ``n_branches`` needs, from the geometry (no weights built).

    K/V term (``2 L B N C`` values, once per pack; bf16 under ``kv_bf16`` or bf16 precision; absent under
    ``recompute``) + the query path of every branch + the frozen weights + per-branch trainable weights,
    gradients and AdamW state + the transient activations of one frozen block and the input batch.
    """
    g = _geometry(cfg)
    B = int(cfg.batch_size) // max(1, int(cfg.grad_accum_steps))
    C, L, N, T = g["C"], g["L"], g["N"], int(cfg.token_nums)
    low = cfg.precision in ("bf16", "fp16")
    act = 2 if low else 4
    kv_bytes = 2 if (cfg.memory_mode == "kv_bf16" or low) else 4
    kv = 0 if cfg.memory_mode == "recompute" else 2 * L * B * N * C * kv_bytes
    query = B * L * C * (QUERY_PATH_VALUES_PER_TOKEN * T + QUERY_PATH_VALUES_FIXED) * act
    if cfg.memory_mode == "recompute":
        query = 0
    per_branch_params = L * (T * C + 3 * (2 * 48 * C) + 4 * (2 * 8 * C) + 10 * C) + 3 * L * C + 4 * C + 101 * C
    weights = g["backbone_params"] * 4 + n_branches * per_branch_params * 4 * 4
    transient = B * N * C * 4 * 10 + B * 3 * g["image_size"] ** 2 * 4
    if cfg.memory_mode == "recompute":  # the backward re-runs the whole forward of the pack, one block kept at a time
        transient += 2 * B * N * C * 4 + n_branches * B * L * C * (QUERY_PATH_VALUES_PER_TOKEN * T) * 4
    return int(kv + n_branches * query + weights + transient)


__all__ = ["estimate_trial_memory", "saved_activation_bytes", "peak_memory", "model_tensors", "keep_freed_host_memory",
           "release_freed_host_memory", "GIB"]
