"""The `synqt sweep` and `synqt demo` commands: load and plan (launcher.plan), then run the plan on a
backend (launcher.run.stages without Ray, launcher.run.ray_backend with it) and aggregate.

Kept apart from the plan so that `launcher.plan` imports no executor (no import cycle).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from launcher.console import Exit
from launcher.plan.checks import check_storage, validate
from launcher.plan.dryrun import dry_run_text
from launcher.plan.planfile import plan_dict, set_aside_broken_plan, sweep_yaml_text, write_plan
from launcher.plan.schema import SWEEP_DIR, Sweep, load_sweep
from launcher.plan.trials import PlannedTrial, plan_trials
from launcher.results.tensorboard import write_planned_experiment
from synqt.errors import ConfigError, DataError
from synqt.run import ownership, rundir
from synqt.weights.identify import is_random


def _stage2_pending(sweep: Sweep, stage: str) -> bool:
    return sweep.protocol == "vtab" and stage == "search"


def dry_run_plan(sweep_file: str, overrides: list[str], *, as_json: bool = False,
                 sequential: bool = False) -> tuple[str, str | None]:
    """(the plan of `synqt sweep FILE --dry-run` as text or JSON, why the sweep would be refused or None);
    starts nothing, writes nothing. What is not set yet (data_root, checkpoint) is no refusal: a plan is
    previewed before the data and weights are in place (``validate(preview=True)``)."""
    from synqt.errors import SynQTError

    sweep = load_sweep(sweep_file, overrides)
    trials = plan_trials(sweep)
    try:
        validate(sweep, trials, in_process=sequential, preview=True)
        refused = None
    except SynQTError as err:
        refused = str(err)
    if as_json:
        stage = trials[0].stage if trials else "final"
        try:  # slurm/vtab.sh refuses a second copy of a running sweep with "owner" before it starts Ray; a dry
            ownership.check_free(sweep.sweep_dir, "sweep")  # run itself is a reader: never refused for it
            owner = None
        except ownership.Refused as err:
            owner = str(err)
        d = plan_dict(sweep, trials, _stage2_pending(sweep, stage)) | {"refused": refused, "owner": owner}
        return json.dumps(d, indent=2, default=str), refused
    return dry_run_text(sweep, trials), refused


def run_sweep_command(
    sweep_file: str,
    overrides: list[str],
    *,
    dry_run: bool = False,
    resume: bool = False,
    address: str | None = None,
    as_json: bool = False,
    sequential: bool = False,
    watch: Callable[[Path], AbstractContextManager[Any]] | None = None,
) -> int:
    """`synqt sweep`: plan, validate, then run on Ray (in this process with ``sequential``; print the plan with
    ``dry_run``). ``watch(sweep_dir)`` is held open while the trials run (the CLI's finished-trial lines).
    Returns an exit code of ``launcher.console.Exit``: OK, or FAILED_RUNS when a trial failed or is missing."""
    sweep = load_sweep(sweep_file, overrides)
    # a sweep folder has one live owner (synqt/run/ownership.py): a copy of this sweep still running (a resubmitted
    # or requeued job, a second `synqt demo`) refuses this one first, before anything is prepared, written or started
    if not dry_run:
        ownership.check_free(sweep.sweep_dir, "sweep")
    if sequential and sweep.asha:
        raise ConfigError(f"{sweep.source}: asha needs Ray Tune's scheduler; --sequential runs every trial to its "
                          "end (remove the asha section or run without --sequential)")
    if dry_run:
        text, refused = dry_run_plan(sweep_file, overrides, as_json=as_json, sequential=sequential)
        print(text, flush=True)
        if refused is not None:  # the plan is shown, and the exit status says the sweep would not start
            import sys

            print(f"synqt sweep: --dry-run: this sweep would be refused: {refused}", file=sys.stderr, flush=True)
            return Exit.BAD_INPUT
        return Exit.OK
    check_storage(sweep)  # before demo assets, data, backbone or Ray: storage_path must take files
    prepare_demo_assets(sweep)
    trials = plan_trials(sweep)
    check_storage(sweep, trials)  # ... and the trials' cache folders (said once when unwritable)
    validate(sweep, trials, in_process=sequential)  # data (both stages' splits), checkpoint, device: reads only
    plan_file = sweep.sweep_dir / rundir.PLAN
    if not resume and sweep.sweep_dir.exists() and any(not p.name.startswith((ownership.CLAIM, f".{ownership.CLAIM}"))
                                                       for p in sweep.sweep_dir.iterdir()):
        raise ConfigError(
            f"sweep folder {sweep.sweep_dir} already exists (plan: {plan_file}); continue it with "
            f"`synqt sweep {sweep_file} ... --resume`, or choose another storage_path/name"
        )
    if resume and not plan_file.is_file():
        raise ConfigError(f"--resume: no sweep at {sweep.sweep_dir} (missing {plan_file})")

    if resume and _same_plan(sweep, trials) and _all_done(sweep.sweep_dir):
        # this very plan has run to its end: nothing to run, no Ray cluster (or process) to start, nothing rewritten
        from launcher.run.stages import finish_sweep

        print(f"synqt sweep: every planned trial in {sweep.sweep_dir} has finished; nothing to run "
              "(aggregating only)", flush=True)
        return Exit.OK if finish_sweep(sweep, [], time.time()).get("ok") else Exit.FAILED_RUNS

    # one live owner per sweep folder (synqt/run/ownership.py): checked above before anything started; the claim is
    # taken with the folder's first write (after the backend's own checks, so a refused command leaves no
    # folder) and held until this process ends (also on Ctrl-C / SIGTERM). The trials run under it (their
    # retries too) and take no claim of their own.
    with contextlib.ExitStack() as owned:

        def first_write() -> None:
            """Called by the backend once its own checks passed (Ray: the cluster has the resources; both: every
            checkpoint fits its backbone)."""
            owned.enter_context(ownership.Claim(sweep.sweep_dir, "sweep"))
            write_sweep_files(sweep, trials, resume=resume)

        with watch(sweep.sweep_dir) if watch is not None else contextlib.nullcontext():
            if sequential:
                from launcher.run.stages import run_sequential

                result = run_sequential(sweep, trials, before_trials=first_write)
            else:
                from launcher.run.ray_backend import run_sweep

                result = run_sweep(sweep, trials, address=address, resume=resume, before_trials=first_write)
    return Exit.OK if result.get("ok") else Exit.FAILED_RUNS


def _all_done(sweep_dir: Path) -> bool:
    """Every trial plan.json lists has an ok metrics.json and no later stage is still to be planned."""
    plan, records = rundir.scan_runs(sweep_dir)
    planned = [r for r in records if r.plan]
    return bool(plan and planned and not plan.get("stage2_pending") and all(r.state == "done" for r in planned))


def write_sweep_files(sweep: Sweep, trials: list[PlannedTrial], *, resume: bool) -> None:
    """The sweep folder's FIRST WRITE: everything before it only reads, so a refused command leaves nothing.

    Called once every check has passed (the plan, its data and checkpoint, and the backend's own: Ray's
    cluster resources). On ``--resume``: trials whose config changed are moved aside (``launcher.plan.resume``),
    and ``sweep.yaml`` / ``plan.json`` are rewritten to what this command runs, the earlier copies kept
    under ``<storage_path>/<name>.superseded/`` when they differ. Then TensorBoard's planned HParams experiment.
    """
    stage = trials[0].stage if trials else "final"
    if resume:  # keep unchanged trials, move changed ones aside, say so (launcher/plan/resume.py)
        from launcher.plan.resume import reconcile

        set_aside_broken_plan(sweep)  # a cut plan.json: moved aside, named once, written again below

        reconcile(sweep, trials, stage)
    if not (resume and _same_plan(sweep, trials)):
        if resume:
            from launcher.plan.resume import supersede_sweep_files

            moved = supersede_sweep_files(sweep)
            if moved is not None:
                print(f"synqt sweep: resume with a changed sweep: {rundir.SWEEP} and {rundir.PLAN} rewritten to "
                      f"what runs now; the earlier ones moved to {moved}", flush=True)
        write_plan(sweep, trials, _stage2_pending(sweep, stage))
    write_planned_experiment(sweep.sweep_dir, trials)  # TensorBoard's HParams columns while the sweep runs


# where the sweep folder is reached from (a symbolic link, a moved folder) is not what the sweep runs
_LOCATION_KEYS = ("storage_path", "sweep_dir")


def _same_plan(sweep: Sweep, trials: list[PlannedTrial]) -> bool:
    """On --resume keep plan.json (it may already list stage 2) when neither the sweep's resolved keys
    (sweep.yaml) nor its stage-1 trials changed."""
    import yaml

    text = _read_text(sweep.sweep_dir / rundir.SWEEP)
    try:
        old = yaml.safe_load(text) if text is not None else None
    except yaml.YAMLError:
        return False
    if not isinstance(old, dict):
        return False
    new = yaml.safe_load(sweep_yaml_text(sweep))
    same = all(old.get(k) == new.get(k) for k in {*old, *new} if k not in _LOCATION_KEYS)
    return same and _same_trials(sweep, trials)


def _same_trials(sweep: Sweep, trials: list[PlannedTrial]) -> bool:
    """plan.json lists these stage-1 trials (names, hparams, seeds, epochs, packs) under the same sweep-level
    plan keys; keys that change no trial's plan entry (e.g. a result-neutral eval_batch_size) may differ."""
    old, _ = rundir.read_json(sweep.sweep_dir / rundir.PLAN)
    if not isinstance(old, dict):
        return False
    new = plan_dict(sweep, trials, False)
    old_trials = [t for t in old.get("trials", []) if isinstance(t, dict)]
    same_trials = json.loads(json.dumps(new["trials"], default=str)) == old_trials[: len(trials)]
    return same_trials and all(old.get(k) == json.loads(json.dumps(new[k], default=str))
                               for k in new if k not in ("trials", "stage2_pending", *_LOCATION_KEYS))


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def run_demo(out: str | Path, overrides: list[str] | None = None,
             watch: Callable[[Path], AbstractContextManager[Any]] | None = None) -> int:
    """`synqt demo`: synthetic benchmark + pre-trained tiny ViT, a real local Ray sweep, the table."""
    from synqt.tools.pretrain import ensure_demo_assets

    out = Path(out).absolute()
    from synqt.storage import check_writable

    check_writable(out, "--out")  # before the demo's data and backbone are made
    print(
        "synqt demo: preparing the synthetic benchmark and the pre-trained demo backbone (cached) ...",
        flush=True,
    )
    data_root, ckpt = ensure_demo_assets()
    ov = [
        f"storage_path={out}",
        f"data_root={Path(data_root).absolute()}",
        f"checkpoint={Path(ckpt).absolute()}",
        *list(overrides or []),
    ]
    sweep = load_sweep(SWEEP_DIR / "demo.yaml", ov)
    ownership.check_free(sweep.sweep_dir, "sweep")  # a demo still running there refuses this one (exit 2)
    resume = (sweep.sweep_dir / rundir.PLAN).is_file()
    if resume:
        print(f"synqt demo: continuing the demo sweep already at {sweep.sweep_dir}")
    code = run_sweep_command(str(SWEEP_DIR / "demo.yaml"), ov, resume=resume, watch=watch)
    d = sweep.sweep_dir
    print(
        f"\nresults: {d / 'results.md'}  chart: {d / 'results.png'}\n"
        f"tables: {d / 'table.md'}, {d / 'table.tex'}, {d / 'runs.csv'}  plots: {d / 'curves.png'}, "
        f"{d / 'cost.png'} (+ .pdf)\n"
        f"TensorBoard: tensorboard --logdir {d}   (per-run logs under {d / rundir.RUNS}, "
        f"HParams experiment, table and chart under {d / '_sweep_summary'})",
        flush=True,
    )
    return code


def prepare_demo_assets(sweep: Sweep) -> None:
    """demo_assets: create (or reuse) the cached synthetic data + pre-trained backbone; fill missing paths."""
    if not sweep.demo_assets or (sweep.data_root and sweep.checkpoint):
        return
    # a path given but wrong is refused now, not after minutes of building the assets it would not use
    if sweep.checkpoint and not is_random(sweep.checkpoint) and not Path(sweep.checkpoint).is_file():
        raise ConfigError(f"{sweep.source}: backbone checkpoint {sweep.checkpoint} (key 'checkpoint') does not exist")
    if sweep.data_root and not Path(sweep.data_root).is_dir():
        raise DataError(f"{sweep.source}: data_root {sweep.data_root} does not exist or is not a folder")
    from synqt.tools.pretrain import ensure_demo_assets

    data_root, ckpt = ensure_demo_assets()
    sweep.data_root = sweep.data_root or str(Path(data_root).absolute())
    sweep.checkpoint = sweep.checkpoint or str(Path(ckpt).absolute())
