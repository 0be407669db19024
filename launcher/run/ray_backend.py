"""Everything that touches ray, ray.tune and ray.train (the only module in the project importing ray).

One Tune trial per pack (a pack of 1 is one plain trial). Each Tune trial calls the training entry
(`synqt.training.run_pack`), which writes its run directories itself, under the sweep folder,
on the shared file system: Ray never copies trial artifacts, and a retried or restored Tune trial
resumes from the engine's own `resume.pt`. The frozen backbone is read from its checkpoint once by
the driver and shared through the object store as numpy arrays (zero-copy on each node).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray import tune

from launcher.console import verbosity
from launcher.plan.packing import packs_of
from launcher.plan.schema import Sweep
from launcher.plan.trials import PlannedTrial
from launcher.run.cluster import DRIVER_MEMORY, check_fits, concurrency_cap, worker_request
from launcher.run.stages import drive_stages, finish_sweep, unfinished
from synqt.run import rundir
from synqt.training.build import backbone_key
from synqt.version import PACKAGES_ROOT

FAIL_ONCE_ENV = "SYNQT_FAIL_ONCE"  # test hook: run_name whose pack raises once, after its first epoch
FAIL_ONCE_MARKER = ".synqt_fail_once"
RAY_DIR = "_ray"  # Ray's own files under the sweep folder (one of rundir.SKIP_DIRS)


# ----------------------------------------------------------------------------------------------
# shared frozen backbone


def shared_backbones(trials: list[PlannedTrial], existing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read each distinct (backbone, kwargs, checkpoint) once and ``ray.put`` it once:
    {key: {"ref": ObjectRef of the numpy state dict, "identity": ...}}.

    Trials without a checkpoint (random backbone) or with tensors numpy cannot hold (bf16) build their
    own backbone in the trainer (entry None).
    """
    from synqt.training.build import shareable_state

    out = dict(existing or {})
    for t in trials:
        key = backbone_key(t.config)
        if key not in out and t.config.checkpoint:
            shared = shareable_state(t.config)
            # one object-store copy per sweep: every trial (and every DeepSpeed worker) gets this reference
            out[key] = None if shared is None else {"ref": ray.put(shared["state"]), "identity": shared["identity"]}
    return out


# ----------------------------------------------------------------------------------------------
# the Tune trainable


def _score(payload: dict[str, Any]) -> float:
    """One number per pack for schedulers: best eval accuracy so far, else minus the mean training loss."""
    accs = [b.get(k) for b in payload.get("branches", []) for k in ("val_acc", "test_acc")]
    accs = [a for a in accs if a is not None]
    if accs:
        return float(max(accs))
    losses = [b.get("train_loss") for b in payload.get("branches", []) if b.get("train_loss") is not None]
    return -float(sum(losses) / len(losses)) if losses else float("-inf")


def _metrics_of(payload: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"epoch": int(payload.get("epoch", 0)), "score": _score(payload)}
    for b in payload.get("branches", []):
        name = b.get("run_name", "?")
        for k in ("train_loss", "val_acc", "test_acc"):
            if b.get(k) is not None:
                out[f"{name}/{k}"] = b[k]
    return out


def _fail_once_hook(run_names: list[str], run_dirs: list[str], target: str | None):
    """Test hook: the pack holding `target` raises once, right after its first reported epoch."""
    if not target or target not in run_names:
        return None
    marker = Path(run_dirs[run_names.index(target)]) / FAIL_ONCE_MARKER

    def hook(payload: dict[str, Any]) -> None:
        first = not marker.exists()
        marker.parent.mkdir(parents=True, exist_ok=True)
        with open(marker, "a") as fh:
            fh.write(f"{payload.get('epoch')}\n")
        if first:
            raise RuntimeError(
                f"{FAIL_ONCE_ENV} test hook: {target} fails once after epoch {payload.get('epoch')}"
            )

    return hook


