"""How many threads a single-process trial, evaluation, bench or pre-training uses: the ONE decision.

torch's default is every core of the machine. On a shared node that is wrong twice: SLURM, a container's cgroup
or Ray may have given the process fewer CPUs, and other processes may already fill the cores. OpenMP threads
that spin against each other then collapse throughput (issue 21: `synqt train` on a busy 2-core machine ran at
2 img/s with torch's default, 615-661 img/s with OMP_NUM_THREADS=1).

Precedence (the first that applies decides):

1. ``OMP_NUM_THREADS`` in the environment: the user's word, never changed (inside a Ray worker, Ray sets it to
   the trial's CPUs unless the user did: a value equal to them counts as 2).
2. The CPUs Ray assigned to this trial (``assigned_cpus``: ``launcher.run.ray_backend`` reads them from
   ``ray.get_runtime_context().get_assigned_resources()`` and passes them down; this module imports no Ray).
3. ``SLURM_CPUS_PER_TASK`` (a SLURM step's CPUs per task).
4. What the process can run on: ``joblib.cpu_count()``, which takes the minimum of the machine's cores, the
   CPU affinity mask (``os.sched_getaffinity``: taskset, cpusets) and a cgroup CPU quota (v2 ``cpu.max``,
   v1 ``cpu.cfs_quota_us``). It is told apart here only to name it.

2 and 3 are capped by 4. Where no scheduler granted the CPUs (case 4), other processes' threads count too:

- the cores they keep busy *now* (``psutil.cpu_percent`` of the whole machine over 0.3 s, less this
  process's own share) are not free: the count is cut to the cores left, ``round(cores - busy)`` (at least 1);
- the machine is *oversubscribed* when its 1-minute load average exceeds its cores (``os.getloadavg``): the
  count is cut to the process's fair share, ``floor(usable * cores / load)`` (at least 1), and the run's first
  line says so.

The 1-minute load lags (a process started with its neighbour sees the neighbour only after a minute), hence the
instantaneous sample. Measured on this project's 2-core machine at load 3.5-4 (`synqt train`, the demo's ViT
geometry, kv_cache off): 1 thread 392-446 img/s, 2 threads 17-29 img/s; with one CPU-bound neighbour, the demo's
pre-training took 4.8x its idle time per step on 2 threads (the neighbour not yet in the load average).
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
    shared: bool  # the count was cut: other processes keep cores busy, or the machine is oversubscribed
    busy_cpus: float = 0.0  # cores other processes kept busy when the count was chosen

    def line(self) -> str:
        """``threads: 2 (SLURM_CPUS_PER_TASK=2)``, plus a word on an oversubscribed machine."""
        why = {"OMP_NUM_THREADS": f"OMP_NUM_THREADS={self.threads}",
               "ray": "the CPUs Ray assigned to this trial",
               "SLURM_CPUS_PER_TASK": f"SLURM_CPUS_PER_TASK={os.environ.get('SLURM_CPUS_PER_TASK', '?')}",
               "cgroup": f"cgroup CPU quota: {self.usable_cpus} of {self.cores} cores",
               "affinity": f"CPU affinity: {self.usable_cpus} of {self.cores} cores",
               "all cores": f"all {self.cores} cores"}[self.source]
        said = []
        if self.busy_cpus >= 0.5:
            said.append(f"other processes keep {self.busy_cpus:.1f} of {self.cores} cores busy")
        if self.oversubscribed:
            said.append(f"the machine is oversubscribed: load {self.load1:.1f} on {self.cores} cores")
        busy = "; ".join(said)
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


def busy_cpus_now(interval_s: float = 0.3) -> float:
    """Cores other processes keep busy, sampled over ``interval_s`` seconds (psutil: the whole machine's CPU
    time less this process's own), 0.0 .. cores."""
    import psutil

    me = psutil.Process()
    me.cpu_percent(None)
    total = psutil.cpu_percent(interval=interval_s)  # % of all cores, averaged
    mine = me.cpu_percent(None)  # % of one core
    cores = psutil.cpu_count() or 1
    return max(0.0, total * cores / 100.0 - mine / 100.0)


def choose_threads(assigned_cpus: float | None = None, *, environ: Mapping[str, str] | None = None,
                   load1: float | None = None, busy_cpus: float | None = None) -> ThreadChoice:
    """The thread count by the precedence of this module's docstring. ``assigned_cpus``: Ray's CPUs for this
    trial (None outside Ray); ``environ`` / ``load1`` / ``busy_cpus``: the environment, the 1-minute load
    average and the cores other processes keep busy (default: this process's, ``os.getloadavg()`` and
    ``busy_cpus_now()``; a ``load1`` given alone means nothing else is busy)."""
    env = os.environ if environ is None else environ
    usable, limit_source, cores = _process_limit()
    measure = busy_cpus is None and load1 is None
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
        if busy_cpus is None:  # sampled only here: a scheduler's grant never waits for it
            busy_cpus = busy_cpus_now() if measure else 0.0
        left = max(1, round(cores - busy_cpus))
        if oversubscribed:
            left = min(left, max(1, math.floor(usable * cores / load1)))
        shared, threads = left < threads, min(threads, left)
    return ThreadChoice(threads, source, usable, cores, load1, oversubscribed, shared, round(busy_cpus or 0.0, 2))


def configure_threads(assigned_cpus: float | None = None) -> ThreadChoice:
    """``choose_threads`` and set torch's intra-op thread count to it; returns the choice (for the run's first
    line and its metrics.json)."""
    import torch

    choice = choose_threads(assigned_cpus)
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    return choice


__all__ = ["SOURCES", "ThreadChoice", "busy_cpus_now", "choose_threads", "configure_threads"]
