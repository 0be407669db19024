"""`synqt status RUN_DIR`: done / failed / running / pending trials of a sweep and the time left.

Reads only plan.json and each run directory's metrics.json / progress.json (written by the
engine), so it works while the sweep runs, after it died, and on a shared filesystem from any
machine. Never imports ray.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from synqt.errors import SynQTError

STATES = ("done", "failed", "running", "pending")

_SKIP_DIRS = frozenset({"_ray", "_sweep_summary", "tensorboard", "__pycache__"})

# A progress.json not rewritten for this long probably belongs to a dead process.
STALE_AFTER_S = 3600.0


def _read_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as err:
        return None, f"{path.name} not readable ({err})"


def _timestamp(value: Any) -> float | None:
    """progress.json ``updated``: unix seconds or an ISO-8601 string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def trial_state(trial_dir: Path, planned_epochs: int | None = None) -> dict[str, Any]:
    """State of one trial from its run directory (metrics.json wins over progress.json)."""
    info: dict[str, Any] = {
        "state": "pending", "epoch": None, "epochs": planned_epochs, "error": None,
        "wall_time_s": None, "epochs_done": None, "updated": None,
    }  # fmt: skip
    metrics_path = trial_dir / "metrics.json"
    progress_path = trial_dir / "progress.json"
    if metrics_path.is_file():
        metrics, err = _read_json(metrics_path)
        if err or not isinstance(metrics, dict):
            info.update(state="failed", error=err or "metrics.json is not a JSON object")
            return info
        ok = metrics.get("status") == "ok"
        info.update(
            state="done" if ok else "failed",
            error=None if ok else (metrics.get("error") or "unknown error"),
            wall_time_s=metrics.get("wall_time_s"),
            epochs_done=metrics.get("epochs_done"),
        )
        return info
    if progress_path.is_file():
        progress, err = _read_json(progress_path)
        info["state"] = "running"
        if isinstance(progress, dict):
            info.update(
                epoch=progress.get("epoch"),
                epochs=progress.get("epochs") or planned_epochs,
                updated=_timestamp(progress.get("updated")),
            )
    return info


def _discover(run_dir: Path) -> list[dict[str, Any]]:
    """Trials without a plan: every directory holding metrics.json or progress.json."""
    dirs: set[Path] = set()
    for name in ("metrics.json", "progress.json"):
        for path in run_dir.rglob(name):
            rel = path.relative_to(run_dir).parts[:-1]
            if not any(p in _SKIP_DIRS or p.startswith(".") for p in rel):
                dirs.add(path.parent)
    trials = []
    for d in sorted(dirs):
        metrics, _ = _read_json(d / "metrics.json") if (d / "metrics.json").is_file() else (None, None)
        metrics = metrics if isinstance(metrics, dict) else {}
        rel = d.relative_to(run_dir).as_posix()
        trials.append({
            "run_name": rel if rel != "." else d.name, "dataset": metrics.get("dataset"),
            "stage": metrics.get("stage"), "seed": metrics.get("seed"), "epochs": None, "dir": d,
        })  # fmt: skip
    return trials


def collect_status(run_dir: str | Path, now: float | None = None) -> dict[str, Any]:
    """Structured status: per-trial states, counts and the time-left estimate (``status_text`` prints it)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise SynQTError(f"run directory {root} does not exist; expected a sweep directory")
    now = time.time() if now is None else now
    plan_path = root / "plan.json"
    plan: dict[str, Any] | None = None
    if plan_path.is_file():
        plan, err = _read_json(plan_path)
        if err or not isinstance(plan, dict) or not isinstance(plan.get("trials"), list):
            raise SynQTError(
                f"{plan_path}: expected a JSON object with a 'trials' list ({err or 'bad format'})"
            )
        trials = []
        for i, t in enumerate(plan["trials"]):
            if not isinstance(t, Mapping) or not t.get("run_name"):
                raise SynQTError(f"{plan_path}: trials[{i}] needs a 'run_name', got {t!r}")
            trials.append({**t, "dir": root / "runs" / str(t["run_name"])})
    else:
        trials = _discover(root)

    for t in trials:
        epochs = t.get("epochs") if isinstance(t.get("epochs"), int) else None
        t.update(trial_state(t["dir"], epochs))
        t["stale"] = (
            t["state"] == "running" and t["updated"] is not None and now - t["updated"] > STALE_AFTER_S
        )

    counts = {s: sum(t["state"] == s for t in trials) for s in STATES}
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
    eta = per_epoch * remaining / parallel if per_epoch is not None else None
    return {
        "run_dir": str(root),
        "plan": plan is not None,
        "name": (plan or {}).get("name") or root.name,
        "protocol": (plan or {}).get("protocol"),
        "trials": trials,
        "counts": counts,
        "total": len(trials),
        "stage2_pending": stage2,
        "stage2_epochs": stage2_epochs,
        "seconds_per_trial_epoch": per_epoch,
        "finished_epochs": finished_epochs,
        "remaining_epochs": remaining,
        "unknown_epoch_trials": unknown_epochs,
        "parallel": parallel,
        "eta_s": eta,
        "now": now,
    }


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


def status_exit(st: Mapping[str, Any]) -> int:
    """Exit code of `synqt status` (launcher.console.Exit): FAILED_RUNS when a trial failed, NOT_FINISHED while
    trials run or are pending (final-stage ones included), OK when all are done."""
    from launcher.console import Exit

    c = st["counts"]
    if c["failed"]:
        return Exit.FAILED_RUNS
    if c["running"] or c["pending"] or st.get("stage2_pending"):
        return Exit.NOT_FINISHED
    return Exit.OK


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
    lines.append(
        f"trials: {st['total']} | done {c['done']} | failed {c['failed']} | running {c['running']} "
        f"| pending {c['pending']}"
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
    if st["eta_s"] is None:
        lines.append("estimated time left: unknown (no finished trial yet)")
    else:
        how = (
            f"{st['seconds_per_trial_epoch']:.1f} s per finished trial-epoch x {st['remaining_epochs']} "
            f"remaining epochs / {st['parallel']} running"
        )
        if st["stage2_pending"] and st["stage2_epochs"] is not None:
            how += (
                f"; the {st['stage2_pending']} unplanned final trials counted at {st['stage2_epochs']} epochs"
            )
        if st["unknown_epoch_trials"]:
            how += f"; {st['unknown_epoch_trials']} trial(s) of unknown length not counted"
        lines.append(f"estimated time left: ~{format_duration(st['eta_s'])} (estimate: {how})")
    return "\n".join(lines)
