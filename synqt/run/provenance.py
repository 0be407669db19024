"""What a result was produced with: library versions, the code's version and commit, the data's format.

Recorded in every ``metrics.json`` (keys ``versions`` and ``provenance``). Ray is never imported here
(synqt/ must not import it): its version is read from the installed distribution's metadata.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from synqt.version import __version__, git_state

log = logging.getLogger(__name__)

# Suffix -> image format name (PIL's names).
_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".gif": "GIF", ".webp": "WEBP",
            ".tif": "TIFF", ".tiff": "TIFF"}
JPEG_VTAB_NOTE = (
    "VTAB-1k images stored as JPEG (as in NOAH's vtab-1k release); the official extraction from TFDS is "
    "lossless PNG (SynQT/OpenDataLab vtab-1k-png). JPEG re-encoding changes pixels, so accuracies are not "
    "strictly comparable with runs on the PNG copy."
)
_warned: set[tuple[str, str]] = set()


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str | bool | None]:
    """Versions of Python, this package (+ git commit and dirty flag in a checkout) and every library a
    trial depends on; None for one that is not installed (Ray on a machine running only ``synqt train``)."""
    import accelerate
    import numpy
    import PIL
    import timm
    import torch

    commit, dirty = git_state()
    return {
        "python": platform.python_version(),
        "synqt": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "ray": _dist_version("ray"),
    }


def image_formats(paths: Sequence[Path]) -> dict[str, int]:
    """Count of images per format, from the file suffixes (no file is opened): ``{"PNG": 800}``."""
    counts = Counter(_FORMATS.get(Path(p).suffix.lower(), Path(p).suffix.lower().lstrip(".").upper() or "none")
                     for p in paths)
    return dict(sorted(counts.items()))


def split_provenance(split: Any) -> dict[str, Any] | None:
    """Layout and image formats of one split (a ``synqt.data.splits.SplitList``); None when there is none.

    A VTAB layout stored as JPEG gets ``note`` = ``JPEG_VTAB_NOTE`` and a warning in the log (once per
    dataset and split in a process).
    """
    if split is None:
        return None
    layout = getattr(split, "layout", None)
    formats = image_formats(getattr(split, "paths", []))
    note = None
    if layout in ("vtab_json", "vtab_txt") and "JPEG" in formats:
        note = JPEG_VTAB_NOTE
        key = (str(getattr(split, "dataset", "")), str(getattr(split, "split", "")))
        if key not in _warned:
            _warned.add(key)
            log.warning("%s/%s: %s", key[0], key[1], JPEG_VTAB_NOTE)
    return {
        "split": getattr(split, "split", None),
        "layout": layout,
        "images": len(getattr(split, "paths", [])),
        "image_formats": formats,
        "data_root": str(split.data_root) if getattr(split, "data_root", None) is not None else None,
        "note": note,
    }
