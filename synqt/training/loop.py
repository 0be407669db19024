"""Loop pieces shared by the pack trainer (``pack.py``) and the DeepSpeed trainer (``deepspeed.py``).

Both trainers follow one recipe: the same epoch order (``epoch_order``), the same evaluation schedule
(``should_eval``), the same per-epoch report payload (``summary``), the same metrics.json
(``trial_metrics``) and the same TensorBoard hparams (``write_hparams``); the run-directory files are
written through ``synqt.run.rundir``.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synqt.config import HPARAM_KEYS, TrialConfig, config_to_dict, effective_seeds
from synqt.run.provenance import library_versions, split_provenance
from synqt.weights.checkpoint import weights_text


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike hash())."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
    return value & 0x7FFFFFFFFFFFFFFF


def epoch_order(cfg: TrialConfig, n_images: int, epoch: int) -> np.ndarray:
    """The training images' order in ``epoch`` (0-based): a permutation drawn from (data_seed, epoch) only, so a
    pack, a resumed run and N DeepSpeed processes see the same global batches."""
    gen = torch.Generator().manual_seed(derive_seed(effective_seeds(cfg)[0], epoch))
    return torch.randperm(n_images, generator=gen).numpy()


def should_eval(cfg: TrialConfig, epoch: int) -> bool:
    """Evaluate after ``epoch`` (1-based)? Always after the last; vtab final: only then; else every eval_every."""
    if epoch == cfg.epochs:
        return True
    if cfg.protocol == "vtab" and cfg.stage == "final":
        return False  # the retrain stage scores test once, at the end
    return cfg.eval_every > 0 and epoch % cfg.eval_every == 0


def run_hparams(cfg: TrialConfig, extra: dict | None = None) -> dict[str, Any]:
    """A run's recorded hyperparameters: the HPARAM_KEYS of its config plus what the sweep varied."""
    out = {k: getattr(cfg, k) for k in HPARAM_KEYS}
    out.update(extra or {})
    return out


@dataclass
class TrialOutcome:
    """One trial's outcome as its trainer knows it (the typed input of ``trial_metrics``)."""

    cfg: TrialConfig
    run_dir: Path
    hparams: dict[str, Any]
    status: str = "pending"  # pending -> running -> ok | failed; "skipped" when already finished
    error: str | None = None
    epochs_done: int = 0
    eval_history: list[dict] = field(default_factory=list)
    trainable_params: int | None = None
    last_loss: float | None = None
    resumed_after_epoch: int | None = None  # set when this process continued the run from its epoch checkpoint

    @property
    def run_name(self) -> str:
        return Path(self.run_dir).name


@dataclass
class RunData:
    """What a trial ran on; the optional fields stay None until setup has read them (a trial failing in setup
    still writes its metrics.json)."""

    train_split: str
    eval_split: str
    started: float
    train_list: Any = None  # synqt.data split list (list_hash, derived)
    eval_list: Any = None
    image_size: int | None = None
    images_per_s: float | None = None
    threads: dict[str, Any] | None = None  # synqt.training.threads.ThreadChoice.as_dict(): how many, and why


def summary(run: TrialOutcome, eval_split: str) -> dict[str, Any]:
    """One branch's entry of the per-epoch report payload ``{"epoch", "branches": [...]}``."""
    last = run.eval_history[-1]["acc"] if run.eval_history else None
    return {"run_name": run.run_name, "status": run.status, "epoch": run.epochs_done, "train_loss": run.last_loss,
            "val_acc": last if eval_split == "val200" else None,
            "test_acc": last if eval_split == "test" else None}


def device_peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, kind): CUDA max allocated, or the process's max resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_max_rss"


