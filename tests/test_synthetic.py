"""Synthetic benchmark layout, determinism, idempotence; the pre-trained demo backbone and its cache."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from synqt.data.synthetic import (
    DEMO_BACKBONE,
    DEMO_BACKBONE_KWARGS,
    DEMO_TASKS,
    SOURCE_ATTRIBUTES,
    draw_task_images,
    source_batch,
    write_benchmark,
)
from synqt.errors import DataError
from synqt.tools.pretrain import ensure_demo_assets, linear_probe_accuracy, load_demo_backbone, pretrain_backbone

SMALL = dict(n_train=20, n_val=6, n_test=10)


def _entries(path: Path) -> list[tuple[str, int]]:
    data = json.loads(path.read_text())
    assert isinstance(data, list)
    out = []
    for entry in data:
        assert isinstance(entry, dict) and len(entry) == 1
        ((rel, label),) = entry.items()
        out.append((rel, label))
    return out


def _digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_groups_and_class_counts_are_vtab_like():
    groups = {g for g, _, _ in DEMO_TASKS.values()}
    assert groups == {"Natural", "Specialized", "Structured"}
    assert all(4 <= k <= 10 for _, k, _ in DEMO_TASKS.values())


def test_layout_counts_and_labels(tmp_path):
    root = write_benchmark(tmp_path / "bench", **SMALL)
    manifest = json.loads((root / "synthetic.json").read_text())
    assert manifest["complete"] is True and manifest["tasks"] == list(DEMO_TASKS)
    for task, (group, k, _) in DEMO_TASKS.items():
        folder = root / task
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["images", "train800.json", "val200.json", "train800val200.json", "test.json"])
        train, val = _entries(folder / "train800.json"), _entries(folder / "val200.json")
        test = _entries(folder / "test.json")
        assert (len(train), len(val), len(test)) == (20, 6, 10)
        assert _entries(folder / "train800val200.json") == train + val
        assert {lab for _, lab in train} == set(range(k)), f"{task}: a class is missing from train800"
        for rel, lab in train + val + test:
            assert isinstance(lab, int) and 0 <= lab < k
            assert (folder / "images" / rel).is_file()
        assert len({rel for rel, _ in train + val + test}) == 36  # no image shared between splits
        with Image.open(folder / "images" / train[0][0]) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
        assert manifest["groups"][task] == group


def test_write_benchmark_is_idempotent_and_rewrites_on_new_params(tmp_path):
    root = write_benchmark(tmp_path / "b", tasks=["syn_count"], **SMALL)
    png = root / "syn_count" / "images" / "train800" / "00000.png"
    before = png.stat().st_mtime_ns
    time.sleep(0.01)
    write_benchmark(tmp_path / "b", tasks=["syn_count"], **SMALL)
    assert png.stat().st_mtime_ns == before
    write_benchmark(tmp_path / "b", tasks=["syn_count"], **{**SMALL, "n_test": 12})
    assert len(_entries(root / "syn_count" / "test.json")) == 12


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = _digest_tree(write_benchmark(tmp_path / "a", tasks=["syn_texture", "syn_blobs"], seed=3, **SMALL))
    b = _digest_tree(write_benchmark(tmp_path / "b", tasks=["syn_texture", "syn_blobs"], seed=3, **SMALL))
    c = _digest_tree(write_benchmark(tmp_path / "c", tasks=["syn_texture", "syn_blobs"], seed=4, **SMALL))
    assert a == b
    pngs = [k for k in a if k.endswith(".png")]
    assert sum(a[k] != c[k] for k in pngs) > len(pngs) // 2


def test_image_size_and_source_batch_shapes():
    images, labels = draw_task_images("syn_orientation", 12, image_size=48)
    assert all(im.shape == (48, 48, 3) and im.dtype == np.uint8 for im in images)
    assert sorted(set(labels)) == list(range(DEMO_TASKS["syn_orientation"][1]))
    x, y = source_batch(np.random.default_rng(0), 16)
    assert x.shape == (16, 32, 32, 3) and y.shape == (16, len(SOURCE_ATTRIBUTES))
    for col, k in enumerate(SOURCE_ATTRIBUTES.values()):
        assert y[:, col].max() < k and y[:, col].min() >= -1


def test_refuses_foreign_folder_and_bad_names(tmp_path):
    (tmp_path / "syn_count").mkdir()
    (tmp_path / "syn_count" / "mine.txt").write_text("not synthetic")
    with pytest.raises(DataError, match="syn_count"):
        write_benchmark(tmp_path, tasks=["syn_count"], **SMALL)
    with pytest.raises(DataError, match="no_such_task"):
        write_benchmark(tmp_path / "x", tasks=["no_such_task"])


def test_pretrain_backbone_writes_headless_safetensors(tmp_path):
    from safetensors.torch import load_file

    out = pretrain_backbone(tmp_path / "bb.safetensors", seconds=600, max_steps=2, batch_size=8, verbose=False)
    state = load_file(str(out))
    assert state and not any(k.startswith("head.") for k in state)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["steps"] == 2 and meta["backbone"] == DEMO_BACKBONE and meta["kwargs"] == DEMO_BACKBONE_KWARGS
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary file


def test_demo_checkpoint_loads_strictly_and_transfers(demo_assets):
    from safetensors.torch import load_file

    data_root, ckpt = demo_assets
    fresh = timm.create_model(DEMO_BACKBONE, pretrained=False, num_classes=0, **DEMO_BACKBONE_KWARGS)
    fresh.load_state_dict(load_file(str(ckpt)), strict=True)
    torch.manual_seed(0)
    pre, rand = load_demo_backbone(ckpt), load_demo_backbone(None)
    margins = {}
    for task in ("syn_orientation", "syn_texture"):
        a = linear_probe_accuracy(pre, data_root, task)
        b = linear_probe_accuracy(rand, data_root, task)
        margins[task] = (a, b)
    chance = {t: 100 / DEMO_TASKS[t][1] for t in margins}
    assert any(a - b >= 15 and a >= 2 * chance[t] for t, (a, b) in margins.items()), margins


def test_ensure_demo_assets_second_call_is_instant(demo_assets, synqt_cache_dir):
    data_root, ckpt = demo_assets
    mtime = ckpt.stat().st_mtime_ns
    start = time.monotonic()
    again = ensure_demo_assets(synqt_cache_dir)
    assert time.monotonic() - start < 5
    assert again == (data_root, ckpt)
    assert ckpt.stat().st_mtime_ns == mtime