def pack_trainable(
    config: dict[str, Any],
    packs: list[dict[str, Any]] | None = None,
    backbones: dict[str, Any] | None = None,
    fail_once: str | None = None,
) -> None:
    """Tune function trainable: run one pack with the engine; forward its epoch reports to Tune.

    ``config["pack"]`` is the pack's content key (``launcher.plan.resume.pack_id``), never its position, so
    a Tune trial restored from an earlier experiment can only run the pack it was made for.
    """
    by_id = {p["id"]: p for p in (packs or [])}
    if config["pack"] not in by_id:
        raise RuntimeError(f"Ray trial for pack {config['pack']} is not in this sweep's plan (a restored trial of "
                           "an earlier plan); it runs nothing")
    pack = by_id[config["pack"]]
    entry = (backbones or {}).get(backbone_key(pack["cfgs"][0]))
    from synqt.training import run_pack, trainer_for
    from synqt.training.build import frozen_backbone

    cfgs, run_dirs = pack["cfgs"], [Path(d) for d in pack["run_dirs"]]
    if trainer_for(cfgs[0]) == "deepspeed":
        _deepspeed_trial(pack, entry)
        return
    # numpy arrays mapped from the node's object store, not copied
    backbone = frozen_backbone(cfgs[0], state=ray.get(entry["ref"]), identity=entry["identity"]) if entry else None
    hook = _fail_once_hook(pack["run_names"], pack["run_dirs"], fail_once)

    def report(payload: dict[str, Any]) -> None:
        tune.report(_metrics_of(payload))
        if hook is not None:
            hook(payload)

    # the CPUs Ray gave this trial decide its thread count (synqt.training.threads; torch would take every core)
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    results = run_pack(
        cfgs, run_dirs, resume=True, backbone=backbone, report=report, hparams=pack.get("hparams"), cpus=cpus
    )
    tune.report(_final_report(results))


def _final_report(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The Tune trial's last result: counts of ok / failed members and the pack's score."""
    final: dict[str, Any] = {
        "done": 1,
        "ok": sum(1 for m in results if m.get("status") == "ok"),
        "failed": sum(1 for m in results if m.get("status") != "ok"),
        "epoch": max([int(m.get("epochs_done") or 0) for m in results] or [0]),
    }
    branches = [
        {"run_name": m.get("run_name"), "val_acc": m.get("val_acc"), "test_acc": m.get("test_acc")}
        for m in results
    ]
    final["score"] = _score({"branches": branches})
    return final


def _deepspeed_trial(pack: dict[str, Any], backbone_entry: dict[str, Any] | None) -> None:
    """devices > 1: a Ray Train TorchTrainer inside this Tune trial, one worker per device.

    The workers' per-epoch ``ray.train.report`` results reach this Tune trial through Ray's
    ``TuneReportCallback`` (rank 0's result is forwarded), so schedulers and the progress table see
    them; the trial then reports its final result from the trial's metrics.json. The workers load the
    frozen backbone from one object-store reference to the driver's shared copy, not from the checkpoint file.
    """
    from ray.train import RunConfig as TrainRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg, run_dir = pack["cfgs"][0], pack["run_dirs"][0]
    if not rundir.is_done(run_dir):
        res = pack["resources"]
        per_worker = {"CPU": res["cpus"], "GPU": res["gpus"]} if res["gpus"] > 0 else {"CPU": res["cpus"]}
        loop_config = deepspeed_loop_config(cfg, run_dir, backbone_entry)
        trainer = TorchTrainer(
            _deepspeed_worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(
                num_workers=pack["devices"], use_gpu=res["gpus"] > 0, resources_per_worker=per_worker
            ),
            run_config=TrainRunConfig(
                name=pack["run_names"][0],
                storage_path=pack["train_storage"],
                callbacks=_train_to_tune_callbacks(),
            ),
        )
        trainer.fit()  # raises on a worker failure: Tune's FailureConfig retries, the workers resume
    m = rundir.read_metrics(run_dir) or {"run_name": pack["run_names"][0], "status": "missing"}
    tune.report(_final_report([m]))


def deepspeed_loop_config(cfg: Any, run_dir: str, backbone_entry: dict[str, Any] | None) -> dict[str, Any]:
    """The TorchTrainer workers' config: the trial config, its run dir, and the sweep's one reference to the
    shared frozen backbone (put once per sweep by ``shared_backbones``, never again per trial)."""
    from synqt.config import config_to_dict

    return {"cfg": config_to_dict(cfg), "run_dir": run_dir,
            "backbone": backbone_entry["ref"] if backbone_entry is not None else None}


def _train_to_tune_callbacks() -> list[Any]:
    """Ray's Train-to-Tune forwarding callback (Train V2), or none where this Ray lacks it."""
    try:
        from ray.tune.integration.ray_train import TuneReportCallback
    except ImportError:  # older Ray / Train V1: the trial still reports its final result
        return []
    return [TuneReportCallback()]


def _deepspeed_worker(conf: dict[str, Any]) -> None:
    """One Ray Train worker: every rank reports its per-epoch result with ``ray.train.report``."""
    import ray.train

    from synqt.training.deepspeed import train_worker

    def report(payload: dict[str, Any]) -> None:
        ray.train.report(_metrics_of(payload))

    ref = conf.get("backbone")
    state = ray.get(ref) if ref is not None else None
    train_worker(conf["cfg"], conf["run_dir"], report=report, backbone_state=state)


# ----------------------------------------------------------------------------------------------
# driver


def worker_env() -> dict[str, Any]:
    """Ray's runtime env for this sweep's workers: the folder holding synqt/ and launcher/ first on PYTHONPATH
    (a checkout run without installing it; an installed package finds itself anyway)."""
    path = [str(PACKAGES_ROOT), os.environ.get("PYTHONPATH", "")]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in path if p)}}


