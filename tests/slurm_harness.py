"""Throw-away SLURM clusters (munged + slurmctld + slurmd) for the integration tests.

``slurm_cluster``: one node, the machine itself. ``multinode_cluster``: N nodes on this one machine,
each a network namespace of its own (``ip netns``) joined to the others by veth pairs on a private
bridge, with its own hostname (a UTS namespace), its own ``/etc/hosts`` naming every node, and its
own node-local scratch folder (a mount namespace): what a Ray cluster spanning real nodes sees, except
that the file system (and the PID space) is the machine's own, as a shared file system would be.
slurmctld runs in a namespace of its own too; clients (sbatch, squeue, ray job submit) run in the
machine's namespace and reach the daemons over the bridge. The addresses (a free 10.213.X.0/24) exist
only on the bridge and in the namespaces, none has a default route: nothing can leave the machine.

There is no init system in CI, so the daemons are started by hand from a temp dir and stopped by
PID at the end. Everything (config, state, spool, logs, munge socket) lives under that temp dir,
so the harness never touches a system SLURM or munge that may be running on the machine.
Commands run against it need ``SLURM_CONF`` pointing at the generated slurm.conf:
``cluster.env`` is an environment with that set.
"""

from __future__ import annotations

import contextlib
import os
import secrets
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
NETNS_BINARIES = ("ip", "nsenter", "unshare", "mount")
MUNGE_KEY = Path("/etc/munge/munge.key")


class SlurmHarnessError(RuntimeError):
    """The throw-away cluster did not come up; the message carries the daemon logs."""


def missing_binaries(multinode: bool = False) -> list[str]:
    """SLURM/munge programs (and, for ``multinode``, ip/unshare/mount) not on PATH."""
    extra = ["/usr/sbin", "/sbin"]
    path = os.pathsep.join([os.environ.get("PATH", ""), *extra])
    wanted = REQUIRED_BINARIES + (NETNS_BINARIES if multinode else ())
    return [b for b in wanted if shutil.which(b, path=path) is None]


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
class NetNode:
    """One node of a multi-node cluster: SLURM node name (= its hostname), address, network namespace."""

    name: str
    addr: str
    netns: str

    def pids(self) -> list[int]:
        """PIDs of every process inside this node's network namespace (``ip netns pids``)."""
        r = subprocess.run([_which("ip"), "netns", "pids", self.netns], capture_output=True, text=True, check=False)
        return [int(p) for p in r.stdout.split()]


