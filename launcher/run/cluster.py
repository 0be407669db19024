"""What a sweep's Ray trials ask for, against what the cluster has (pure: no Ray import).

A request no node can ever satisfy (``resources.gpus: 1`` on a cluster without GPUs) would leave every
trial PENDING forever with only Ray's periodic warnings, so ``check_fits`` refuses it before any trial
starts, naming the request and the cluster's numbers. Inside a SLURM job the Ray cluster is started by
``slurm/vtab.sh`` with the allocation's CPU and GPU counts, so the cluster's numbers are the allocation's.

Multi-device (DeepSpeed) trials: the Tune trial is a driver holding no CPU, and its ``devices`` workers
hold the CPUs/GPUs. Without a cap, Tune starts as many drivers as ``max_concurrent`` allows, and they
all wait for workers; ``concurrency_cap`` limits them to the number whose workers fit at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from synqt.errors import ConfigError

DRIVER_MEMORY = 256 * 2**20  # bytes of Ray's logical memory resource a multi-device trial's driver holds

Resources = Mapping[str, float]


def worker_request(resources: Mapping[str, Any]) -> dict[str, float]:
    """What one process of a trial holds: ``{"CPU": cpus, "GPU": gpus}`` (GPU left out when 0)."""
    out = {"CPU": float(resources["cpus"])}
    if float(resources["gpus"]) > 0:
        out["GPU"] = float(resources["gpus"])
    return out


def _fits(node: Resources, request: Resources) -> int:
    """How many copies of ``request`` fit on ``node`` at once."""
    counts = [math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in request.items() if v > 0]
    return min(counts) if counts else 0


def _fmt(res: Resources, show: Sequence[str] = ()) -> str:
    parts = []
    for k in ("CPU", "GPU", "memory"):
        if (k in show) if show else (k in res):
            v = res.get(k, 0.0)
            parts.append(f"{v / 2**30:.1f} GiB memory" if k == "memory" else f"{v:g} {k}")
    return ", ".join(parts) or "nothing"


def check_fits(resources: Mapping[str, Any], nodes: Sequence[Resources], totals: Resources) -> None:
    """Refuse (``ConfigError``) a per-trial request the cluster can never run; both numbers in the message.

    ``resources``: the sweep's ``{"cpus", "gpus", "devices"}``; ``nodes``: each alive node's resources;
    ``totals``: the cluster's (``ray.cluster_resources()``).
    """
    devices = int(resources["devices"])
    req = worker_request(resources)
    per_node = [_fits(n, req) for n in nodes]
    what = (f"resources: cpus={resources['cpus']} gpus={resources['gpus']} devices={devices} "
            f"(each {'worker' if devices > 1 else 'trial'} needs {_fmt(req)} on one node"
            + (f", {devices} workers per trial" if devices > 1 else "") + ")")
    show = list(req)
    have = f"the cluster has {_fmt(totals, show)} in total" + (
        f"; the largest node has {_fmt(max(nodes, key=lambda n: (n.get('GPU', 0), n.get('CPU', 0))), show)}"
        if nodes else "")
    if not any(per_node):
        raise ConfigError(f"{what}, but {have}: no trial could ever start. Lower the request or run where "
                          "these resources exist (inside SLURM: ask the allocation for them)")
    if devices > 1:
        if sum(per_node) < devices:
            raise ConfigError(f"{what}, but {have}: only {sum(per_node)} worker(s) fit at once, fewer than one "
                              "trial's devices")
        if totals.get("memory", DRIVER_MEMORY) < DRIVER_MEMORY:
            raise ConfigError(f"{what}: each trial's driver holds {_fmt({'memory': DRIVER_MEMORY})}, but the "
                              f"cluster has {_fmt(totals, ['memory'])}")


def concurrency_cap(resources: Mapping[str, Any], nodes: Sequence[Resources],
                    max_concurrent: int | None) -> int | None:
    """``max_concurrent_trials`` for Tune: the sweep's value, and for multi-device trials at most the
    number of trials whose workers all fit at once (so drivers never pile up waiting for workers)."""
    devices = int(resources["devices"])
    if devices <= 1:
        return max_concurrent
    slots = sum(_fits(n, worker_request(resources)) for n in nodes)
    cap = max(1, slots // devices)
    return cap if max_concurrent is None else min(cap, max_concurrent)


__all__ = ["DRIVER_MEMORY", "check_fits", "concurrency_cap", "worker_request"]
