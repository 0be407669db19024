"""The official transform and the decoded-image cache: PIL decode, RGB, square resize, uint8 on
node-local disk (one decode per image per node), normalisation to a tensor batch.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from synqt.data.imagemodes import to_rgb
from synqt.data.listfiles import show_path
from synqt.data.splits import SplitList
from synqt.errors import DataError
from synqt.storage import atomic_write, human_bytes

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

INTERPOLATIONS: dict[str, int] = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
# Bump when the cached array's content or naming changes, so old caches are never reused.
CACHE_FORMAT_VERSION = 2  # 2: 16-bit / float images scaled by value range (1 clipped them)
BUILD_LOG_NAME = "builds.log"


# ----------------------------------------------------------------------------------------------
# Transform and decoding


def pil_filter(interpolation: str) -> int:
    try:
        return INTERPOLATIONS[interpolation]
    except KeyError:
        raise DataError(
            f"unknown interpolation {interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}"
        ) from None


def decode_image(path: Path, image_size: int, resample: int) -> np.ndarray:
    """The official transform up to the tensor: PIL decode, RGB, square resize; uint8 [H, W, 3].

    The RGB step maps each Pillow mode by its value range (``synqt.data.imagemodes.to_rgb``): for 8-bit
    modes it is the official ``convert("RGB")``; 16-bit and float images are scaled, not clipped.
    """
    try:
        with Image.open(path) as im:
            rgb = to_rgb(im, path)
        out = rgb.resize((image_size, image_size), resample)
    except FileNotFoundError as e:
        raise DataError(f"listed image file missing: {show_path(path)}") from e
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {path}: {e}") from e
    return np.asarray(out, dtype=np.uint8)


def workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _decode_into(out: np.ndarray, paths: Sequence[Path], image_size: int, resample: int) -> None:
    # PIL releases the GIL while decoding and resizing, so threads scale.
    def one(i: int) -> None:
        out[i] = decode_image(paths[i], image_size, resample)

    pool = ThreadPoolExecutor(max_workers=workers())
    try:
        for _ in pool.map(one, range(len(paths))):
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # first bad image: stop, do not decode the rest


CACHE_SHARED_ENV = "SYNQT_CACHE_SHARED"  # 1: cache folders and files group-writable (a group-shared cache)
_cache_warned: set[str] = set()


def _user_name() -> str:
    import pwd

    try:
        name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid without a passwd entry (containers)
        name = str(os.getuid())
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def default_cache_dir() -> Path:
    """Node-local and per user by default: `$SYNQT_CACHE_DIR`, else `$SLURM_TMPDIR/synqt-cache` (per job),
    else `<tmp>/synqt-cache-<user>`.

    The cache is built under a `filelock.FileLock`, and POSIX/flock locks are unreliable on
    NFS and Lustre (silently not exclusive, or very slow), so the default is a node-local disk;
    node-local reads of the memory-mapped array are also much faster than a shared filesystem.
    Point SYNQT_CACHE_DIR at shared storage only if its locking is known to work. Per user, because a
    folder the first user makes is not writable by the next one; for one cache shared by a group see
    `cache_is_shared`.
    """
    env = os.environ.get("SYNQT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    slurm = os.environ.get("SLURM_TMPDIR")
    if slurm:
        return Path(slurm) / "synqt-cache"
    return Path(tempfile.gettempdir()) / f"synqt-cache-{_user_name()}"


def cache_is_shared() -> bool:
    """`SYNQT_CACHE_SHARED=1`: folders are made 2775 and files 664 whatever the umask, so a group shares one
    cache (the admin makes the folder: `mkdir D; chgrp GROUP D; chmod 2775 D`; users set `SYNQT_CACHE_DIR=D`)."""
    return os.environ.get(CACHE_SHARED_ENV, "").strip().lower() in ("1", "true", "yes", "group")


def _owner(path: Path) -> str:
    import pwd

    try:
        uid = path.stat().st_uid
    except OSError:
        return "?"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _warn_cache_unusable(cdir: Path, err: OSError) -> None:
    key = str(cdir)
    if key in _cache_warned:
        return
    _cache_warned.add(key)
    import logging

    where = cdir if cdir.exists() else cdir.parent
    logging.getLogger("synqt.data").warning(
        "decoded-image cache %s is not usable by user %s (%s: %s; %s belongs to %s): decoding without the cache. "
        "Set SYNQT_CACHE_DIR (or cache_dir) to a folder of your own, or see docs/data.md for a group-shared cache",
        cdir, _user_name(), err.strerror or type(err).__name__, err.filename or cdir, where, _owner(where))


def cache_key(split: SplitList, image_size: int, interpolation: str) -> str:
    """sha256 of everything the cached array depends on: lists, size, filter, format, data root."""
    root = split.data_root if split.data_root is not None else split.list_files[0].parent.parent
    payload = json.dumps(
        [split.list_hash, int(image_size), interpolation, CACHE_FORMAT_VERSION, str(Path(root).absolute())]
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def cache_paths(split: SplitList, image_size: int, interpolation: str, cache_dir: str | Path) -> dict[str, Path]:
    """File names of one cache entry: images `.npy`, labels `.labels.npy`, `.lock`."""
    key = cache_key(split, image_size, interpolation)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", split.dataset)
    stem = f"{name}-{split.split}-{image_size}-{interpolation}-{key[:20]}"
    d = Path(cache_dir)
    return {
        "images": d / f"{stem}.npy",
        "labels": d / f"{stem}.labels.npy",
        "lock": d / f"{key}.lock",
        "key": Path(key),
    }


def _build_cache(split: SplitList, image_size: int, resample: int, files: dict[str, Path]) -> None:
    n = len(split.paths)
    mode = 0o664 if cache_is_shared() else None

    def write_labels(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(split.labels, dtype=np.int64))

    def write_images(tmp: Path) -> None:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, image_size, image_size, 3))
        _decode_into(arr, split.paths, image_size, resample)
        arr.flush()
        del arr

    # Labels first: readers test only for the images file, which appears last.
    atomic_write(files["labels"], write_labels, mode=mode)
    atomic_write(files["images"], write_images, mode=mode)
    stamp = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    line = (
        f"{stamp}\t{files['key']}\t{split.dataset}\t{split.split}\t{image_size}\t{n}"
        f"\t{socket.gethostname()}\t{os.getpid()}\n"
    )
    build_log = files["images"].parent / BUILD_LOG_NAME
    with open(build_log, "a") as fh:
        fh.write(line)
    if mode is not None and build_log.stat().st_uid == os.getuid():
        build_log.chmod(mode)  # the next labmate appends to it


def load_images(
    split: SplitList,
    image_size: int,
    *,
    interpolation: str = "bicubic",
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode a split to uint8 [N, H, W, 3] (memory-mapped when cached) and int64 labels [N].

    With the cache, concurrent callers on one node build the array once: the builder holds
    `<key>.lock`, re-checks, writes to a temporary file and renames it into place; a caller that
    finds the final file opens it without touching the lock.
    """
    if image_size <= 0:
        raise DataError(f"image_size must be positive, got {image_size}")
    resample = pil_filter(interpolation)
    labels = np.asarray(split.labels, dtype=np.int64)
    n = len(split.paths)
    if not use_cache:
        out = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
        _decode_into(out, split.paths, image_size, resample)
        return out, labels
    cdir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        images, cached_labels, files = _open_cache(split, image_size, interpolation, resample, cdir)
    except OSError as err:  # a folder or file of another user, a read-only or full disk: never a traceback
        _warn_cache_unusable(cdir, err)
        out = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
        _decode_into(out, split.paths, image_size, resample)
        return out, labels
    return images, labels


