"""Dataset layouts, splits, the official transform, the decoded-image cache and `synqt data check`.

Three on-disk layouts are in use for VTAB-1k / FGVC (spec section 7); each dataset folder is read
through one of them, detected automatically or forced:

- ``vtab_json``  ``<root>/<ds>/{train800val200,test,train800?,val200?}.json``: JSON lists of
  one-entry objects ``{"relative/path.png": label}``, paths relative to ``<root>/<ds>/images/``.
- ``vtab_txt``   ``<root>/<ds>/{train800,val200,train800val200,test}.txt``: lines
  ``relative/path label``, paths relative to ``<root>/<ds>/``.
- ``fgvc_json``  ``<root>/<ds>/{train,val,test}.json``: objects ``{"relative/path.jpg": class_id}``,
  paths relative to ``images/``, ``Images/`` or the dataset folder; ids remapped to 0..K-1.

The transform is the official one (PIL decode, convert RGB, resize to a square with a PIL filter,
to tensor, normalise). Resizing is done once and the uint8 result is cached on node-local disk so
that a sweep's many trials on one dataset decode each image only once per node.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from synqt import registry, splitcheck
from synqt.errors import DataError
from synqt.fileio import atomic_write, human_bytes
from synqt.imagemodes import HOW, RESCALED, to_rgb
from synqt.listfiles import INVISIBLE, read_list_text, resolve_listed, show_path

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

LAYOUTS = ("vtab_json", "vtab_txt", "fgvc_json")
SPLITS = ("train800", "val200", "train800val200", "test")
# VTAB-1k's fixed splits and their sizes (by the benchmark's definition); test's size varies by task (the registry)
VTAB1K_SPLIT_SIZES = registry.VTAB1K_SPLIT_SIZES
FGVC_SPLITS = ("train", "val", "test")
# Project split name -> the FGVC list files that make it up.
FGVC_SPLIT_MAP: dict[str, tuple[str, ...]] = {
    "train800": ("train",),
    "val200": ("val",),
    "train800val200": ("train", "val"),
    "test": ("test",),
    "train": ("train",),
    "val": ("val",),
}
# Where VPT keeps each FGVC dataset's images, tried in this order.
FGVC_IMAGE_DIRS = ("images", "Images", ".")
INTERPOLATIONS: dict[str, int] = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
# Bump when the cached array's content or naming changes, so old caches are never reused.
CACHE_FORMAT_VERSION = 2  # 2: 16-bit / float images scaled by value range (1 clipped them)
BUILD_LOG_NAME = "builds.log"
# vtab_json with only train800val200: the first 800 entries train, the rest val
DERIVED_TRAIN = VTAB1K_SPLIT_SIZES["train800"]


@dataclass
class SplitList:
    """One split of one dataset: absolute image paths and 0-based labels, plus provenance."""

    dataset: str
    split: str
    layout: str
    paths: list[Path]
    labels: list[int]
    list_files: list[Path]
    list_hash: str
    derived: bool = False
    data_root: Path | None = None
    # "test.json entry 5" / "train800.txt line 12" for each entry, so errors can point at the list.
    sources: list[str] = field(default_factory=list, repr=False)
    # entries found under another spelling than the list's (backslashes, invisible characters, NFD ...)
    notes: list[str] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.paths)


# ----------------------------------------------------------------------------------------------
# Folders and layout detection


def _listing(folder: Path, limit: int = 40) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    except OSError:
        return "(unreadable)"
    if not names:
        return "(empty)"
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _dataset_dir(data_root: str | Path, dataset: str) -> Path:
    root = Path(data_root).expanduser().absolute()
    if not str(data_root):
        raise DataError("data_root is empty: set data_root (or --data-root) to the folder holding datasets")
    if not root.is_dir():
        raise DataError(f"data root {show_path(root)} does not exist or is not a folder")
    if not dataset:
        raise DataError(f"dataset name is empty: name one of the folders under {root}")
    ds_dir = root / dataset
    if not ds_dir.is_dir():
        folders = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(
            f"dataset folder {show_path(ds_dir)} does not exist; folders under {root}: "
            + (", ".join(folders) if folders else "(none)")
        )
    return ds_dir


def detect_layout(dataset_dir: Path) -> str:
    """Tell the layout of one dataset folder from the list files it holds."""
    d = Path(dataset_dir)
    if not d.is_dir():
        raise DataError(f"dataset folder {d} does not exist")
    if (d / "train800val200.json").is_file() or (d / "train800.json").is_file():
        return "vtab_json"
    if (d / "train.json").is_file() or (d / "val.json").is_file():
        return "fgvc_json"
    if any((d / f"{s}.txt").is_file() for s in SPLITS):
        return "vtab_txt"
    if (d / "test.json").is_file():
        # Only a test list: its JSON type tells the two JSON layouts apart.
        head = read_list_text(d / "test.json").text.lstrip()[:1]
        return "vtab_json" if head == "[" else "fgvc_json"
    raise DataError(
        f"cannot tell the layout of {d}: expected train800val200.json + test.json (vtab_json), "
        f"train800.txt/val200.txt/train800val200.txt/test.txt (vtab_txt) or train.json/val.json/"
        f"test.json (fgvc_json); the folder holds: {_listing(d)}"
    )


def _resolve_layout(ds_dir: Path, layout: str) -> str:
    if layout == "auto":
        return detect_layout(ds_dir)
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}: expected auto or one of {', '.join(LAYOUTS)}")
    return layout


# ----------------------------------------------------------------------------------------------
# List file parsers: each returns [(relative_path, label, source)]

Entry = tuple[str, int, str]


def _check_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _load_json(path: Path) -> Any:
    text = read_list_text(path).text
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"list file {path} line {e.lineno}: malformed JSON ({e.msg})") from e


def _parse_vtab_json(path: Path) -> list[Entry]:
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError(
            f'list file {path}: expected a JSON list of one-entry objects {{"path.png": label}}, '
            f"got a {type(data).__name__}"
        )
    out: list[Entry] = []
    for i, item in enumerate(data, start=1):
        where = f"{path.name} entry {i}"
        if not (isinstance(item, dict) and len(item) == 1):
            raise DataError(
                f'list file {path} entry {i}: expected a one-entry object {{"path.png": label}}, got {item!r:.120}'
            )
        ((rel, label),) = item.items()
        if not _check_int(label):
            raise DataError(f"list file {path} entry {i}: label of {rel!r} is {label!r}, expected an integer")
        out.append((rel, label, where))
    return out


def _parse_vtab_txt(path: Path) -> list[Entry]:
    # CRLF, CR-only and LF line ends; tabs, no-break spaces and trailing blanks between path and label
    lines = read_list_text(path).text.splitlines()
    out: list[Entry] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.rsplit(None, 1)
        if len(parts) == 2:
            parts[1] = "".join(ch for ch in parts[1] if ch not in INVISIBLE)
        if len(parts) != 2 or not re.fullmatch(r"[+-]?\d+", parts[1]):
            raise DataError(
                f"list file {path} line {n}: expected 'relative/path label' with an integer label, got {line!r:.120}"
            )
        out.append((parts[0].strip(), int(parts[1]), f"{path.name} line {n}"))
    return out


def _parse_fgvc_json(path: Path) -> list[Entry]:
    data = _load_json(path)
    if not isinstance(data, dict):
        raise DataError(
            f'list file {path}: expected a JSON object {{"path.jpg": class_id}}, got a {type(data).__name__}'
        )
    out: list[Entry] = []
    for i, (rel, label) in enumerate(data.items(), start=1):
        if not _check_int(label):
            raise DataError(f"list file {path} entry {i}: class id of {rel!r} is {label!r}, expected an integer")
        out.append((rel, label, f"{path.name} entry {i}"))
    return out


def _missing_list(ds_dir: Path, layout: str, names: Sequence[str]) -> DataError:
    wanted = " or ".join(str(ds_dir / n) for n in names)
    return DataError(f"list file {wanted} not found (layout {layout}); the folder holds: {_listing(ds_dir)}")


def _hash(list_files: Sequence[Path], extra: str) -> str:
    digest = hashlib.sha256()
    for f in list_files:
        digest.update(f.name.encode() + b"\0")
        digest.update(f.read_bytes())
        digest.update(b"\0")
    digest.update(extra.encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Splits


def _vtab_entries(ds_dir: Path, layout: str, split: str) -> tuple[list[Entry], list[Path], str, bool]:
    """Entries of a VTAB split, deriving train800/val200 (or train800val200) where a list is absent."""
    ext, parse = (".json", _parse_vtab_json) if layout == "vtab_json" else (".txt", _parse_vtab_txt)
    f = ds_dir / f"{split}{ext}"
    if f.is_file():
        return parse(f), [f], "", False
    full = ds_dir / f"train800val200{ext}"
    if split in ("train800", "val200") and full.is_file():
        entries = parse(full)
        if len(entries) < 2:
            raise DataError(f"list file {full} has {len(entries)} entries: cannot derive {split} from it")
        # Official VTAB-1k: 1000 entries -> first 800 / remaining 200. Smaller lists keep 80/20.
        cut = DERIVED_TRAIN if len(entries) >= 1000 else max(1, round(0.8 * len(entries)))
        part = entries[:cut] if split == "train800" else entries[cut:]
        return part, [full], f"derived:{split}:first{cut}", True
    if split == "train800val200":
        a, b = ds_dir / f"train800{ext}", ds_dir / f"val200{ext}"
        if a.is_file() and b.is_file():
            return parse(a) + parse(b), [a, b], "derived:train800val200:concat", True
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for layout {layout}: expected one of {', '.join(SPLITS)}")
    raise _missing_list(ds_dir, layout, [f"{split}{ext}"])


def _fgvc_all(ds_dir: Path) -> dict[str, list[Entry]]:
    files = {s: ds_dir / f"{s}.json" for s in FGVC_SPLITS}
    found = {s: _parse_fgvc_json(f) for s, f in files.items() if f.is_file()}
    if not found:
        raise _missing_list(ds_dir, "fgvc_json", [f"{s}.json" for s in FGVC_SPLITS])
    return found


def _fgvc_image_dir(ds_dir: Path, lists: dict[str, list[Entry]]) -> Path:
    """The first of images/, Images/, the dataset folder that holds the first listed file."""
    first = next((e[0][0] for e in lists.values() if e), None)
    if first is not None:
        for cand in FGVC_IMAGE_DIRS:
            if (ds_dir / cand / first).is_file():
                return ds_dir / cand if cand != "." else ds_dir
    # Nothing found: keep the first existing candidate so errors name a plausible path.
    for cand in FGVC_IMAGE_DIRS[:-1]:
        if (ds_dir / cand).is_dir():
            return ds_dir / cand
    return ds_dir


def _resolve_paths(base: Path, entries: Sequence[Entry], split: str, notes: list[str]) -> list[Path]:
    """Each entry's file: as listed, else its existing Windows / invisible-character / NFD spelling."""
    out = []
    for rel, _, src in entries:
        path, note = resolve_listed(base, rel)
        if note is not None:
            notes.append(f"{src}: {note}")
        out.append(path)
    if notes:
        log.info("split %s: %d listed path(s) found under another spelling, first: %s", split, len(notes), notes[0])
    return out


