"""Brief full pre-training of the demo ViT on the synthetic source task.

A frozen, randomly initialised ViT leaves any parameter-efficient method near chance, so the demo
and the learning tests first train the small demo backbone (all weights) for about a minute on
freshly drawn source images (``synqt.data.synthetic.source_batch``), then save it *without its head* as a
safetensors file of the timm state dict. Trials load it through the normal checkpoint path.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from filelock import FileLock
from torch import nn

from synqt.data.synthetic import (
    DEMO_BACKBONE,
    DEMO_BACKBONE_KWARGS,
    DEMO_TASKS,
    SOURCE_ATTRIBUTES,
    SOURCE_NUM_OUTPUTS,
    SYNTHETIC_VERSION,
    source_batch,
    write_benchmark,
)
from synqt.errors import DataError, ModelError
from synqt.storage import atomic_write, atomic_write_json

__all__ = [
    "DEMO_CHECKPOINT_NAME",
    "DEMO_DATA_NAME",
    "DEMO_PRETRAIN_STEPS",
    "default_cache_dir",
    "ensure_demo_assets",
    "extract_features",
    "linear_probe_accuracy",
    "load_demo_backbone",
    "load_vtab_json_split",
    "pretrain_backbone",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEMO_DATA_NAME = "synthetic-vtab"
DEMO_CHECKPOINT_NAME = "vit_tiny_demo.safetensors"
# A fixed step count, not a time budget, so a busy machine cannot cache a half-trained backbone:
# 200 steps x 128 images take about a minute on 2 idle cores.
DEMO_PRETRAIN_STEPS = 200


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W), ImageNet-normalised like the trial transform."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _source_loss_and_acc(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Sum of per-attribute cross-entropies (label -1 ignored) and the mean per-attribute accuracy."""
    loss = logits.new_zeros(())
    accs = []
    start = 0
    for i, k in enumerate(SOURCE_ATTRIBUTES.values()):
        part, y = logits[:, start:start + k], labels[:, i]
        start += k
        valid = y >= 0
        if valid.any():
            loss = loss + F.cross_entropy(part[valid], y[valid])
            accs.append((part[valid].argmax(1) == y[valid]).float().mean().item())
    return loss, float(np.mean(accs))


def _lr_factor(progress: float, warmup: float = 0.05) -> float:
    """Linear warm-up then cosine to zero, over progress in [0, 1] (time- or step-based)."""
    if progress < warmup:
        return max(progress / warmup, 0.02)
    return 0.5 * (1.0 + math.cos(math.pi * min((progress - warmup) / (1 - warmup), 1.0)))


