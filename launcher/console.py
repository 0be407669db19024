"""What `synqt` shows on the console: logging levels, progress lines or bar, sweep lines, exit codes.

The library (``synqt/``) logs and emits progress events (``synqt.run.progress``); this module, used by the
CLI only, turns them into output:

- ``configure_logging(verbosity)``: ``-q`` / ``-v`` of every subcommand;
- ``TrainPrinter``: ``synqt train`` — one line per epoch and per evaluation off a terminal, a tqdm bar
  (with the same epoch / evaluation lines above it) on a terminal;
- ``SweepWatcher``: ``synqt sweep`` — one line per finished trial and a running count, read from the
  run directories (the same files ``synqt status`` reads), so it works for Ray and ``--sequential``;
- ``Exit``: the exit codes every subcommand follows (docs/cli.md).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from synqt.run import progress, rundir


class Exit(enum.IntEnum):
    """Exit codes of every ``synqt`` subcommand (one rule; documented in docs/cli.md)."""

    OK = 0  # everything asked for finished and is ok
    ERROR = 1  # an unexpected error (a bug): Python's traceback is shown
    BAD_INPUT = 2  # bad command line, config, data or file: nothing was started (argparse uses 2 too)
    FAILED_RUNS = 3  # finished, but with failed or missing runs (train, sweep, aggregate, status)
    NOT_FINISHED = 4  # status only: trials still running or pending, none failed
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), also SIGTERM and SLURM's SIGUSR1: stopped, checkpoints kept
    BROKEN_PIPE = 141  # the reader of stdout went away (`| head`): ended quietly (128 + SIGPIPE)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``scancel``, SLURM preemption) while a subcommand runs: handled as Ctrl-C is (stop,
    keep the last epoch checkpoints, exit 130, say how to resume). A KeyboardInterrupt, so no trainer records
    the run as failed."""

    def __str__(self) -> str:
        return "interrupted (SIGTERM received)"


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the body runs (main thread only), SIGTERM raises ``Terminated`` where the program is, as SIGINT
    raises KeyboardInterrupt; a sweep's stages install their own handler on top (launcher.run.stages)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_signum: int, _frame: Any) -> None:
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# subcommand -> whether its resume command adds --resume (it continues the same work; None: nothing to resume)
RESUMABLE = {"sweep": True, "train": True, "demo": False, "slurm task": False}


def resume_command(command: str, words: list[str]) -> str | None:
    """The command line that continues an interrupted ``command`` (``synqt ...``), or None when there is none."""
    if command not in RESUMABLE:
        return None
    words = list(words)
    if RESUMABLE[command] and "--resume" not in words:
        words.append("--resume")
    return f"synqt {shlex.join(words)}"


def status_exit(st: Mapping[str, Any]) -> int:
    """Exit code of `synqt status` (launcher.console.Exit): FAILED_RUNS when a trial failed or is broken,
    NOT_FINISHED while trials run or are pending (final-stage ones included), OK when all are done."""
    c = st["counts"]
    if c["failed"] or c.get("broken"):  # a broken metrics.json is a run without a usable result
        return Exit.FAILED_RUNS
    if c["running"] or c["pending"] or st.get("stage2_pending"):
        return Exit.NOT_FINISHED
    return Exit.OK


# ------------------------------------------------------------------------------------------ logging


