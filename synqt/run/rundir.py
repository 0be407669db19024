"""The run-directory contract: the files a trial leaves, how they are read and written, and what they say.

Trainers (``synqt.training``) write run directories; the launcher, ``synqt aggregate`` and
``synqt status`` only read them, through ``read_run`` / ``scan_runs`` here, so they always agree on
which run is done, failed, broken, running or pending, and on which of two copies of the same run counts.

A run directory::

    config.yaml            resolved TrialConfig (written at the start)
    progress.json          {"epoch", "epochs", "wall_time_s", "updated", "status": "running", "host"} while it trains
    resume.pt              last epoch checkpoint of the pack trainer (ds_checkpoint/ for DeepSpeed)
    eval_snapshots/        deferred evaluation's weight snapshots, while they wait to be scored (deleted after)
    trainable.safetensors  final trainable-only weights (+ trainable.json, their description)
    metrics.json           written atomically at the end: status ok, or failed with the error
    events.out.tfevents.*  TensorBoard

A sweep folder holds ``sweep.yaml``, ``plan.json`` and the run directories under ``runs/``. Never imports
torch or ray.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synqt.config import RESULT_KEYS, TrialConfig, config_to_dict
from synqt.errors import SynQTError
from synqt.storage import atomic_write_json, set_aside, sha256_file

log = logging.getLogger("synqt.run.rundir")

# ------------------------------------------------------------------------------------------------- names

CONFIG = "config.yaml"
METRICS = "metrics.json"
PROGRESS = "progress.json"
RESUME = "resume.pt"
DS_CHECKPOINT = "ds_checkpoint"
EVAL_SNAPSHOTS = "eval_snapshots"  # deferred evaluation (synqt.training.snapshots)
TRAINABLE = "trainable.safetensors"
TRAINABLE_INFO = "trainable.json"
EVAL_METRICS = "eval_metrics.json"
PLAN = "plan.json"
SWEEP = "sweep.yaml"
RUNS = "runs"
# Folders under a sweep that never hold run directories (Ray's files, the aggregate's TensorBoard).
SKIP_DIRS = frozenset({"_ray", "_sweep_summary", "tensorboard", "__pycache__"})

# metrics.json: every key always present (null where it does not apply); docs/DESIGN.md.
METRIC_KEYS = (
    "dataset", "group", "protocol", "stage", "seed", "hparams", "val_acc", "test_acc", "best_of_test",
    "trainable_params", "peak_memory_bytes", "images_per_s", "wall_time_s", "versions", "provenance",
    "status", "error",
)  # fmt: skip

# hparams keys that identify a run rather than a hyperparameter point (dropped when comparing points).
SEED_KEYS = frozenset({"seed", "data_seed", "init_seed"})

# States of a run directory. broken: a metrics.json that cannot be read as a run's result.
STATES = ("done", "failed", "broken", "running", "pending")

# A progress.json not rewritten for this long probably belongs to a dead process (seconds).
STALE_AFTER_S = 3600.0


# ------------------------------------------------------------------------------------------ reads/writes


def point_key(hparams: Mapping[str, Any] | None) -> str:
    """Canonical JSON of a hyperparameter point (seed keys dropped): runs with one key are seeds of one point."""
    clean = {k: v for k, v in (hparams or {}).items() if k not in SEED_KEYS}
    return json.dumps(clean, sort_keys=True, default=str)


@functools.cache
def _default_config() -> dict[str, Any]:
    return config_to_dict(TrialConfig())


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)  # once per file version (path, size, modification time) per process


def weights_id(checkpoint: Any, sha256: str | None = None) -> Any:
    """The backbone weights a run used, by content: ``sha256:<hex>`` (from its provenance, else the file's
    hash, computed once per file per process), ``random``, None (no checkpoint), or the path text when the
    file is gone and the run recorded no hash."""
    if sha256:
        return f"sha256:{sha256}"
    if checkpoint is None or str(checkpoint).strip().lower() == "random":
        return None if checkpoint is None else "random"
    path = Path(str(checkpoint)).expanduser()
    try:
        st = path.stat()
    except OSError:
        return str(checkpoint)
    if not path.is_file():
        return str(checkpoint)
    return f"sha256:{_file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)}"


def trial_identity(config: Mapping[str, Any], checkpoint_sha256: str | None = None) -> dict[str, Any]:
    """A trial's identity: every key of ``synqt.config.RESULT_KEYS`` (the keys the resume check compares)
    from a resolved config (a key the config lacks: its default); seeds as their effective values, the
    paper protocol's stage as "final" (it ignores stage), and the checkpoint by content (``weights_id``).
    Two runs with equal identities are copies of the same trial; runs that differ are different trials."""
    defaults = _default_config()
    ident = {k: config.get(k, defaults[k]) for k in RESULT_KEYS}
    for k in ("data_seed", "init_seed"):
        if ident[k] is None:
            ident[k] = ident["seed"]
    if ident["protocol"] == "paper":
        ident["stage"] = "final"
    ident["checkpoint"] = weights_id(ident["checkpoint"], checkpoint_sha256)
    return ident


def read_json(path: str | Path) -> tuple[Any, str | None]:
    """(parsed JSON, None) or (None, a reason naming the file) when absent or unreadable."""
    from synqt.storage import read_json_file

    path = Path(path)
    try:
        return read_json_file(path), None
    except FileNotFoundError:
        return None, f"{path} does not exist"
    except ValueError as err:
        return None, str(err)
    except OSError as err:
        return None, f"{path} is not readable ({err})"


def read_metrics(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's metrics.json as a dict, or None when absent, unreadable or not a JSON object."""
    data, _ = read_json(Path(run_dir) / METRICS)
    return data if isinstance(data, dict) else None


