"""The order of a sweep's work, shared by the Ray backend and the Ray-free sequential runner.

A sweep is one stage (paper protocol, or vtab without a grid) or two (vtab: the val200 search, then the
best grid point of each dataset retrained with every seed). ``drive_stages`` runs them with any
``run_stage(stage, trials) -> failures`` function; ``finish_sweep`` aggregates and prints. The Ray
backend (``launcher.ray_backend.run_sweep``) runs a stage's packs as Tune trials;
``run_sequential`` (``synqt sweep --sequential``) runs them one after another in this process, with no
Ray at all: for debugging a sweep, and to measure what Ray's concurrency buys.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Collection
from typing import Any

from launcher.sweep import (
    PlannedTrial,
    Sweep,
    packs_of,
    plan_dict,
    plan_trials,
    select_best,
    stage_names,
)
from synqt import rundir
from synqt.ckptfile import is_random
from synqt.fileio import atomic_write_json

Failures = list[tuple[str, str]]


def write_full_plan(sweep: Sweep, stage1: list[PlannedTrial], stage2: list[PlannedTrial]) -> None:
    d = plan_dict(sweep, stage1 + stage2, stage2_pending=False)
    for i, t in enumerate(d["trials"]):
        t["index"] = i
    atomic_write_json(sweep.sweep_dir / rundir.PLAN, d)
    from launcher.aggregate import write_planned_experiment

    write_planned_experiment(sweep.sweep_dir, stage1 + stage2)


def drive_stages(sweep: Sweep, plan: list[PlannedTrial],
                 run_stage: Callable[[str, list[PlannedTrial]], Failures]) -> Failures:
    """Run the planned stage, then (vtab protocol) stage 2 on each dataset's best val200 point."""
    failures = run_stage(plan[0].stage if plan else "final", plan)
    if sweep.protocol == "vtab" and "final" in stage_names(sweep):
        best = select_best(sweep, plan)
        for d in sweep.datasets:
            if d in best:
                print(f"synqt sweep: {d}: selected {best[d] or 'the only point'} on val200", flush=True)
            else:
                failures.append((f"final-{d}", "no stage-1 run finished; stage 2 skipped"))
        stage2 = plan_trials(sweep, "final", best=best)
        from launcher.resume import reconcile

        reconcile(sweep, stage2, "final")  # a resumed sweep: keep unchanged stage-2 runs, move changed ones aside
        write_full_plan(sweep, plan, stage2)
        if stage2:
            failures += run_stage("final", stage2)
    return failures


def unfinished(sweep: Sweep, trials: list[PlannedTrial], skip: Collection[str] = (),
               stopped_early_ok: bool = False) -> Failures:
    """(run_name, reason) for each trial without an ok metrics.json (names in ``skip`` are reported already)."""
    out: Failures = []
    for t in trials:
        if t.run_name in skip:
            continue
        rec = rundir.read_run(t.run_dir(sweep))
        if rec.state in ("pending", "running"):
            if not stopped_early_ok:  # ASHA-stopped trials have no metrics
                out.append((t.run_name, f"no {rundir.METRICS} was written"))
        elif rec.state != "done":
            out.append((t.run_name, str(rec.error)))
    return out


def finish_sweep(sweep: Sweep, failures: Failures, started: float) -> dict[str, Any]:
    """Aggregate the sweep folder, print the table and the failures; the result of ``synqt sweep``."""
    from launcher.aggregate import aggregate
    from launcher.console import before_summary
    from launcher.report import summary_text

    before_summary()  # the last finished-trial lines come before the table
    results = aggregate(sweep.sweep_dir)
    print(summary_text(results), flush=True)
    if failures:
        print(f"synqt sweep: {len(failures)} trial(s) failed:", file=sys.stderr)
        for name, err in failures:
            print(f"  {name}: {err}", file=sys.stderr)
    print(f"synqt sweep: {sweep.sweep_dir} ({time.time() - started:.0f} s)", flush=True)
    return {"ok": not failures, "failed": failures, "results": results, "sweep_dir": str(sweep.sweep_dir)}


def run_sequential(sweep: Sweep, plan: list[PlannedTrial]) -> dict[str, Any]:
    """Every pack of every stage, one after another in this process (no Ray); then aggregate.

    Same packs, run dirs, resume rule (finished trials are skipped, interrupted ones resume) and
    results as the Ray backend; a frozen backbone loaded from a checkpoint is built once per
    (backbone, kwargs, checkpoint) and shared, as the Ray backend shares it through the object store.
    A pack that raises is retried ``retries`` times (resuming from its epoch checkpoint, as a Tune retry
    does), then recorded as failed, and the next pack runs.
    """
    import torch

    from synqt.training import run_pack, trainer_for
    from synqt.training.build import backbone_key, frozen_backbone

    started = time.time()
    backbones: dict[str, torch.nn.Module] = {}

    def shared_backbone(cfg: Any) -> torch.nn.Module | None:
        # random (or no) weights: the trainer seeds its own; DeepSpeed workers build theirs
        if not cfg.checkpoint or is_random(cfg.checkpoint) or trainer_for(cfg) == "deepspeed":
            return None
        key = backbone_key(cfg)
        if key not in backbones:
            backbones[key] = frozen_backbone(cfg)
        return backbones[key]

    def run_stage(stage: str, trials: list[PlannedTrial]) -> Failures:
        packs = packs_of(trials)
        print(f"synqt sweep: stage {stage}: {len(trials)} trial(s) in {len(packs)} pack(s), one after another "
              "in this process (no Ray)", flush=True)
        raised: Failures = []
        for i, pack in enumerate(packs, 1):
            cfgs = [t.config for t in pack]
            run_dirs = [t.run_dir(sweep) for t in pack]
            names = ", ".join(t.run_name for t in pack)
            print(f"synqt sweep: pack {i}/{len(packs)}: {names}", flush=True)
            for attempt in range(sweep.retries + 1):  # a retry resumes from the pack's epoch checkpoint
                try:
                    # the trainer (pack or DeepSpeed) follows from the configs; retries are counted here
                    run_pack(cfgs, run_dirs, resume=True, backbone=shared_backbone(cfgs[0]),
                             hparams=[dict(t.hparams) for t in pack], retries=0)
                    break
                except Exception as err:  # noqa: BLE001 - one failed pack must not stop the sweep
                    print(f"synqt sweep: pack {i} raised {type(err).__name__}: {err} "
                          f"(attempt {attempt + 1} of {sweep.retries + 1})", file=sys.stderr, flush=True)
                    if attempt == sweep.retries:
                        raised += [(t.run_name, f"{type(err).__name__}: {err}") for t in pack
                                   if not rundir.is_done(t.run_dir(sweep))]
        return raised + unfinished(sweep, trials, skip={name for name, _ in raised})

    failures = drive_stages(sweep, plan, run_stage)
    return finish_sweep(sweep, failures, started)


__all__ = ["drive_stages", "finish_sweep", "run_sequential", "unfinished", "write_full_plan"]