def official_split_size(dataset: str, split: str) -> int | None:
    """Images in ``split`` of the registry task ``dataset`` is (or is an alias of), by the benchmark's official
    list files (configs/datasets.yaml): VTAB-1k 800 / 200 / 1000 for train800 / val200 / train800val200 and each
    task's own test size; FGVC VPT's train / val / test lists (train800val200 = train + val, ``FGVC_SPLIT_MAP``).
    None for a dataset or split the registry has no number for (e.g. the synthetic demo tasks)."""
    info = registry.lookup(dataset)
    if info is None:
        return None
    if info.benchmark == "vtab1k":
        return VTAB1K_SPLIT_SIZES.get(split, info.split_sizes.get(split))
    parts = FGVC_SPLIT_MAP.get(split, ()) if info.benchmark == "fgvc" else ()
    if parts and all(part in info.split_sizes for part in parts):
        return sum(info.split_sizes[part] for part in parts)
    return None


def read_split(data_root: str | Path, dataset: str, split: str, layout: str = "auto") -> SplitList:
    """Read one split's image paths and labels (no image is opened)."""
    ds_dir = _dataset_dir(data_root, dataset)
    layout = _resolve_layout(ds_dir, layout)
    root = ds_dir.parent
    if layout == "fgvc_json":
        if split not in FGVC_SPLIT_MAP:
            raise DataError(
                f"unknown split {split!r} for layout fgvc_json: expected one of {', '.join(FGVC_SPLIT_MAP)}"
            )
        parts = FGVC_SPLIT_MAP[split]
        missing = [p for p in parts if not (ds_dir / f"{p}.json").is_file()]
        if missing:
            raise _missing_list(ds_dir, layout, [f"{p}.json" for p in missing])
        lists = _fgvc_all(ds_dir)
        ids = sorted({lab for entries in lists.values() for _, lab, _ in entries})
        remap = {c: i for i, c in enumerate(ids)}
        img_dir = _fgvc_image_dir(ds_dir, lists)
        entries = [e for p in parts for e in lists[p]]
        list_files = [ds_dir / f"{p}.json" for p in parts]
        # Labels depend on every split's ids, so the remap is part of the hash.
        extra = "fgvc:ids=" + ",".join(map(str, ids)) + f":dir={img_dir.relative_to(ds_dir)}"
        notes: list[str] = []
        return SplitList(
            dataset=dataset,
            split=split,
            layout=layout,
            paths=_resolve_paths(img_dir, entries, split, notes),
            labels=[remap[lab] for _, lab, _ in entries],
            list_files=list_files,
            list_hash=_hash(list_files, f"{layout}:{split}:{extra}"),
            derived=False,
            data_root=root,
            sources=[s for _, _, s in entries],
            notes=notes,
        )
    entries, list_files, derivation, derived = _vtab_entries(ds_dir, layout, split)
    img_dir = ds_dir / "images" if layout == "vtab_json" else ds_dir
    notes = []
    return SplitList(
        dataset=dataset,
        split=split,
        layout=layout,
        paths=_resolve_paths(img_dir, entries, split, notes),
        labels=[lab for _, lab, _ in entries],
        list_files=list_files,
        list_hash=_hash(list_files, f"{layout}:{derivation}"),
        derived=derived,
        data_root=root,
        sources=[s for _, _, s in entries],
        notes=notes,
    )


