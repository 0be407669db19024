"""The order of a sweep's work, shared by the Ray backend and the Ray-free sequential runner.

A sweep is one stage (paper protocol, or vtab without a grid) or two (vtab: the val200 search, then the
best grid point of each dataset retrained with every seed). ``drive_stages`` runs them with any
``run_stage(stage, trials) -> failures`` function; ``finish_sweep`` aggregates and prints. The Ray
backend (``launcher.run.ray_backend.run_sweep``) runs a stage's packs as Tune trials;
``run_sequential`` (``synqt sweep --sequential``) runs them one after another in this process, with no
Ray at all: for debugging a sweep, and to measure what Ray's concurrency buys.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

from launcher.plan.packing import packs_of
from launcher.plan.planfile import plan_dict
from launcher.plan.schema import Sweep
from launcher.plan.trials import PlannedTrial, plan_trials, select_best, stage1_unfinished, stage_names
from synqt.run import rundir
from synqt.storage import atomic_write_json
from synqt.weights.identify import is_random

Failures = list[tuple[str, str]]
# Ctrl+C; SLURM's time-limit warning (slurm/vtab.sh forwards it as SIGINT); scancel, preemption and `kill`
INTERRUPT_SIGNALS = ("SIGINT", "SIGUSR1", "SIGTERM")


class SweepInterrupted(KeyboardInterrupt):
    """The sweep was stopped (SIGINT / SIGUSR1 / SIGTERM) before a stage's trials all ended; no later stage started.

    A KeyboardInterrupt, so the engine's ``except Exception`` failure path does not record the
    interrupted trials as failed: their epoch checkpoints (resume.pt) stay, and ``--resume`` continues them.
    """

    def __init__(self, reason: str, stage: str | None = None, unfinished: Sequence[str] = ()) -> None:
        super().__init__(reason)
        self.reason, self.stage, self.unfinished = reason, stage, list(unfinished)

    def __str__(self) -> str:
        where = f" in stage {self.stage}" if self.stage else ""
        left = f"; {len(self.unfinished)} run(s) unfinished" if self.unfinished else ""
        return f"interrupted{where} ({self.reason}){left}; no later stage was started"


class InterruptGuard:
    """SIGINT / SIGUSR1 / SIGTERM while stages are driven (see ``interrupt_handlers``)."""

    def __init__(self, sigs: list[int], wakeup_read: int | None) -> None:
        self.sigs, self._read, self.received = sigs, wakeup_read, ""
        self.stage: str | None = None  # the stage being run, named in the interruption

    def handler(self, signum: int, frame: Any) -> None:
        if signum == getattr(signal, "SIGTERM", None):
            # inside Tuner.fit() Tune handles SIGINT (and SIGUSR1) itself but not SIGTERM: hand SIGTERM to Tune's
            # SIGINT handler, so it stops the trials and saves the experiment as on Ctrl-C (after_stage then
            # raises, naming SIGTERM); Ray's own SIGTERM handler would sys.exit inside Tune's loop (exit 134)
            current = signal.getsignal(signal.SIGINT)
            if callable(current) and current != self.handler and current is not signal.default_int_handler:
                current(signal.SIGINT, frame)
                return
        raise SweepInterrupted(f"{signal.Signals(signum).name} received", stage=self.stage)

    def install(self) -> None:
        for s in self.sigs:
            signal.signal(s, self.handler)

    def after_stage(self, stage: str, sweep: Sweep, trials: list[PlannedTrial]) -> None:
        """Put our handlers back (Tune leaves its own installed); raise if a signal came during the stage."""
        self.install()
        if self._read is not None and not self.received:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                while chunk := os.read(self._read, 512):
                    names = [signal.Signals(b).name for b in chunk if b in self.sigs]
                    if names:
                        self.received = names[0]
                        break
        if self.received:
            left = [t.run_name for t in trials if not rundir.is_done(t.run_dir(sweep))]
            raise SweepInterrupted(f"{self.received} received", stage=stage, unfinished=left)


@contextlib.contextmanager
def interrupt_handlers() -> Iterator[InterruptGuard]:
    """While stages are driven, SIGINT, SIGUSR1 and SIGTERM stop the sweep with ``SweepInterrupted``.

    Outside Ray Tune our handler raises at once. Inside ``Tuner.fit()`` Tune's own handlers take both
    signals: Tune stops its trials, saves the experiment and returns normally, with every trial marked
    terminated. So every signal is also recorded through ``signal.set_wakeup_fd`` (Python writes the
    signal number there whichever handler runs), and ``InterruptGuard.after_stage`` raises after a stage
    that saw one: the next stage never starts. Outside the main thread nothing is installed.
    """
    sigs = [getattr(signal, name) for name in INTERRUPT_SIGNALS if hasattr(signal, name)]
    if threading.current_thread() is not threading.main_thread():
        yield InterruptGuard([], None)
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    old_handlers = {s: signal.getsignal(s) for s in sigs}
    old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    guard = InterruptGuard(sigs, read_fd)
    guard.install()
    try:
        yield guard
    finally:
        signal.set_wakeup_fd(old_fd)
        for s, h in old_handlers.items():
            signal.signal(s, h)
        os.close(read_fd)
        os.close(write_fd)


def write_full_plan(sweep: Sweep, stage1: list[PlannedTrial], stage2: list[PlannedTrial]) -> None:
    d = plan_dict(sweep, stage1 + stage2, stage2_pending=False)
    for i, t in enumerate(d["trials"]):
        t["index"] = i
    atomic_write_json(sweep.sweep_dir / rundir.PLAN, d)
    from launcher.results.tensorboard import write_planned_experiment

    write_planned_experiment(sweep.sweep_dir, stage1 + stage2)


def drive_stages(sweep: Sweep, plan: list[PlannedTrial],
                 run_stage: Callable[[str, list[PlannedTrial]], Failures]) -> Failures:
    """Run the planned stage, then (vtab protocol) stage 2 on each dataset's best val200 point.

    A stage advances only when every one of its trials ended: a SIGINT/SIGUSR1 before that (inside
    Tune's ``fit``, which then returns normally, or anywhere else) raises ``SweepInterrupted``. A dataset
    whose stage-1 points did not all end (``stage1_unfinished``) is not selected on the others: its
    stage 2 waits for a ``--resume`` that finishes them, and it is listed among the failures.
    """
    with interrupt_handlers() as guard:
        stage = guard.stage = plan[0].stage if plan else "final"
        failures = run_stage(stage, plan)
        guard.after_stage(stage, sweep, plan)
        if sweep.protocol == "vtab" and "final" in stage_names(sweep):
            held = stage1_unfinished(sweep, plan)
            best = select_best(sweep, plan)
            for d in sweep.datasets:
                if d in best:
                    print(f"synqt sweep: {d}: selected {best[d] or 'the only point'} on val200", flush=True)
                elif d in held:
                    failures.append((f"final-{d}", f"stage-1 point(s) {', '.join(held[d])} did not finish; not "
                                                   "selected on partial results, stage 2 skipped (finish them "
                                                   "with --resume)"))
                else:
                    failures.append((f"final-{d}", "no stage-1 run finished; stage 2 skipped"))
            stage2 = plan_trials(sweep, "final", best=best)
            from launcher.plan.resume import reconcile

            reconcile(sweep, stage2, "final")  # a resumed sweep: keep unchanged stage-2 runs, move changed ones aside
            write_full_plan(sweep, plan, stage2)
            if stage2:
                guard.stage = "final"
                failures += run_stage("final", stage2)
                guard.after_stage("final", sweep, stage2)
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
    from launcher.console import before_summary
    from launcher.results.aggregate import aggregate
    from launcher.results.report import summary_text

    before_summary()  # the last finished-trial lines come before the table
    results = aggregate(sweep.sweep_dir)
    print(summary_text(results), flush=True)
    if failures:
        print(f"synqt sweep: {len(failures)} trial(s) failed:", file=sys.stderr)
        for name, err in failures:
            print(f"  {name}: {err}", file=sys.stderr)
    print(f"synqt sweep: {sweep.sweep_dir} ({time.time() - started:.0f} s)", flush=True)
    return {"ok": not failures, "failed": failures, "results": results, "sweep_dir": str(sweep.sweep_dir)}


def run_sequential(sweep: Sweep, plan: list[PlannedTrial],
                   before_trials: Callable[[], None] | None = None) -> dict[str, Any]:
    """Every pack of every stage, one after another in this process (no Ray); then aggregate.

    Same packs, run dirs, resume rule (finished trials are skipped, interrupted ones resume) and
    results as the Ray backend; a frozen backbone loaded from a checkpoint is built once per
    (backbone, kwargs, checkpoint) and shared, as the Ray backend shares it through the object store.
    A pack that raises is retried ``retries`` times (resuming from its epoch checkpoint, as a Tune retry
    does), then recorded as failed, and the next pack runs. ``before_trials()`` runs once every
    checkpoint has been read, before any trial.
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

    for t in plan:  # each checkpoint read now: one that does not fit its backbone is refused before any write
        shared_backbone(t.config)
    if before_trials is not None:
        before_trials()  # the sweep folder's first write (launcher.run.commands.write_sweep_files)
    failures = drive_stages(sweep, plan, run_stage)
    return finish_sweep(sweep, failures, started)


__all__ = ["InterruptGuard", "SweepInterrupted", "drive_stages", "finish_sweep", "interrupt_handlers", "run_sequential",
           "unfinished", "write_full_plan"]
