"""`synqt status RUN_DIR`: done / failed / broken / running / pending trials of a sweep and the time left.

Reads only plan.json and the run directories, through ``synqt.run.rundir.scan_runs`` (as ``synqt aggregate``
does, so both agree on every state), so it works while the sweep runs, after it died, and on a shared
filesystem from any machine. Never imports ray.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from synqt.run import rundir
from synqt.run.rundir import STALE_AFTER_S, STATES

__all__ = ["STALE_AFTER_S", "STATES", "collect_status", "format_duration", "status_text"]


def _trial(root: Path, rec: rundir.RunRecord, planned: bool) -> dict[str, Any]:
    m = rec.metrics or {}
    rel = rec.dir.relative_to(root).as_posix() if rec.dir.is_relative_to(root) else str(rec.dir)
    return {
        **rec.plan,
        "run_name": rec.plan.get("run_name") or (rel if rel != "." else rec.dir.name),
        "dataset": rec.dataset, "stage": rec.plan.get("stage", m.get("stage")),
        "seed": rec.plan.get("seed", m.get("seed")), "dir": rec.dir, "planned": planned,
        "state": rec.state, "error": rec.error,
        "epoch": rec.epoch, "epochs": rec.epochs or (rec.plan.get("epochs") if isinstance(rec.plan.get("epochs"), int)
                                                     else None),
        "wall_time_s": m.get("wall_time_s"), "epochs_done": m.get("epochs_done"), "updated": rec.updated,
        "started": rec.started, "finished_at": rec.finished_at if rec.metrics else None,
        "superseded_by": rec.superseded_by,
    }


def _throughput(trials: list[dict[str, Any]], now: float) -> tuple[int, float]:
    """(trial-epochs completed, seconds during which any trial ran): the sweep's own throughput so far.

    Each finished trial ran over [finished_at - wall_time_s, finished_at], a running one since progress.json's
    start (until its last update when stale); the union of these intervals is the sweep's busy time (a pause
    between a kill and a --resume is not in it; packed branches share their pack's interval and each counts its
    epochs). Unlike seconds per trial-epoch divided by the trials running at this instant, the rate does not
    jump when a pack ends or the next one starts.
    """
    spans, epochs = [], 0
    for t in trials:
        if t["state"] in ("done", "failed") and isinstance(t.get("wall_time_s"), int | float) and t.get("finished_at"):
            spans.append((float(t["finished_at"]) - float(t["wall_time_s"]), float(t["finished_at"])))
            epochs += t["epochs_done"] if isinstance(t.get("epochs_done"), int) else 0
        elif t["state"] == "running" and t.get("started") is not None:
            end = float(t["updated"]) if t.get("stale") else now  # a stale one (its process died?) ran until then
            spans.append((float(t["started"]), max(end, float(t["started"]))))
            epochs += t["epoch"] if isinstance(t.get("epoch"), int) else 0
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        start = max(start, end)
        if stop > start:
            busy += stop - start
            end = stop
    return epochs, busy


def collect_status(run_dir: str | Path, now: float | None = None) -> dict[str, Any]:
    """Structured status: per-trial states, counts and the time-left estimate (``status_text`` prints it).

    Trials are read with ``synqt.run.rundir.scan_runs`` (as ``synqt aggregate`` reads them): the planned trials
    plus any other run directory under ``run_dir``; a copy superseded by a later one of the same trial is
    listed but not counted.
    """
    root = Path(run_dir)
    now = time.time() if now is None else now
    plan, records = rundir.scan_runs(root)
    trials = [_trial(root, r, bool(r.plan)) for r in records]
    counted = [t for t in trials if t["superseded_by"] is None]

    for t in trials:
        t["stale"] = (
            t["state"] == "running" and t["updated"] is not None and now - t["updated"] > STALE_AFTER_S
        )

    counts = {s: sum(t["state"] == s for t in counted) for s in STATES}
    trials_all, trials = trials, counted
    stage2 = int(plan.get("stage2_pending") or 0) if plan else 0

    # Mean wall time per finished trial-epoch.
    finished_time = 0.0
    finished_epochs = 0
    for t in trials:
        if t["state"] != "done" or not isinstance(t["wall_time_s"], (int, float)):
            continue
        ep = t["epochs_done"] if isinstance(t["epochs_done"], int) else t.get("epochs")
        if isinstance(ep, int) and ep > 0:
            finished_time += float(t["wall_time_s"])
            finished_epochs += ep

    remaining = 0
    unknown_epochs = 0
    for t in trials:
        epochs = t.get("epochs")
        if t["state"] == "pending":
            if isinstance(epochs, int):
                remaining += epochs
            else:
                unknown_epochs += 1
        elif t["state"] == "running":
            if isinstance(epochs, int):
                done = t["epoch"] if isinstance(t["epoch"], int) else 0
                remaining += max(0, epochs - done)
            else:
                unknown_epochs += 1
    planned = [t["epochs"] for t in trials if isinstance(t.get("epochs"), int)]
    finals = [t["epochs"] for t in trials if isinstance(t.get("epochs"), int) and t.get("stage") == "final"]
    stage2_epochs = round(sum(finals or planned) / len(finals or planned)) if (finals or planned) else None
    if stage2 and stage2_epochs is not None:
        remaining += stage2 * stage2_epochs

    per_epoch = finished_time / finished_epochs if finished_epochs else None
    parallel = max(1, counts["running"])
    done_epochs, busy_s = _throughput(trials, now)
    rate = done_epochs / busy_s if done_epochs and busy_s > 0 else None
    eta = remaining / rate if rate is not None and finished_epochs else (0.0 if not remaining else None)
    return {
        "run_dir": str(root),
        "plan": plan is not None,
        "name": (plan or {}).get("name") or root.name,
        "protocol": (plan or {}).get("protocol"),
        "trials": trials,
        "superseded": [t for t in trials_all if t["superseded_by"] is not None],
        "counts": counts,
        "total": len(trials),
        "stage2_pending": stage2,
        "stage2_epochs": stage2_epochs,
        "seconds_per_trial_epoch": per_epoch,
        "finished_epochs": finished_epochs,
        "remaining_epochs": remaining,
        "unknown_epoch_trials": unknown_epochs,
        "parallel": parallel,
        "completed_epochs": done_epochs,
        "busy_s": busy_s,
        "epochs_per_s": rate,
        "eta_s": eta,
        "now": now,
        "owner": _owner(root),
    }


def _owner(root: Path) -> dict[str, Any] | None:
    """The process that owns the sweep folder (synqt/run/ownership.py): its description and whether it still runs."""
    from synqt.run import ownership

    owner = ownership.read_owner(root)
    if owner is None:
        return None
    gone = owner.gone_because()
    return {"pid": owner.pid, "host": owner.host, "started": owner.started, "describe": owner.describe(),
            "live": gone is None, "gone_because": gone}


def format_duration(seconds: float) -> str:
    """``2 h 05 min`` / ``4 min 10 s`` / ``12 s``."""
    s = int(round(seconds))
    if s >= 86400:
        return f"{s // 86400} d {s % 86400 // 3600} h"
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def status_text(run_dir: str | Path, st: Mapping[str, Any] | None = None) -> str:
    """The text `synqt status RUN_DIR` prints (of ``st``, a ``collect_status`` result, when given)."""
    st = collect_status(run_dir) if st is None else st
    c = st["counts"]
    proto = f" (protocol {st['protocol']})" if st["protocol"] else ""
    lines = [f"sweep {st['name']}{proto}: {st['run_dir']}"]
    if not st["plan"]:
        lines.append(
            "no plan.json: trials inferred from the metrics.json/progress.json found; pending ones unknown"
        )
    owner = st.get("owner")
    if owner:
        lines.append(f"being run by {owner['describe']}" if owner["live"] else
                     f"last run by {owner['describe']}; that owner is gone ({owner['gone_because']}): the next "
                     "--resume takes over")
    lines.append(
        f"trials: {st['total']} | done {c['done']} | failed {c['failed']} | running {c['running']} "
        f"| pending {c['pending']}" + (f" | broken {c['broken']}" if c["broken"] else "")
    )
    if st["stage2_pending"]:
        lines.append(
            f"plus {st['stage2_pending']} final-stage trial(s) to be planned when the search stage ends"
        )
    running = [t for t in st["trials"] if t["state"] == "running"]
    if running:
        lines.append("running:")
        for t in running:
            epoch = t["epoch"] if t["epoch"] is not None else "?"
            ep = f"epoch {epoch}/{t['epochs'] or '?'}"
            extra = ""
            if t["updated"] is not None:
                extra = f", updated {format_duration(max(0.0, st['now'] - t['updated']))} ago"
                if t["stale"]:
                    extra += " (stale? its process may have died)"
            lines.append(f"  {t['run_name']}: {ep}{extra}")
    failed = [t for t in st["trials"] if t["state"] == "failed"]
    if failed:
        lines.append("failed:")
        lines += [f"  {t['run_name']}: {t['error']}" for t in failed]
    broken = [t for t in st["trials"] if t["state"] == "broken"]
    if broken:
        lines.append("broken (a metrics.json that cannot be read; rerun or remove it):")
        lines += [f"  {t['run_name']}: {t['error']}" for t in broken]
    if st["superseded"]:
        lines.append("duplicates (not counted: the same trial finished later elsewhere):")
        lines += [f"  {t['dir']} -> counted: {t['superseded_by']}" for t in st["superseded"]]
    lines.append(time_left_line(st))
    return "\n".join(lines)


def time_left_line(st: Mapping[str, Any]) -> str:
    """`estimated time left: ...` of a ``collect_status`` result; says so when nothing runs."""
    c = st["counts"]
    if not c["running"] and not c["pending"] and not st["stage2_pending"]:
        return "nothing running or pending: no time left to estimate"
    idle = "" if c["running"] else "nothing running now (resume the sweep to continue); "
    if st["eta_s"] is None:
        return f"estimated time left: {idle}unknown (no finished trial yet)"
    how = f"{st['completed_epochs']} trial-epochs done in {format_duration(st['busy_s'])} of sweep time, " \
          f"{st['remaining_epochs']} remaining"
    if st["stage2_pending"] and st["stage2_epochs"] is not None:
        how += f"; the {st['stage2_pending']} unplanned final trials counted at {st['stage2_epochs']} epochs"
    if st["unknown_epoch_trials"]:
        how += f"; {st['unknown_epoch_trials']} trial(s) of unknown length not counted"
    return f"estimated time left: {idle}~{format_duration(st['eta_s'])} at the sweep's throughput so far ({how})"
