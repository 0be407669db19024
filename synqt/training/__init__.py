"""Training: the one entry that runs a trial or a pack of trials, whichever trainer it needs.

``run_pack`` / ``run_trial`` pick the trainer from the config (``trainer_for``): the pack trainer
(``synqt.training.pack``: k >= 1 branches over one frozen forward pass, one process, Accelerate) or the
DeepSpeed trainer (``synqt.training.deepspeed``: one trial over ``num_devices`` processes). Both build
their backbone and branch in ``synqt.training.build``, share the loop pieces of ``synqt.training.loop``
and write run directories through ``synqt.run.rundir``. Backends (Ray, the sequential runner, a SLURM array
task, ``synqt train``) call only this module, except Ray Train, which runs
``synqt.training.deepspeed.train_worker`` in its own workers.

- ``pack``       the pack trainer: k >= 1 branches in lockstep (recipe: setup / train / cleanup)
- ``deepspeed``  the DeepSpeed ZeRO-2 trainer: one trial over several processes
- ``build``      the one place a frozen backbone and a query branch are built from a TrialConfig
- ``loop``       pieces both trainers share (epoch order, evaluation, metrics, TensorBoard writer)
- ``snapshots``  deferred evaluation (paper protocol): weight snapshots, one packed test pass at the end
- ``kv_cache``   the frozen stream's per-block K/V of a split, computed once per node
- ``schedule``   the optimizer and the official per-iteration learning rate
- ``threads``    the one decision of a process's thread count

May import: synqt.config, synqt.data, synqt.errors, synqt.model, synqt.run, synqt.storage, synqt.weights
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synqt.errors import ConfigError

log = logging.getLogger("synqt.training")

if TYPE_CHECKING:
    import torch

    from synqt.config import TrialConfig


def trainer_for(cfg: TrialConfig) -> str:
    """"deepspeed" when the trial spreads over several processes (trainer deepspeed, num_devices > 1), else
    "pack" (the single-process trainer, also for trainer=deepspeed with one device)."""
    return "deepspeed" if cfg.trainer == "deepspeed" and cfg.num_devices > 1 else "pack"


_CACHE_SAID: set[Path] = set()


def check_outputs(cfgs: Sequence[TrialConfig], run_dirs: Sequence[str | Path], key: str | None = None) -> None:
    """Before data, backbone or device are touched: each run directory must take a new file
    (``synqt.storage.check_writable``: ``NotWritable`` naming ``key`` -- the option or config key that chose
    it, else the key recorded for the folder -- the folder and the reason). The cache folder (``cache_dir``;
    decoded images and K/V caches) is checked too; caches are optional, so an unwritable one is said once
    (per folder and process) and the trial reads only entries already built there and decodes the rest live.
    """
    from synqt.data.images import default_cache_dir
    from synqt.storage import NotWritable, check_writable, folder_key

    for d in run_dirs:
        check_writable(d, key or folder_key(d) or "the run directory")
    for c in cfgs:
        cdir = Path(c.cache_dir).expanduser().absolute() if c.cache_dir else default_cache_dir().absolute()
        if cdir in _CACHE_SAID:
            continue
        try:
            check_writable(cdir, "cache_dir" if c.cache_dir else "cache_dir (default: SYNQT_CACHE_DIR or <tmp>)")
        except NotWritable as err:
            _CACHE_SAID.add(cdir)
            log.warning("%s; caches already built there are read, the rest is decoded live each time", err)


def run_pack(cfgs: Sequence[TrialConfig], run_dirs: Sequence[str | Path], *, resume: bool = True,
             backbone: torch.nn.Module | None = None, report: Callable[[dict], None] | None = None,
             hparams: Sequence[dict] | None = None, retries: int = 1,
             cpus: float | None = None) -> list[dict[str, Any]]:
    """Train a pack of k >= 1 trials (run directories finished earlier are skipped; interrupted ones resume
    when ``resume``); returns each trial's metrics (also in its metrics.json).

    A DeepSpeed trial (``trainer_for`` says so) is a pack of one, run on this machine with ``num_devices``
    processes; ``retries`` is how often a crashed process is restarted from its last checkpoint there.
    ``cpus``: the CPUs Ray assigned to this trial, for its thread count (``synqt.training.threads``; None elsewhere).
    """
    from synqt.weights.identify import require_backbone_weights

    for c in cfgs:  # before any run directory, device or data: a missing checkpoint is a config error
        require_backbone_weights(c.checkpoint, f"dataset {c.dataset!r}")
    check_outputs(cfgs, run_dirs)  # ... and a folder that takes no file a storage error (synqt.storage)
    if cfgs and trainer_for(cfgs[0]) == "deepspeed":
        if len(cfgs) != 1:
            raise ConfigError(f"a DeepSpeed trial is never packed (got a pack of {len(cfgs)})")
        from synqt.training.deepspeed import run_local

        return [run_local(cfgs[0], run_dirs[0], nprocs=cfgs[0].num_devices, retries=retries)]
    from synqt.training.pack import train_pack

    return train_pack(cfgs, run_dirs, resume=resume, backbone=backbone, report=report, hparams=hparams, cpus=cpus)


def run_trial(cfg: TrialConfig, run_dir: str | Path, *, resume: bool = True,
              backbone: torch.nn.Module | None = None, report: Callable[[dict], None] | None = None,
              hparams: dict | None = None, retries: int = 1) -> dict[str, Any]:
    """One trial (a pack of one); see ``run_pack``."""
    return run_pack([cfg], [run_dir], resume=resume, backbone=backbone, report=report,
                    hparams=[hparams] if hparams else None, retries=retries)[0]


def evaluate_checkpoint(cfg: TrialConfig, weights: str | Path, *, split: str = "test", official: bool = False,
                        out: str | Path | None = None) -> dict[str, Any]:
    """Score a trainable-only checkpoint (or an official full state dict) on one split."""
    from synqt.training.pack import evaluate_checkpoint as evaluate

    return evaluate(cfg, weights, split=split, official=official, out=out)


__all__ = ["trainer_for", "check_outputs", "run_pack", "run_trial", "evaluate_checkpoint"]