def _available_labels(ds_dir: Path, layout: str) -> tuple[list[int], list[Path]]:
    """All labels in every list file present (raw ids for fgvc), and those files."""
    if layout == "fgvc_json":
        lists = _fgvc_all(ds_dir)
        return [lab for e in lists.values() for _, lab, _ in e], [ds_dir / f"{s}.json" for s in lists]
    ext, parse = (".json", _parse_vtab_json) if layout == "vtab_json" else (".txt", _parse_vtab_txt)
    files = [ds_dir / f"{s}{ext}" for s in SPLITS if (ds_dir / f"{s}{ext}").is_file()]
    if not files:
        raise _missing_list(ds_dir, layout, [f"{s}{ext}" for s in SPLITS])
    return [lab for f in files for _, lab, _ in parse(f)], files


def dataset_num_classes(data_root: str | Path, dataset: str, layout: str = "auto") -> int:
    """Class count from the lists: max label + 1 (VTAB), number of distinct ids (FGVC)."""
    ds_dir = _dataset_dir(data_root, dataset)
    layout = _resolve_layout(ds_dir, layout)
    labels, files = _available_labels(ds_dir, layout)
    if not labels:
        raise DataError(f"the list files {', '.join(str(f) for f in files)} hold no entries")
    if layout == "fgvc_json":
        return len(set(labels))
    return max(labels) + 1


