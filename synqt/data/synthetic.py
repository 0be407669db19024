"""Synthetic VTAB-style benchmark and a separate source task, for the demo and the tests.

Real VTAB-1k cannot be downloaded at run time, so the demo draws small RGB images procedurally:
a few learnable target tasks per VTAB group, written in the SynQT/OpenDataLab ``vtab_json`` layout
(spec section 7), and a multi-attribute *source* task used only to pre-train the demo backbone
(``synqt.tools.pretrain``) so that a frozen backbone carries features worth transferring.

Every image is a pure function of (task, label, seed, index): the benchmark is reproducible byte
for byte. Shapes are drawn from signed distance functions with a one-pixel soft edge, so they stay
recognisable at 32x32 and the code works for any ``image_size``.
"""

from __future__ import annotations

import io
import json
import shutil
import zlib
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from synqt.errors import DataError
from synqt.storage import atomic_write_json

__all__ = [
    "DEMO_BACKBONE",
    "DEMO_BACKBONE_KWARGS",
    "DEMO_TASKS",
    "SOURCE_ATTRIBUTES",
    "SOURCE_NUM_OUTPUTS",
    "SYNTHETIC_VERSION",
    "Generator",
    "draw_task_images",
    "source_batch",
    "write_benchmark",
]

# The demo backbone (fixed: configs/demo.yaml, the tests and synqt.tools.pretrain rely on it).
DEMO_BACKBONE = "vit_tiny_patch16_224"
DEMO_BACKBONE_KWARGS: dict[str, int] = {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3}

# Bump when any generator changes: cached benchmarks and pre-trained backbones are then rebuilt.
SYNTHETIC_VERSION = 1
MANIFEST = "synthetic.json"
SPLIT_FILES = ("train800", "val200", "train800val200", "test")

Generator = Callable[[np.random.Generator, int, int], np.ndarray]
"""``generator(rng, label, image_size) -> uint8 array (image_size, image_size, 3)``."""

# ----------------------------------------------------------------------------------------------
# drawing primitives (coordinates are normalised to [0, 1], so any image_size works)

PALETTE = np.array(
    [
        [220, 40, 40],  # red
        [40, 180, 60],  # green
        [50, 80, 225],  # blue
        [235, 210, 40],  # yellow
        [200, 50, 200],  # magenta
        [40, 200, 215],  # cyan
        [245, 140, 30],  # orange
        [240, 240, 240],  # white
    ],
    dtype=np.float32,
) / 255.0
SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")
ROTATION_INVARIANT = {"circle", "ring"}


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return (xx + 0.5) / size, (yy + 0.5) / size


