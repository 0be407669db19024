"""The frozen-stream K/V cache: per-block keys and values of a split's image tokens, computed once per node.

SynQT's query stream reads one thing from the frozen backbone: K and V of the image tokens in every
block. With the official input pipeline (no augmentation) and no stochastic depth on the image stream
(``backbone_drop_path: false``), those are a pure function of (backbone weights, image, transform),
the same in every epoch, for every grid point and every seed. This module stores them:

- **Array**: ``[n, L, 2, H, N, d]`` per split (image, block, K/V, head, token, head dim), in bf16
  (stored as int16 bits; numpy has no bf16) or fp32, computed by ``_FrozenStream.kv_block_stream`` in
  eval mode under the trial's autocast precision: the very code the live path runs.
- **Key**: sha256 of the backbone identity (name, kwargs, checkpoint sha256, and a digest of the weights
  when no checkpoint file names them), the list file content hash, data root, image size,
  interpolation, mean/std, storage dtype, compute precision and ``STREAM_CODE_VERSION``.
- **Files** (``<cache_dir>/kv/``, node-local by default like the decoded-image cache):
  ``<dataset>-<split>-<key20>.kv.npy`` and its manifest ``.kv.json`` (written last: the key, shape,
  dtype, byte size and sha256 of sampled rows). Built under ``<key>.lock`` (``filelock``): the first
  trial of a node builds, the others wait and then memory-map the file read-only. A data file
  without a valid manifest, with a foreign key, the wrong size or a sampled row that does not hash
  to the manifest's digest is deleted and rebuilt, never read.
- **Modes** (``kv_cache``): ``disk`` memory-maps the node's file; ``memory`` holds the array in process
  memory (read from a valid node file if one exists, else computed in-process without writing one);
  on a GPU on the device when it fits in half the free memory, else in pinned host memory with the
  next batch copied ahead on a side stream; ``auto`` is ``disk`` when the stream is deterministic and
  the cache fits ``kv_cache_max_gb`` and the disk, else live; ``off`` is live.

A cache that cannot be built (over budget, disk full, write error) leaves ``open_kv_cache`` returning
None with one message in ``reason``: the trial then runs the live stream.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synqt.data.images import BUILD_LOG_NAME  # one build-log name for both caches of a node
from synqt.storage import atomic_write, atomic_write_json

log = logging.getLogger("synqt.training.kv_cache")

# Bump when the image stream's code (``_FrozenStream._embed`` / ``_image_block``) or the array layout changes.
STREAM_CODE_VERSION = 1
STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_NUMPY_OF = {"bf16": np.int16, "fp32": np.float32}  # bf16 bits are stored as int16
_SAMPLED_ROWS = 8  # rows whose sha256 the manifest records (first, last and evenly spaced)
DISK_MARGIN_BYTES = 1 << 30  # leave 1 GiB free after a build
GIB = 1024**3


@dataclass(frozen=True)
class Geometry:
    """What one image's cached K/V look like: ``[L, 2, H, N, d]``."""

    depth: int
    heads: int
    tokens: int
    head_dim: int

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.depth, 2, self.heads, self.tokens, self.head_dim)

    def bytes_per_image(self, dtype: str) -> int:
        return int(np.prod(self.shape)) * (2 if dtype == "bf16" else 4)