def trial_metrics(run: TrialOutcome, data: RunData, *, peak: int | None, peak_kind: str, identity: dict,
                  packed_with: int) -> dict[str, Any]:
    """metrics.json of one trial (every key of ``synqt.run.rundir.METRIC_KEYS``, null where it does not apply)."""
    cfg = run.cfg
    evals = [e["acc"] for e in run.eval_history]
    final = evals[-1] if evals and run.epochs_done >= cfg.epochs else None
    is_test = data.eval_split == "test"
    train_list, eval_list = data.train_list, data.eval_list
    data_seed, init_seed = effective_seeds(cfg)
    return {
        "dataset": cfg.dataset,
        "group": cfg.group,
        "protocol": cfg.protocol,
        "stage": cfg.stage if cfg.protocol == "vtab" else "final",
        "seed": cfg.seed,
        "hparams": run.hparams,
        "val_acc": final if not is_test else None,
        "test_acc": final if is_test else None,
        "best_of_test": (max(evals) if evals else None) if (cfg.protocol == "paper" and is_test) else None,
        "trainable_params": run.trainable_params,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "images_per_s": data.images_per_s,
        "wall_time_s": time.time() - data.started,
        "versions": library_versions(),
        "provenance": {
            "backbone": identity.get("name"),
            "backbone_checkpoint": identity.get("checkpoint"),
            "backbone_checkpoint_sha256": identity.get("checkpoint_sha256"),
            "backbone_weights": weights_text(identity),
            "train_split": data.train_split,
            "eval_split": data.eval_split,
            "train_list_sha256": None if train_list is None else train_list.list_hash,
            "eval_list_sha256": None if eval_list is None else eval_list.list_hash,
            "derived_splits": bool((train_list is not None and train_list.derived)
                                   or (eval_list is not None and eval_list.derived)),
            "train_data": split_provenance(train_list),
            "eval_data": split_provenance(eval_list),
            "image_size": data.image_size,
            "data_seed": data_seed,
            "init_seed": init_seed,
            "packed_with": packed_with,
            # where the run finished, and the epoch checkpoint it continued from (None: ran from the start
            # in one process): which node of a multi-node sweep ran it, and that a retry resumed
            "host": socket.gethostname(),
            "resumed_after_epoch": run.resumed_after_epoch,
            "threads": data.threads,  # torch's intra-op threads and how they were decided (synqt.training.threads)
        },
        "status": "ok" if run.status == "ok" else "failed",
        "error": run.error,
        "run_name": run.run_name,
        "epochs_done": run.epochs_done,
        "eval_history": run.eval_history,
        "config": config_to_dict(cfg),
    }


def open_writer(run_dir: str | Path, resume_step: int) -> Any:
    """The run's TensorBoard ``SummaryWriter``; a run directory that already holds event files (an earlier
    attempt, killed or failed) gets ``purge_step=resume_step + 1``.

    ``resume_step``: the optimizer step this process continues from (0: from the start). Every point of an
    earlier attempt at a later step (logged after the checkpoint it resumes from, so logged again now) is
    dropped by TensorBoard's reader (``EventAccumulator`` purges on the writer's SessionLog START), for every
    scalar, text and HParams summary: one point per step, and the curve never jumps back.
    """
    from torch.utils.tensorboard import SummaryWriter

    earlier = any(Path(run_dir).glob("events.out.tfevents.*"))
    return SummaryWriter(log_dir=str(run_dir), purge_step=int(resume_step) + 1 if earlier else None)


def write_hparams(writer: Any, cfg: TrialConfig, hparams: dict, metrics: dict, extra: dict | None = None,
                  step: int = 0) -> None:
    """The run's hyperparameters (session) and final metrics for TensorBoard's HParams view; see synqt.run.tblog."""
    if writer is None:
        return
    from synqt.run.tblog import write_session

    write_session(writer, metrics, extra=extra, step=step)


class BranchScaler:
    """One branch's fp16 loss scale (``torch.amp.GradScaler``); a pass-through when disabled (fp32, bf16).

    Each branch of a pack has its own: one shared scaler (accelerate's) is updated by every branch's
    step, so one branch's overflow would halve the scale its pack-mates' gradients are unscaled with.
    Branches have disjoint parameters, so one backward over the sum of the scaled losses gives each
    branch exactly its own scaled gradients.
    """

    def __init__(self, enabled: bool, device_type: str, **kwargs: Any) -> None:
        self.scaler = torch.amp.GradScaler(device_type, **kwargs) if enabled else None

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.scaler is None else self.scaler.scale(loss)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale, step unless the gradients overflowed, update the scale; True when the step was taken."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= before  # the scale backs off exactly when a step is skipped

    def state_dict(self) -> dict | None:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def memory_tag(peak_kind: str) -> str:
    """TensorBoard tag of a peak-memory scalar in MiB, named by what was measured (see device_peak_memory)."""
    return {"cuda_max_allocated": "perf/process_peak_cuda_alloc_mib",
            "cpu_max_rss": "perf/process_peak_cpu_rss_mib"}.get(peak_kind, f"perf/process_peak_{peak_kind}_mib")


def emit_end(run_dir: Path, metrics: dict) -> None:
    """The ``synqt.run.progress.TrialEnd`` event of a finished or failed run, from its metrics.json content."""
    from synqt.run import progress

    progress.emit(progress.TrialEnd(
        run_name=Path(run_dir).name, run_dir=str(run_dir), status=metrics["status"], val_acc=metrics["val_acc"],
        test_acc=metrics["test_acc"], best_of_test=metrics["best_of_test"], wall_time_s=metrics["wall_time_s"],
        error=metrics.get("error")))

