"""The optimizer and the official per-iteration learning-rate schedule (MAE-style, as SynQT's code sets it).

``lr_at`` is a pure function so that the engine, the resume logic and the tests all compute the same
value: the lr is set before every optimizer step from the fractional epoch ``step / steps_per_epoch``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from synqt.errors import ConfigError


def adamw(params: Iterable[Any], *, lr: float, weight_decay: float) -> Any:
    """torch AdamW, fused where the device has the kernel (CPU and CUDA since torch 2.4).

    A query branch is hundreds of small tensors; the unfused AdamW runs about ten tiny ops per tensor
    per step, which costs more than the branch's own backward on a CPU. Every trainer (engine,
    DeepSpeed, bench) uses this one function, so they step identically.
    """
    import torch

    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def lr_at(
    step: int,
    steps_per_epoch: int,
    *,
    epochs: float,
    warmup_epochs: float,
    base_lr: float,
    min_lr: float,
) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    With ``e = step / steps_per_epoch``: linear warm-up ``base_lr * e / warmup_epochs`` while
    ``e < warmup_epochs`` (so step 0 has lr 0), then half-cycle cosine from ``base_lr`` down to
    ``min_lr`` at ``e = epochs``. ``warmup_epochs = 0`` gives a pure cosine. Past ``epochs`` the lr
    stays at ``min_lr`` (the cosine is not allowed to climb back).
    """
    if steps_per_epoch < 1:
        raise ConfigError(f"lr_at: steps_per_epoch={steps_per_epoch}; expected >= 1")
    if step < 0:
        raise ConfigError(f"lr_at: step={step}; expected >= 0")
    if warmup_epochs < 0 or epochs <= 0:
        raise ConfigError(
            f"lr_at: epochs={epochs}, warmup_epochs={warmup_epochs}; "
            "expected epochs > 0 and warmup_epochs >= 0"
        )
    e = step / steps_per_epoch
    if e < warmup_epochs:
        return base_lr * e / warmup_epochs
    span = epochs - warmup_epochs
    if span <= 0 or e >= epochs:
        return min_lr
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (e - warmup_epochs) / span))