def geometry(backbone: torch.nn.Module, image_size: int) -> Geometry:
    """K/V geometry of a timm ViT at ``image_size`` (prefix tokens + patches), read from the backbone."""
    attn = backbone.blocks[0].attn
    heads = int(attn.num_heads)
    head_dim = int(attn.qkv.out_features) // (3 * heads)
    patch = backbone.patch_embed.patch_size
    grid = (image_size // int(patch[0])) * (image_size // int(patch[1]))
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    return Geometry(len(backbone.blocks), heads, grid + prefix, head_dim)


def estimate_bytes(backbone: torch.nn.Module, image_size: int, n_images: int, dtype: str) -> int:
    """Size in bytes of one split's cache."""
    return geometry(backbone, image_size).bytes_per_image(dtype) * int(n_images)


@functools.lru_cache(maxsize=64)
def _planned_bytes_per_image(backbone: str, kwargs_json: str, image_size: int | None, dtype: str) -> int:
    """Cache bytes per image of a backbone from a meta-device build (no weights), once per geometry: a dry run
    of 19 tasks x 2 splits asks 38 times for the same ViT-B/16 (0.5 s of timm's init each)."""
    import timm

    with torch.device("meta"):
        bb = timm.create_model(backbone, pretrained=False, num_classes=0, **json.loads(kwargs_json))
    size = int(image_size or (bb.patch_embed.img_size[0]))
    return geometry(bb, size).bytes_per_image(dtype)


def planned_cache(cfg: Any, n_train: int, n_eval: int) -> dict[str, Any]:
    """What a trial of ``cfg`` will cache, from the geometry alone (meta-device build, no weights, no data).

    Returns ``{"active": bool, "reason": str, "bytes_per_image", "train_bytes", "eval_bytes",
    "train_cached", "eval_cached"}``, applying the same rules as the trainer: ``off`` or stochastic depth on
    the image stream -> live; splits in order train, eval while they fit ``kv_cache_max_gb``.
    """
    per = _planned_bytes_per_image(cfg.backbone, json.dumps(cfg.backbone_kwargs, sort_keys=True), cfg.image_size,
                                   cfg.kv_cache_dtype)
    out = {"bytes_per_image": per, "train_bytes": per * n_train, "eval_bytes": per * n_eval,
           "train_cached": False, "eval_cached": False, "active": False, "reason": ""}
    if cfg.kv_cache == "off":
        out["reason"] = "kv_cache=off"
        return out
    if cfg.backbone_drop_path:
        out["reason"] = "backbone_drop_path=true (stochastic image stream)"
        return out
    budget = cfg.kv_cache_max_gb * GIB
    used = 0
    for split in ("train", "eval"):
        if used + out[f"{split}_bytes"] <= budget:
            used += out[f"{split}_bytes"]
            out[f"{split}_cached"] = True
    out["active"] = out["train_cached"] or out["eval_cached"]
    if not out["train_cached"]:
        out["reason"] = f"over kv_cache_max_gb={cfg.kv_cache_max_gb:g}"
    return out


def format_bytes(n: float) -> str:
    if n >= GIB / 10:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 / 10 else f"{n / 1024:.1f} KiB"


def weights_digest(backbone: torch.nn.Module) -> str:
    """sha256 over the backbone's state dict (names, shapes, dtypes and bytes), in key order."""
    digest = hashlib.sha256()
    for name, t in sorted(backbone.state_dict().items()):
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}\0".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def cache_identity(backbone: torch.nn.Module, split: Any, *, image_size: int, interpolation: str,
                   mean: Sequence[float], std: Sequence[float], dtype: str, precision: str) -> dict[str, Any]:
    """Everything the cached array depends on (the key is the sha256 of this, as canonical JSON): the backbone's
    identity, the split's list content, the transform, the storage dtype and precision, the stream code's
    version and the torch and timm versions."""
    ident = dict(getattr(backbone, "synqt_identity", {}) or {})
    backbone_id: dict[str, Any] = {k: ident.get(k) for k in ("name", "kwargs", "checkpoint_sha256")}
    if not ident.get("checkpoint_sha256"):
        # a random init or an in-memory state dict: only the weights themselves identify the backbone
        backbone_id["weights_sha256"] = weights_digest(backbone)
    root = getattr(split, "data_root", None)
    return {
        "backbone": backbone_id,
        "dataset": split.dataset,
        "split": split.split,
        "list_sha256": split.list_hash,
        "data_root": str(Path(root).absolute()) if root is not None else None,
        "n_images": len(split.paths),
        "image_size": int(image_size),
        "interpolation": interpolation,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "dtype": dtype,
        "precision": precision,
        "stream_code_version": STREAM_CODE_VERSION,
        # the frozen blocks run through timm's submodules and torch's kernels: another version may compute other
        # bits, so a cache written under one is rebuilt under another rather than mixed with a live run
        "torch": torch.__version__,
        "timm": _timm_version(),
    }