def _sdf(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (approximately; <= 0 inside) of a shape of radius r centred at the origin."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return np.sqrt(u * u + v * v) - r
    if shape == "square":
        return np.maximum(au, av) - 0.8 * r
    if shape == "triangle":
        return np.maximum(v - 0.5 * r, (np.sqrt(3.0) * au - v - r) / 2.0)
    if shape == "cross":
        return np.minimum(np.maximum(au - 0.3 * r, av - r), np.maximum(av - 0.3 * r, au - r))
    if shape == "ring":
        return np.abs(np.sqrt(u * u + v * v) - 0.75 * r) - 0.25 * r
    if shape == "bar":
        return np.maximum(au - r, av - 0.2 * r)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _alpha(shape: str, size: int, cx: float, cy: float, r: float, angle: float = 0.0) -> np.ndarray:
    """Coverage in [0, 1] of a rotated shape, with a one-pixel soft edge."""
    xx, yy = _grid(size)
    dx, dy = xx - cx, yy - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = dx * c + dy * s, -dx * s + dy * c
    return np.clip(0.5 - _sdf(shape, u, v, r) * size, 0.0, 1.0)


def _paint(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    img *= 1.0 - alpha[..., None]
    img += alpha[..., None] * colour


def _jitter_colour(rng: np.random.Generator, colour: np.ndarray, amount: float = 0.08) -> np.ndarray:
    return np.clip(colour + rng.normal(0.0, amount, 3), 0.0, 1.0).astype(np.float32)


def _background(rng: np.random.Generator, size: int, *, base: Sequence[float] | None = None,
                noise: float = 0.06) -> np.ndarray:
    """A dim background with a random gradient and pixel noise (the nuisance of most tasks)."""
    xx, yy = _grid(size)
    colour = np.asarray(base, dtype=np.float32) if base is not None else rng.uniform(0.05, 0.4, 3)
    colour = _jitter_colour(rng, colour, 0.04)
    gx, gy = rng.normal(0.0, 0.08, 2)
    img = colour[None, None, :] + (gx * (xx - 0.5) + gy * (yy - 0.5))[..., None]
    img = img + rng.normal(0.0, noise, (size, size, 3))
    return img.astype(np.float32)


def _stripes(rng: np.random.Generator, size: int, angle: float, cycles: float) -> np.ndarray:
    """Sinusoidal grating in [-1, 1] with ``cycles`` periods across the image."""
    xx, yy = _grid(size)
    phase = rng.uniform(0.0, 2 * np.pi)
    return np.sin(2 * np.pi * cycles * (xx * np.cos(angle) + yy * np.sin(angle)) + phase).astype(np.float32)


def _place(rng: np.random.Generator, n: int, radii: Sequence[float], margin: float = 0.02,
           tries: int = 200) -> list[tuple[float, float]]:
    """Centres for n objects inside the image, not overlapping when possible."""
    centres: list[tuple[float, float]] = []
    for i in range(n):
        r = radii[i]
        for attempt in range(tries):
            cx, cy = rng.uniform(r + margin, 1 - r - margin, 2)
            if attempt == tries - 1 or all(
                np.hypot(cx - ox, cy - oy) > r + radii[j] + margin for j, (ox, oy) in enumerate(centres)
            ):
                break
        centres.append((float(cx), float(cy)))
    return centres


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# target tasks


def gen_colour_shape(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """Natural: 9 classes = shape (circle, square, triangle) x colour (red, green, blue); distractor dots."""
    shape = ("circle", "square", "triangle")[label // 3]
    colour = PALETTE[label % 3]
    img = _background(rng, size)
    for _ in range(rng.integers(0, 3)):  # small distractor dots of any colour
        _paint(img, _alpha("circle", size, *rng.uniform(0.08, 0.92, 2), rng.uniform(0.03, 0.05)),
               _jitter_colour(rng, PALETTE[rng.integers(len(PALETTE))]))
    r = rng.uniform(0.16, 0.26)
    cx, cy = rng.uniform(r + 0.02, 1 - r - 0.02, 2)
    _paint(img, _alpha(shape, size, cx, cy, r, rng.uniform(-0.4, 0.4)), _jitter_colour(rng, colour, 0.1))
    return _to_uint8(img)


def gen_texture(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """Natural: 8 classes = grating orientation (0, 45, 90, 135 deg) x frequency (coarse, fine)."""
    angle = (label % 4) * np.pi / 4 + rng.uniform(-0.12, 0.12)
    cycles = (rng.uniform(2.0, 3.0) if label < 4 else rng.uniform(5.0, 6.5)) * size / 32
    cycles = min(cycles, size / 4.5)
    a, b = rng.uniform(0.0, 1.0, 3), rng.uniform(0.0, 1.0, 3)
    contrast = rng.uniform(0.5, 1.0)
    t = 0.5 + 0.5 * contrast * _stripes(rng, size, angle, cycles)
    img = a[None, None, :] * t[..., None] + b[None, None, :] * (1 - t[..., None])
    img = img + rng.normal(0.0, 0.07, (size, size, 3))
    return _to_uint8(img)


BLOB_COUNTS = ((2, 4), (6, 8), (10, 12), (14, 17), (20, 24))


def gen_blobs(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """Specialized (cell-count-like): 5 density classes of dark nuclei on pinkish tissue."""
    lo, hi = BLOB_COUNTS[label]
    n = int(rng.integers(lo, hi + 1))
    img = _background(rng, size, base=(0.85, 0.6, 0.75), noise=0.05)
    radii = rng.uniform(0.035, 0.055, n)
    for (cx, cy), r in zip(_place(rng, n, radii, margin=0.005), radii, strict=True):
        _paint(img, _alpha("circle", size, cx, cy, r), _jitter_colour(rng, np.array([0.35, 0.1, 0.45]), 0.05))
    return _to_uint8(img)


LESION_RADII = (0.07, 0.12, 0.17, 0.23)


def gen_lesion(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """Specialized (fundus-like): 4 size classes of one irregular bright lesion among dark vessels."""
    img = _background(rng, size, base=(0.7, 0.3, 0.15), noise=0.05)
    xx, yy = _grid(size)
    for _ in range(rng.integers(1, 4)):  # vessels: thin dark curves
        cx, cy, ang = *rng.uniform(0.0, 1.0, 2), rng.uniform(0, np.pi)
        bend = rng.normal(0.0, 1.5)
        u = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)
        v = -(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang) - bend * u * u
        _paint(img, np.clip(0.5 - (np.abs(v) - 0.012) * size, 0, 1), np.array([0.35, 0.08, 0.05], np.float32))
    r = LESION_RADII[label] * rng.uniform(0.92, 1.08)
    cx, cy = rng.uniform(r + 0.02, 1 - r - 0.02, 2)
    theta = np.arctan2(yy - cy, xx - cx)
    k, ph = rng.integers(2, 5), rng.uniform(0, 2 * np.pi)
    rr = r * (1 + 0.15 * np.sin(k * theta + ph))
    alpha = np.clip(0.5 - (np.hypot(xx - cx, yy - cy) - rr) * size, 0, 1)
    _paint(img, alpha, _jitter_colour(rng, np.array([0.98, 0.9, 0.45]), 0.04))
    return _to_uint8(img)


def gen_count(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """Structured (clevr_count-like): 6 classes = 1..6 objects of mixed shapes, colours and sizes."""
    n = label + 1
    img = _background(rng, size)
    radii = rng.uniform(0.07, 0.12, n)
    for (cx, cy), r in zip(_place(rng, n, radii), radii, strict=True):
        shape = ("circle", "square", "triangle", "cross")[rng.integers(4)]
        _paint(img, _alpha(shape, size, cx, cy, r, rng.uniform(0, np.pi)),
               _jitter_colour(rng, PALETTE[rng.integers(len(PALETTE))]))
    return _to_uint8(img)


def gen_orientation(rng: np.random.Generator, label: int, size: int, bins: int = 6) -> np.ndarray:
    """Structured (dsprites_ori-like): 6 classes = orientation bin (30 deg each) of a bar."""
    img = _background(rng, size)
    width = np.pi / bins
    angle = rng.uniform(label * width + 0.15 * width, (label + 1) * width - 0.15 * width)
    r = rng.uniform(0.22, 0.34)
    cx, cy = rng.uniform(0.35, 0.65, 2)
    _paint(img, _alpha("bar", size, cx, cy, r, angle), _jitter_colour(rng, PALETTE[rng.integers(len(PALETTE))]))
    return _to_uint8(img)


DEMO_TASKS: dict[str, tuple[str, int, Generator]] = {
    "syn_colour_shape": ("Natural", 9, gen_colour_shape),
    "syn_texture": ("Natural", 8, gen_texture),
    "syn_blobs": ("Specialized", 5, gen_blobs),
    "syn_lesion": ("Specialized", 4, gen_lesion),
    "syn_count": ("Structured", 6, gen_count),
    "syn_orientation": ("Structured", 6, gen_orientation),
}
"""name -> (VTAB group, number of classes, generator)."""

# ----------------------------------------------------------------------------------------------
# source task (pre-training only): several attributes per image, one linear head of their sum

SOURCE_ATTRIBUTES: dict[str, int] = {
    "shape": len(SHAPES),  # shape of all objects
    "colour": len(PALETTE),  # colour class of all objects
    "count": 6,  # 1..6 objects
    "texture": 4,  # orientation of the background grating
    "x": 4,  # centroid x bin
    "y": 4,  # centroid y bin
    "rotation": 4,  # orientation bin of bars (-1 = ignore for the other shapes)
}
SOURCE_NUM_OUTPUTS = sum(SOURCE_ATTRIBUTES.values())


def source_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One source image and its attribute labels (int64, -1 where an attribute does not apply)."""
    shape_i = int(rng.integers(len(SHAPES)))
    colour_i = int(rng.integers(len(PALETTE)))
    n = int(rng.integers(1, 7))
    tex = int(rng.integers(4))
    img = _background(rng, size, noise=rng.uniform(0.02, 0.08))
    grating = _stripes(rng, size, tex * np.pi / 4 + rng.uniform(-0.1, 0.1), rng.uniform(2.0, 6.0) * size / 32)
    img += rng.uniform(0.05, 0.15) * grating[..., None]
    radii = rng.uniform(0.06, 0.13 if n > 3 else 0.2, n)
    centres = _place(rng, n, radii)
    rot_bin = int(rng.integers(4))
    is_bar = SHAPES[shape_i] == "bar"
    for (cx, cy), r in zip(centres, radii, strict=True):
        angle = (rot_bin + rng.uniform(0.1, 0.9)) * np.pi / 4 if is_bar else rng.uniform(0, np.pi)
        _paint(img, _alpha(SHAPES[shape_i], size, cx, cy, r * (1.3 if is_bar else 1.0), angle),
               _jitter_colour(rng, PALETTE[colour_i]))
    mx, my = np.mean(centres, axis=0)
    labels = np.array([
        shape_i, colour_i, n - 1, tex, min(int(mx * 4), 3), min(int(my * 4), 3),
        rot_bin if is_bar else -1,
    ], dtype=np.int64)
    return _to_uint8(img), labels


def source_batch(rng: np.random.Generator, batch_size: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``batch_size`` fresh source images (B, H, W, 3) uint8 and labels (B, len(SOURCE_ATTRIBUTES))."""
    pairs = [source_image(rng, size) for _ in range(batch_size)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


# ----------------------------------------------------------------------------------------------
# benchmark writer


def _task_seed(seed: int, task: str, split: str) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, zlib.crc32(task.encode()), zlib.crc32(split.encode())])


def draw_task_images(task: str, n: int, *, split: str = "train800", seed: int = 0,
                     image_size: int = 32) -> tuple[list[np.ndarray], list[int]]:
    """``n`` images of a demo task with balanced, shuffled labels (every class present once n >= K)."""
    if task not in DEMO_TASKS:
        raise DataError(f"unknown synthetic task {task!r}; expected one of {sorted(DEMO_TASKS)}")
    _, k, gen = DEMO_TASKS[task]
    rng = np.random.default_rng(_task_seed(seed, task, split))
    labels = (np.arange(n) % k)
    rng.shuffle(labels)
    images = [gen(rng, int(lab), image_size) for lab in labels]
    return images, [int(lab) for lab in labels]


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, mode="RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_benchmark(root: str | Path, *, image_size: int = 32, tasks: Sequence[str] | None = None,
                    n_train: int = 400, n_val: int = 100, n_test: int = 300, seed: int = 0) -> Path:
    """Write the synthetic benchmark in the vtab_json layout under ``root``; return ``root``.

    ``<root>/<task>/images/{train800,val200,test}/<i>.png`` and ``<root>/<task>/{train800,val200,
    train800val200,test}.json``. ``n_train``/``n_val`` play the roles of VTAB-1k's 800/200 (smaller by
    default so the CPU demo stays fast). A ``synthetic.json`` manifest makes a second call with the
    same parameters return at once; other parameters rewrite the task folders.
    """
    root = Path(root)
    names = list(DEMO_TASKS) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in DEMO_TASKS]
    if unknown:
        raise DataError(f"unknown synthetic task(s) {unknown}; expected names from {sorted(DEMO_TASKS)}")
    if image_size < 8:
        raise DataError(f"synthetic image_size must be >= 8, got {image_size}")
    if min(n_train, n_val, n_test) < 1:
        raise DataError(f"synthetic split sizes must be >= 1, got n_train={n_train} n_val={n_val} n_test={n_test}")
    params = {"version": SYNTHETIC_VERSION, "image_size": image_size, "tasks": names, "n_train": n_train,
              "n_val": n_val, "n_test": n_test, "seed": seed}
    old = _read_manifest(root)
    if old is not None and old.get("complete") and {k: old.get(k) for k in params} == params and all(
        (root / t / f"{s}.json").is_file() for t in names for s in SPLIT_FILES
    ):
        return root
    if old is None:
        foreign = [t for t in names if (root / t).exists()]
        if foreign:
            raise DataError(f"{root} already holds {foreign} without a {MANIFEST} manifest; refusing to "
                            f"overwrite data not written by write_benchmark (choose an empty folder)")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / MANIFEST, {**params, "complete": False})
    for task in names:
        task_dir = root / task
        if task_dir.exists():
            shutil.rmtree(task_dir)
        entries: dict[str, list[dict[str, int]]] = {}
        for split, n in (("train800", n_train), ("val200", n_val), ("test", n_test)):
            images, labels = draw_task_images(task, n, split=split, seed=seed, image_size=image_size)
            (task_dir / "images" / split).mkdir(parents=True, exist_ok=True)
            entries[split] = []
            for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
                rel = f"{split}/{i:05d}.png"
                (task_dir / "images" / rel).write_bytes(_png_bytes(img))
                entries[split].append({rel: lab})
        entries["train800val200"] = entries["train800"] + entries["val200"]
        for split in SPLIT_FILES:
            atomic_write_json(task_dir / f"{split}.json", entries[split])
    group_of = {t: DEMO_TASKS[t][0] for t in names}
    atomic_write_json(root / MANIFEST, {**params, "complete": True, "groups": group_of,
                                        "num_classes": {t: DEMO_TASKS[t][1] for t in names}})
    return root
