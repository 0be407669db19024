"""Deferred evaluation (``deferred_eval``, paper protocol), shared by the pack and the DeepSpeed trainer.

At each evaluation epoch before the last a trainer saves a snapshot of the branch's trainable weights
(``<run_dir>/eval_snapshots/epochNNNNN.safetensors``, ``save_snapshot``) and remembers ``(epoch, step)``
in its resume state. After the last epoch it loads every pending snapshot as a branch
(``load_snapshots``) and scores them together with the final weights as branches of one packed no-grad
forward (``count_correct``: ``forward_branches`` of the frozen model), so the eval images pass the
backbone once; then the snapshots are deleted (``remove_snapshots``). Whatever the trainer, a
snapshot's accuracy is written at the epoch and optimizer step it was taken, as a periodic
evaluation would have written it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from synqt.errors import ConfigError
from synqt.model.branch import QueryBranch
from synqt.run import rundir
from synqt.storage import atomic_write_safetensors


def deferred(cfg) -> bool:
    """Does this trial defer its evaluations to one pass at the end?"""
    return bool(cfg.deferred_eval and cfg.protocol == "paper")


def snapshot_path(run_dir: str | Path, epoch: int) -> Path:
    return Path(run_dir) / rundir.EVAL_SNAPSHOTS / f"epoch{epoch:05d}.safetensors"


def save_snapshot(module: nn.Module, run_dir: str | Path, epoch: int) -> None:
    """Write ``module``'s weights (CPU copies) as the snapshot of ``epoch``, atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_write_safetensors(snapshot_path(run_dir, epoch), state)


def load_snapshots(run_dir: str | Path, epochs: Iterable[int], make_branch: Callable[[], QueryBranch],
                   device: torch.device, *, run_name: str) -> list[QueryBranch]:
    """One branch per snapshot epoch (``make_branch()`` builds it, the snapshot fills it), on ``device``.

    A missing snapshot is a ConfigError naming it. ``make_branch`` draws its throwaway init from a forked
    global generator, so loading snapshots leaves torch's random state as it was.
    """
    from safetensors.torch import load_file

    modules = []
    for epoch in epochs:
        path = snapshot_path(run_dir, epoch)
        if not path.is_file():
            raise ConfigError(f"{run_name}: the weight snapshot of epoch {epoch} ({path}) for deferred "
                              "evaluation is missing; rerun the trial with resume=false")
        with torch.random.fork_rng(devices=[]):
            module = make_branch()
        module.load_state_dict(load_file(str(path)))
        modules.append(module.to(device))
    return modules


def remove_snapshots(run_dir: str | Path, epochs: Iterable[int]) -> None:
    """Delete the snapshots of ``epochs``, and the folder once it is empty."""
    for epoch in epochs:
        snapshot_path(run_dir, epoch).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (Path(run_dir) / rundir.EVAL_SNAPSHOTS).rmdir()


@torch.no_grad()
def count_correct(model: nn.Module, branches: Sequence[nn.Module], batches: Sequence[np.ndarray],
                  inputs: Iterator[dict[str, torch.Tensor]], labels: np.ndarray, *, device: torch.device,
                  autocast: Callable[[], contextlib.AbstractContextManager],
                  gather: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                  ) -> tuple[list[int], int]:
    """Correct predictions of each branch, and the number of labels scored, over ``batches`` (index arrays).

    One forward per batch for all branches: ``model.forward_branches(branches, **x)`` with ``x`` the next
    item of ``inputs`` (``{"images": ...}`` or ``{"kv": ...}``). ``gather(preds [k, B], y [B])``, if given,
    collects the predictions of every process (Accelerate's ``gather_for_metrics``). Puts the model and
    the branches in eval mode and leaves them there (the caller restores training mode).
    """
    model.eval()
    for module in branches:
        module.eval()
    correct = torch.zeros(len(branches), dtype=torch.long, device=device)
    total = 0
    for idx in batches:
        x = next(inputs)
        y = torch.as_tensor(labels[idx], dtype=torch.long).to(device, non_blocking=True)
        with autocast():
            logits = model.forward_branches(list(branches), **x)
        preds = torch.stack([out.argmax(dim=-1) for out in logits])  # [k, B]
        if gather is not None:
            preds, y = gather(preds, y)
        correct += (preds == y).sum(dim=1)
        total += y.numel()
    return [int(c) for c in correct.tolist()], total
