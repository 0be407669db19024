"""A sweep resumed with a changed plan: which trials are kept, which run, and what happens to changed ones.

Rule (the sweep form of ``synqt.weights.compat``'s "a resume continues exactly the same run, or stops"): on
``--resume`` each planned trial's run directory is compared with the trial's resolved config.

- kept: the directory's recorded config equals the planned one in every key that can change a result
  (``synqt.weights.compat.RESULT_NEUTRAL_KEYS`` may differ). A finished one is not rerun; an unfinished one
  continues from its last epoch checkpoint.
- new: no run directory yet (an added grid point, dataset or seed). It runs.
- changed: the run directory was made with another config (e.g. ``epochs=`` changed for the whole sweep).
  The old directory is moved, whole, to ``<storage_path>/<name>.superseded/<run_name>.<n>/`` (outside the
  sweep folder, so the table, ``synqt status`` and TensorBoard read only the current plan's runs) and the
  trial runs again from scratch as a new trial.
- dropped: run directories of the stage that the new plan no longer has (a removed grid point, dataset
  or seed; a stage-2 point no longer selected) are moved aside the same way, so the table never mixes in a
  run of another plan, and nothing finished is lost.

The summary is printed before anything runs. Nothing here imports Ray; the Ray backend separately keys
its Tune trials by pack content (``pack_id``) so that a restored Tune experiment never hands one pack's
trial to another.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.plan.schema import PlannedTrial, Sweep
from synqt.run import rundir
from synqt.weights.compat import config_changes, format_changes, has_state, saved_config


@dataclass
class Reconciled:
    """What ``reconcile`` found and did, per category (run names)."""

    kept_finished: list[str] = field(default_factory=list)
    kept_unfinished: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    changed: list[tuple[str, str, Path]] = field(default_factory=list)  # (run name, changes, moved to)
    dropped: list[tuple[str, Path]] = field(default_factory=list)  # (run name, moved to)

    def text(self, stage: str) -> str:
        lines = [
            f"synqt sweep: resume, stage {stage}: {len(self.kept_finished)} finished trial(s) kept, "
            f"{len(self.kept_unfinished)} unfinished continue(s), {len(self.new)} new, "
            f"{len(self.changed)} changed (rerun as new trials)"
        ]
        lines += [f"  new: {name}" for name in self.new]
        for name, what, moved in self.changed:
            lines.append(f"  changed: {name}: {what}; the earlier run moved to {moved}")
        for name, moved in self.dropped:
            lines.append(f"  no longer in the plan: {name}; moved to {moved}")
        return "\n".join(lines)


def superseded_dir(sweep: Sweep) -> Path:
    return Path(sweep.storage_path) / f"{sweep.name}.superseded"


def _move_aside(sweep: Sweep, run_dir: Path) -> Path:
    root = superseded_dir(sweep)
    root.mkdir(parents=True, exist_ok=True)
    n = 1
    while (root / f"{run_dir.name}.{n}").exists():
        n += 1
    dest = root / f"{run_dir.name}.{n}"
    shutil.move(str(run_dir), str(dest))
    return dest


def supersede_sweep_files(sweep: Sweep) -> Path | None:
    """Move the sweep folder's ``sweep.yaml`` and ``plan.json`` to ``<name>.superseded/sweep-files.<n>/``
    before a resume with a changed sweep rewrites them; returns that folder, or None when neither existed."""
    present = [sweep.sweep_dir / f for f in (rundir.SWEEP, rundir.PLAN) if (sweep.sweep_dir / f).is_file()]
    if not present:
        return None
    root = superseded_dir(sweep)
    n = 1
    while (root / f"sweep-files.{n}").exists():
        n += 1
    dest = root / f"sweep-files.{n}"
    dest.mkdir(parents=True)
    for f in present:
        shutil.move(str(f), str(dest / f.name))
    return dest


def _content_changes(run_dir: Path, t: PlannedTrial) -> str:
    """What differs between a run's recorded identity and the planned trial's beyond the config text
    (``synqt.run.rundir.trial_identity``: the backbone weights by content, e.g. another file under the same path);
    empty when nothing does or the run recorded no identity."""
    from synqt.config import config_to_dict

    recorded = rundir.read_run(run_dir).config_identity()
    if recorded is None:
        return ""
    planned = rundir.trial_identity(config_to_dict(t.config))
    return "; ".join(f"{k}: {recorded.get(k)} -> {v}" for k, v in planned.items() if recorded.get(k) != v)


def reconcile(sweep: Sweep, trials: Sequence[PlannedTrial], stage: str) -> Reconciled:
    """Classify each planned trial against its run directory, move changed ones aside, print the summary.

    Prints nothing for a stage that has no run directories yet (a fresh sweep or stage).
    """
    out = Reconciled()
    for t in trials:
        run_dir = t.run_dir(sweep)
        if not has_state(run_dir):
            out.new.append(t.run_name)
            continue
        old = saved_config(run_dir)
        changes = config_changes(old, t.config) if old is not None else []
        what = format_changes(changes) if changes else _content_changes(run_dir, t)
        if what:
            moved = _move_aside(sweep, run_dir)
            out.changed.append((t.run_name, what, moved))
            continue
        m = rundir.read_metrics(run_dir)
        (out.kept_finished if m and m.get("status") == "ok" else out.kept_unfinished).append(t.run_name)
    planned = {t.run_name for t in trials}
    runs = sweep.sweep_dir / rundir.RUNS
    if runs.is_dir():  # run names start with their stage (launcher.plan.trials.plan_trials)
        gone = sorted(d for d in runs.iterdir()
                      if d.name.startswith(f"{stage}-") and d.name not in planned and has_state(d))
        out.dropped = [(d.name, _move_aside(sweep, d)) for d in gone]
    if out.kept_finished or out.kept_unfinished or out.changed or out.dropped:
        print(out.text(stage), flush=True)
    return out


def pack_id(run_names: Sequence[str], cfgs: Sequence[Any]) -> str:
    """A Tune trial's key: a hash of its pack's run names and resolved configs (not its position)."""
    from synqt.config import RESULT_KEYS, config_to_dict

    # keys that cannot change a result may change on resume without making it another Tune trial
    resolved = [{k: v for k, v in config_to_dict(c).items() if k in RESULT_KEYS} for c in cfgs]
    blob = json.dumps([list(run_names), resolved], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


__all__ = ["Reconciled", "pack_id", "reconcile", "supersede_sweep_files", "superseded_dir"]
