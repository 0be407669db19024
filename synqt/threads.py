"""How many threads a single-process trial, evaluation, bench or pre-training uses: the ONE decision.

torch's default is every core of the machine. On a shared node that is wrong twice: SLURM, a container's cgroup
or Ray may have given the process fewer CPUs, and other processes may already fill the cores. OpenMP threads
that spin against each other then collapse throughput (issue 21: `synqt train` on a busy 2-core machine ran at
2 img/s with torch's default, 615-661 img/s with OMP_NUM_THREADS=1).

Precedence (the first that applies decides):

1. ``OMP_NUM_THREADS`` in the environment: the user's word, never changed (inside a Ray worker, Ray sets it to
   the trial's CPUs unless the user did: a value equal to them counts as 2).
2. The CPUs Ray assigned to this trial (``assigned_cpus``: ``launcher.ray_backend`` reads them from
   ``ray.get_runtime_context().get_assigned_resources()`` and passes them down; this module imports no Ray).
3. ``SLURM_CPUS_PER_TASK`` (a SLURM step's CPUs per task).
4. What the process can run on: ``joblib.cpu_count()``, which takes the minimum of the machine's cores, the
   CPU affinity mask (``os.sched_getaffinity``: taskset, cpusets) and a cgroup CPU quota (v2 ``cpu.max``,
   v1 ``cpu.cfs_quota_us``). It is told apart here only to name it.

2 and 3 are capped by 4. The machine is *oversubscribed* when its 1-minute load average exceeds its cores
(``os.getloadavg``); that is said in the run's first line. Where no scheduler granted the CPUs (case 4), the
count is then cut to the process's fair share, ``floor(usable * cores / load)`` (at least 1): other processes'
threads already fill the cores. Measured on this project's 2-core machine at load 3.5-4 (`synqt train`, the demo's
ViT geometry, kv_cache off): 1 thread 392-446 img/s, 2 threads 17-29 img/s.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

SOURCES = ("OMP_NUM_THREADS", "ray", "SLURM_CPUS_PER_TASK", "cgroup", "affinity", "all cores")


@dataclass(frozen=True)
class ThreadChoice:
    """The decision: ``threads`` for torch's intra-op pool, which ``source`` decided (one of ``SOURCES``), the
    CPUs the process may use, the machine's cores and 1-minute load, and whether it is oversubscribed."""

    threads: int
    source: str
    usable_cpus: int
    cores: int
    load1: float | None
    oversubscribed: bool
    shared: bool  # the count was cut to a fair share because the machine is oversubscribed

    def line(self) -> str:
        """``threads: 2 (SLURM_CPUS_PER_TASK=2)``, plus a word on an oversubscribed machine."""
        why = {"OMP_NUM_THREADS": f"OMP_NUM_THREADS={self.threads}",
               "ray": "the CPUs Ray assigned to this trial",
               "SLURM_CPUS_PER_TASK": f"SLURM_CPUS_PER_TASK={os.environ.get('SLURM_CPUS_PER_TASK', '?')}",
               "cgroup": f"cgroup CPU quota: {self.usable_cpus} of {self.cores} cores",
               "affinity": f"CPU affinity: {self.usable_cpus} of {self.cores} cores",
               "all cores": f"all {self.cores} cores"}[self.source]
        busy = f"the machine is oversubscribed: load {self.load1:.1f} on {self.cores} cores"
        if self.shared:
            return (f"threads: {self.threads} (a fair share of {why}: {busy}; set OMP_NUM_THREADS to choose)")
        return f"threads: {self.threads} ({why})" + (f"; {busy}; expect slower steps" if self.oversubscribed else "")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _positive_int(text: str | None) -> int | None:
    try:
        n = int(str(text).strip())
    except (TypeError, ValueError):
        return None
    return n if n > 0 else None


def _process_limit() -> tuple[int, str, int]:
    """(usable CPUs, cgroup | affinity | all cores, the machine's cores)."""
    import joblib

    cores = os.cpu_count() or 1
    usable = max(1, int(joblib.cpu_count()))
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = cores
    if usable < affinity:
        return usable, "cgroup", cores
    return usable, ("affinity" if usable < cores else "all cores"), cores


def choose_threads(assigned_cpus: float | None = None, *, environ: Mapping[str, str] | None = None,
                   load1: float | None = None) -> ThreadChoice:
    """The thread count by the precedence of this module's docstring. ``assigned_cpus``: Ray's CPUs for this
    trial (None outside Ray); ``environ`` / ``load1``: the environment and 1-minute load average (default:
    this process's and ``os.getloadavg()``)."""
    env = os.environ if environ is None else environ
    usable, limit_source, cores = _process_limit()
    if load1 is None:
        try:
            load1 = os.getloadavg()[0]
        except OSError:  # not available
            load1 = None
    oversubscribed = load1 is not None and load1 > cores
    omp = _positive_int(env.get("OMP_NUM_THREADS"))
    slurm = _positive_int(env.get("SLURM_CPUS_PER_TASK"))
    shared = False
    ray_cpus = max(1, math.floor(assigned_cpus)) if assigned_cpus is not None and assigned_cpus > 0 else None
    if omp is not None and omp == ray_cpus:  # Ray sets OMP_NUM_THREADS to the trial's CPUs in its workers
        threads, source = min(usable, ray_cpus), "ray"
    elif omp is not None:
        threads, source = omp, "OMP_NUM_THREADS"
    elif ray_cpus is not None:
        threads, source = min(usable, ray_cpus), "ray"
    elif slurm is not None:
        threads, source = min(usable, slurm), "SLURM_CPUS_PER_TASK"
    else:
        threads, source = usable, limit_source
        if oversubscribed:
            fair = max(1, math.floor(usable * cores / load1))
            shared, threads = fair < threads, min(threads, fair)
    return ThreadChoice(threads, source, usable, cores, load1, oversubscribed, shared)


def configure_threads(assigned_cpus: float | None = None) -> ThreadChoice:
    """``choose_threads`` and set torch's intra-op thread count to it; returns the choice (for the run's first
    line and its metrics.json)."""
    import torch

    choice = choose_threads(assigned_cpus)
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    return choice


__all__ = ["SOURCES", "ThreadChoice", "choose_threads", "configure_threads"]