def _open_cache(split: SplitList, image_size: int, interpolation: str, resample: int,
                cdir: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Path]]:
    """Open (building it first, under its lock, when absent) one cache entry; OSError when unusable."""
    from filelock import FileLock

    shared = cache_is_shared()
    files = cache_paths(split, image_size, interpolation, cdir)
    got = _read_cache_entry(split, image_size, files)
    if not isinstance(got, tuple):
        if not cdir.is_dir():
            cdir.mkdir(parents=True, exist_ok=True)
            if shared:
                cdir.chmod(0o2775)
        lock = FileLock(str(files["lock"]), mode=0o664) if shared else FileLock(str(files["lock"]))
        with lock:
            got = _read_cache_entry(split, image_size, files)  # another process may have built it meanwhile
            if not isinstance(got, tuple):
                if got is not None:  # the broken-file rule: moved aside (kept for a look), named, rebuilt
                    from synqt.storage import set_aside

                    for name in ("images", "labels"):
                        set_aside(files[name], got, "the decoded-image cache entry is rebuilt")
                need = len(split.paths) * image_size * image_size * 3
                free = shutil.disk_usage(cdir).free
                if free < need + (64 << 20):  # a memory map written past a full disk dies of SIGBUS: refuse first
                    raise OSError(errno.ENOSPC, f"{human_bytes(need)} needed, {human_bytes(free)} free", str(cdir))
                _build_cache(split, image_size, resample, files)
            got = _read_cache_entry(split, image_size, files)
            if not isinstance(got, tuple):
                raise DataError(f"decoded-image cache entry {files['images']} was just built but {got}")
    return got[0], got[1], files


def _read_cache_entry(split: SplitList, image_size: int,
                      files: dict[str, Path]) -> tuple[np.ndarray, np.ndarray] | str | None:
    """(images, labels) of a complete cache entry; None when absent; else why it is broken (empty, cut short,
    not an .npy, another shape or other labels than the split's). OSError (permissions) passes through."""
    if not files["images"].is_file():
        return None
    try:
        images = np.load(files["images"], mmap_mode="r")
        labels = np.load(files["labels"])
    except FileNotFoundError:
        return f"{files['labels'].name} is missing"
    except (ValueError, EOFError) as err:  # numpy's words for an empty, cut or foreign file
        return f"not a complete .npy pair ({err})"
    want = (len(split.paths), image_size, image_size, 3)
    if images.shape != want or images.dtype != np.uint8:
        return f"it holds {images.shape} {images.dtype}, expected {want} uint8"
    if not np.array_equal(labels, np.asarray(split.labels, dtype=np.int64)):
        return f"its labels ({files['labels'].name}) differ from the split's"
    return images, labels


def to_tensor_batch(images_uint8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W], (x/255 - mean)/std: torchvision ToTensor+Normalize."""
    import torch

    arr = np.array(images_uint8, dtype=np.uint8, copy=True)  # memmaps are read-only; torch wants writable
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise DataError(f"expected a uint8 batch [B, H, W, 3], got shape {arr.shape}")
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().float().div(255)
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)
