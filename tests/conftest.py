"""Shared session fixtures: the cached demo assets, a tiny random ViT, a vtab_json writer."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(2)  # the CI machines (and the target laptops) have 2 cores


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the ``gpu`` checks (tests/test_gpu.py) unless ``-m`` names the marker (``-m gpu``, as
    scripts/gpu_check.sh runs them): they are reported as deselected, never as passed or skipped. A
    ``-m`` without ``gpu`` (e.g. README's ``-m "not slow"``) still leaves them out."""
    if "gpu" in (config.getoption("markexpr") or ""):
        return
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if item.get_closest_marker("gpu") is None]


@pytest.fixture(scope="session")
def synqt_cache_dir() -> Path:
    """``$SYNQT_TEST_CACHE`` or ``<repo>/.cache/test-assets``: reused across test files and runs."""
    env = os.environ.get("SYNQT_TEST_CACHE")
    path = Path(env) if env else REPO / ".cache" / "test-assets"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def demo_assets(synqt_cache_dir: Path) -> tuple[Path, Path]:
    """(data_root, checkpoint_path): the synthetic benchmark and the pre-trained demo backbone.

    Built once (about a minute of pre-training) and cached under ``synqt_cache_dir``.
    """
    from synqt.tools.pretrain import ensure_demo_assets

    return ensure_demo_assets(synqt_cache_dir)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is fastest and immune to other processes contending for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_vit() -> Callable[..., torch.nn.Module]:
    """A function returning a fresh random, very small timm ViT (32x32 input, 16 patches, 2 blocks)."""
    import timm

    def make(**overrides) -> torch.nn.Module:
        kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
        kwargs.update(overrides)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)

    return make


def _write_vtab_json(root: str | Path, name: str, images: Sequence[np.ndarray], labels: Sequence[int],
                     splits: Mapping[str, Sequence[int]] | None = None) -> Path:
    """Write ``<root>/<name>/images/<i>.png`` and one ``<split>.json`` per entry of ``splits``.

    ``splits`` maps a split name (``train800``, ``val200``, ``train800val200``, ``test`` or any other) to
    indices into ``images``/``labels``; None writes every image to both ``train800val200`` and ``test``.
    Returns the dataset folder.
    """
    from PIL import Image

    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    folder = Path(root) / name
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rels = []
    for i, img in enumerate(images):
        rel = f"{i:05d}.png"
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).astype(np.uint8) if arr.dtype.kind == "f" else arr.astype(np.uint8)
        Image.fromarray(arr).convert("RGB").save(folder / "images" / rel)
        rels.append(rel)
    if splits is None:
        everything = list(range(len(images)))
        splits = {"train800val200": everything, "test": everything}
    for split, idx in splits.items():
        entries = [{rels[i]: int(labels[i])} for i in idx]
        (folder / f"{split}.json").write_text(json.dumps(entries))
    return folder


@pytest.fixture(scope="session")
def write_vtab_json() -> Callable[..., Path]:
    """``write_vtab_json(root, name, images, labels, splits=None) -> dataset folder`` (vtab_json layout)."""
    return _write_vtab_json
