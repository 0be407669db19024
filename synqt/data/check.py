"""`synqt data check`: every dataset folder's layout, lists, images, classes and split leaks, in one report.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from synqt.data import leaks
from synqt.data.imagemodes import HOW, RESCALED, to_rgb
from synqt.data.images import default_cache_dir, pil_filter, workers
from synqt.data.listfiles import read_list_text, show_path
from synqt.data.splits import (
    FGVC_SPLITS,
    SPLITS,
    SplitList,
    dataset_dir,
    dataset_num_classes,
    read_split,
    resolve_layout,
)
from synqt.errors import DataError

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# `synqt data check`


def _config_num_classes(name: str) -> tuple[int | None, str | None]:
    """(num_classes, config path) of the task ``name`` is in the dataset registry, or (None, None)."""
    from synqt.data.registry import lookup

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
                splits: dict[str, SplitList] | None = None) -> leaks.LeakReport:
    """Duplicates within a split and overlap between splits of one dataset (``synqt.data.leaks.find_leaks``).

    Reads every split the folder has (train800, val200, train800val200, test, derived ones included; FGVC
    train, val, test) unless ``splits`` gives them already; a split whose list cannot be read is left out
    (``validate_dataset`` / ``check_datasets`` report it). ``content``: also compare decoded pixels, with the
    hashes cached under ``default_cache_dir()``. Decodes in ``workers()`` threads.
    """
    if splits is None:
        ds_dir = dataset_dir(data_root, dataset)
        lay = resolve_layout(ds_dir, layout)
        splits = {}
        for name in _check_splits(ds_dir, lay):
            try:
                splits[name] = read_split(data_root, dataset, name, lay)
            except DataError:
                continue
    else:
        ds_dir = dataset_dir(data_root, dataset)
    key = hashlib.sha256(os.path.realpath(ds_dir).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", dataset)
    return leaks.find_leaks(
        dataset, {s: list(zip(sl.sources, sl.paths, strict=True)) for s, sl in splits.items()}, content=content,
        cache_dir=default_cache_dir(), cache_name=f"{name}-{key}", workers=workers(), folder=ds_dir)


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
            ds_dir = dataset_dir(root_p, name)
            lay = resolve_layout(ds_dir, layout)
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
        resample = pil_filter("bicubic")
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
