"""One live owner per sweep folder and per run directory: the claim file, its renewal, and its takeover.

The ownership contract (docs/hpc.md, "Two copies of one run"), written here once and imported everywhere:

- A process that trains a sweep (``synqt sweep`` / ``synqt demo``: the sweep folder) or one run
  (``synqt train --out``, ``synqt slurm task``: the run directory) first *claims* the folder: it publishes
  ``owner.json`` (pid, host, start time, user, command line, a random token, the renewal interval and the
  time after which an unrenewed claim counts as abandoned) and renews it (its modification time) every
  ``renew_s`` seconds from a daemon thread. It removes the file when it ends, also on Ctrl-C / SIGTERM.
- A second process refuses (``Refused``, exit 2) with "being run by pid P on host H since T (started by ...)"
  while that owner is alive. A sweep folder's claim covers every run directory under ``runs/``: the
  sweep's trials (Ray Tune trials on any node, their retries, ``--sequential`` packs) run under it and take
  no claim of their own, so neither a trial nor its retry can be refused by its own sweep. Claiming a sweep
  folder is refused while any of its run directories has a live owner (an array task, a ``synqt train``),
  and claiming a run directory is refused while its sweep folder has one.
- An owner is *gone*, and its claim is taken over with one warning line that says why, when: its host is
  this host and its process no longer exists (pid absent, or reused by a process started at another time);
  or it ran in this SLURM job and this is a later run of the job (``SLURM_RESTART_COUNT`` higher: a
  requeued job never runs twice at once); or its claim has not been renewed for the ``stale_after_s`` it
  states itself (another host that died, lost the storage, or was killed without a chance to clean up).
- Readers (``synqt status``, ``synqt aggregate``, ``synqt sweep --dry-run``) never claim and are never refused.

What it relies on (shared storage: NFSv3+, Lustre, GPFS, local disks): ``link(2)`` of a fully written
temporary file onto ``owner.json`` is atomic and fails with EEXIST when the name exists (the NFS-safe form of
O_EXCL creation recommended by ``open(2)``; an NFS reply lost on retry is detected through the temporary
file's link count), ``rename(2)`` is atomic (takeover moves the stale claim aside under a unique name, and
only one contender's rename of one file can succeed), and ``utime(2)`` updates the modification time, which
on NFS the file server stamps. Staleness compares that time with this host's clock: clocks of the hosts and
the file server must agree within a margin well below ``stale_after_s`` (NTP keeps them within
milliseconds). No ``fcntl``/``flock`` lock is used: on NFS they depend on the lock manager (NLM) being up and
reachable, on Lustre they are per node unless the file system is mounted with ``-o flock`` (with
``localflock`` two nodes both "hold" the lock), and such a lock carries no owner to name in a refusal.
``filelock.SoftFileLease`` (the project's lock library) renews and expires leases too, but a contender must
watch the marker unchanged for a whole lease before it may take over (a duplicate ``synqt sweep`` would wait
minutes to learn anything), and its marker has no room for when and by whom a run was started.

An owner whose renewal finds its claim replaced (it was suspended, or its storage stalled, for longer than
``stale_after_s`` and another process took over) logs an error and sends itself SIGTERM: it stops as on
Ctrl-C, keeping its epoch checkpoints, and never writes alongside the new owner for longer than ``renew_s``.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synqt.errors import SynQTError
from synqt.run.rundir import PLAN, RUNS

log = logging.getLogger("synqt.run.ownership")

CLAIM = "owner.json"
RENEW_ENV = "SYNQT_CLAIM_RENEW_S"
STALE_ENV = "SYNQT_CLAIM_STALE_S"
DEFAULT_RENEW_S = 30.0
DEFAULT_STALE_S = 300.0  # ten missed renewals: survives an NFS server fail-over, frees a dead node's claim in 5 min
FORMAT = 1


class Refused(SynQTError):
    """Another live process owns the folder (the CLI prints it and exits 2, before any resource is taken)."""


@dataclass
class Owner:
    """What a claim file says about its owner, plus when it was last renewed (the file's modification time)."""

    path: Path
    pid: int
    host: str
    started: float
    user: str
    command: str
    token: str
    what: str  # "sweep" or "run"
    renew_s: float
    stale_after_s: float
    process_started: float | None  # the owner process's start time (tells a reused pid apart)
    slurm_job: str | None
    slurm_restart: int
    renewed: float

    def describe(self) -> str:
        """``pid P on host H since T (started by USER: COMMAND)``."""
        return (f"pid {self.pid} on host {self.host} since {_when(self.started)} "
                f"(started by {self.user}: {self.command})")

    def gone_because(self, now: float | None = None) -> str | None:
        """Why this owner no longer runs (the claim may be taken over), or None while it may still run."""
        now = time.time() if now is None else now
        if self.host == socket.gethostname():
            if not _process_alive(self.pid, self.process_started):
                return f"its process {self.pid} has ended on this host"
            return None  # alive here: its renewal thread runs, whatever the clock says
        job, restart = _slurm()
        if job is not None and job == self.slurm_job and restart > self.slurm_restart:
            return (f"it was run {self.slurm_restart} of SLURM job {job}, which has been requeued "
                    f"(this is run {restart})")
        age = now - self.renewed
        if age > self.stale_after_s:
            return (f"its claim was last renewed {age:.0f} s ago, more than the {self.stale_after_s:g} s after which "
                    "it counts as abandoned")
        return None


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


def _slurm() -> tuple[str | None, int]:
    """(SLURM job id, restart count) of this process; (None, 0) outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID") or None
    try:
        restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        restart = 0
    return job, restart


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return None


def _process_alive(pid: int, started: float | None) -> bool:
    """True when ``pid`` runs on this host and (when known) started at ``started`` (not a reused pid)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        created = proc.create_time()
    except psutil.NoSuchProcess:
        return False
    except (psutil.Error, OSError):
        return True  # exists but unreadable (another user's): assume alive
    return started is None or abs(created - started) < 1.0


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as err:
        raise SynQTError(f"{env}={raw!r}: expected a number of seconds") from err
    if value <= 0:
        raise SynQTError(f"{env}={raw!r}: expected a positive number of seconds")
    return value


def read_owner(folder: str | Path) -> Owner | None:
    """The owner recorded in ``folder/owner.json``, or None when there is none (or it is unreadable: a claim
    being written, or not ours, never blocks; a half-written one cannot exist, claims are linked in whole)."""
    path = Path(folder) / CLAIM
    try:
        raw = path.read_text()
        st = path.stat()
        d = json.loads(raw)
        return Owner(
            path=path, pid=int(d["pid"]), host=str(d["host"]), started=float(d["started"]), user=str(d.get("user")),
            command=str(d.get("command")), token=str(d["token"]), what=str(d.get("what", "run")),
            renew_s=float(d.get("renew_s", DEFAULT_RENEW_S)),
            stale_after_s=float(d.get("stale_after_s", DEFAULT_STALE_S)),
            process_started=float(d["process_started"]) if d.get("process_started") is not None else None,
            slurm_job=str(d["slurm_job"]) if d.get("slurm_job") else None,
            slurm_restart=int(d.get("slurm_restart") or 0), renewed=st.st_mtime,
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("%s is not a readable claim (%s); ignoring it", path, err)
        return None


def live_owner(folder: str | Path) -> Owner | None:
    """The owner of ``folder`` when it still runs (see ``Owner.gone_because``), else None."""
    owner = read_owner(folder)
    if owner is None or owner.gone_because() is not None:
        return None
    return owner


def sweep_folder_of(run_dir: str | Path) -> Path | None:
    """The sweep folder a run directory belongs to (``<sweep>/runs/<name>`` with ``<sweep>/plan.json``), else None."""
    run_dir = Path(run_dir).absolute()
    if run_dir.parent.name == RUNS and (run_dir.parent.parent / PLAN).is_file():
        return run_dir.parent.parent
    return None


def _covering(folder: Path, what: str) -> list[Path]:
    """The folders whose live owner also excludes a claim on ``folder``: the folder itself, and for a run its
    sweep folder, for a sweep every run directory under it."""
    out = [folder]
    if what == "run":
        sweep = sweep_folder_of(folder)
        if sweep is not None:
            out.append(sweep)
    elif (folder / RUNS).is_dir():
        out += sorted(p.parent for p in (folder / RUNS).glob(f"*/{CLAIM}"))
    return out


def _refusal(folder: Path, what: str, owner: Owner, where: Path) -> Refused:
    age = max(0.0, time.time() - owner.renewed)
    scope = "" if where == folder else f" ({'its sweep folder' if what == 'run' else 'its run directory'} {where})"
    return Refused(
        f"{folder} is being run by {owner.describe()}{scope}; this process stops before taking any resource. "
        f"The claim {owner.path} was renewed {age:.0f} s ago; it is taken over once that process has ended "
        f"(checked on host {owner.host}) or its claim goes {owner.stale_after_s:g} s without renewal. Wait for it, "
        f"stop it (kill -TERM {owner.pid} on {owner.host}, or scancel its job), or choose another folder.")


def check_free(folder: str | Path, what: str) -> None:
    """Raise ``Refused`` when a live process other than this one owns ``folder`` (or covers it); writes nothing."""
    folder = Path(folder).absolute()
    for where in _covering(folder, what):
        owner = live_owner(where)
        if owner is not None and not _is_me(owner):
            raise _refusal(folder, what, owner, where)


def _is_me(owner: Owner) -> bool:
    return owner.host == socket.gethostname() and owner.pid == os.getpid()


class Claim:
    """This process's claim on a folder: ``with Claim(folder, "sweep"):`` around the work (or acquire/release).

    ``acquire`` raises ``Refused`` while another live process owns the folder (or covers it), takes over a
    gone owner's claim with one warning line, and starts renewing. ``release`` stops renewing and removes the
    claim when it is still ours. ``on_lost`` runs (in the renewal thread) when another process has replaced
    the claim; the default logs an error and sends this process SIGTERM (a graceful stop, as Ctrl-C).
    """

    def __init__(self, folder: str | Path, what: str, *, command: str | None = None,
                 on_lost: Any = None) -> None:
        if what not in ("sweep", "run"):
            raise ValueError(f"what={what!r}: expected 'sweep' or 'run'")
        self.folder = Path(folder).absolute()
        self.what = what
        self.path = self.folder / CLAIM
        self.token = secrets.token_hex(16)
        self.renew_s = _seconds(RENEW_ENV, DEFAULT_RENEW_S)
        self.stale_after_s = max(_seconds(STALE_ENV, DEFAULT_STALE_S), 2 * self.renew_s)
        self.command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.on_lost = on_lost or self._stop_self
        self.held = False
        self.took_over: Owner | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------ acquire
    def _record(self) -> dict[str, Any]:
        job, restart = _slurm()
        try:
            user = getpass.getuser()
        except Exception:  # noqa: BLE001 - no passwd entry (containers): the uid says enough
            user = f"uid {os.getuid()}"
        return {"format": FORMAT, "what": self.what, "pid": os.getpid(), "host": socket.gethostname(),
                "started": time.time(), "user": user, "command": self.command, "token": self.token,
                "renew_s": self.renew_s, "stale_after_s": self.stale_after_s,
                "process_started": _process_started(os.getpid()), "slurm_job": job, "slurm_restart": restart}

    def _publish(self, tmp: Path) -> bool:
        """Link the written claim ``tmp`` onto owner.json: True when it is ours now, False when the name exists."""
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            # NFS: a retransmitted LINK whose first reply was lost answers EEXIST although it succeeded
            with contextlib.suppress(OSError):
                if os.stat(tmp).st_nlink == 2:
                    return True
            return False
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            # a file system without hard links: exclusive creation of the final name, then the content
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(tmp.read_bytes())
                fh.flush()
                os.fsync(fh.fileno())
            return True

    def acquire(self) -> Claim:
        self._created = not self.folder.exists()  # removed again at release when nothing else was written
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{CLAIM}.{socket.gethostname()}.{os.getpid()}.{self.token[:8]}.tmp"
        with open(tmp, "w") as fh:
            json.dump(self._record(), fh, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            for _ in range(20):  # each round either publishes, refuses, or moves one gone claim aside
                for where in _covering(self.folder, self.what)[1:]:
                    owner = live_owner(where)
                    if owner is not None and not _is_me(owner):
                        raise _refusal(self.folder, self.what, owner, where)
                if self._publish(tmp):
                    self.held = True
                    break
                owner = read_owner(self.folder)
                if owner is None:
                    # unreadable or just released: move an unreadable one aside once it is old
                    self._set_aside_unreadable()
                    continue
                if _is_me(owner):  # this process holds it already (a nested claim): the outer one renews and
                    return self  # releases it; this one neither renews nor removes it
                reason = owner.gone_because()
                if reason is None:
                    raise _refusal(self.folder, self.what, owner, self.folder)
                if self._set_aside(owner):
                    self.took_over = owner
                    log.warning("%s: taking over from %s: %s", self.folder, owner.describe(), reason)
            else:
                raise Refused(f"{self.path}: could not claim it after 20 tries (other processes keep claiming it)")
        finally:
            tmp.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._renew, name=f"synqt-claim-{self.folder.name}", daemon=True)
        self._thread.start()
        return self

    def _set_aside(self, owner: Owner) -> bool:
        """Move the gone owner's claim aside (atomic rename: one contender wins); False when it changed meanwhile."""
        aside = self.folder / f".{CLAIM}.gone.{self.token[:8]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = read_owner_file(aside)
        if moved is not None and moved.get("token") != owner.token:
            # another contender replaced the gone claim between our read and our rename: put its claim back
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def _set_aside_unreadable(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        if time.time() - st.st_mtime > 60:
            with contextlib.suppress(OSError):
                os.rename(self.path, self.folder / f".{CLAIM}.unreadable.{self.token[:8]}")
        else:
            time.sleep(0.5)

    # ------------------------------------------------------------------------------------------------ renewal
    def _renew(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                current = read_owner_file(self.path)
                if current is None:  # removed by hand: publish it again unless someone else has meanwhile
                    tmp = self.folder / f".{CLAIM}.renew.{self.token[:8]}.tmp"
                    tmp.write_text(json.dumps({**self._record(), "token": self.token}, indent=1) + "\n")
                    try:
                        if self._publish(tmp):
                            continue
                    finally:
                        tmp.unlink(missing_ok=True)
                    current = read_owner_file(self.path)
                if current is not None and current.get("token") == self.token:
                    os.utime(self.path)
                    continue
                other = read_owner(self.folder)
                self.held = False
                self.on_lost(other)
                return
            except OSError as err:  # storage hiccup: try again at the next renewal
                log.warning("%s: could not renew the claim (%s); retrying in %g s", self.path, err, self.renew_s)

    def _stop_self(self, other: Owner | None) -> None:
        who = other.describe() if other is not None else "another process"
        log.error("%s: this process's claim was taken over by %s (this process was not renewing it for more than "
                  "%g s); stopping so that two processes never write one run", self.folder, who, self.stale_after_s)
        os.kill(os.getpid(), signal.SIGTERM)

    # ------------------------------------------------------------------------------------------------ release
    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.held:
            current = read_owner_file(self.path)
            if current is not None and current.get("token") == self.token:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            self.held = False
        if getattr(self, "_created", False):
            with contextlib.suppress(OSError):  # only when empty: a refused or failed start leaves no folder
                self.folder.rmdir()

    def __enter__(self) -> Claim:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def read_owner_file(path: str | Path) -> dict[str, Any] | None:
    """The raw claim at ``path`` as a dict, or None (absent / unreadable)."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


__all__ = ["CLAIM", "Claim", "Owner", "Refused", "check_free", "live_owner", "read_owner", "read_owner_file",
           "sweep_folder_of", "RENEW_ENV", "STALE_ENV", "DEFAULT_RENEW_S", "DEFAULT_STALE_S"]
