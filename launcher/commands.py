"""The `synqt sweep` and `synqt demo` commands: load and plan (launcher.sweep), then run the plan on a
backend (launcher.stages without Ray, launcher.ray_backend with it) and aggregate.

Kept apart from the plan so that `launcher.sweep` imports no executor (no import cycle).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from launcher.aggregate import write_planned_experiment
from launcher.console import Exit
from launcher.sweep import (
    SWEEP_DIR,
    PlannedTrial,
    Sweep,
    check_storage,
    dry_run_text,
    load_sweep,
    plan_dict,
    plan_trials,
    prepare_demo_assets,
    set_aside_broken_plan,
    validate,
    write_plan,
)
from synqt import rundir
from synqt.errors import ConfigError


def _stage2_pending(sweep: Sweep, stage: str) -> bool:
    return sweep.protocol == "vtab" and stage == "search"


def dry_run_plan(sweep_file: str, overrides: list[str], *, as_json: bool = False) -> str:
    """The plan of `synqt sweep FILE --dry-run` as text (or JSON); starts nothing, writes nothing."""
    sweep = load_sweep(sweep_file, overrides)
    trials = plan_trials(sweep)
    if as_json:
        stage = trials[0].stage if trials else "final"
        return json.dumps(plan_dict(sweep, trials, _stage2_pending(sweep, stage)), indent=2, default=str)
    return dry_run_text(sweep, trials)


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
    if sequential and sweep.asha:
        raise ConfigError(f"{sweep.source}: asha needs Ray Tune's scheduler; --sequential runs every trial to its "
                          "end (remove the asha section or run without --sequential)")
    if dry_run:
        print(dry_run_plan(sweep_file, overrides, as_json=as_json))
        return 0
    check_storage(sweep)  # before demo assets, data, backbone or Ray: storage_path must take files
    prepare_demo_assets(sweep)
    trials = plan_trials(sweep)
    check_storage(sweep, trials)  # ... and the trials' cache folders (said once when unwritable)
    validate(sweep, trials)
    plan_file = sweep.sweep_dir / rundir.PLAN
    if not resume and sweep.sweep_dir.exists() and any(sweep.sweep_dir.iterdir()):
        raise ConfigError(
            f"sweep folder {sweep.sweep_dir} already exists (plan: {plan_file}); continue it with "
            f"`synqt sweep {sweep_file} ... --resume`, or choose another storage_path/name"
        )
    if resume and not plan_file.is_file():
        raise ConfigError(f"--resume: no sweep at {sweep.sweep_dir} (missing {plan_file})")
    if resume:
        set_aside_broken_plan(sweep)  # a cut plan.json: moved aside, named, written again below
    if resume:  # keep unchanged trials, move changed ones aside, say so (launcher/resume.py)
        from launcher.resume import reconcile

        reconcile(sweep, trials, trials[0].stage if trials else "final")
    if not (resume and _same_plan(plan_file, trials)):
        write_plan(sweep, trials, _stage2_pending(sweep, trials[0].stage if trials else "final"))
    write_planned_experiment(sweep.sweep_dir, trials)  # TensorBoard's HParams columns while the sweep runs
    with watch(sweep.sweep_dir) if watch is not None else contextlib.nullcontext():
        if sequential:
            from launcher.stages import run_sequential

            result = run_sequential(sweep, trials)
        else:
            from launcher.ray_backend import run_sweep

            result = run_sweep(sweep, trials, address=address, resume=resume)
    return Exit.OK if result.get("ok") else Exit.FAILED_RUNS


def _same_plan(plan_file: Path, trials: list[PlannedTrial]) -> bool:
    """On --resume keep plan.json when stage 1 is unchanged (it may already list stage 2)."""
    old, _ = rundir.read_json(plan_file)
    if not isinstance(old, dict):
        return False
    names = [t.get("run_name") for t in old.get("trials", []) if isinstance(t, dict)]
    return names[: len(trials)] == [t.run_name for t in trials]


def run_demo(out: str | Path, overrides: list[str] | None = None,
             watch: Callable[[Path], AbstractContextManager[Any]] | None = None) -> int:
    """`synqt demo`: synthetic benchmark + pre-trained tiny ViT, a real local Ray sweep, the table."""
    from synqt.pretrain import ensure_demo_assets

    out = Path(out).absolute()
    from synqt.fileio import check_writable

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