def _timm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("timm")
    except PackageNotFoundError:
        return "unknown"


def identity_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def cache_files(cache_dir: str | Path, identity: dict[str, Any]) -> dict[str, Path]:
    key = identity_key(identity)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(identity["dataset"]))
    stem = f"{name}-{identity['split']}-{key[:20]}"
    d = Path(cache_dir) / "kv"
    return {"data": d / f"{stem}.kv.npy", "manifest": d / f"{stem}.kv.json", "lock": d / f"{key}.lock",
            "dir": d, "key": Path(key)}


def _sampled_rows(n: int) -> list[int]:
    if n <= _SAMPLED_ROWS:
        return list(range(n))
    return sorted({int(round(i * (n - 1) / (_SAMPLED_ROWS - 1))) for i in range(_SAMPLED_ROWS)})


def _row_digests(arr: np.ndarray) -> dict[str, str]:
    return {str(i): hashlib.sha256(np.ascontiguousarray(arr[i]).tobytes()).hexdigest() for i in _sampled_rows(len(arr))}


def validate(files: dict[str, Path], identity: dict[str, Any], geom: Geometry) -> str | None:
    """None when the node's cache file may be read; else why it must be rebuilt (or is absent)."""
    data, manifest = files["data"], files["manifest"]
    if not data.is_file():
        return "absent"
    if not manifest.is_file():
        return f"{data.name} has no manifest (an interrupted or foreign build)"
    try:
        meta = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        return f"manifest {manifest.name} unreadable ({err})"
    if meta.get("key") != identity_key(identity) or meta.get("identity") != identity:
        return f"{data.name} belongs to another backbone, split or transform (key mismatch)"
    shape = [identity["n_images"], *geom.shape]
    if meta.get("shape") != shape or meta.get("dtype") != identity["dtype"]:
        return (f"{data.name} has shape {meta.get('shape')} / {meta.get('dtype')}, "
                f"expected {shape} / {identity['dtype']}")
    try:
        arr = np.load(data, mmap_mode="r")
    except (OSError, ValueError) as err:
        return f"{data.name} unreadable ({err})"
    if list(arr.shape) != shape or arr.dtype != np.dtype(_NUMPY_OF[identity["dtype"]]):
        return f"{data.name} holds {arr.shape} {arr.dtype}, expected {shape}"
    if _row_digests(arr) != meta.get("row_sha256"):
        return f"{data.name} is corrupt (a sampled row does not match its recorded sha256)"
    return None


# ---------------------------------------------------------------------------------------------------------------
# computing


def _kv_batches(frozen: Any, images: np.ndarray, mean: Sequence[float], std: Sequence[float], *, dtype: str,
                device: torch.device, batch_size: int,
                autocast: Callable[[], AbstractContextManager] | None) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, stop, kv)`` per batch of ``images``: the eval-mode image stream's K/V as ``[L, 2, B, H, N, d]`` in
    the storage dtype, on ``device``. The one place a cache's values are computed."""
    from synqt.data.images import to_tensor_batch

    was_training = frozen.training
    frozen.eval()
    try:
        for start in range(0, len(images), batch_size):
            stop = min(start + batch_size, len(images))
            x = to_tensor_batch(images[start:stop], mean, std).to(device)
            with torch.no_grad(), (autocast() if autocast is not None else nullcontext()):
                blocks = [kv.to(STORAGE_DTYPES[dtype]) for kv in frozen.kv_block_stream(x)]
            yield start, stop, torch.stack(blocks)
    finally:
        frozen.train(was_training)