def is_done(run_dir: str | Path) -> bool:
    """True when the run's metrics.json says status ok: trainers skip it, the launcher counts it finished."""
    return (read_metrics(run_dir) or {}).get("status") == "ok"


def write_metrics(run_dir: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Write metrics.json atomically, stamping ``finished_at`` (unix seconds) for the duplicate rule."""
    return atomic_write_json(Path(run_dir) / METRICS, {**metrics, "finished_at": time.time()})


def write_progress(run_dir: str | Path, epoch: int, epochs: int, started: float) -> Path:
    """progress.json after an epoch (``synqt status`` reads it while the trial runs)."""
    now = time.time()
    return atomic_write_json(Path(run_dir) / PROGRESS, {
        "epoch": epoch, "epochs": epochs, "wall_time_s": now - started, "updated": now, "status": "running",
        "host": socket.gethostname()})


def clear_progress(run_dir: str | Path) -> None:
    (Path(run_dir) / PROGRESS).unlink(missing_ok=True)


def set_aside_broken_state(run_dir: str | Path) -> list[Path]:
    """Before a trainer (re)starts a run: apply the broken-file rule (``synqt.storage.set_aside``) to its
    metrics.json and progress.json. A file that is empty, cut or not a JSON object is moved aside to
    ``<name>.broken-<time>`` and named once; the run is then trained (metrics.json) or its progress
    rewritten after the next epoch (progress.json), as if the file were absent. Returns the moved files.
    (Readers -- ``read_run``, ``synqt status``, ``synqt aggregate`` -- never move anything: they name it.)
    """
    moved = []
    for name, then in ((METRICS, "the run is trained (again) and writes a new one"),
                       (PROGRESS, "it is rewritten after the next epoch")):
        path = Path(run_dir) / name
        if not path.exists():
            continue
        data, err = read_json(path)
        if err is None and not isinstance(data, dict):
            err = f"{path}: expected a JSON object, got {type(data).__name__}"
        if err is not None:
            dest = set_aside(path, err, then)
            if dest is not None:
                moved.append(dest)
    return moved


def read_plan(sweep_dir: str | Path) -> dict[str, Any] | None:
    """``<sweep_dir>/plan.json`` or None when absent; SynQTError naming the file when it is not a plan."""
    path = Path(sweep_dir) / PLAN
    if not path.is_file():
        return None
    plan, err = read_json(path)
    if err:
        raise SynQTError(f"{err}; expected the sweep plan")
    if not isinstance(plan, dict):
        raise SynQTError(f"{path}: expected a JSON object with 'datasets' and 'trials', got {type(plan).__name__}")
    trials = plan.get("trials", [])
    if not isinstance(trials, list):
        raise SynQTError(f"{path}: key 'trials' must be a list, got {type(trials).__name__}")
    for i, t in enumerate(trials):
        if not isinstance(t, Mapping) or not t.get("run_name"):
            raise SynQTError(f"{path}: trials[{i}] needs a 'run_name', got {t!r}")
    return plan


# -------------------------------------------------------------------------------------------- outcomes


@dataclass
class RunRecord:
    """What one run directory says, read once: the typed outcome every reader shares."""

    dir: Path
    state: str  # one of STATES
    metrics: dict[str, Any] | None = None  # the parsed metrics.json (done / failed)
    error: str | None = None  # failed: the trial's error; broken: why metrics.json is unusable
    epoch: int | None = None  # running: last finished epoch (progress.json)
    epochs: int | None = None  # running: planned epochs
    updated: float | None = None  # running: unix time progress.json was written
    started: float | None = None  # running: unix time the current process started it (progress.json)
    superseded_by: Path | None = None  # set by resolve_duplicates on the copy that does not count
    plan: dict[str, Any] = field(default_factory=dict)  # the plan.json entry, when the run was planned

    @property
    def run_name(self) -> str:
        return str((self.metrics or {}).get("run_name") or self.plan.get("run_name") or self.dir.name)

    @property
    def dataset(self) -> str | None:
        return (self.metrics or {}).get("dataset") or self.plan.get("dataset")

    @property
    def finished_at(self) -> float:
        """When the trial wrote its result: metrics ``finished_at``, else the file's modification time."""
        value = (self.metrics or {}).get("finished_at")
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        try:
            return (self.dir / METRICS).stat().st_mtime
        except OSError:
            return 0.0

    def config_identity(self) -> dict[str, Any] | None:
        """``trial_identity`` of the run's recorded config (metrics.json ``config``, the checkpoint hash from
        its provenance); None for a run that recorded no config."""
        m = self.metrics or {}
        if not isinstance(m.get("config"), Mapping):
            return None
        if "_identity" not in self.__dict__:
            sha = (m.get("provenance") or {}).get("backbone_checkpoint_sha256")
            self.__dict__["_identity"] = trial_identity(m["config"], sha if isinstance(sha, str) else None)
        return self.__dict__["_identity"]

    def identity(self) -> str | None:
        """The trial a done or failed run belongs to (``trial_identity`` of its config, hparams and stage):
        two runs with one identity are copies of the same trial. A metrics.json without a config (written
        by hand or by an old version) falls back to (dataset, protocol, stage, hparams, seed)."""
        m = self.metrics
        if m is None:
            return None
        legacy = [str(m.get("dataset")), str(m.get("protocol")), str(m.get("stage")), point_key(m.get("hparams")),
                  json.dumps(m.get("seed"))]
        config = self.config_identity()
        return json.dumps(legacy if config is None else [legacy, config], sort_keys=True, default=str)


def _timestamp(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        from datetime import datetime

        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def read_run(run_dir: str | Path, plan: Mapping[str, Any] | None = None) -> RunRecord:
    """The state of one run directory (metrics.json wins over progress.json); ``plan``: its plan.json entry.

    done: metrics.json with status ok; failed: a readable metrics.json with another status (its error);
    broken: a metrics.json that is not JSON, not an object, or names no dataset when the plan does not
    either (nothing can be attributed to it); running: progress.json only; pending: neither file.
    """
    d = Path(run_dir)
    plan = dict(plan or {})
    if (d / METRICS).exists():
        metrics, err = read_json(d / METRICS)
        if err:
            return RunRecord(d, "broken", error=err, plan=plan)
        if not isinstance(metrics, dict):
            return RunRecord(d, "broken", error=f"{d / METRICS}: expected a JSON object, got "
                                                f"{type(metrics).__name__}", plan=plan)
        if not (isinstance(metrics.get("dataset"), str) and metrics["dataset"]):
            if not plan.get("dataset"):
                return RunRecord(d, "broken", error=f"{d / METRICS}: expected a non-empty 'dataset' string",
                                 plan=plan)
            metrics = {**metrics, "dataset": plan["dataset"]}
        if metrics.get("status") == "ok":
            return RunRecord(d, "done", metrics=metrics, plan=plan)
        return RunRecord(d, "failed", metrics=metrics, error=str(metrics.get("error") or "unknown error"),
                         plan=plan)
    if (d / PROGRESS).exists():
        progress, err = read_json(d / PROGRESS)
        rec = RunRecord(d, "running", plan=plan, error=err)  # a broken progress.json: named, epoch unknown
        if isinstance(progress, dict):
            rec.epoch = progress.get("epoch") if isinstance(progress.get("epoch"), int) else None
            rec.epochs = progress.get("epochs") if isinstance(progress.get("epochs"), int) else None
            rec.updated = _timestamp(progress.get("updated"))
            wall = progress.get("wall_time_s")
            if rec.updated is not None and isinstance(wall, int | float) and not isinstance(wall, bool):
                rec.started = rec.updated - float(wall)
        return rec
    return RunRecord(d, "pending", plan=plan)


def find_run_dirs(root: str | Path) -> list[Path]:
    """Every folder below ``root`` (``root`` included) holding metrics.json or progress.json, sorted;
    Ray's and the aggregate's folders (SKIP_DIRS) and hidden folders are skipped."""
    root = Path(root)
    found: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(n for n in dirnames if n not in SKIP_DIRS and not n.startswith("."))
        if METRICS in filenames or PROGRESS in filenames:
            found.add(Path(dirpath))
    return sorted(found)


def scan_runs(root: str | Path) -> tuple[dict[str, Any] | None, list[RunRecord]]:
    """(plan, records): every planned trial of ``root/plan.json`` plus every run directory found below ``root``.

    The ONE reader of a sweep folder (``synqt aggregate``, ``synqt status`` and the launcher use it).
    Duplicates are marked by ``resolve_duplicates``.
    """
    root = Path(root)
    if not root.is_dir():
        raise SynQTError(f"run directory {root} does not exist; expected a sweep or run directory")
    plan = read_plan(root)
    records: dict[Path, RunRecord] = {}
    for t in (plan or {}).get("trials", []):
        d = root / RUNS / str(t["run_name"])
        records[d] = read_run(d, t)
    for d in find_run_dirs(root):
        if d not in records:
            records[d] = read_run(d)
    out = list(records.values())
    resolve_duplicates(out)
    return plan, out


def resolve_duplicates(records: Iterable[RunRecord]) -> list[tuple[RunRecord, RunRecord]]:
    """Mark every copy of the same trial but one as superseded; return (superseded, kept) pairs.

    Rule (docs/aggregate.md): among done/failed records of the same trial (``RunRecord.identity``: every key
    that can change a result, the checkpoint by content), the one finished most recently counts (metrics.json
    ``finished_at``, else the file's modification time); equal times: the path that sorts last. A re-run
    therefore replaces a stale copy, and an exact copy (same content) changes nothing. Each superseded copy is
    logged once with both paths.
    """
    groups: dict[str, list[RunRecord]] = {}
    for rec in records:
        key = rec.identity() if rec.state in ("done", "failed") else None
        if key is not None:
            groups.setdefault(key, []).append(rec)
    pairs = []
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda r: (r.finished_at, str(r.dir)))
        kept = members[-1]
        for rec in members[:-1]:
            rec.superseded_by = kept.dir
            pairs.append((rec, kept))
            log.warning("%s and %s are the same trial (dataset %s, seed %s): counting %s, the one finished last",
                        rec.dir, kept.dir, kept.dataset, (kept.metrics or {}).get("seed"), kept.dir)
    return pairs


def counting(records: Iterable[RunRecord]) -> list[RunRecord]:
    """The records that count (not superseded by a later copy)."""
    return [r for r in records if r.superseded_by is None]


__all__ = [
    "CONFIG", "METRICS", "PROGRESS", "RESUME", "DS_CHECKPOINT", "TRAINABLE", "TRAINABLE_INFO", "EVAL_METRICS",
    "PLAN", "SWEEP", "RUNS", "SKIP_DIRS", "METRIC_KEYS", "SEED_KEYS", "point_key",
    "trial_identity", "weights_id", "STATES", "RunRecord", "read_json",
    "read_metrics", "is_done", "set_aside_broken_state", "write_metrics", "write_progress", "clear_progress",
    "read_plan", "read_run",
    "find_run_dirs", "scan_runs", "resolve_duplicates", "counting",
]
