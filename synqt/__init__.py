"""SynQT: a learnable query branch reads a frozen ViT's keys/values (Zhang et al., ECCV 2024).

This package is the method and one trial (torch, timm, accelerate). It never imports ray or launcher/.
The public names are loaded lazily so that light tools (`synqt data check`, config loading,
spawned data workers) do not pay for importing torch and timm.

Rooms (each folder's ``__init__`` says what lives there and what it may import):
  data/      dataset folders, list files, images, the registry of dataset facts, synthetic tasks
  weights/   checkpoint files: what a file is, loading and key maps, trainable files, what fits what
  model/     the query branch, the frozen stream, memory modes, precision
  run/       the run-directory contract, ownership, TensorBoard, progress events, provenance
  training/  ``run_pack`` / ``run_trial``: the trainers, the K/V cache, the schedule, thread counts
  tools/     bench, K/V bench, the demo backbone's pre-training

Top-level modules are the base the rooms stand on; what each may import:
  errors.py, version.py       may import: nothing
  shipped.py, storage.py      may import: synqt.errors
  config.py                   may import: synqt.data, synqt.errors, synqt.storage
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SynQT": "synqt.model.stream",
    "QueryBranch": "synqt.model.branch",
    "PackedSynQT": "synqt.model.stream",
    "build_model": "synqt.model.stream",
    "build_backbone": "synqt.model.stream",
    "load_official_state_dict": "synqt.weights.checkpoint",
    "to_official_state_dict": "synqt.weights.checkpoint",
    "save_trainable": "synqt.weights.checkpoint",
    "load_trainable": "synqt.weights.checkpoint",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'synqt' has no attribute {name!r}")