def compute_kv(frozen: Any, images: np.ndarray, mean: Sequence[float], std: Sequence[float], out: np.ndarray, *,
               dtype: str, device: torch.device, batch_size: int,
               autocast: Callable[[], AbstractContextManager] | None = None) -> None:
    """Fill ``out[n, L, 2, H, N, d]`` with the eval-mode image stream's per-block K/V of ``images`` (uint8 NHWC)."""
    for start, stop, kv in _kv_batches(frozen, images, mean, std, dtype=dtype, device=device, batch_size=batch_size,
                                       autocast=autocast):
        kv = kv.permute(2, 0, 1, 3, 4, 5).contiguous().cpu()  # [B, L, 2, H, N, d]
        if dtype == "bf16":
            kv = kv.view(torch.int16)
        out[start:stop] = kv.numpy()


def compute_held(frozen: Any, images: np.ndarray, mean: Sequence[float], std: Sequence[float], geom: Geometry, *,
                 dtype: str, device: torch.device, batch_size: int,
                 autocast: Callable[[], AbstractContextManager] | None = None) -> tuple[torch.Tensor, str]:
    """``kv_cache=memory`` without a node file: the K/V computed straight into the ``[L, 2, n, H, N, d]`` tensor the
    trial reads, where it will be held (``_hold_in_memory``'s rule): on a GPU in device memory when it fits (no
    host round trip, no transposing copy), else in pinned host memory; on a CPU in process memory."""
    n = len(images)
    shape = (geom.depth, 2, n, geom.heads, geom.tokens, geom.head_dim)
    nbytes = int(np.prod(shape)) * (2 if dtype == "bf16" else 4)
    where = "host" if device.type != "cuda" else ("device" if fits_on_device(nbytes, device) else "pinned")
    held = torch.empty(shape, dtype=STORAGE_DTYPES[dtype], device=device if where == "device" else "cpu",
                       pin_memory=where == "pinned")
    for start, stop, kv in _kv_batches(frozen, images, mean, std, dtype=dtype, device=device, batch_size=batch_size,
                                       autocast=autocast):
        held[:, :, start:stop].copy_(kv)
    return held, where


def _build(files: dict[str, Path], identity: dict[str, Any], geom: Geometry,
           compute: Callable[[np.ndarray], None]) -> None:
    shape = (identity["n_images"], *geom.shape)
    for stale in (files["manifest"], files["data"]):
        stale.unlink(missing_ok=True)  # manifest first: no reader may trust a half-replaced pair

    def write(tmp: Path) -> None:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=_NUMPY_OF[identity["dtype"]], shape=shape)
        compute(arr)
        arr.flush()
        digests = _row_digests(arr)
        del arr
        write.digests = digests  # type: ignore[attr-defined]

    atomic_write(files["data"], write)
    atomic_write_json(files["manifest"], {
        "key": identity_key(identity), "identity": identity, "shape": list(shape), "dtype": identity["dtype"],
        "nbytes": int(np.prod(shape)) * (2 if identity["dtype"] == "bf16" else 4),
        "row_sha256": write.digests,  # type: ignore[attr-defined]
        "built": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "host": socket.gethostname(),
        "pid": os.getpid()})
    with open(files["dir"] / BUILD_LOG_NAME, "a") as fh:
        fh.write(f"{_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')}\t{files['key']}\t{identity['dataset']}"
                 f"\t{identity['split']}\t{shape[0]}\t{socket.gethostname()}\t{os.getpid()}\n")


# ---------------------------------------------------------------------------------------------------------------
# reading