def _start_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to `address` / RAY_ADDRESS, or start a local cluster. True when we started it."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    env = worker_env()
    # Ray's own console output (its INFO log, the workers' forwarded stdout/stderr) only with -v: the
    # sweep's lines come from launcher.console.SweepWatcher; trial errors are reported by finish_sweep
    # and stay in each trial's metrics.json and Ray's session logs.
    verbose = verbosity() >= 1
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    # ray.init replaces the SIGTERM handler with sys.exit (SystemExit inside Tune's loop: Aborted, exit 134);
    # the CLI's handler (SIGTERM acts as Ctrl-C: stop, keep checkpoints, exit 130) is put back
    on_term = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if address:
        ray.init(address=address, **quiet)
    else:
        # num_cpus only when asked for: Ray's own count honours the cgroup (salloc, containers), while
        # os.cpu_count() is every core of the node
        extra = {"num_cpus": num_cpus} if num_cpus else {}
        ray.init(include_dashboard=False, runtime_env=env, **quiet, **extra)
    if on_term is not None:
        signal.signal(signal.SIGTERM, on_term)
    return True


def _alive_nodes() -> list[dict[str, float]]:
    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


class _PendingReporter(tune.Callback):
    """Names each Tune trial that has waited longer than ``after_s`` seconds for its resources (once)."""

    def __init__(self, after_s: float, members: dict[str, list[str]], request: dict[str, float]) -> None:
        self.after_s, self.members, self.request = after_s, members, request
        self.since: dict[str, float] = {}
        self.reported: set[str] = set()
        self.out = sys.stdout  # the console: Tune's own stdout chatter is redirected while the Tuner runs

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        for trial in trials:
            if trial.status != "PENDING":
                self.since.pop(trial.trial_id, None)
                continue
            start = self.since.setdefault(trial.trial_id, now)
            if now - start >= self.after_s and trial.trial_id not in self.reported:
                self.reported.add(trial.trial_id)
                runs = self.members.get((trial.config or {}).get("pack"), ["?"])
                avail = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
                total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
                unit = "worker" if self.request.get("devices", 1) > 1 else "trial"
                print(f"synqt sweep: trial {', '.join(runs)} has been pending for {now - start:.0f} s "
                      f"(pending_report_s={self.after_s:g}); it needs {self.request} per {unit}; the cluster "
                      f"has {total} in total, {avail} free now", file=self.out, flush=True)


