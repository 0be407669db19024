"""slurm/vtab.sh and Ray across three nodes: a real multi-node SLURM cluster on this machine.

``tests/slurm_harness.multinode_cluster`` starts slurmctld and three slurmds, each in a network
namespace of its own with its own hostname (sqn1..sqn3) and address on a private bridge; the file
system is shared, as on a cluster. The tests submit the CI sweep (configs/sweeps/ci.yaml) with
``sbatch --nodes=3`` and check where its trials ran (``metrics.json`` provenance.host), what a lost
worker node and a USR1 time-limit warning do to it, and run the same sweep on a Ray cluster started
by hand in the namespaces (``ray start`` + ``ray job submit``, no SLURM).
Needs root (``ip netns``); CI runs these as part of ``python -m pytest``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_slurm as single  # the single-node tests' sbatch/log/results helpers
from slurm_harness import NetNode, SlurmCluster, multinode_cluster, node_command

pytestmark = [pytest.mark.slow, pytest.mark.multinode]

REPO = Path(__file__).resolve().parents[1]
VTAB_SH = REPO / "slurm" / "vtab.sh"
CI_SWEEP = REPO / "configs" / "sweeps" / "ci.yaml"
NODES = {"sqn1", "sqn2", "sqn3"}
SWEEP_TIMEOUT = 1200
# every node gives Ray one CPU, so three concurrent trials must spread over the three nodes
SBATCH = ["--nodes=3", "--cpus-per-task=1", "--mem=1500"]
SWEEP_ARGS = ["max_concurrent=3"]


@pytest.fixture(scope="module")
def cluster() -> SlurmCluster:
    with multinode_cluster(3, cpus=1) as c:
        yield c


@pytest.fixture(scope="module")
def ci_assets() -> list[str]:
    from synqt.pretrain import ensure_demo_assets

    data_root, ckpt = ensure_demo_assets()
    return [f"data_root={Path(data_root).absolute()}", f"checkpoint={Path(ckpt).absolute()}"]


def job_env(cluster: SlurmCluster) -> dict[str, str]:
    """The submitter's environment: SLURM_CONF, node-local Ray dir, one thread per trial."""
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_")}
    return env | {"SYNQT_RAY_TMP": str(cluster.local_dir), "SYNQT_JOIN_TIMEOUT": "300",
                  "OMP_NUM_THREADS": "1", "SYNQT_STOP_GRACE": "120"}


def run_metrics(sweep_dir: Path) -> dict[str, dict]:
    """run name -> parsed metrics.json, for every run that finished ok."""
    out = {}
    for p in sorted((sweep_dir / "runs").glob("*/metrics.json")):
        m = json.loads(p.read_text())
        if m.get("status") == "ok":
            out[p.parent.name] = m
    return out


def table(sweep_dir: Path) -> dict[str, dict]:
    """Per dataset: the aggregate's status and numbers (no timings, which differ run to run)."""
    results = json.loads((sweep_dir / "results.json").read_text())
    keep = ("status", "mean", "std", "n", "values", "test_acc", "val_acc", "seeds", "hparams")
    return {d: {k: v for k, v in e.items() if k in keep} for d, e in results["datasets"].items()}


def job_state(cluster: SlurmCluster, job_id: str) -> str:
    return cluster.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip()


def job_field(cluster: SlurmCluster, job_id: str, key: str) -> str:
    out = cluster.run("scontrol", "show", "job", job_id, check=False).stdout
    for tok in out.split():
        if tok.startswith(f"{key}="):
            return tok.split("=", 1)[1]
    return ""


def kill_ray_on(node: NetNode) -> list[str]:
    """SIGKILL every process in the node's namespace except the SLURM daemons: its Ray is gone.

    Returns the killed processes' command lines.
    """
    killed = []
    for pid in node.pids():
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if comm in ("slurmd", "slurmstepd", "nsenter", "unshare"):
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(cmd)
        except ProcessLookupError:
            pass
    return killed