class KVCache:
    """One split's cached K/V; ``batch(idx)`` -> ``[L, 2, B, H, N, d]`` on the trial's device.

    ``where``: ``disk`` (read-only memory map), ``host`` (process memory), ``pinned`` (pinned host
    memory, next batch prefetched on a side CUDA stream) or ``device`` (on the GPU).
    """

    def __init__(self, array: np.ndarray | torch.Tensor, dtype: str, device: torch.device, where: str,
                 path: Path | None, split: str) -> None:
        self.array, self.dtype, self.device, self.where = array, dtype, device, where
        self.path, self.split = path, split
        self.nbytes = int(array.nbytes) if isinstance(array, np.ndarray) else array.numel() * array.element_size()
        self._stream = torch.cuda.Stream(device) if where == "pinned" else None
        self._ahead: tuple[bytes, torch.Tensor, Any] | None = None

    def __len__(self) -> int:
        return int(self.array.shape[2] if isinstance(self.array, torch.Tensor) else self.array.shape[0])

    def _rows(self, idx: np.ndarray, pin: bool = False) -> torch.Tensor:
        """Images ``idx`` as one contiguous ``[L, 2, B, H, N, d]`` tensor (each block's K and V contiguous, so the
        attention's batched matmuls read them without another copy); ``pin``: gathered straight into pinned
        host memory (the source of an asynchronous copy to the GPU)."""
        if isinstance(self.array, torch.Tensor):  # held as [L, 2, n, H, N, d] (_hold_in_memory)
            where = torch.as_tensor(idx, device=self.array.device)
            if not pin:
                return self.array.index_select(2, where)
            shape = self.array.shape
            out = torch.empty((shape[0], shape[1], len(where), *shape[3:]), dtype=self.array.dtype, pin_memory=True)
            return torch.index_select(self.array, 2, where, out=out)
        shape = self.array.shape
        out = np.empty((shape[1], shape[2], len(idx), *shape[3:]), dtype=self.array.dtype)
        for j, i in enumerate(np.asarray(idx)):  # one read of each image's rows, written in place
            out[:, :, j] = self.array[i]
        rows = torch.from_numpy(out)
        rows = rows.view(torch.bfloat16) if self.dtype == "bf16" else rows
        return rows.pin_memory() if pin else rows

    def _to_device(self, rows: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        return rows if rows.device == self.device else rows.to(self.device, non_blocking=non_blocking)

    def batch(self, idx: np.ndarray, next_idx: np.ndarray | None = None) -> torch.Tensor:
        """K/V of images ``idx`` as ``[L, 2, B, H, N, d]``; ``next_idx`` is copied ahead when pinned."""
        idx = np.asarray(idx)
        if self._ahead is not None and self._ahead[0] == idx.tobytes():
            _, out, event = self._ahead
            main = torch.cuda.current_stream(self.device)
            main.wait_event(event)
            out.record_stream(main)  # allocated on the side stream: not reused while the main stream reads it
        else:
            out = self._to_device(self._rows(idx))
        self._ahead = None
        if self._stream is not None and next_idx is not None:
            rows = self._rows(np.asarray(next_idx), pin=True)
            with torch.cuda.stream(self._stream):
                ahead = rows.to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            self._ahead = (np.asarray(next_idx).tobytes(), ahead, event)
        if self.dtype == "bf16" and out.dtype != torch.bfloat16:
            out = out.view(torch.bfloat16)
        return out


def _hold_in_memory(arr: np.ndarray, dtype: str, device: torch.device) -> tuple[torch.Tensor, str]:
    """The cache as a ``[L, 2, n, H, N, d]`` tensor (a batch is one ``index_select``) in process memory."""
    tensor = torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, 0, 2)))
    if dtype == "bf16":
        tensor = tensor.view(torch.bfloat16)
    if device.type != "cuda":
        return tensor, "host"
    if fits_on_device(tensor.numel() * tensor.element_size(), device):
        return tensor.to(device), "device"
    return tensor.pin_memory(), "pinned"


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """May a ``kv_cache=memory`` cache of ``nbytes`` live on CUDA ``device``? When it takes less than half the
    device's free memory (the rest is the trial's); else it is held in pinned host memory."""
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < free // 2