def validate_dataset(
    data_root: str | Path,
    dataset: str,
    splits: list[str],
    num_classes: int | None,
    layout: str = "auto",
) -> dict[str, int]:
    """Check lists, labels and that every listed file exists (no decoding); return counts per split.

    Raises DataError naming the folder, list file, entry or label at fault.
    """
    ds_dir = _dataset_dir(data_root, dataset)
    layout = _resolve_layout(ds_dir, layout)
    data_classes = dataset_num_classes(data_root, dataset, layout)
    classes = num_classes if num_classes is not None else data_classes
    counts: dict[str, int] = {}
    for split in splits:
        sl = read_split(data_root, dataset, split, layout)
        if not sl.paths:
            raise DataError(f"split {split} of {ds_dir} is empty (list {', '.join(map(str, sl.list_files))})")
        for lab, src in zip(sl.labels, sl.sources, strict=True):
            if not 0 <= lab < classes:
                what = f"num_classes={classes} (config)" if num_classes is not None else f"{classes} classes"
                raise DataError(f"{ds_dir / src.split(' ')[0]} ({src}): label {lab} outside [0, {classes}) for {what}")
        missing = [(p, s) for p, s in zip(sl.paths, sl.sources, strict=True) if not p.is_file()]
        if missing:
            shown = "; ".join(f"{show_path(p)} ({s})" for p, s in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DataError(f"{len(missing)} listed image file(s) missing in split {split}: {shown}{more}")
        counts[split] = len(sl.paths)
    if num_classes is not None and num_classes != data_classes:
        raise DataError(
            f"num_classes={num_classes} in the config disagrees with the data: the lists of {ds_dir} hold "
            f"{data_classes} classes ({'distinct ids' if layout == 'fgvc_json' else 'max label + 1'})"
        )
    return counts


# ----------------------------------------------------------------------------------------------
# Transform and decoding


def _resample(interpolation: str) -> int:
    try:
        return INTERPOLATIONS[interpolation]
    except KeyError:
        raise DataError(
            f"unknown interpolation {interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}"
        ) from None


def decode_image(path: Path, image_size: int, resample: int) -> np.ndarray:
    """The official transform up to the tensor: PIL decode, RGB, square resize; uint8 [H, W, 3].

    The RGB step maps each Pillow mode by its value range (``synqt.imagemodes.to_rgb``): for 8-bit
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


def _workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _decode_into(out: np.ndarray, paths: Sequence[Path], image_size: int, resample: int) -> None:
    # PIL releases the GIL while decoding and resizing, so threads scale.
    def one(i: int) -> None:
        out[i] = decode_image(paths[i], image_size, resample)

    pool = ThreadPoolExecutor(max_workers=_workers())
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
    resample = _resample(interpolation)
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
                    from synqt.fileio import set_aside

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


# ----------------------------------------------------------------------------------------------
# `synqt data check`


def _config_num_classes(name: str) -> tuple[int | None, str | None]:
    """(num_classes, config path) of the task ``name`` is in the dataset registry, or (None, None)."""
    from synqt.registry import lookup

    info = lookup(name)
    if info is None or info.config_path is None:
        return None, None
    return info.num_classes, str(info.config_path)


def _check_splits(ds_dir: Path, layout: str) -> list[str]:
    if layout == "fgvc_json":
        return [s for s in FGVC_SPLITS if (ds_dir / f"{s}.json").is_file()]
    ext = ".json" if layout == "vtab_json" else ".txt"
    present = {s for s in SPLITS if (ds_dir / f"{s}{ext}").is_file()}
    out = []
    for s in SPLITS:
        derivable = (s in ("train800", "val200") and "train800val200" in present) or (
            s == "train800val200" and {"train800", "val200"} <= present
        )
        if s in present or derivable:
            out.append(s)
    return out


def split_leaks(data_root: str | Path, dataset: str, layout: str = "auto", *, content: bool = True,
                splits: dict[str, SplitList] | None = None) -> splitcheck.LeakReport:
    """Duplicates within a split and overlap between splits of one dataset (``synqt.splitcheck.find_leaks``).

    Reads every split the folder has (train800, val200, train800val200, test, derived ones included; FGVC
    train, val, test) unless ``splits`` gives them already; a split whose list cannot be read is left out
    (``validate_dataset`` / ``check_datasets`` report it). ``content``: also compare decoded pixels, with the
    hashes cached under ``default_cache_dir()``. Decodes in ``_workers()`` threads.
    """
    if splits is None:
        ds_dir = _dataset_dir(data_root, dataset)
        lay = _resolve_layout(ds_dir, layout)
        splits = {}
        for name in _check_splits(ds_dir, lay):
            try:
                splits[name] = read_split(data_root, dataset, name, lay)
            except DataError:
                continue
    else:
        ds_dir = _dataset_dir(data_root, dataset)
    key = hashlib.sha256(os.path.realpath(ds_dir).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", dataset)
    return splitcheck.find_leaks(
        dataset, {s: list(zip(sl.sources, sl.paths, strict=True)) for s, sl in splits.items()}, content=content,
        cache_dir=default_cache_dir(), cache_name=f"{name}-{key}", workers=_workers(), folder=ds_dir)


@dataclass
class DataCheck:
    """The report of ``check_datasets``: its text lines, the number of problems and of split-leak findings.

    Leaks are warnings (``ok`` stays True) unless the check ran with ``strict``: then they count as problems.
    """

    lines: list[str]
    problems: int
    leaks: int = 0

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def ok(self) -> bool:
        return self.problems == 0


def check_datasets(root: str | Path, names: Sequence[str] | None = None, layout: str = "auto",
                   decode: bool = False, *, content: bool = True, strict: bool = False) -> DataCheck:
    """`synqt data check`: counts and problems per dataset and split (the CLI prints the report).

    Also split leaks (``split_leaks``: duplicates within a split, overlap between splits that must be disjoint),
    by file and, with ``content``, by decoded pixels (an undecodable image is then a problem too); ``strict``
    counts each leak finding as a problem.
    """
    lines: list[str] = []
    say = lines.append
    root_p = Path(root).expanduser().absolute()
    if not root_p.is_dir():
        say(f"error: data root {root_p} does not exist or is not a folder")
        return DataCheck(lines, 1)
    explicit = bool(names)
    names = list(names) if names else sorted(p.name for p in root_p.iterdir() if p.is_dir())
    if not names:
        say(f"error: no dataset folders under {root_p}")
        return DataCheck(lines, 1)
    total = 0
    leaks = 0
    for name in names:
        problems: list[str] = []
        read: dict[str, SplitList] = {}
        try:
            ds_dir = _dataset_dir(root_p, name)
            lay = _resolve_layout(ds_dir, layout)
        except DataError as e:
            if not explicit and "cannot tell the layout" in str(e):
                say(f"{name}: skipped (no list files)")
                continue
            say(f"{name}: ERROR {e}")
            total += 1
            continue
        cfg_classes, cfg_path = _config_num_classes(name)
        try:
            data_classes: int | None = dataset_num_classes(root_p, name, lay)
        except DataError as e:
            data_classes = None
            problems.append(str(e))
        cfg_txt = f", config {cfg_classes} ({cfg_path})" if cfg_classes is not None else ", no shipped config"
        say(f"{name} [{lay}] classes: {data_classes}{cfg_txt}")
        if cfg_classes is not None and data_classes is not None and cfg_classes != data_classes:
            problems.append(
                f"num_classes={cfg_classes} in {cfg_path} disagrees with the lists ({data_classes} classes)"
            )
        limit = cfg_classes if cfg_classes is not None else data_classes
        resample = _resample("bicubic")
        for split in _check_splits(ds_dir, lay):
            try:
                sl = read_split(root_p, name, split, lay)
            except DataError as e:
                problems.append(f"{split}: {e}")
                say(f"  {split:<15} unreadable list")
                continue
            read[split] = sl
            missing, bad_labels, unreadable = [], [], []
            modes: dict[str, int] = {}
            rescaled: dict[str, list[str]] = {}
            for p, lab, src in zip(sl.paths, sl.labels, sl.sources, strict=True):
                if limit is not None and not 0 <= lab < limit:
                    bad_labels.append(f"label {lab} outside [0, {limit}) at {src}")
                if not p.is_file():
                    missing.append(f"{show_path(p)} ({src})")
                elif decode:
                    try:
                        with Image.open(p) as im:
                            mode = im.mode
                            to_rgb(im, p).resize((8, 8), resample)
                        modes[mode] = modes.get(mode, 0) + 1
                        if mode in RESCALED:
                            rescaled.setdefault(mode, []).append(f"{show_path(p)} ({src})")
                    except Exception as e:  # any decoder failure is a finding, not a crash
                        unreadable.append(f"{show_path(p)} ({src}): {e}")
            note = f" (derived from {', '.join(f.name for f in sl.list_files)})" if sl.derived else ""
            say(f"  {split:<15} {len(sl):>7} images {len(set(sl.labels)):>5} classes{note}")
            for f in sl.list_files:
                enc = read_list_text(f).encoding
                if enc != "UTF-8":  # read right, but say so: the next tool may not
                    say(f"    list {f.name}: read as {enc}")
            if sl.notes:
                say(f"    {len(sl.notes)} listed path(s) found under another spelling, e.g. {sl.notes[0]}")
            if decode and modes:
                say("    modes: " + ", ".join(f"{m} {n} ({HOW.get(m, '?')})" for m, n in sorted(modes.items())))
            for mode, items in sorted(rescaled.items()):
                say(f"    CONVERTED {len(items)} image(s) of mode {mode} by value range ({HOW[mode]}): "
                    + "; ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else ""))
            found = (("missing file", missing), ("bad label", bad_labels), ("unreadable", unreadable))
            for kind, items in found:
                for item in items[:10]:
                    problems.append(f"{split}: {kind}: {item}")
                if len(items) > 10:
                    problems.append(f"{split}: {kind}: ... and {len(items) - 10} more")
        found_leaks = 0
        if read:
            rep = split_leaks(root_p, name, lay, content=content, splits=read)
            how = (f"by file and by pixels: {rep.hashed} image files in {rep.seconds:.1f} s ({rep.from_cache} "
                   "hashes from the pixel-hash cache)" if content else "by file only (--paths-only)")
            say(f"  split leaks checked {how}")
            if not decode:  # with --decode the loop above reported them already
                problems += [f"unreadable: {u}" for u in rep.unreadable[:10]]
                if len(rep.unreadable) > 10:
                    problems.append(f"unreadable: ... and {len(rep.unreadable) - 10} more")
            for line in rep.lines():
                say(f"  {line}" if line.startswith(" ") else f"  {'PROBLEM' if strict else 'LEAK'} {line}")
            found_leaks = len(rep.findings)
        for pr in problems:
            say(f"  PROBLEM {pr}")
        n = len(problems) + (found_leaks if strict else 0)
        warned = 0 if strict else found_leaks
        parts = [f"{n} problem(s)"] * bool(n) + [f"{warned} split leak(s)"] * bool(warned)
        say(f"  {', '.join(parts) or 'OK'}")
        total += n
        leaks += found_leaks
    if total:
        say(f"{total} problem(s) found")
    elif leaks:
        say(f"{leaks} split leak(s) found (LEAK lines; --strict makes them errors)")
    else:
        say("all OK")
    return DataCheck(lines, total, leaks)
