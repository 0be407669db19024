"""A throw-away single-node SLURM cluster (munged + slurmctld + slurmd) for the integration tests.

There is no init system in CI, so the daemons are started by hand from a temp dir and stopped by
PID at the end. Everything (config, state, spool, logs, munge socket) lives under that temp dir,
so the harness never touches a system SLURM or munge that may be running on the machine.
Commands run against it need ``SLURM_CONF`` pointing at the generated slurm.conf:
``cluster.env`` is an environment with that set.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scontrol", "srun")
MUNGE_KEY = Path("/etc/munge/munge.key")


class SlurmHarnessError(RuntimeError):
    """The throw-away cluster did not come up; the message carries the daemon logs."""


def missing_binaries() -> list[str]:
    """SLURM/munge programs not on PATH (the only reason the tests may skip)."""
    extra = ["/usr/sbin", "/sbin"]
    path = os.pathsep.join([os.environ.get("PATH", ""), *extra])
    return [b for b in REQUIRED_BINARIES if shutil.which(b, path=path) is None]


def _which(name: str) -> str:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = shutil.which(name, path=path)
    if found is None:
        raise SlurmHarnessError(f"{name} not found on PATH or /usr/sbin")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _real_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 512
    return 1024


@dataclass
class SlurmCluster:
    """Handles of a running throw-away cluster."""

    root: Path
    conf: Path
    node: str
    cpus: int
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF (what every sbatch/squeue call of a test needs)."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster, capturing text output."""
        return subprocess.run(list(args), env=kw.pop("env", self.env), capture_output=True, text=True,
                              check=check, timeout=timeout, **kw)

    def logs(self) -> str:
        """All daemon logs, for failure messages."""
        parts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            p = self.root / "log" / name
            text = p.read_text(errors="replace") if p.exists() else "(missing)"
            parts.append(f"===== {name} =====\n{text[-6000:]}")
        return "\n".join(parts)

    def sinfo_state(self) -> str:
        r = self.run("sinfo", "-h", "-N", "-o", "%t", check=False, timeout=15)
        return r.stdout.strip()

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmHarnessError(f"{name} exited with {proc.returncode}\n{self.logs()}")
            state = self.sinfo_state()
            if state == "idle":
                return
            if state in ("down", "down*", "drain", "drain*"):
                self.run("scontrol", "update", f"NodeName={self.node}", "State=RESUME", check=False)
            time.sleep(0.5)
        raise SlurmHarnessError(
            f"node {self.node} not idle after {timeout}s (sinfo: {state!r})\n{self.logs()}")

    def wait_job(self, job_id: str, timeout: float = 600) -> str:
        """Wait until a job (or every task of an array) has left the queue; return its final state."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False, timeout=15)
            if r.returncode == 0 and not r.stdout.strip():
                break
            time.sleep(1)
        else:
            raise SlurmHarnessError(f"job {job_id} still queued after {timeout}s")
        r = self.run("scontrol", "show", "job", job_id, check=False, timeout=15)
        for tok in r.stdout.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return "UNKNOWN"

    def stop(self) -> None:
        """Stop slurmd, slurmctld and munged by PID (reverse start order)."""
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def write_config(root: Path, node: str, cpus: int) -> Path:
    """Write slurm.conf + cgroup.conf for one node with no cgroup plugins (containers lack them)."""
    for sub in ("state", "spool", "log", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=synqtci
SlurmctldHost={node}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root / 'munge' / 'munge.socket'}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}
SlurmdPidFile={root / 'run' / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=600
KillWait=10
InactiveLimit=0
Waittime=0
JobRequeue=1
NodeName={node} CPUs={cpus} RealMemory={_real_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
    (root / "cgroup.conf").write_text("CgroupAutomount=no\nConstrainCores=no\nConstrainRAMSpace=no\n")
    return conf


def _start_munged(root: Path, logf) -> subprocess.Popen:
    mdir = root / "munge"
    mdir.mkdir(mode=0o755, exist_ok=True)
    os.chmod(mdir, 0o755)
    key = mdir / "munge.key"
    if MUNGE_KEY.exists():
        shutil.copyfile(MUNGE_KEY, key)
    else:  # no packaged key: make one (munged only needs it to be secret)
        key.write_bytes(os.urandom(128))
    os.chmod(key, 0o600)
    return subprocess.Popen(
        [_which("munged"), "-F", "-f", f"--socket={mdir / 'munge.socket'}", f"--key-file={key}",
         f"--pid-file={mdir / 'munged.pid'}", f"--seed-file={mdir / 'munged.seed'}",
         f"--log-file={root / 'log' / 'munged.log'}"],
        stdout=logf, stderr=subprocess.STDOUT,
    )


def _wait_file(path: Path, proc: subprocess.Popen, timeout: float, cluster: SlurmCluster) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            raise SlurmHarnessError(f"{proc.args[0]} exited with {proc.returncode}\n{cluster.logs()}")
        time.sleep(0.2)
    raise SlurmHarnessError(f"{path} did not appear in {timeout}s\n{cluster.logs()}")


@contextlib.contextmanager
def slurm_cluster(root: str | Path | None = None, cpus: int | None = None) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd for one node; yield the handle; stop them by PID."""
    missing = missing_binaries()
    if missing:
        raise SlurmHarnessError(f"SLURM binaries missing: {', '.join(missing)} (run .ci/slurm_setup.sh)")
    owned = root is None
    root = Path(tempfile.mkdtemp(prefix="synqt-slurm-")) if root is None else Path(root)
    os.chmod(root, 0o755)  # the second-user test's jobs must reach the config
    node = socket.gethostname().split(".")[0]
    cpus = cpus or min(os.cpu_count() or 2, 2)
    conf = write_config(root, node, cpus)
    cluster = SlurmCluster(root=root, conf=conf, node=node, cpus=cpus)
    env = cluster.env
    logf = open(root / "log" / "daemons.out", "ab")
    try:
        cluster.procs["munged"] = _start_munged(root, logf)
        _wait_file(root / "munge" / "munge.socket", cluster.procs["munged"], 20, cluster)
        cluster.procs["slurmctld"] = subprocess.Popen(
            [_which("slurmctld"), "-D", "-c", "-i", "-f", str(conf)],
            env=env, stdout=logf, stderr=subprocess.STDOUT)
        _wait_file(root / "run" / "slurmctld.pid", cluster.procs["slurmctld"], 30, cluster)
        cluster.procs["slurmd"] = subprocess.Popen(
            [_which("slurmd"), "-D", "-f", str(conf), "-N", node],
            env=env, stdout=logf, stderr=subprocess.STDOUT)
        cluster.wait_idle(timeout=60)
        yield cluster
    finally:
        cluster.stop()
        logf.close()
        if owned and os.environ.get("SYNQT_KEEP_SLURM", "0") in ("", "0"):
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # manual smoke test: python tests/slurm_harness.py
    with slurm_cluster() as c:
        print(c.run("sinfo").stdout)
        print(c.run("srun", "-N1", "hostname").stdout)