@dataclass
class CacheRequest:
    """One split to cache for a trial (see ``open_kv_cache``)."""

    split: Any  # synqt.data.splits.SplitList
    images: np.ndarray  # uint8 [n, H, W, 3], the decoded split
    image_size: int
    interpolation: str = "bicubic"


def open_kv_cache(frozen: Any, request: CacheRequest, *, mode: str, dtype: str, precision: str,
                  max_gb: float, used_bytes: int = 0, cache_dir: str | Path | None, device: torch.device,
                  batch_size: int,
                  mean: Sequence[float], std: Sequence[float],
                  autocast: Callable[[], AbstractContextManager] | None = None) -> tuple[KVCache | None, str]:
    """The split's cache in ``mode`` (``memory``, ``disk``; ``auto`` means ``disk``), or (None, why not).

    ``max_gb`` is the budget of all the trial's caches, ``used_bytes`` what its other splits already took.
    Never raises for a cache that cannot be built: over the budget, too little disk, or a write
    error returns None and one sentence for the trial log; the caller runs the live stream.
    """
    from filelock import FileLock

    from synqt.data.images import default_cache_dir

    split = request.split
    label = f"{split.dataset}/{split.split}"
    geom = geometry(frozen.backbone, request.image_size)
    n = len(request.images)
    nbytes = geom.bytes_per_image(dtype) * n
    if nbytes + used_bytes > max_gb * GIB:
        taken = f", {format_bytes(used_bytes)} of it taken by other splits" if used_bytes else ""
        return None, (f"the {label} K/V cache would take {format_bytes(nbytes)} ({n} images x "
                      f"{format_bytes(geom.bytes_per_image(dtype))}), over kv_cache_max_gb={max_gb:g}{taken}")
    identity = cache_identity(frozen.backbone, split, image_size=request.image_size,
                              interpolation=request.interpolation, mean=mean, std=std,
                              dtype=dtype, precision=precision)
    return _open(frozen, request, identity, geom, mode=mode, dtype=dtype, device=device, batch_size=batch_size,
                 mean=mean, std=std, autocast=autocast, cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(),
                 nbytes=nbytes, label=label, lock_cls=FileLock)


def _open(frozen: Any, request: CacheRequest, identity: dict, geom: Geometry, *, mode: str, dtype: str,
          device: torch.device, batch_size: int, mean: Sequence[float], std: Sequence[float],
          autocast: Callable[[], AbstractContextManager] | None, cache_dir: Path, nbytes: int, label: str,
          lock_cls: Any) -> tuple[KVCache | None, str]:
    files = cache_files(cache_dir, identity)

    def compute(out: np.ndarray) -> None:
        compute_kv(frozen, request.images, mean, std, out, dtype=dtype, device=device, batch_size=batch_size,
                   autocast=autocast)

    if mode == "memory":
        if validate(files, identity, geom) is None:
            arr = np.load(files["data"], mmap_mode="r")
            held, where = _hold_in_memory(arr, dtype, device)
        else:  # compute in process; a memory cache writes nothing to disk
            held, where = compute_held(frozen, request.images, mean, std, geom, dtype=dtype, device=device,
                                       batch_size=batch_size, autocast=autocast)
        return KVCache(held, dtype, device, where, None, identity["split"]), ""
    problem = validate(files, identity, geom)
    if problem is not None:
        try:
            files["dir"].mkdir(parents=True, exist_ok=True)
            with lock_cls(str(files["lock"])):
                problem = validate(files, identity, geom)
                if problem is not None:
                    if problem != "absent":
                        log.warning("K/V cache %s: %s; rebuilding it", label, problem)
                    free = shutil.disk_usage(files["dir"]).free + (
                        files["data"].stat().st_size if files["data"].is_file() else 0)
                    if free < nbytes + DISK_MARGIN_BYTES:
                        return None, (f"the {label} K/V cache needs {format_bytes(nbytes)} but {files['dir']} has "
                                      f"{format_bytes(free)} free")
                    _build(files, identity, geom, compute)
        except OSError as err:  # disk full mid-write, unwritable folder ...
            return None, f"the {label} K/V cache could not be written to {files['dir']}: {err}"
    arr = np.load(files["data"], mmap_mode="r")
    return KVCache(arr, dtype, device, "disk", files["data"], identity["split"]), ""


