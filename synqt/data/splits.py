"""Dataset layouts and splits: list files parsed into ``SplitList``, official split sizes, validation.

Three on-disk layouts are in use for VTAB-1k / FGVC (spec section 7); each dataset folder is read
through one of them, detected automatically or forced:

- ``vtab_json``  ``<root>/<ds>/{train800val200,test,train800?,val200?}.json``: JSON lists of
  one-entry objects ``{"relative/path.png": label}``, paths relative to ``<root>/<ds>/images/``.
- ``vtab_txt``   ``<root>/<ds>/{train800,val200,train800val200,test}.txt``: lines
  ``relative/path label``, paths relative to ``<root>/<ds>/``.
- ``fgvc_json``  ``<root>/<ds>/{train,val,test}.json``: objects ``{"relative/path.jpg": class_id}``,
  paths relative to ``images/``, ``Images/`` or the dataset folder; ids remapped to 0..K-1.

Decoding the listed images and their cache: ``synqt.data.images``; `synqt data check`: ``synqt.data.check``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synqt.data import registry
from synqt.data.listfiles import INVISIBLE, read_list_text, resolve_listed, show_path
from synqt.errors import DataError

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


def dataset_dir(data_root: str | Path, dataset: str) -> Path:
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


def resolve_layout(ds_dir: Path, layout: str) -> str:
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
    ds_dir = dataset_dir(data_root, dataset)
    layout = resolve_layout(ds_dir, layout)
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
        labels = [remap[lab] for _, lab, _ in entries]
        list_hash, derived = _hash(list_files, f"{layout}:{split}:{extra}"), False
    else:
        entries, list_files, derivation, derived = _vtab_entries(ds_dir, layout, split)
        img_dir = ds_dir / "images" if layout == "vtab_json" else ds_dir
        labels = [lab for _, lab, _ in entries]
        list_hash = _hash(list_files, f"{layout}:{derivation}")
    notes: list[str] = []
    return SplitList(
        dataset=dataset,
        split=split,
        layout=layout,
        paths=_resolve_paths(img_dir, entries, split, notes),
        labels=labels,
        list_files=list_files,
        list_hash=list_hash,
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
    ds_dir = dataset_dir(data_root, dataset)
    layout = resolve_layout(ds_dir, layout)
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
    ds_dir = dataset_dir(data_root, dataset)
    layout = resolve_layout(ds_dir, layout)
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