@dataclass
class SlurmCluster:
    """Handles of a running throw-away cluster."""

    root: Path
    conf: Path
    node: str
    cpus: int
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    nodes: list[NetNode] = field(default_factory=list)  # multinode_cluster only; nodes[0] is `node`
    local_dir: Path | None = None  # multinode: the same path, a different folder on each node

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
        names = ["daemons.out", "munged.log", "slurmctld.log"] + (
            [f"slurmd-{n.name}.log" for n in self.nodes] if self.nodes else ["slurmd.log"])
        for name in names:
            p = self.root / "log" / name
            text = p.read_text(errors="replace") if p.exists() else "(missing)"
            parts.append(f"===== {name} =====\n{text[-6000:]}")
        return "\n".join(parts)

    def sinfo_state(self) -> str:
        """sinfo's state of each node, one line per node (``idle`` when a node is ready)."""
        r = self.run("sinfo", "-h", "-N", "-o", "%t", check=False, timeout=15)
        return r.stdout.strip()

    def wait_idle(self, timeout: float = 60) -> None:
        """Wait until every node is idle, resuming nodes SLURM marked down while they came up."""
        names = [n.name for n in self.nodes] or [self.node]
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmHarnessError(f"{name} exited with {proc.returncode}\n{self.logs()}")
            r = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=15)
            state = r.stdout.strip()
            states = dict(line.split() for line in state.splitlines() if len(line.split()) == 2)
            if sorted(states) == sorted(names) and all(v == "idle" for v in states.values()):
                return
            for name, st in states.items():
                if st.rstrip("*") in ("down", "drain"):
                    self.run("scontrol", "update", f"NodeName={name}", "State=RESUME", check=False)
            time.sleep(0.5)
        raise SlurmHarnessError(
            f"node(s) {', '.join(names)} not idle after {timeout}s (sinfo: {state!r})\n{self.logs()}")

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
        """Stop slurmd(s), slurmctld and munged by PID (reverse start order)."""
        order = [k for k in self.procs if k.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def write_config(root: Path, node: str, cpus: int, nodes: list[NetNode] | None = None,
                 controller: NetNode | None = None) -> Path:
    """Write slurm.conf + cgroup.conf with no cgroup plugins (containers lack them).

    One node named ``node`` (the machine), or ``nodes`` with their addresses and ``controller``
    (multinode: per-node spool, pid and log files, %n being the node name).
    """
    for sub in ("state", "spool", "log", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    if nodes:
        mem = max(_real_memory_mb() // (len(nodes) + 1), 512)
        ctl = f"{controller.name}({controller.addr})"
        node_lines = "\n".join(f"NodeName={n.name} NodeAddr={n.addr} NodeHostname={n.name} CPUs={cpus} "
                               f"RealMemory={mem} State=UNKNOWN" for n in nodes)
        part = ",".join(n.name for n in nodes)
        per_node = "-%n"
        ports = "SlurmctldPort=6817\nSlurmdPort=6818"  # every daemon has a network namespace of its own
        # a requeued job may start again once its old credential expired (default 120 s): the USR1 test waits less
        cred = ",cred_expire=30"
    else:
        ctl = node
        node_lines = f"NodeName={node} CPUs={cpus} RealMemory={_real_memory_mb()} State=UNKNOWN"
        part = node
        per_node = ""
        ports = f"SlurmctldPort={_free_port()}\nSlurmdPort={_free_port()}"
        cred = ""
    conf.write_text(f"""\
ClusterName=synqtci
SlurmctldHost={ctl}
{ports}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root / 'munge' / 'munge.socket'}{cred}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}{per_node}
SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}
SlurmdPidFile={root / 'run' / f'slurmd{per_node}.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / f'slurmd{per_node}.log'}
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
{node_lines}
PartitionName=debug Nodes={part} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
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


# ---------------------------------------------------------------------------------------------
# multi-node: network namespaces on a private bridge

_NODE_WRAPPER = ('hostname "$1" && mount --bind "$2" /etc/hosts && '
                 '{ [ -z "$3" ] || mount --bind "$3" "$4"; } && shift 4 && exec "$@"')


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([_which("ip"), *args], capture_output=True, text=True, check=False)
    if check and r.returncode != 0:
        raise SlurmHarnessError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def _free_subnet() -> str:
    """The first 10.213.X (X in 1..254) no interface address or route of this machine mentions."""
    used = _ip("-4", "-o", "addr").stdout + _ip("-4", "route").stdout
    for x in range(1, 255):
        if f"10.213.{x}." not in used:
            return f"10.213.{x}"
    raise SlurmHarnessError("no free 10.213.X.0/24 subnet for the test bridge")


@dataclass
class _Network:
    """The bridge and namespaces of one multi-node cluster (removed by ``remove``)."""

    bridge: str
    namespaces: list[str] = field(default_factory=list)

    def remove(self) -> None:
        for ns in self.namespaces:
            # processes a job left behind (Ray) inside the namespace: ours, ended by PID
            for pid in NetNode("", "", ns).pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _ip("netns", "del", ns, check=False)  # also deletes the veth pair
        _ip("link", "del", self.bridge, check=False)


def _make_network(names: list[str]) -> tuple[_Network, str, list[NetNode]]:
    """A bridge at <subnet>.1 in this namespace, one namespace + veth per name at <subnet>.(10+i).

    No namespace gets a default route, so only the bridge's /24 is reachable from inside.
    """
    tag = secrets.token_hex(2)
    subnet = _free_subnet()
    net = _Network(bridge=f"sqbr{tag}")
    _ip("link", "add", net.bridge, "type", "bridge")
    try:
        _ip("addr", "add", f"{subnet}.1/24", "dev", net.bridge)
        _ip("link", "set", net.bridge, "up")
        nodes = []
        for i, name in enumerate(names):
            ns = f"sq{tag}-{name}"
            host_end = f"sq{tag}v{i}"
            _ip("netns", "add", ns)
            net.namespaces.append(ns)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", host_end, "master", net.bridge)
            _ip("link", "set", host_end, "up")
            addr = f"{subnet}.{10 + i}"
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            nodes.append(NetNode(name, addr, ns))
    except BaseException:
        net.remove()
        raise
    return net, f"{subnet}.1", nodes


def node_command(cluster: SlurmCluster, node: NetNode, argv: list[str]) -> list[str]:
    """argv run as if on ``node``: its network namespace, hostname, /etc/hosts and node-local folder.

    (The cluster must have been created, with ``node`` in ``cluster.nodes``, or its controller.)
    """
    has_local = cluster.local_dir is not None and (cluster.root / "nodes" / node.name).is_dir()
    local_src = str(cluster.root / "nodes" / node.name) if has_local else ""
    local_dst = str(cluster.local_dir) if has_local else ""
    # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup file system slurmd needs
    return [_which("nsenter"), f"--net=/run/netns/{node.netns}",
            _which("unshare"), "--uts", "--mount", "--propagation", "private",
            "sh", "-c", _NODE_WRAPPER, "sh", node.name, str(cluster.root / "hosts"), local_src, local_dst, *argv]


@contextlib.contextmanager
def multinode_cluster(n_nodes: int = 3, cpus: int = 1,
                      root: str | Path | None = None) -> Iterator[SlurmCluster]:
    """munged, slurmctld (namespace ``sqctl``) and one slurmd per node ``sqn1..sqnN``; yield; tear down.

    ``cluster.nodes`` lists the nodes (name = hostname, address, namespace); ``cluster.local_dir``
    is a path that is a different folder on each node (give it to jobs as their node-local scratch,
    e.g. ``SYNQT_RAY_TMP``). Needs root (``ip netns``); raises ``SlurmHarnessError`` naming the
    command that failed.
    """
    missing = missing_binaries(multinode=True)
    if missing:
        raise SlurmHarnessError(f"missing: {', '.join(missing)} (run .ci/slurm_setup.sh; iproute2, util-linux)")
    if os.geteuid() != 0:
        raise SlurmHarnessError("multinode_cluster needs root (ip netns, mount namespaces)")
    owned = root is None
    # short: Ray's socket paths under the node-local folder must stay below 107 characters
    root = Path(tempfile.mkdtemp(prefix="sqmn-")) if root is None else Path(root)
    os.chmod(root, 0o755)
    names = ["sqctl"] + [f"sqn{i}" for i in range(1, n_nodes + 1)]
    net, bridge_addr, all_nodes = _make_network(names)
    controller, nodes = all_nodes[0], all_nodes[1:]
    (root / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{n.addr} {n.name}\n" for n in all_nodes))
    (root / "local").mkdir()
    for n in nodes:
        (root / f"spool-{n.name}").mkdir()
        (root / "nodes" / n.name).mkdir(parents=True)
        os.chmod(root / "nodes" / n.name, 0o1777)  # like /tmp: every user's jobs write here
    conf = write_config(root, nodes[0].name, cpus, nodes=nodes, controller=controller)
    cluster = SlurmCluster(root=root, conf=conf, node=nodes[0].name, cpus=cpus, nodes=nodes,
                           local_dir=root / "local")
    cluster.bridge_addr = bridge_addr  # type: ignore[attr-defined]
    env = cluster.env
    logf = open(root / "log" / "daemons.out", "ab")
    try:
        cluster.procs["munged"] = _start_munged(root, logf)
        _wait_file(root / "munge" / "munge.socket", cluster.procs["munged"], 20, cluster)
        cluster.procs["slurmctld"] = subprocess.Popen(
            node_command(cluster, controller, [_which("slurmctld"), "-D", "-c", "-i", "-f", str(conf)]),
            env=env, stdout=logf, stderr=subprocess.STDOUT)
        _wait_file(root / "run" / "slurmctld.pid", cluster.procs["slurmctld"], 30, cluster)
        for n in nodes:
            cluster.procs[f"slurmd-{n.name}"] = subprocess.Popen(
                node_command(cluster, n, [_which("slurmd"), "-D", "-f", str(conf), "-N", n.name]),
                env=env, stdout=logf, stderr=subprocess.STDOUT)
        cluster.wait_idle(timeout=90)
        yield cluster
    finally:
        cluster.stop()
        logf.close()
        net.remove()
        if owned and os.environ.get("SYNQT_KEEP_SLURM", "0") in ("", "0"):
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # manual smoke test: python tests/slurm_harness.py [--nodes N]
    import sys

    n = int(sys.argv[sys.argv.index("--nodes") + 1]) if "--nodes" in sys.argv else 1
    with (multinode_cluster(n) if n > 1 else slurm_cluster()) as c:
        print(c.run("sinfo").stdout)
        print(c.run("srun", f"-N{n}", "hostname", "-I").stdout if n > 1 else c.run("srun", "-N1", "hostname").stdout)