def _payload(sweep: Sweep, trials: list[PlannedTrial]) -> list[dict[str, Any]]:
    from launcher.plan.resume import pack_id

    out = []
    for p in packs_of(trials):
        out.append(
            {
                "id": pack_id([t.run_name for t in p], [t.config for t in p]),
                "cfgs": [t.config for t in p],
                "run_dirs": [str(t.run_dir(sweep)) for t in p],
                "run_names": [t.run_name for t in p],
                "hparams": [dict(t.hparams) for t in p],
                "devices": sweep.resources["devices"],
                "resources": dict(sweep.resources),
                "train_storage": str(sweep.sweep_dir / RAY_DIR / "train"),
            }
        )
    return out


def _pending_reporter(sweep: Sweep, payload: list[dict[str, Any]]) -> _PendingReporter:
    request: dict[str, float] = dict(worker_request(sweep.resources))
    if sweep.resources["devices"] > 1:
        request["devices"] = sweep.resources["devices"]
    return _PendingReporter(sweep.pending_report_s, {p["id"]: p["run_names"] for p in payload}, request)


def _trial_resources(sweep: Sweep) -> dict[str, float]:
    res = sweep.resources
    if res["devices"] > 1:
        # the TorchTrainer's workers hold the trial's CPUs/GPUs; the Tune trial only drives them and
        # holds no CPU (any share would leave a worker unplaceable on a node whose CPUs the workers
        # fill). Tune refuses an all-zero request, so it reserves Ray's logical `memory` resource.
        return {"cpu": 0, "memory": DRIVER_MEMORY}
    return {"cpu": float(res["cpus"]), "gpu": float(res["gpus"])}


