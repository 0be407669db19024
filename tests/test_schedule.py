"""lr_at: the official per-iteration warm-up + half-cycle cosine, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest

from synqt.errors import ConfigError
from synqt.training.schedule import lr_at

# The official recipe with 10 optimizer steps per epoch: 50 epochs, 10 of warm-up, 1e-3 -> 1e-6.
OFFICIAL = dict(epochs=50, warmup_epochs=10, base_lr=1e-3, min_lr=1e-6)


def lr(step: int, spe: int = 10, **kw) -> float:
    return lr_at(step, spe, **{**OFFICIAL, **kw})


def test_warmup_start_is_zero_and_linear():
    assert lr(0) == 0.0
    assert lr(5) == pytest.approx(5.0e-5, rel=1e-12)  # e = 0.5: 1e-3 * 0.5 / 10
    assert lr(99) == pytest.approx(9.9e-4, rel=1e-12)  # e = 9.9, last warm-up step


def test_end_of_warmup_is_peak():
    assert lr(100) == pytest.approx(1e-3, rel=1e-12)  # e = 10: cos(0) = 1


def test_mid_cosine():
    # e = 30 is half-way through the 40 cosine epochs: cos(pi/2) = 0 -> (1e-3 + 1e-6) / 2
    assert lr(300) == pytest.approx(5.005e-4, rel=1e-12)
    # e = 20, a quarter of the way: 0.5 * (1 + cos(pi/4)) = 0.85355339...
    assert lr(200) == pytest.approx(1e-6 + 0.999e-3 * 0.8535533905932737, rel=1e-12)


def test_last_iteration():
    # step 499: e = 49.9, 0.5 * (1 + cos(pi * 39.9 / 40)) = sin(pi / 800)^2 = 1.5421e-5 (hand value)
    assert lr(499) == pytest.approx(1e-6 + 0.999e-3 * 1.54212e-5, rel=1e-4)
    assert lr(499) == pytest.approx(1.015406e-6, rel=1e-5)
    assert lr(500) == 1e-6 and lr(10_000) == 1e-6  # never climbs back up past the last epoch


def test_zero_warmup_is_pure_cosine():
    assert lr(0, warmup_epochs=0) == pytest.approx(1e-3, rel=1e-12)
    assert lr(250, warmup_epochs=0) == pytest.approx(5.005e-4, rel=1e-12)  # e = 25 of 50


def test_fractional_epochs_and_shape():
    # warm-up of half an epoch with 4 steps per epoch: steps 0, 1 ramp; step 2 (e = 0.5) is the peak.
    kw = dict(epochs=2, warmup_epochs=0.5, base_lr=0.1, min_lr=0.0)
    assert [lr_at(s, 4, **kw) for s in range(3)] == pytest.approx([0.0, 0.05, 0.1])
    values = [lr(s) for s in range(500)]
    assert all(a < b for a, b in zip(values[:100], values[1:101], strict=True))
    assert all(a >= b for a, b in zip(values[100:-1], values[101:], strict=True))
    assert max(values) == pytest.approx(1e-3) and not any(math.isnan(v) for v in values)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        lr_at(0, 0, **OFFICIAL)
    with pytest.raises(ConfigError, match="step=-1"):
        lr_at(-1, 10, **OFFICIAL)
    with pytest.raises(ConfigError, match="warmup_epochs"):
        lr_at(0, 10, epochs=5, warmup_epochs=-1, base_lr=1.0, min_lr=0.0)
