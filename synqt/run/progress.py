"""Training progress as events: the library emits them, whoever runs it decides how to show them.

The trainers never print. They call :func:`emit` with one of the event classes below; a program that
wants lines or a progress bar installs a listener with :func:`listening` (the ``synqt`` CLI does, in
``launcher/console.py``). Without a listener an event becomes one log record of the ``synqt.run.progress``
logger (step events at DEBUG, the others at INFO), so a library user sees them by configuring logging
and a Ray worker, whose logging nobody configures, stays silent.

Listeners run in the training thread: they must be quick and must not raise (an exception from a
listener is logged and swallowed, so display code can never fail a trial).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

log = logging.getLogger("synqt.run.progress")


@dataclass(frozen=True)
class TrainStart:
    """A trainer is about to run ``total_steps`` optimizer steps (``done_steps`` already done, e.g. resumed)."""

    run_names: tuple[str, ...]
    epochs: int
    steps_per_epoch: int
    done_steps: int
    threads: str = ""  # synqt.training.threads.ThreadChoice.line(): the count and why, the run's first line

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclass(frozen=True)
class Step:
    """One optimizer step of every branch of a pack (``step`` is 1-based, counted over all epochs)."""

    step: int
    total_steps: int
    losses: dict[str, float]  # run name -> this step's training loss (cross-entropy, nats)


@dataclass(frozen=True)
class EpochEnd:
    """A branch finished epoch ``epoch`` (1-based) of ``epochs``."""

    run_name: str
    epoch: int
    epochs: int
    loss: float | None  # mean training loss over the epoch's steps (nats); None if no step ran
    lr: float  # learning rate of the epoch's last step
    images_per_s: float | None  # training images per second of this epoch (the whole pack's stream)
    epoch_s: float  # wall seconds of this epoch (training + evaluation + checkpoint)


@dataclass(frozen=True)
class Eval:
    """A branch was scored on ``split`` after epoch ``epoch``: ``acc`` in percent."""

    run_name: str
    epoch: int
    epochs: int
    split: str
    acc: float


@dataclass(frozen=True)
class TrialEnd:
    """A branch finished (``status`` ok) or failed; accuracies in percent, None where not measured."""

    run_name: str
    run_dir: str
    status: str
    val_acc: float | None
    test_acc: float | None
    best_of_test: float | None
    wall_time_s: float
    error: str | None = None


Event = TrainStart | Step | EpochEnd | Eval | TrialEnd
Listener = Callable[[Event], None]

_lock = threading.Lock()
_listener: Listener | None = None


def set_listener(listener: Listener | None) -> Listener | None:
    """Install ``listener`` for every event of this process; returns the one it replaces."""
    global _listener
    with _lock:
        previous, _listener = _listener, listener
    return previous


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """``with listening(fn): ...`` — ``fn`` receives the events emitted inside the block."""
    previous = set_listener(listener)
    try:
        yield
    finally:
        set_listener(previous)


def describe(event: Event) -> str:
    """A one-line plain-text rendering of an event (the log record used when nobody listens)."""
    if isinstance(event, EpochEnd):
        loss = f"{event.loss:.4f}" if event.loss is not None else "-"
        return f"{event.run_name}: epoch {event.epoch}/{event.epochs} loss {loss} lr {event.lr:.3g}"
    if isinstance(event, Eval):
        return f"{event.run_name}: epoch {event.epoch}/{event.epochs} {event.split} accuracy {event.acc:.2f}%"
    if isinstance(event, TrialEnd):
        accs = {k: getattr(event, k) for k in ("val_acc", "test_acc", "best_of_test") if getattr(event, k) is not None}
        return f"{event.run_name}: {event.status} {accs} ({event.run_dir})"
    if isinstance(event, TrainStart):
        return (f"{', '.join(event.run_names)}: {event.epochs} epochs of {event.steps_per_epoch} steps"
                + (f"; {event.threads}" if event.threads else ""))
    return f"step {event.step}/{event.total_steps}"


def emit(event: Event) -> None:
    """Hand ``event`` to the installed listener, or log it (see the module docstring)."""
    listener = _listener
    if listener is None:
        log.log(logging.DEBUG if isinstance(event, Step) else logging.INFO, "%s", describe(event))
        return
    try:
        listener(event)
    except BrokenPipeError:  # the reader of our output went away (`| head`): the caller ends quietly
        raise
    except Exception:  # noqa: BLE001 - showing progress must never fail a trial
        log.exception("progress listener failed on %r", event)
