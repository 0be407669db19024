"""A sweep stopped by SIGUSR1 / SIGINT: no stage advances on a partial stage, the exit says how to resume.

Real ``synqt sweep`` processes on the CI sweep with the vtab protocol (stage 1: val200 search, stage 2:
the selected point with every seed), signalled once the first epoch checkpoint (resume.pt) exists.
The trials get ``EPOCHS`` epochs, not ci.yaml's 2: Tune stops a trial within about a second of the signal, and a
2-epoch trial on a fast machine finished its last epoch in that time (then no run was left to resume).
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
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CI_SWEEP = REPO / "configs" / "sweeps" / "ci.yaml"
SYNQT = [sys.executable, "-m", "launcher.cli"]
EPOCHS = 6


def start_sweep(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    # SIGINT as a terminal's Ctrl-C finds it (default), even when this test run was started in the background
    return subprocess.Popen([*SYNQT, "sweep", *args], cwd=REPO, env=env, stdout=open(log, "w"),
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def signal_at_first_checkpoint(proc: subprocess.Popen, sweep_dir: Path, sig: int, log: Path) -> list[str]:
    """Wait for the first runs/*/resume.pt, send ``sig``; return the run names that had one."""
    deadline = time.time() + 600
    while not (found := sorted(p.parent.name for p in (sweep_dir / "runs").glob("*/resume.pt"))):
        assert proc.poll() is None, f"sweep ended before any epoch checkpoint\n{log.read_text()}{proc.stderr.read()}"
        assert time.time() < deadline, log.read_text()
        time.sleep(0.5)
    proc.send_signal(sig)
    return found


def kept_checkpoints(sweep_dir: Path, checkpointed: list[str]) -> dict[str, int]:
    """Each run checkpointed at the signal either kept its epoch checkpoint (never a failed metrics.json) or
    finished during the stop (an ok metrics.json); returns stopped run -> the epoch its checkpoint holds; the
    stopped runs must not be all of them."""
    stopped = {}
    for name in checkpointed:
        run = sweep_dir / "runs" / name
        if (run / "metrics.json").exists():
            assert json.loads((run / "metrics.json").read_text())["status"] == "ok", name
            assert not (run / "resume.pt").exists()
        else:
            assert (run / "resume.pt").is_file(), name
            stopped[name] = torch.load(run / "resume.pt", weights_only=True)["epochs_done"]
            assert 1 <= stopped[name] < EPOCHS, (name, stopped[name])
    assert stopped, f"every checkpointed run finished during the stop: {checkpointed}"
    return stopped


