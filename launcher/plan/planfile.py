"""The sweep folder's plan files: ``plan.json`` (what runs) and ``sweep.yaml`` (the resolved sweep).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from launcher.plan.schema import PlannedTrial, Sweep
from synqt.run import rundir
from synqt.storage import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def set_aside_broken_plan(sweep: Sweep) -> bool:
    """The broken-file rule for ``plan.json`` of a sweep being continued: an empty, cut or malformed plan is
    moved aside (``synqt.storage.set_aside``), named once, and written again from the sweep file. True if moved."""
    from synqt.errors import SynQTError
    from synqt.storage import set_aside

    try:
        rundir.read_plan(sweep.sweep_dir)
    except SynQTError as err:
        return set_aside(sweep.sweep_dir / rundir.PLAN, str(err), "it is written again from the sweep file") is not None
    return False


def plan_dict(sweep: Sweep, trials: list[PlannedTrial], stage2_pending: bool) -> dict[str, Any]:
    return {
        "name": sweep.name,
        "protocol": sweep.protocol,
        "datasets": sweep.datasets,
        "sweep_dir": str(sweep.sweep_dir),
        "seeds": sweep.seeds,
        "grid": sweep.grid,
        "resources": sweep.resources,
        "pack": sweep.pack,
        "trials": [t.summary() for t in trials],
        "stage2_pending": stage2_pending,
    }


def sweep_yaml_text(sweep: Sweep) -> str:
    """The resolved sweep (every key, after overrides) as ``sweep.yaml`` holds it."""
    return yaml.safe_dump(sweep.to_dict(), sort_keys=False)


def write_plan(sweep: Sweep, trials: list[PlannedTrial], stage2_pending: bool) -> Path:
    """Write ``sweep.yaml`` and ``plan.json`` (creating the sweep folder). Callers write only after every check
    passed (``launcher.run.commands.write_sweep_files``, the SLURM array once its array job is queued)."""
    d = sweep.sweep_dir
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(d / rundir.SWEEP, sweep_yaml_text(sweep))
    return atomic_write_json(d / rundir.PLAN, plan_dict(sweep, trials, stage2_pending))