def leftovers(cluster: SlurmCluster) -> list[str]:
    """Command lines of processes other than the SLURM daemons still running on any node."""
    out = []
    for n in cluster.nodes:
        for pid in n.pids():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if comm not in ("slurmd", "nsenter", "unshare"):
                out.append(f"{n.name}: {cmd}")
    return out


def wait_for(cond, what: str, job: tuple[SlurmCluster, str] | None, logs_dir: Path, timeout: float = SWEEP_TIMEOUT):
    """Poll ``cond()`` until truthy (returned); fail naming ``what`` if the job left the queue first."""
    deadline = time.time() + timeout
    while True:
        got = cond()
        if got:
            return got
        if job is not None and not job_state(*job):
            pytest.fail(f"job {job[1]} ended before {what}\n{single._job_logs(logs_dir)}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{single._job_logs(logs_dir)}")
        time.sleep(1)


@pytest.fixture(scope="module")
def reference(cluster: SlurmCluster, ci_assets: list[str], tmp_path_factory) -> dict:
    """One uninterrupted ``sbatch --nodes=3 slurm/vtab.sh configs/sweeps/ci.yaml`` (used by two tests)."""
    work = tmp_path_factory.mktemp("mn-reference")
    storage = work / "store"
    t0 = time.time()
    r = single._sbatch(cluster, *SBATCH, str(VTAB_SH), str(CI_SWEEP), f"storage_path={storage}", *ci_assets,
                       *SWEEP_ARGS, cwd=work, env=job_env(cluster), wait=True, timeout=SWEEP_TIMEOUT)
    return {"rc": r.returncode, "stderr": r.stderr, "job": r.stdout.strip(), "work": work,
            "sweep_dir": storage / "ci", "seconds": time.time() - t0}


# ---------------------------------------------------------------------------------------------


def test_nodes_are_separate_hosts(cluster: SlurmCluster, tmp_path: Path) -> None:
    """srun on 3 nodes: three hostnames, three addresses on the bridge, each node's own scratch folder."""
    script = (f'echo "$(hostname) $(hostname -I) $(getent ahostsv4 sqn2 | head -1 | cut -d" " -f1)"; '
              f'echo $(hostname) > {cluster.local_dir}/whoami; cat {cluster.local_dir}/whoami >&2')
    r = cluster.run("srun", "--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "bash", "-c", script,
                    cwd=tmp_path, timeout=60)
    lines = sorted(r.stdout.split("\n"))[-3:]
    seen = {line.split()[0]: line.split()[1:] for line in lines}
    assert set(seen) == NODES, r.stdout
    for n in cluster.nodes:
        assert seen[n.name][0] == n.addr  # the node's only address is its namespace's
        assert seen[n.name][1] == cluster.nodes[1].addr  # names resolve through the nodes' /etc/hosts
        # same path, a different folder per node
        assert (cluster.root / "nodes" / n.name / "whoami").read_text().strip() == n.name
    assert sorted(r.stderr.split()) == sorted(NODES)


def test_three_node_sweep_spreads_over_nodes(cluster: SlurmCluster, reference: dict) -> None:
    logs = single._job_logs(reference["work"])
    assert reference["rc"] == 0, reference["stderr"] + logs + cluster.logs()
    assert "3/3 node(s) up" in logs, logs
    single._check_results(reference["sweep_dir"], logs)
    metrics = run_metrics(reference["sweep_dir"])
    plan = json.loads((reference["sweep_dir"] / "plan.json").read_text())
    assert sorted(metrics) == sorted(t["run_name"] for t in plan["trials"])
    hosts = {m["provenance"]["host"] for m in metrics.values()}
    assert hosts == NODES, {k: m["provenance"]["host"] for k, m in metrics.items()}
    assert all(m["provenance"]["resumed_after_epoch"] is None for m in metrics.values())
    assert leftovers(cluster) == []
    print(f"three-node CI sweep: {reference['seconds']:.0f} s")