def test_sigusr1_stops_stage1_and_resumes(demo_assets, tmp_path: Path) -> None:
    data_root, ckpt = demo_assets
    args = [str(CI_SWEEP), "protocol=vtab", f"storage_path={tmp_path}", f"data_root={data_root}",
            f"checkpoint={ckpt}", f"epochs={EPOCHS}"]
    sweep_dir = tmp_path / "ci"
    log = tmp_path / "first.log"
    proc = start_sweep(args, log)
    checkpointed = signal_at_first_checkpoint(proc, sweep_dir, signal.SIGUSR1, log)
    _, err = proc.communicate(timeout=300)
    out = log.read_text()
    assert proc.returncode == 130, out + err
    # nothing after stage 1 was selected or started
    assert not list((sweep_dir / "runs").glob("final-*")), out + err
    plan = json.loads((sweep_dir / "plan.json").read_text())
    assert all(t["run_name"].startswith("search-") for t in plan["trials"])
    assert "selected" not in out
    assert "interrupted in stage search" in err
    # the exact command that continues it
    line = next(x for x in err.splitlines() if x.startswith("interrupted: resume with: "))
    words = shlex.split(line.removeprefix("interrupted: resume with: "))
    assert words == ["synqt", "sweep", *args, "--resume"]
    stopped = kept_checkpoints(sweep_dir, checkpointed)

    again = subprocess.run([*SYNQT, *words[1:]], cwd=REPO, capture_output=True, text=True, timeout=900,
                           env=dict(os.environ, OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0"))
    assert again.returncode == 0, again.stdout + again.stderr
    results = json.loads((sweep_dir / "results.json").read_text())
    assert {d: e["status"] for d, e in results["datasets"].items()} == {"syn_colour_shape": "ok", "syn_count": "ok"}
    for name, epoch in stopped.items():  # each continued from the epoch its kept checkpoint holds
        m = json.loads((sweep_dir / "runs" / name / "metrics.json").read_text())
        assert m["status"] == "ok" and m["provenance"]["resumed_after_epoch"] == epoch, (name, epoch, m["provenance"])
    assert len(list((sweep_dir / "runs").glob("final-*/metrics.json"))) == 4  # 2 datasets x 2 seeds


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_sequential_sweep(demo_assets, tmp_path: Path, sig: int) -> None:
    """Ctrl-C and SIGTERM (scancel, preemption, `kill`) to `synqt sweep --sequential` (no Ray: the stage guard
    raises at once): exit 130, the resume command, epoch checkpoints kept, the claim released."""
    data_root, ckpt = demo_assets
    args = [str(CI_SWEEP), "protocol=vtab", f"storage_path={tmp_path}", f"data_root={data_root}",
            f"checkpoint={ckpt}", f"epochs={EPOCHS}", "--sequential"]
    sweep_dir = tmp_path / "ci"
    log = tmp_path / "first.log"
    proc = start_sweep(args, log)
    checkpointed = signal_at_first_checkpoint(proc, sweep_dir, sig, log)
    _, err = proc.communicate(timeout=300)
    out = log.read_text()
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err
    assert f"interrupted in stage search ({signal.Signals(sig).name} received)" in err
    assert f"interrupted: resume with: synqt sweep {shlex.join(args)} --resume" in err
    assert not list((sweep_dir / "runs").glob("final-*"))
    kept_checkpoints(sweep_dir, checkpointed)
    assert not (sweep_dir / "owner.json").exists()


def test_sigterm_stops_ray_sweep_and_duplicate_is_refused(demo_assets, tmp_path: Path) -> None:
    """Issue 19: while a real Ray `synqt sweep` runs, the same sweep with --resume (a resubmitted or requeued
    job) refuses with exit 2 naming the running process, before Ray starts; `synqt status` still reads the
    folder; then SIGTERM (scancel, preemption, `kill`) stops the sweep as SIGINT does: exit 130, the resume
    command, epoch checkpoints kept, no native abort, and the claim released so that the resubmission runs."""
    data_root, ckpt = demo_assets
    args = [str(CI_SWEEP), f"storage_path={tmp_path}", f"data_root={data_root}", f"checkpoint={ckpt}",
            f"epochs={EPOCHS}"]
    sweep_dir = tmp_path / "ci"
    log = tmp_path / "first.log"
    proc = start_sweep(args, log)
    try:
        deadline = time.time() + 600
        while not (sweep_dir / "plan.json").is_file():  # the claim is taken before plan.json is written
            assert proc.poll() is None, log.read_text() + proc.stderr.read()
            assert time.time() < deadline, log.read_text()
            time.sleep(0.2)
        env = dict(os.environ, OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
        dup = subprocess.run([*SYNQT, "sweep", *args, "--resume"], cwd=REPO, capture_output=True, text=True,
                             timeout=180, env=env)
        assert dup.returncode == 2, dup.stdout + dup.stderr
        assert f"being run by pid {proc.pid} on host {socket.gethostname()} since " in dup.stderr, dup.stderr
        assert "(started by " in dup.stderr and "Traceback" not in dup.stderr
        assert "Ray" not in dup.stdout  # refused before Ray was started (no stage line)
        status = subprocess.run([*SYNQT, "status", str(sweep_dir)], cwd=REPO, capture_output=True, text=True,
                                timeout=300, env=env)
        assert status.returncode == 4, status.stdout + status.stderr  # a reader is never refused: still running

        checkpointed = signal_at_first_checkpoint(proc, sweep_dir, signal.SIGTERM, log)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # a failed assertion above: never leave the sweep running
            proc.kill()
    out = log.read_text()
    assert proc.returncode == 130, out + err
    assert "Aborted" not in err and "Traceback" not in err and "Fatal Python error" not in err, err
    assert "(SIGTERM received)" in err, err
    assert f"interrupted: resume with: synqt sweep {shlex.join(args)} --resume" in err, err
    kept_checkpoints(sweep_dir, checkpointed)
    assert not (sweep_dir / "owner.json").exists()
