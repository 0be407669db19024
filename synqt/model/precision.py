"""Can this device run a precision natively? One rule, applied before any training step.

Rule: ``precision=bf16`` runs only where the device has native bf16 arithmetic; anywhere else it is
refused before training (a ``ConfigError`` naming the device, what was found, and ``precision=no``),
unless ``SYNQT_ALLOW_SLOW_BF16=1`` says to run it emulated anyway (tests of a tiny model do this).
There is no silent fall-back: a run labelled bf16 is a bf16 run.

Why: on a CPU without AVX512-BF16 or AMX (an AVX2-only EPYC, as some CI machines are) bf16 matmuls
are emulated and a ViT-B/16 training step is about 100x slower than in fp32 (60-75 s per step at
batch 8 against well under a second); GPUs before Ampere (compute capability < 8.0) have no fast bf16
either.

Native means, on CUDA, ``torch.cuda.is_bf16_supported(including_emulation=False)``; on an x86 CPU,
that torch dispatches AVX512 kernels (``torch.backends.cpu.get_cpu_capability()``; ``ATEN_CPU_CAPABILITY``
can lower it) *and* the CPU has ``avx512_bf16`` or ``amx_bf16`` (``/proc/cpuinfo``); on an ARM CPU, the
``bf16`` feature. ``precision=no`` (fp32, the default) and ``fp16`` (GPU only) are unaffected.
"""

from __future__ import annotations

import os
import platform
from contextlib import AbstractContextManager, nullcontext

import torch

from synqt.errors import ConfigError

ALLOW_SLOW_BF16_ENV = "SYNQT_ALLOW_SLOW_BF16"
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The first CPU's ``flags`` (x86) or ``Features`` (ARM) from /proc/cpuinfo; empty where unreadable."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_native(device: torch.device | str) -> tuple[bool, str]:
    """(native?, what was found) for bf16 arithmetic on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        native = bool(torch.cuda.is_bf16_supported(including_emulation=False))
        return native, f"GPU {torch.cuda.get_device_name(index)}, compute capability {major}.{minor}"
    capability = torch.backends.cpu.get_cpu_capability()
    flags = cpu_flags()
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        native = "bf16" in flags
        return native, f"CPU {machine}, torch kernels {capability}, bf16 feature {'yes' if native else 'no'}"
    found = [f for f in X86_BF16_FLAGS if f in flags]
    native = bool(found) and capability.upper().startswith("AVX512")
    return native, (f"CPU {machine}, torch kernels {capability}, bf16 instructions "
                    f"{', '.join(found) if found else 'none (no ' + ' / '.join(X86_BF16_FLAGS) + ')'}")


def slow_bf16_allowed() -> bool:
    return os.environ.get(ALLOW_SLOW_BF16_ENV, "").strip().lower() in ("1", "true", "yes")


def describe(precision: str, device: torch.device | str) -> str:
    """One line for ``synqt bench`` and ``synqt sweep --dry-run``: what the rule does with ``precision`` here."""
    native, found = bf16_native(device)
    if native:
        return f"bf16: native on this machine ({found})"
    if precision != "bf16":
        return f"bf16: not native on this machine ({found}); precision=bf16 would be refused here"
    if slow_bf16_allowed():
        return f"bf16: NOT native on this machine ({found}); runs emulated because {ALLOW_SLOW_BF16_ENV}=1"
    return (f"bf16: NOT native on this machine ({found}): trials with precision=bf16 are refused before "
            f"training on such a device (use precision=no)")


def check_precision(precision: str, device: torch.device | str) -> None:
    """Apply the rule (module docstring): ``ConfigError`` for bf16 on a device without native bf16."""
    if precision != "bf16" or slow_bf16_allowed():
        return
    native, found = bf16_native(device)
    if native:
        return
    gpu = torch.device(device).type == "cuda"
    raise ConfigError(
        f"precision=bf16 is not native on this device ({found}): it would run emulated, "
        + ("far slower than fp32 or fp16 (bf16 needs compute capability >= 8.0)" if gpu else
           "about 100x slower than fp32 (ViT-B/16: about a minute per training step)")
        + f". Use precision=no (fp32){' or precision=fp16' if gpu else ''}, or set {ALLOW_SLOW_BF16_ENV}=1 to "
        "run it emulated anyway"
    )


__all__ = ["ALLOW_SLOW_BF16_ENV", "bf16_native", "check_precision", "cpu_flags", "describe", "slow_bf16_allowed"]


def autocast_for(device: torch.device, precision: str) -> AbstractContextManager:
    """The autocast context of ``precision`` (no / fp32: none; bf16; fp16) on ``device``.

    Raises ConfigError for fp16 off a GPU (CPU autocast has no fp16 kernels worth running).
    """
    if precision in ("no", "fp32"):
        return nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision 'fp16' needs a GPU; use precision=bf16 on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