def _run_stage(
    sweep: Sweep, stage: str, trials: list[PlannedTrial], backbones: dict[str, Any], resume: bool
) -> list[tuple[str, str]]:
    """Run one stage's packs as Tune trials (restoring the stage's Tuner on --resume); return failures."""
    from ray.tune import FailureConfig, RunConfig, TuneConfig, Tuner
    from ray.tune.logger import JsonLoggerCallback

    # Tune's automatic loggers off: its TensorBoardX logger put a second copy of every trial under _ray/ into
    # `tensorboard --logdir <sweep>` (the engine writes each run's events itself); read when the Tuner starts
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    payload = _payload(sweep, trials)
    refs = {k: v for k, v in backbones.items() if v is not None}
    fail_once = os.environ.get(FAIL_ONCE_ENV)
    trainable = tune.with_resources(
        tune.with_parameters(pack_trainable, packs=payload, backbones=refs, fail_once=fail_once),
        _trial_resources(sweep),
    )
    storage = sweep.sweep_dir / RAY_DIR
    print(f"synqt sweep: stage {stage}: {len(trials)} trial(s) in {len(payload)} Ray trial(s)", flush=True)
    ids = [p["id"] for p in payload]
    # packs with a member that has no ok result: a restored experiment must not hold one of them as finished
    pending = {p["id"] for p in payload
               if not all(rundir.is_done(sweep.sweep_dir / rundir.RUNS / n) for n in p["run_names"])}
    exp_name, restore = _experiment(storage, stage, ids, resume, pending)
    tuner = None
    if restore:
        try:
            tuner = Tuner.restore(str(storage / exp_name), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
        except (ImportError, AttributeError, pickle.UnpicklingError, EOFError) as err:
            # Tune pickles its callbacks by module path: a sweep started before an upgrade that moved a module
            # (launcher.ray_backend -> launcher.run.ray_backend) cannot be restored. Nothing is lost: the engine
            # skips finished trials and continues unfinished ones from their epoch checkpoints.
            fresh = _fresh_name(storage, stage, ids)
            _say_new_experiment(stage, f"Ray's saved experiment {storage / exp_name} cannot be restored "
                                f"({type(err).__name__}: {str(err)[:200]})", fresh)
            exp_name = fresh
    if tuner is None:
        scheduler = None
        if sweep.asha and stage == "search":
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(time_attr="epoch", metric="score", mode="max", **sweep.asha)
        names = {
            p["id"]: p["run_names"][0] + (f"+{len(p['run_names']) - 1}" if len(p["run_names"]) > 1 else "")
            for p in payload
        }
        position = {pid: i for i, pid in enumerate(ids)}
        tuner = Tuner(
            trainable,
            param_space={"pack": tune.grid_search(ids)},
            tune_config=TuneConfig(
                max_concurrent_trials=concurrency_cap(sweep.resources, _alive_nodes(), sweep.max_concurrent),
                # a finished trial's actor runs the next pack of the same resources: no new worker process
                # importing torch and timm (about 3 s each on 2 CPU cores)
                reuse_actors=True,
                scheduler=scheduler,
                trial_name_creator=lambda t: names[t.config["pack"]],
                trial_dirname_creator=lambda t: f"pack{position[t.config['pack']]:04d}-{t.config['pack'][:8]}",
            ),
            run_config=RunConfig(
                name=exp_name,
                storage_path=str(storage),
                verbose=min(2, verbosity()),  # Tune's table: -v (1) or -vv (2), silent by default (0)
                failure_config=FailureConfig(max_failures=sweep.retries),
                # Ray's JSON record of what each Tune trial reported (result.json; not read by TensorBoard)
                callbacks=[JsonLoggerCallback(), _pending_reporter(sweep, payload)],
            ),
        )
    _write_pack_ids(storage / exp_name, ids)
    # Tune prints its experiment header and paths on stdout even at verbose=0: only with -v
    quiet = contextlib.redirect_stdout(io.StringIO()) if verbosity() < 1 else contextlib.nullcontext()
    with quiet:
        grid = tuner.fit()
    failures: list[tuple[str, str]] = []
    errored: set[str] = set()
    by_id = {p["id"]: p for p in payload}
    for res in grid:
        if res.error is not None:
            pid = (res.config or {}).get("pack")
            members = by_id[pid]["run_names"] if pid in by_id else ["?"]
            for name in members:
                if not rundir.is_done(sweep.sweep_dir / rundir.RUNS / name):
                    errored.add(name)
                    failures.append((name, f"{type(res.error).__name__}: {str(res.error).strip()[-500:]}"))
    return failures + unfinished(sweep, trials, skip=errored, stopped_early_ok=bool(sweep.asha and stage == "search"))


PACK_IDS_FILE = "synqt_packs.json"  # the pack keys a stage's Tune experiment was made for


def _write_pack_ids(exp_dir: Path, ids: list[str]) -> None:
    from synqt.storage import atomic_write_json

    atomic_write_json(exp_dir / PACK_IDS_FILE, sorted(ids))


def _plan_base(stage: str, ids: list[str]) -> str:
    """``<stage>-<digest of the plan's pack keys>``: the name of the experiments made for exactly these packs."""
    return f"{stage}-{hashlib.sha256(json.dumps(sorted(ids)).encode()).hexdigest()[:8]}"


def _plan_experiments(storage: Path, stage: str, ids: list[str]) -> list[str]:
    """Names of the experiments made for exactly this plan's packs besides the stage's first one, oldest first:
    ``<base>``, ``<base>-2``, ... up to the first that does not exist."""
    base = _plan_base(stage, ids)
    out: list[str] = []
    name = base
    while (storage / name).exists():
        out.append(name)
        name = f"{base}-{len(out) + 1}"
    return out


def _fresh_name(storage: Path, stage: str, ids: list[str]) -> str:
    """A new experiment name for this plan's packs: never an existing folder."""
    n = len(_plan_experiments(storage, stage, ids))
    base = _plan_base(stage, ids)
    return base if n == 0 else f"{base}-{n + 1}"


def _say_new_experiment(stage: str, why: str, name: str) -> None:
    print(f"synqt sweep: stage {stage}: {why}; running a new Ray experiment {name} (finished trials are not rerun, "
          "unfinished ones continue from their last epoch)", flush=True)


def _experiment(storage: Path, stage: str, ids: list[str], resume: bool,
                pending: set[str] | None = None) -> tuple[str, bool]:
    """(Tune experiment name, restore it?) for a stage whose packs have the keys ``ids``.

    A Tune experiment is restored only when it was made for exactly these packs, and when it holds none of the
    ``pending`` packs (a member without an ok result) as finished. A resume with a changed plan starts a new
    experiment (named by the plan's keys) instead: Tune's restore knows only the trials it had, so added packs
    would never run, and it must never run a changed plan inside old trials. Likewise a finished trial whose
    metrics.json was removed or set aside as broken: restored, Tune would keep its pack TERMINATED and never
    run it again. The engine itself skips finished trials and resumes unfinished ones from their epoch
    checkpoints, so a new experiment loses no work.
    """
    from ray.tune import ExperimentAnalysis, Tuner

    # this plan's own experiments, newest first, then the stage's first one
    candidates = [*reversed(_plan_experiments(storage, stage, ids)), stage]
    why = f"the plan differs from the one its Ray experiment {storage / stage} was made for"
    if resume:
        for name in candidates:
            exp = storage / name
            try:
                made_for = json.loads((exp / PACK_IDS_FILE).read_text())
            except (OSError, ValueError):
                continue
            if made_for != sorted(ids) or not Tuner.can_restore(str(exp)):
                continue
            try:
                held = {t.config.get("pack"): t.status for t in ExperimentAnalysis(str(exp)).trials}
            except Exception as err:  # noqa: BLE001 - any unreadable state: a new experiment loses no work
                why = f"its Ray experiment {exp} cannot be read ({type(err).__name__}: {str(err)[:200]})"
                break
            done_there = sorted(pid for pid in (pending or set()) if held.get(pid) == "TERMINATED")
            if not done_there:
                return name, True
            why = (f"{len(done_there)} Ray trial(s) that its Ray experiment {exp} records as finished have no "
                   "result now (metrics.json removed or set aside as broken)")
            break
    fresh = _fresh_name(storage, stage, ids)
    if (storage / stage).exists():
        _say_new_experiment(stage, why, fresh)
        return fresh, False
    return stage, False


def run_sweep(
    sweep: Sweep, plan: list[PlannedTrial], *, address: str | None = None, resume: bool = False,
    before_trials: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run every stage of a planned, validated sweep on Ray, then aggregate. Returns {"ok", "failed", ...}.

    vtab protocol: stage 1 (`plan`), then the best val200 grid point per dataset is retrained with every
    seed (stage 2), in one call; --resume restores whichever stage's Tuner exists. ``before_trials()`` runs
    once the cluster is known to fit the request and before any trial (the sweep folder's first write).
    """
    t0 = time.time()
    started = _start_ray(address)
    try:  # a request no node can satisfy would pend forever: refuse it, with both numbers, before any trial
        check_fits(sweep.resources, _alive_nodes(), ray.cluster_resources())
        # each checkpoint read once, now: one that does not fit its backbone is refused before the first write
        refs: dict[str, Any] = shared_backbones(plan)
        if before_trials is not None:
            before_trials()
    except BaseException:
        if started:
            ray.shutdown()
        raise

    def run_stage(stage: str, trials: list[PlannedTrial]) -> list[tuple[str, str]]:
        refs.update(shared_backbones(trials, refs))
        return _run_stage(sweep, stage, trials, {k: v for k, v in refs.items() if v is not None}, resume)

    try:
        failures = drive_stages(sweep, plan, run_stage)
    finally:
        if started:
            ray.shutdown()
    return finish_sweep(sweep, failures, t0)