def open_trial_caches(frozen: Any, cfg: Any, splits: Sequence[tuple[str, CacheRequest]], *, device: torch.device,
                      mean: Sequence[float], std: Sequence[float],
                      autocast: Callable[[], AbstractContextManager] | None = None,
                      who: str = "", say_live: bool = True) -> dict[str, KVCache]:
    """A trial's K/V caches, split by split in the given order (train first: ``kv_cache_max_gb`` covers them
    together); name -> cache for each split that has one. The one place both trainers turn ``kv_cache`` into
    caches: ``off`` -> none; ``auto`` with ``backbone_drop_path: true`` -> none, said once (if ``say_live``);
    a split that cannot be cached (budget, disk) -> one warning naming it, the split runs live. ``who``
    prefixes the messages (e.g. ``rank 1: ``).
    """
    if cfg.kv_cache == "off":
        return {}
    if cfg.backbone_drop_path:  # only kv_cache=auto gets here (the config refuses the others)
        if say_live:
            log.info("kv_cache=auto: running the image stream live, because backbone_drop_path=true draws "
                     "stochastic depth on it every step (set backbone_drop_path: false to train from the K/V cache)")
        return {}
    mode = "disk" if cfg.kv_cache == "auto" else cfg.kv_cache
    out: dict[str, KVCache] = {}
    used = 0
    for name, request in splits:
        cache, why = open_kv_cache(frozen, request, mode=mode, dtype=cfg.kv_cache_dtype, precision=cfg.precision,
                                   max_gb=cfg.kv_cache_max_gb, used_bytes=used, cache_dir=cfg.cache_dir,
                                   device=device, batch_size=cfg.eval_batch_size, mean=mean, std=std,
                                   autocast=autocast)
        if cache is None:
            log.warning("%skv_cache=%s: %s; the %s split runs the live image stream", who, cfg.kv_cache, why, name)
            continue
        used += cache.nbytes
        out[name] = cache
        log.info("%sK/V cache %s/%s: %d images, %s %s (%s)%s", who, cfg.dataset, request.split.split, len(cache),
                 format_bytes(cache.nbytes), cfg.kv_cache_dtype, cache.where,
                 f" at {cache.path}" if cache.path else "")
    return out


def feed(cache: KVCache | None, live: Callable[[np.ndarray], torch.Tensor],
         micro_batches: Sequence[np.ndarray], then: np.ndarray | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The model inputs for each micro-batch in turn: ``{"kv": ...}`` from the cache, else ``{"images": ...}``.

    ``then``: the micro-batch that follows the last one (the next optimizer step's first), so a pinned cache
    copies it ahead while this step's last micro-batch computes.
    """
    for i, idx in enumerate(micro_batches):
        if cache is None:
            yield {"images": live(idx)}
        else:
            nxt = micro_batches[i + 1] if i + 1 < len(micro_batches) else then
            yield {"kv": cache.batch(idx, nxt)}


__all__ = ["planned_cache", "STREAM_CODE_VERSION", "Geometry", "geometry", "estimate_bytes", "format_bytes",
           "cache_identity", "identity_key", "cache_files", "validate", "compute_kv", "compute_held", "KVCache",
           "CacheRequest", "open_kv_cache", "open_trial_caches", "feed", "weights_digest"]