class _Formatter(logging.Formatter):
    """INFO as the bare message; warnings and errors prefixed by their level."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        if record.levelno <= logging.DEBUG:
            return f"debug {record.name}: {message}"
        return message


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (tests swap it; tqdm wraps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ assigns it
        pass


# Two of Ray's log records that mislead a synqt user, dropped by filters on the loggers that emit them (Python
# logging's own mechanism: Ray's handlers are left alone, so every other Ray message still shows):
# - Ray >= 2.60, at WARNING, whenever `ray.init()` starts a local cluster with RAY_AUTH_MODE unset (our in-process
#   sweep cluster, every time): "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled
#   ..." -- shown again with -v;
# - Tune on Ctrl-C / SIGUSR1: "Experiment has been interrupted, but the most recent state was saved.\nResume
#   experiment with: Tuner.restore(path=...)" -- a Python API call; the CLI prints the `synqt ... --resume` line
#   instead -- shown again only with -vv (everything).
RAY_NOTICES = {  # logger -> (start of the message, the lowest verbosity that shows it)
    "ray._private.authentication.authentication_token_setup": ("Token authentication is enabled for this Ray", 1),
    "ray.tune.tune": ("Experiment has been interrupted, but the most recent state was saved", 2),
}


def _notice_filter(prefix: str) -> Callable[[logging.LogRecord], bool]:
    return lambda record: not str(record.msg).startswith(prefix)


def configure_logging(verbosity: int, stream: TextIO | None = None) -> Callable[[], None]:
    """Levels for this process: ours (``synqt``, ``launcher``) and everyone else's (Ray, torch, ...).

    verbosity -2: errors only; -1 (``-q``): warnings; 0: our INFO messages (what ``--resume`` decided,
    what was skipped); 1 (``-v``): also our DEBUG and others' INFO (Ray's own output); 2: others' DEBUG.
    Returns a function that puts back what it changed (``main`` called in-process, e.g. by tests).
    """
    global _verbosity
    root = logging.getLogger()
    saved = (root.level, {n: logging.getLogger(n).level for n in ("synqt", "launcher")}, _verbosity)
    ours = {-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    others = logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity == 1 else logging.WARNING
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(_Formatter("%(message)s"))
    for old in list(root.handlers):
        if getattr(old, "_synqt", False):
            root.removeHandler(old)
    handler._synqt = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    # the root level governs every library that does not set its own; ours are set explicitly (a record
    # of a logger that passes its own level reaches the root's handlers whatever the root's level)
    root.setLevel(others)
    handler.setLevel(min(ours, others))
    for name in ("synqt", "launcher"):
        logging.getLogger(name).setLevel(ours)
    logging.captureWarnings(verbosity >= 1)
    notice_filters = []
    for name, (prefix, shown_from) in RAY_NOTICES.items():
        if verbosity < shown_from:
            notice_filters.append((logging.getLogger(name), _notice_filter(prefix)))
            notice_filters[-1][0].addFilter(notice_filters[-1][1])
    _verbosity = verbosity

    def restore() -> None:
        global _verbosity
        root.removeHandler(handler)
        root.setLevel(saved[0])
        for name, level in saved[1].items():
            logging.getLogger(name).setLevel(level)
        logging.captureWarnings(False)
        for logger, notice_filter in notice_filters:
            logger.removeFilter(notice_filter)
        _verbosity = saved[2]

    return restore


_verbosity = 0


def verbosity() -> int:
    """The ``-v`` / ``-q`` level of this process (0 when the CLI did not configure one)."""
    return _verbosity


def on_terminal(stream: TextIO) -> bool:
    """A progress bar only where a person watches (a TTY) and nobody asked for plain lines."""
    return stream.isatty() and not os.environ.get("SYNQT_NO_PROGRESS")


def duration(seconds: float) -> str:
    """``1 h 05 min`` / ``4 min 10 s`` / ``12 s``."""
    s = int(round(max(0.0, seconds)))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


# ------------------------------------------------------------------------------------------ synqt train


class TrainPrinter:
    """Listener for ``synqt.run.progress`` events of ``synqt train`` (and, with ``-v``, of an in-process sweep).

    Lines (stdout): ``epoch E/N  loss L  lr X  I img/s  left T`` per epoch, ``eval  epoch E/N  SPLIT
    accuracy A%`` per evaluation; a pack prefixes each line with the run name. ``quiet`` drops them
    (the CLI's final line stays). On a terminal a tqdm bar on stderr counts optimizer steps below them.
    """

    def __init__(self, out: TextIO | None = None, *, quiet: bool = False, bar: bool | None = None,
                 prefix: bool | None = None) -> None:
        self.out = out or sys.stdout
        self.quiet = quiet
        self.want_bar = on_terminal(sys.stderr) if bar is None else bar
        self.prefix = prefix
        self.bar: Any = None
        self.started = time.monotonic()
        self.first_epoch: dict[str, int] = {}

    def _line(self, run_name: str, text: str) -> None:
        if self.quiet:
            return
        line = f"{run_name}: {text}" if self.prefix else text
        if self.bar is not None:
            self.bar.write(line, file=self.out)
        else:
            print(line, file=self.out, flush=True)

    def __call__(self, event: progress.Event) -> None:
        if isinstance(event, progress.TrainStart):
            if event.threads and not self.quiet:
                print(event.threads, file=self.out, flush=True)  # the run's first line: how many threads, and why
            self.started = time.monotonic()
            if self.prefix is None:
                self.prefix = len(event.run_names) > 1
            for name in event.run_names:
                self.first_epoch[name] = event.done_steps // max(event.steps_per_epoch, 1)
            if self.want_bar and not self.quiet:
                from tqdm import tqdm

                desc = event.run_names[0] if len(event.run_names) == 1 else f"pack of {len(event.run_names)}"
                self.bar = tqdm(total=event.total_steps, initial=event.done_steps, desc=desc, unit="step",
                                dynamic_ncols=True, leave=False, file=sys.stderr)
        elif isinstance(event, progress.Step):
            if self.bar is not None:
                self.bar.update(1)
                losses = list(event.losses.values())
                if losses:
                    self.bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}", refresh=False)
        elif isinstance(event, progress.EpochEnd):
            done_here = event.epoch - self.first_epoch.get(event.run_name, 0)
            per_epoch = (time.monotonic() - self.started) / max(done_here, 1)
            left = per_epoch * (event.epochs - event.epoch)
            loss = f"{event.loss:.4f}" if event.loss is not None else "-"
            speed = f"{event.images_per_s:.0f} img/s" if event.images_per_s is not None else "- img/s"
            self._line(event.run_name, f"epoch {event.epoch}/{event.epochs}  loss {loss}  lr {event.lr:.2e}  "
                                       f"{speed}  left {duration(left)}")
        elif isinstance(event, progress.Eval):
            self._line(event.run_name, f"eval  epoch {event.epoch}/{event.epochs}  {event.split} accuracy "
                                       f"{event.acc:.2f}%")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def final_line(metrics: dict[str, Any], run_dir: str | Path) -> str:
    """The last line of ``synqt train``: the final accuracy (the split it was measured on) and where it is."""
    wall = metrics.get("wall_time_s")
    took = f" in {duration(wall)}" if isinstance(wall, (int, float)) else ""
    if metrics.get("status") != "ok":
        err = (metrics.get("error") or "unknown error").splitlines()[0]
        return f"FAILED{took}: {err}; run dir {run_dir}"
    parts = []
    if metrics.get("test_acc") is not None:
        parts.append(f"final test accuracy {metrics['test_acc']:.2f}%")
    if metrics.get("best_of_test") is not None:
        parts.append(f"best of test {metrics['best_of_test']:.2f}% (selected on test)")
    if metrics.get("val_acc") is not None:
        parts.append(f"final val200 accuracy {metrics['val_acc']:.2f}%")
    return f"done{took}: {', '.join(parts) or 'no accuracy recorded'}; run dir {run_dir}"


# ------------------------------------------------------------------------------------------ synqt sweep


_watchers: list[SweepWatcher] = []


def before_summary() -> None:
    """Print the last finished-trial lines of every active watcher now, before the sweep's table."""
    for w in list(_watchers):
        w.stop()
        w.poll()


class SweepWatcher:
    """Prints a sweep's finished trials and a running count, polling its run directories (a thread).

    One line per trial that finishes while watching (``done   NAME   test 52.34%   1.2 min`` or
    ``FAILED NAME: error``), then the count ``[done/total] done D · running R · pending P · failed F ·
    left ~T``. Trials already finished when the watch starts (``--resume``) are counted, not listed.
    Reads plan.json, metrics.json and progress.json through ``launcher.results.status.collect_status``.
    """

    def __init__(self, sweep_dir: str | Path, out: TextIO | None = None, interval_s: float = 2.0) -> None:
        self.sweep_dir = Path(sweep_dir)
        self.out = out or sys.stdout
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: set[str] = set()

    def __enter__(self) -> SweepWatcher:
        _watchers.append(self)
        self._seen = {t["run_name"] for t in self._trials() if t["state"] in ("done", "failed")}
        if self._seen:
            print(f"synqt sweep: {len(self._seen)} trial(s) already finished", file=self.out, flush=True)
        self._thread = threading.Thread(target=self._loop, name="synqt-sweep-watcher", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        _watchers.remove(self)
        if exc[0] is None:
            self.poll()  # the trials that finished after the last poll

    def stop(self) -> None:
        """Stop the polling thread (idempotent); ``poll`` still works."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _trials(self) -> list[dict[str, Any]]:
        from launcher.results.status import collect_status

        try:
            return collect_status(self.sweep_dir)["trials"]
        except Exception:  # noqa: BLE001 - a half-written plan must not stop the sweep; try again next poll
            return []

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except BrokenPipeError:
                return

    def poll(self) -> None:
        from launcher.results.status import collect_status

        try:
            st = collect_status(self.sweep_dir)
        except Exception:  # noqa: BLE001 - see _trials
            return
        new = [t for t in st["trials"] if t["state"] in ("done", "failed") and t["run_name"] not in self._seen]
        for t in new:
            self._seen.add(t["run_name"])
            print(self.trial_line(t), file=self.out, flush=True)
        if new:
            print(self.count_line(st), file=self.out, flush=True)

    @staticmethod
    def trial_line(t: dict[str, Any]) -> str:
        m = rundir.read_metrics(t["dir"]) or {}
        minutes = (m.get("wall_time_s") or 0.0) / 60
        if t["state"] == "failed":
            return f"FAILED {t['run_name']}: {(t.get('error') or 'unknown error').splitlines()[0]}"
        accs = []
        for key, label in (("test_acc", "test"), ("val_acc", "val200"), ("best_of_test", "best of test")):
            if m.get(key) is not None:
                accs.append(f"{label} {m[key]:.2f}%")
        return f"done   {t['run_name']}   {'  '.join(accs) or '-'}   {minutes:.1f} min"

    @staticmethod
    def count_line(st: dict[str, Any]) -> str:
        c = st["counts"]
        left = f"~{duration(st['eta_s'])}" if st.get("eta_s") is not None else "unknown"
        return (f"[{c['done'] + c['failed']}/{st['total']}] done {c['done']} · running {c['running']} · "
                f"pending {c['pending']} · failed {c['failed']} · left {left}")
