"""One live owner per run (issue 19, kind 1) and SIGTERM as Ctrl-C (kind 2), with real `synqt` processes.

No Ray here (the Ray sweep's duplicate and SIGTERM: tests/test_interrupt.py): `synqt train --out`, `synqt slurm
task`, `synqt sweep --sequential` and `synqt demo` on the tiny assets of engine_helpers. Expected values come from
outside the code under test: the pid of the process the test started (Popen), this host's name (socket), a claim
file written here by hand as docs/hpc.md describes it, the exit status and files the processes leave.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.engine_helpers import (
    TASK,
    env_one_thread,
    tiny_overrides,
    tiny_sweep_overrides,
    write_tiny_assets,
)

REPO = Path(__file__).resolve().parents[1]
SYNQT = [sys.executable, "-m", "launcher.cli"]
CI_SWEEP = REPO / "configs" / "sweeps" / "ci.yaml"
HOST = socket.gethostname()
LONG = ["epochs=400", "eval_every=1000"]  # a trial that runs until the test stops it (a tiny epoch: ~0.1 s)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_assets(tmp_path_factory.mktemp("tiny"))


def start(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([*SYNQT, *args], cwd=REPO, env=env or env_one_thread(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, text=True)


def run(args: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*SYNQT, *args], cwd=REPO, env=env or env_one_thread(), capture_output=True, text=True,
                          timeout=timeout)


def wait_for(what, proc: subprocess.Popen, log: Path, timeout: float = 300):
    """Poll until ``what()`` is truthy (a state, never a time); the process must still run meanwhile."""
    deadline = time.time() + timeout
    while not (value := what()):
        assert proc.poll() is None, f"process ended early ({proc.returncode})\n{log.read_text()}"
        assert time.time() < deadline, log.read_text()
        time.sleep(0.2)
    return value


def claim_pid(folder: Path) -> int | None:
    try:
        return json.loads((folder / "owner.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def foreign_claim(folder: Path, *, host: str = "node-that-died", pid: int = 4242, age_s: float = 0.0,
                  stale_after_s: float = 60.0, **extra) -> Path:
    """A claim as another process would have left it (docs/hpc.md: owner.json fields), renewed ``age_s`` ago."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "owner.json"
    started = time.time() - age_s - 100
    path.write_text(json.dumps({"format": 1, "what": "sweep", "pid": pid, "host": host, "started": started,
                                "user": "alice", "command": "synqt sweep vtab1k.yaml", "token": "f" * 32,
                                "renew_s": 10, "stale_after_s": stale_after_s, **extra}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def assert_refused(res: subprocess.CompletedProcess, pid: int, host: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert f"being run by pid {pid} on host {host} since " in out, out
    assert "(started by " in out, out
    assert "Traceback" not in out, out


def test_train_twice_refused_then_killed_owner_taken_over_then_sigterm(assets, tmp_path: Path) -> None:
    """Two `synqt train --out RUN`: the second refuses (exit 2) while the first trains; `synqt status` still reads
    the run; the first killed (SIGKILL: no clean-up) leaves its claim, which the resubmission takes over with one
    line; SIGTERM to that one stops it like Ctrl-C (exit 130, resume command, epoch checkpoint kept, claim gone)."""
    data_root, ckpt = assets
    run_dir = tmp_path / "run"
    args = ["train", "--dataset", TASK, "--data-root", str(data_root), "--out", str(run_dir),
            *tiny_overrides(data_root, ckpt, tmp_path / "cache"), *LONG]
    first_log = tmp_path / "first.log"
    first = start(args, first_log)
    try:
        wait_for(lambda: (run_dir / "resume.pt").is_file(), first, first_log)
        assert claim_pid(run_dir) == first.pid
        events_before = sorted(p.name for p in run_dir.glob("events.out.tfevents.*"))

        second = run(args)
        assert_refused(second, first.pid, HOST)
        assert sorted(p.name for p in run_dir.glob("events.out.tfevents.*")) == events_before  # it wrote nothing
        status = run(["status", str(run_dir)])  # a reader is never refused: the run is running (exit 4)
        assert status.returncode == 4, status.stdout + status.stderr
        assert f"being run by pid {first.pid} on host {HOST} since " in status.stdout, status.stdout
    finally:
        first.kill()
        first.wait()
    assert claim_pid(run_dir) == first.pid  # SIGKILL: nothing could remove it

    third_log = tmp_path / "third.log"
    third = start([*args, "--resume"], third_log)
    try:
        wait_for(lambda: claim_pid(run_dir) == third.pid, third, third_log)
        epoch_at_claim = json.loads((run_dir / "progress.json").read_text())["epoch"]
        wait_for(lambda: json.loads((run_dir / "progress.json").read_text())["epoch"] > epoch_at_claim, third,
                 third_log)
        third.send_signal(signal.SIGTERM)
        third.wait(timeout=120)
    finally:
        third.kill()
    out = third_log.read_text()
    assert f"taking over from pid {first.pid} on host {HOST}" in out, out
    assert f"its process {first.pid} has ended on this host" in out, out
    assert third.returncode == 130, out
    assert "Traceback" not in out and "Aborted" not in out, out
    line = next(x for x in out.splitlines() if x.startswith("interrupted: resume with: "))
    assert shlex.split(line.removeprefix("interrupted: resume with: "))[1:] == [*args, "--resume"]
    assert (run_dir / "resume.pt").is_file() and not (run_dir / "metrics.json").exists()
    assert not (run_dir / "owner.json").exists()  # released on the way out: the resume line just works


def test_sweep_foreign_claim_refused_until_stale(assets, tmp_path: Path) -> None:
    """A claim from another host still renewed refuses `synqt sweep` (exit 2, before anything is written); the
    same claim no longer renewed for longer than the time it states is taken over with one line, and the
    sweep runs to the end and removes its claim."""
    data_root, ckpt = assets
    args = ["sweep", str(CI_SWEEP), *tiny_sweep_overrides(data_root, ckpt, tmp_path), "--sequential"]
    sweep_dir = tmp_path / "ci"
    foreign_claim(sweep_dir, age_s=5, stale_after_s=60)
    refused = run(args)
    assert_refused(refused, 4242, "node-that-died")
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["owner.json"]  # nothing written
    # what slurm/vtab.sh reads to refuse a resubmitted job before it starts Ray (a dry run is never refused)
    dry = run(["sweep", *args[1:], "--dry-run", "--json"])
    assert dry.returncode == 0, dry.stderr
    assert "being run by pid 4242 on host node-that-died since " in json.loads(dry.stdout)["owner"]

    foreign_claim(sweep_dir, age_s=600, stale_after_s=60)
    assert json.loads(run(["sweep", *args[1:], "--dry-run", "--json"]).stdout)["owner"] is None
    res = run(args)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "taking over from pid 4242 on host node-that-died" in out, out
    assert "more than the 60 s after which it counts as abandoned" in out, out
    finished = [json.loads(p.read_text())["status"] for p in (sweep_dir / "runs").glob("*/metrics.json")]
    assert finished and set(finished) == {"ok"}, out
    assert not (sweep_dir / "owner.json").exists()


def test_requeued_slurm_job_takes_over_its_earlier_run(assets, tmp_path: Path) -> None:
    """A claim from another node of SLURM job 777, still fresh: another job refuses; the same job requeued
    (SLURM_RESTART_COUNT 1, as SLURM sets it) takes it over at once (a job id never runs twice at once)."""
    data_root, ckpt = assets
    args = ["sweep", str(CI_SWEEP), *tiny_sweep_overrides(data_root, ckpt, tmp_path), "--sequential"]
    sweep_dir = tmp_path / "ci"
    foreign_claim(sweep_dir, host="gpu-node-7", pid=31337, slurm_job="777", slurm_restart=0, stale_after_s=3600)
    other_job = run(args, env={**env_one_thread(), "SLURM_JOB_ID": "778", "SLURM_RESTART_COUNT": "0"})
    assert_refused(other_job, 31337, "gpu-node-7")
    requeued = run(args, env={**env_one_thread(), "SLURM_JOB_ID": "777", "SLURM_RESTART_COUNT": "1"})
    out = requeued.stdout + requeued.stderr
    assert requeued.returncode == 0, out
    assert "taking over from pid 31337 on host gpu-node-7" in out and "SLURM job 777" in out, out
    assert not (sweep_dir / "owner.json").exists()


def test_slurm_task_twice_refused_and_sigterm(assets, tmp_path: Path) -> None:
    """Two copies of one array task (`synqt slurm task FILE 0`, a resubmission while the first runs): the second
    refuses naming the first; `synqt train --out` into that run directory refuses too; SIGTERM (what
    vtab_array.sh sends on the time-limit warning, and scancel) stops the first with exit 130 and the resume
    command, keeping its epoch checkpoint."""
    data_root, ckpt = assets
    args = ["slurm", "task", str(CI_SWEEP), "0", *tiny_sweep_overrides(data_root, ckpt, tmp_path), *LONG]
    log = tmp_path / "task.log"
    first = start(args, log)
    try:
        run_dir = wait_for(lambda: next((p.parent for p in (tmp_path / "ci" / "runs").glob("*/resume.pt")), None),
                           first, log)
        assert claim_pid(run_dir) == first.pid
        assert_refused(run(args), first.pid, HOST)
        train = run(["train", "--dataset", TASK, "--data-root", str(data_root), "--out", str(run_dir),
                     *tiny_overrides(data_root, ckpt, tmp_path / "cache")])
        assert_refused(train, first.pid, HOST)
        # a sweep over the same folder refuses too, naming the task's run directory
        assert_refused(run(["sweep", str(CI_SWEEP), *tiny_sweep_overrides(data_root, ckpt, tmp_path), "--resume",
                            "--sequential"]), first.pid, HOST)
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    finally:
        first.kill()
    out = log.read_text()
    assert first.returncode == 130, out
    assert "Traceback" not in out, out
    assert f"interrupted: resume with: synqt {shlex.join(args)}" in out, out
    assert (run_dir / "resume.pt").is_file() and not (run_dir / "owner.json").exists()


def test_demo_refused_while_its_folder_is_owned(demo_assets, synqt_cache_dir: Path, tmp_path: Path) -> None:
    """`synqt demo` twice: the second finds the first's live claim (here: this test process, alive on this host)
    and refuses before starting Ray."""
    claim = foreign_claim(tmp_path / "demo", host=HOST, pid=os.getpid(), stale_after_s=3600)
    res = run(["demo", "--out", str(tmp_path)], env={**env_one_thread(), "SYNQT_DEMO_DIR": str(synqt_cache_dir)})
    assert_refused(res, os.getpid(), HOST)
    assert sorted(p.name for p in claim.parent.iterdir()) == ["owner.json"]


def test_sigterm_to_status_watch_is_an_interrupt(tmp_path: Path) -> None:
    """Every subcommand takes SIGTERM as Ctrl-C (exit 130, one line, no traceback): here `synqt status --watch`,
    which refreshes until nothing runs, on a folder whose one run is running (progress.json only)."""
    run_dir = tmp_path / "runs" / "a"
    run_dir.mkdir(parents=True)
    (run_dir / "progress.json").write_text(json.dumps({"epoch": 1, "epochs": 3, "updated": time.time(),
                                                       "status": "running"}))
    log = tmp_path / "watch.log"
    proc = start(["status", str(tmp_path), "--watch", "--interval", "0.5"], log)
    try:
        wait_for(lambda: "running" in log.read_text(), proc, log)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    out = log.read_text()
    assert proc.returncode == 130, out
    assert "synqt status: interrupted (SIGTERM received)" in out and "Traceback" not in out, out
    assert "resume with" not in out  # nothing to resume


def test_an_owner_whose_claim_was_taken_over_learns_it_at_its_next_renewal(tmp_path: Path, monkeypatch) -> None:
    """The renewal thread: a claim removed by hand is published again; a claim replaced by another process's
    (this owner was suspended past stale_after_s and taken over) ends the renewal and calls on_lost once."""
    from synqt.run.ownership import Claim

    monkeypatch.setenv("SYNQT_CLAIM_RENEW_S", "0.1")
    lost: list = []
    claim = Claim(tmp_path / "run", "run", on_lost=lost.append).acquire()
    try:
        path = tmp_path / "run" / "owner.json"
        mine = json.loads(path.read_text())
        assert mine["pid"] == os.getpid() and mine["host"] == HOST
        path.unlink()
        deadline = time.time() + 30
        while not path.is_file():
            assert time.time() < deadline
            time.sleep(0.05)
        assert json.loads(path.read_text())["token"] == mine["token"]
        foreign_claim(tmp_path / "run", host="other-node", pid=999)
        while not lost:
            assert time.time() < deadline
            time.sleep(0.05)
        assert lost[0].host == "other-node" and lost[0].pid == 999
    finally:
        claim.release()
    assert json.loads(path.read_text())["host"] == "other-node"  # release never removes another's claim
