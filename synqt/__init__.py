"""SynQT: a learnable query branch reads a frozen ViT's keys/values (Zhang et al., ECCV 2024).

This package is the method and one trial (torch, timm, accelerate). It never imports ray.
The public names are loaded lazily so that light tools (`synqt data check`, config loading,
spawned data workers) do not pay for importing torch and timm.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SynQT": "synqt.model",
    "QueryBranch": "synqt.model",
    "PackedSynQT": "synqt.model",
    "build_model": "synqt.model",
    "build_backbone": "synqt.model",
    "load_official_state_dict": "synqt.checkpoint",
    "to_official_state_dict": "synqt.checkpoint",
    "save_trainable": "synqt.checkpoint",
    "load_trainable": "synqt.checkpoint",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'synqt' has no attribute {name!r}")
