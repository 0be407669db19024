"""Split leaks: an image listed twice in one split, or one image in two splits that must be disjoint.

Which pairs leak (big_vision / VTAB-1k protocol: select on validation, report test):

- ``test`` with any other split (``train800``, ``val200``, ``train800val200``; FGVC ``train``, ``val``): the
  reported number is measured on images the model trained on (``val200`` is part of ``train800val200``).
- ``val200`` with ``train800`` (FGVC ``val`` with ``train``): ``protocol: vtab`` stage 1 selects
  hyperparameters on images it trained on.
- an image more than once in one split: a training split weights it twice, an evaluation split counts it twice.

``train800val200`` with ``train800`` / ``val200`` is NOT a leak: by design ``train800val200 = train800 ∪ val200``.

Two entries are the same image when they name the same file (``synqt.data.listfiles.same_file``: after the list
spelling is resolved by ``resolve_listed``, ``./a.png``, ``x/../a.png``, an absolute path and a symbolic link
all name one file) or, with ``content=True``, when their decoded pixels are equal (``pixel_hash``): a renamed
or copied file, or a lossless re-encode (PNG re-saved, PNG <-> BMP/TIFF/lossless WebP, grayscale saved as RGB)
is found. A lossy re-encode (JPEG saved again, PNG -> JPEG) changes the pixels and is NOT found.

Pixel hashes are cached per file (path, size, modification and change times, inode) under the decoded-image
cache folder (``synqt.data.images.default_cache_dir() / pixel-hashes``), so a second check of the same data
costs a ``stat`` per file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from synqt.data.imagemodes import to_rgb
from synqt.data.listfiles import same_file, show_path
from synqt.storage import atomic_write_text

log = logging.getLogger(__name__)

# Bump when pixel_hash changes: cached hashes of the old kind are then ignored.
PIXEL_HASH_VERSION = 1  # also the cache file's format
HASH_CACHE_DIR = "pixel-hashes"
EVAL_SPLIT = "test"
# split -> the split it must not share an image with besides test (selection on the first, training on the second)
VAL_PAIRS: dict[str, str] = {"val200": "train800", "val": "train"}
EXAMPLES = 3


def pixel_hash(path: str | Path) -> str:
    """blake2b-128 (hex) of an image's decoded RGB pixels and its shape ``(H, W, 3)``.

    The image goes through ``synqt.data.imagemodes.to_rgb`` (the loader's mode -> RGB step), so two files the loader
    turns into the same uint8 array hash the same whatever their format or mode. Raises what PIL raises for a
    file it cannot decode (OSError, ValueError, SyntaxError, DecompressionBombError).
    """
    with Image.open(path) as im:
        rgb = to_rgb(im, path)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{rgb.height}x{rgb.width}x3:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


@dataclass
class Entry:
    """One line / entry of a list file and the splits it belongs to (a derived split shares its source's entries)."""

    source: str  # "test.json entry 5", "train800.txt line 12"
    path: Path
    splits: list[str]


@dataclass
class Finding:
    """One kind of leak in one dataset: the groups of entries that are one image."""

    what: str  # "test images also in train800val200", "images listed more than once in train800"
    groups: list[list[Entry]]
    by_pixels: int  # groups found only by their pixels (different files)
    lead: str = ""  # the split the finding is about (test, val200, the split with duplicates)
    other: tuple[str, ...] = ()  # the splits it overlaps (empty for duplicates)

    def example(self, g: list[Entry]) -> list[list[Entry]]:
        """One group as files (each with its entries), put so that a short example shows both sides: a lead
        entry first, then one from the other side, then the rest (lead entries first)."""
        def side(e: Entry) -> int:
            return 0 if self.lead in e.splits else 1 if any(s in e.splits for s in self.other) else 2

        front = [e for e in (next((e for e in g if side(e) == k), None) for k in (0, 1)) if e is not None]
        order = front + sorted((e for e in g if not any(e is x for x in front)), key=side)
        files: dict[str, list[Entry]] = {}
        for e in order:
            files.setdefault(same_file(e.path), []).append(e)
        return list(files.values())

    @property
    def count(self) -> int:
        return len(self.groups)


@dataclass
class LeakReport:
    """``find_leaks``' answer for one dataset: findings (empty: no leak), pixel-hash cost and undecodable files."""

    dataset: str
    findings: list[Finding]
    content: bool
    hashed: int = 0  # distinct files whose pixels were compared
    from_cache: int = 0  # of those, hashes read from the pixel-hash cache
    seconds: float = 0.0
    unreadable: list[str] = field(default_factory=list)  # "path (source): error"
    folder: Path | None = None  # example paths are shown relative to it

    def _show(self, path: Path) -> str:
        if self.folder is not None:
            try:
                return show_path(Path(path).relative_to(self.folder))
            except ValueError:
                pass
        return show_path(path)

    @property
    def count(self) -> int:
        """Distinct images involved in any leak."""
        return len({frozenset(e.source for e in g) for f in self.findings for g in f.groups})

    def summary(self) -> str:
        """One line: the count per finding, e.g. ``3 test images also in train800val200; 1 image ... twice``."""
        return "; ".join(f"{f.count} {f.what}" + (f" ({f.by_pixels} by pixels only)" if f.by_pixels else "")
                         for f in self.findings)

    def lines(self, examples: int = EXAMPLES) -> list[str]:
        """The finding, its count and up to ``examples`` groups, each entry with its list source and file."""
        out = []
        for f in self.findings:
            pix = f" ({f.by_pixels} found by pixels only: different files, same image)" if f.by_pixels else ""
            out.append(f"{f.count} {f.what}{pix}")
            for g in f.groups[:examples]:
                shown = [f"{self._show(es[0].path)} ({_first(e.source for e in es)})" for es in f.example(g)]
                out.append("    e.g. " + " = ".join(shown[:EXAMPLES]) + _more(len(shown) - EXAMPLES, "file", "files"))
            if f.count > examples:
                out.append(f"    ... and {f.count - examples} more")
        return out


class _HashCache:
    """Pixel hashes of one dataset folder keyed by file and (size, mtime, inode, ctime): a changed file is hashed
    again."""

    def __init__(self, folder: Path | None, name: str) -> None:
        self.file = folder / HASH_CACHE_DIR / f"{name}.json" if folder is not None else None
        self.entries: dict[str, list] = {}
        self.dirty = False
        if self.file is None or not self.file.is_file():
            return
        try:
            data = json.loads(self.file.read_text())
            if data.get("version") == PIXEL_HASH_VERSION and isinstance(data.get("files"), dict):
                self.entries = data["files"]
        except (OSError, ValueError, AttributeError) as err:  # unreadable or cut off: hash again, rewrite
            log.debug("pixel-hash cache %s ignored: %s", self.file, err)

    def get(self, key: str, stamp: list[int]) -> str | None:
        hit = self.entries.get(key)
        return hit[-1] if isinstance(hit, list) and hit[:-1] == stamp else None

    def put(self, key: str, stamp: list[int], digest: str) -> None:
        self.entries[key] = [*stamp, digest]
        self.dirty = True

    def save(self) -> None:
        if self.file is None or not self.dirty:
            return
        try:
            atomic_write_text(self.file, json.dumps({"version": PIXEL_HASH_VERSION, "files": self.entries}))
        except OSError as err:  # a read-only or another user's cache folder: the check itself is unaffected
            log.warning("pixel-hash cache %s not written (%s): the next check hashes these images again",
                        self.file, err.strerror or err)


def _hash_files(keys: Sequence[str], cache: _HashCache, workers: int) -> tuple[dict[str, str], dict[str, str], int]:
    """({file: pixel hash}, {file: decode error}, hashes read from the cache) for the existing files ``keys``."""
    hashes: dict[str, str] = {}
    errors: dict[str, str] = {}
    todo: list[tuple[str, list[int]]] = []
    for key in keys:
        try:
            st = Path(key).stat()
        except OSError:
            continue  # missing: `data check` reports it as a missing file
        # a changed or replaced file (rewritten, renamed over, re-linked) differs in one of these
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
        hit = cache.get(key, stamp)
        if hit is not None:
            hashes[key] = hit
        else:
            todo.append((key, stamp))
    from_cache = len(hashes)

    def one(item: tuple[str, list[int]]) -> tuple[str, list[int], str | None, str | None]:
        key, stamp = item
        try:
            return key, stamp, pixel_hash(key), None
        except Exception as err:  # noqa: BLE001 - any decoder failure is a finding, not a crash
            return key, stamp, None, f"{type(err).__name__}: {err}"

    # PIL releases the GIL while decoding and hashlib while hashing, so threads scale with the cores.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for key, stamp, digest, err in pool.map(one, todo):
            if digest is not None:
                hashes[key] = digest
                cache.put(key, stamp, digest)
            elif err is not None:
                errors[key] = err
    cache.save()
    return hashes, errors, from_cache


def _first(items: Iterable[str], n: int = EXAMPLES) -> str:
    items = list(items)
    return ", ".join(items[:n]) + _more(len(items) - n, "entry", "entries")


def _more(n: int, one: str, many: str) -> str:
    return f" and {n} more {one if n == 1 else many}" if n > 0 else ""


def _plural(n: int, one: str, many: str) -> str:
    return one if n == 1 else many


def find_leaks(dataset: str, splits: Mapping[str, Sequence[tuple[str, Path]]], *, content: bool = True,
               cache_dir: Path | None = None, cache_name: str | None = None, workers: int = 4,
               folder: Path | None = None) -> LeakReport:
    """Duplicates within each split and overlap between the splits that must be disjoint (module docstring).

    ``splits``: split name -> ``[(source, path)]`` in list order, the path as ``synqt.data.splits.read_split`` resolved
    it; ``source`` names the list entry ("train800val200.json entry 5") and is the same in a derived split as in
    the list it comes from. ``content``: also compare decoded pixels (``pixel_hash``; threads: ``workers``), with
    hashes cached in ``cache_dir / pixel-hashes / <cache_name>.json`` (None: no cache). Counts are distinct images
    (groups of entries that are one image). ``folder``: example paths are printed relative to it.
    """
    t0 = time.perf_counter()
    entries: dict[str, Entry] = {}
    for split, items in splits.items():
        for source, path in items:
            e = entries.get(source)
            if e is None:
                entries[source] = Entry(source, Path(path), [split])
            elif split not in e.splits:
                e.splits.append(split)
    by_file: dict[str, list[Entry]] = {}
    for e in entries.values():
        by_file.setdefault(same_file(e.path), []).append(e)
    report = LeakReport(dataset, [], content, folder=folder)
    # groups: files with equal pixels (content) or one file each; each group is one image
    if content:
        cache = _HashCache(cache_dir, cache_name or dataset)
        hashes, errors, report.from_cache = _hash_files(list(by_file), cache, workers)
        report.hashed = len(hashes)
        for key, err in errors.items():
            report.unreadable.append(f"{show_path(key)} ({by_file[key][0].source}): {err}")
        by_pixels: dict[str, list[str]] = {}
        for key in by_file:
            by_pixels.setdefault(hashes.get(key, "file:" + key), []).append(key)
        file_groups = list(by_pixels.values())
    else:
        file_groups = [[key] for key in by_file]
    groups = [g for g in ([e for key in keys for e in by_file[key]] for keys in file_groups) if len(g) > 1]

    def files(g: list[Entry], in_splits: Sequence[str]) -> set[str]:
        return {same_file(e.path) for e in g if any(s in e.splits for s in in_splits)}

    def count(g: list[Entry], split: str) -> int:
        return sum(split in e.splits for e in g)

    def finding(what: str, hits: list[list[Entry]], lead: str, by_pixels: int, other: Sequence[str] = ()) -> None:
        if hits:
            report.findings.append(Finding(what, hits, by_pixels, lead, tuple(other)))

    present = list(splits)
    if EVAL_SPLIT in present:
        others = [s for s in present if s != EVAL_SPLIT]
        hits = [g for g in groups if count(g, EVAL_SPLIT) and any(count(g, s) for s in others)]
        where = sorted({s for g in hits for e in g for s in e.splits if s != EVAL_SPLIT}, key=present.index)
        pix = sum(not files(g, [EVAL_SPLIT]) & files(g, others) for g in hits)
        finding(f"{_plural(len(hits), 'test image', 'test images')} also in {' / '.join(where)}", hits,
                EVAL_SPLIT, pix, others)
    for val, train in VAL_PAIRS.items():
        if val in present and train in present:
            hits = [g for g in groups if count(g, val) and count(g, train)]
            pix = sum(not files(g, [val]) & files(g, [train]) for g in hits)
            finding(f"{val} {_plural(len(hits), 'image', 'images')} also in {train}", hits, val, pix, [train])
    for split in present:
        hits = [g for g in groups if count(g, split) > 1]
        pix = sum(len(files(g, [split])) == count(g, split) for g in hits)  # no two of its entries share a file
        finding(f"{_plural(len(hits), 'image', 'images')} listed more than once in {split}", hits, split, pix)
    report.seconds = time.perf_counter() - t0
    return report