def pretrain_backbone(out_path: str | Path, *, seconds: float = 60, max_steps: int | None = None, seed: int = 0,
                      batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.05,
                      verbose: bool = True) -> Path:
    """Train all weights of the demo ViT on the source task; save the headless state dict.

    Stops after ``seconds`` of wall time or ``max_steps`` steps, whichever comes first. Writes
    ``out_path`` (safetensors, atomically) and ``out_path.with_suffix(".json")`` with
    ``{backbone, kwargs, steps, source_acc, seed, ...}``.
    """
    from safetensors.torch import save_file

    out_path = Path(out_path)
    if seconds <= 0 and max_steps is None:
        raise ModelError(f"pretrain_backbone({out_path}): need seconds > 0 or max_steps, got seconds={seconds}")
    from synqt.training.threads import configure_threads

    threads = configure_threads()  # the demo's pre-training ran 664 s on a busy 2-core machine with every core
    if verbose:
        print(f"[pretrain] {threads.line()}", flush=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    size = DEMO_BACKBONE_KWARGS["img_size"]
    model = timm.create_model(DEMO_BACKBONE, pretrained=False, num_classes=SOURCE_NUM_OUTPUTS,
                              **DEMO_BACKBONE_KWARGS)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    x_eval, y_eval = source_batch(np.random.default_rng([seed, 1]), 512, size)
    start = time.monotonic()
    step, last_print, recent = 0, start, []
    model.train()
    while True:
        elapsed = time.monotonic() - start
        progress = max(elapsed / seconds if seconds > 0 else 0.0, step / max_steps if max_steps else 0.0)
        if progress >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(progress)
        x, y = source_batch(rng, batch_size, size)
        loss, acc = _source_loss_and_acc(model(_to_tensor(x)), torch.from_numpy(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        recent = (recent + [acc])[-20:]
        if verbose and time.monotonic() - last_print > 10:
            last_print = time.monotonic()
            print(f"[pretrain] step {step} {last_print - start:.0f}s loss {loss.item():.3f} "
                  f"source acc {100 * np.mean(recent):.1f}%", flush=True)
    wall = time.monotonic() - start
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(_to_tensor(x_eval[i:i + 256])) for i in range(0, len(x_eval), 256)])
    _, source_acc = _source_loss_and_acc(logits, torch.from_numpy(y_eval))
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    meta = {"backbone": DEMO_BACKBONE, "kwargs": dict(DEMO_BACKBONE_KWARGS), "steps": step,
            "source_acc": round(100 * source_acc, 2), "seed": seed, "seconds": round(wall, 1),
            "batch_size": batch_size, "lr": lr, "synthetic_version": SYNTHETIC_VERSION}
    atomic_write(out_path, lambda p: save_file(state, str(p), metadata={k: str(v) for k, v in meta.items()}))
    atomic_write_json(out_path.with_suffix(".json"), meta)
    if verbose:
        print(f"[pretrain] done: {step} steps in {wall:.0f}s, held-out source acc {meta['source_acc']}% "
              f"-> {out_path}", flush=True)
    return out_path


def load_demo_backbone(checkpoint: str | Path | None = None) -> nn.Module:
    """A headless demo ViT (``num_classes=0``), loaded strictly from ``checkpoint`` if given."""
    model = timm.create_model(DEMO_BACKBONE, pretrained=False, num_classes=0, **DEMO_BACKBONE_KWARGS)
    if checkpoint is not None:
        from safetensors.torch import load_file

        try:
            model.load_state_dict(load_file(str(checkpoint)), strict=True)
        except (RuntimeError, OSError) as exc:
            raise ModelError(f"{checkpoint}: not a demo backbone checkpoint for {DEMO_BACKBONE} "
                             f"{DEMO_BACKBONE_KWARGS}: {exc}") from exc
    return model.eval()


DEMO_DIR_ENV = "SYNQT_DEMO_DIR"  # SYNQT_CACHE_DIR is the decoded-image cache only (synqt.data)


def default_cache_dir() -> Path:
    """Where the demo assets live: ``$SYNQT_DEMO_DIR``, else ``~/.cache/synqt/demo`` (persistent: pre-training
    the demo backbone takes a minute)."""
    env = os.environ.get(DEMO_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "synqt" / "demo"


def _checkpoint_current(ckpt: Path, steps: int) -> bool:
    import json

    try:
        meta = json.loads(ckpt.with_suffix(".json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return (ckpt.is_file() and meta.get("synthetic_version") == SYNTHETIC_VERSION
            and meta.get("backbone") == DEMO_BACKBONE and meta.get("kwargs") == DEMO_BACKBONE_KWARGS
            and int(meta.get("steps", 0)) >= steps)


def ensure_demo_assets(cache_dir: str | Path | None = None, *, steps: int = DEMO_PRETRAIN_STEPS,
                       seconds: float = 1800) -> tuple[Path, Path]:
    """Return ``(data_root, checkpoint_path)`` under the cache dir, building them only if absent.

    The backbone is pre-trained for ``steps`` steps (about a minute on 2 idle cores; ``seconds`` is
    only a wall-time safety cap). A cached checkpoint with fewer steps, another synthetic version or
    another architecture is rebuilt. A file lock makes concurrent callers (test workers, trials) wait
    for one builder instead of each pre-training; a second call is instant.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    data_root, ckpt = cache / DEMO_DATA_NAME, cache / DEMO_CHECKPOINT_NAME
    with FileLock(str(cache / ".demo-assets.lock")):
        write_benchmark(data_root)
        if not _checkpoint_current(ckpt, steps):
            print(f"[pretrain] pre-training the demo backbone for {steps} steps, about a minute on 2 idle cores "
                  f"(once; cached at {ckpt})", flush=True)
            pretrain_backbone(ckpt, seconds=seconds, max_steps=steps)
    return data_root, ckpt


# ----------------------------------------------------------------------------------------------
# linear probe (used to verify transfer; quick and torch-only)


def load_vtab_json_split(data_root: str | Path, task: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, 3) uint8 and labels (N,) of one vtab_json split list."""
    import json

    from PIL import Image

    task_dir = Path(data_root) / task
    list_path = task_dir / f"{split}.json"
    try:
        entries = json.loads(list_path.read_text())
    except FileNotFoundError as exc:
        raise DataError(f"{list_path}: split list not found (expected a vtab_json dataset folder)") from exc
    images, labels = [], []
    for entry in entries:
        (rel, label), = entry.items()
        with Image.open(task_dir / "images" / rel) as im:
            images.append(np.asarray(im.convert("RGB")))
        labels.append(int(label))
    return np.stack(images), np.asarray(labels, dtype=np.int64)


@torch.no_grad()
def extract_features(backbone: nn.Module, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """[CLS] token concatenated with the mean patch token of the final (normed) layer."""
    backbone.eval()
    feats = []
    for i in range(0, len(images), batch_size):
        tokens = backbone.forward_features(_to_tensor(images[i:i + batch_size]))
        prefix = getattr(backbone, "num_prefix_tokens", 1)
        feats.append(torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=1))
    return torch.cat(feats)


def linear_probe_accuracy(backbone: nn.Module, data_root: str | Path, task: str, *,
                          train_split: str = "train800val200", eval_split: str = "test",
                          steps: int = 300, weight_decay: float = 1e-3, seed: int = 0) -> float:
    """Accuracy (percent) of a logistic regression on frozen features: train on one split, eval another."""
    x_tr, y_tr = load_vtab_json_split(data_root, task, train_split)
    x_ev, y_ev = load_vtab_json_split(data_root, task, eval_split)
    f_tr, f_ev = extract_features(backbone, x_tr), extract_features(backbone, x_ev)
    mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
    f_tr, f_ev = (f_tr - mu) / sd, (f_ev - mu) / sd
    num_classes = int(max(y_tr.max(), y_ev.max())) + 1
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(f_tr.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=gen)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    y = torch.from_numpy(y_tr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(head(f_tr), y) + weight_decay * head.weight.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return 100.0 * (head(f_ev).argmax(1) == torch.from_numpy(y_ev)).float().mean().item()


def _main() -> None:  # python -m synqt.tools.pretrain [cache_dir]: build assets and print the probe table
    import sys

    data_root, ckpt = ensure_demo_assets(sys.argv[1] if len(sys.argv) > 1 else None)
    pre, rand = load_demo_backbone(ckpt), load_demo_backbone(None)
    for task, (group, k, _) in DEMO_TASKS.items():
        a, b = linear_probe_accuracy(pre, data_root, task), linear_probe_accuracy(rand, data_root, task)
        print(f"{task:18s} {group:12s} chance {100 / k:5.1f}  probe pre-trained {a:5.1f}  random {b:5.1f}")


if __name__ == "__main__":
    _main()
