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
import torch
from ray_helpers import ray_job_submit
from slurm_harness import NetNode, SlurmCluster, multinode_cluster, node_command

pytestmark = [pytest.mark.slow, pytest.mark.multinode]

REPO = Path(__file__).resolve().parents[1]
VTAB_SH = REPO / "slurm" / "vtab.sh"
CI_SWEEP = REPO / "configs" / "sweeps" / "ci.yaml"
NODES = {"sqn1", "sqn2", "sqn3"}
SWEEP_TIMEOUT = 1200
# every node gives Ray one CPU, so three concurrent trials must spread over the three nodes
SBATCH = ["--nodes=3", "--cpus-per-task=1", "--mem=1500"]
# 6 epochs, not ci.yaml's 2: the requeue and lost-node tests stop a run that has epochs left after its
# checkpoint; a 2-epoch run on a fast machine finished its last epoch while the stop was on its way
EPOCHS = 6
SWEEP_ARGS = ["max_concurrent=3", f"epochs={EPOCHS}"]


@pytest.fixture(scope="module")
def cluster() -> SlurmCluster:
    with multinode_cluster(3, cpus=1) as c:
        yield c


@pytest.fixture(scope="module")
def ci_assets() -> list[str]:
    from synqt.tools.pretrain import ensure_demo_assets

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
    keep = ("status", "accuracy", "std", "seeds", "hparams", "best_of_test", "val_acc", "trainable_params", "n_runs",
            "selection", "n_failed", "failed_runs", "n_points", "error")
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

    Returns ``comm: command line`` of the processes that ran there when the kill began. All of them, also those
    gone before their own SIGKILL: Ray's children die with `ray start` (CI once saw the raylet exit between
    the listing and its kill, and only `ray start` was reported killed).
    """
    present = []
    for pid in node.pids():
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if comm not in ("slurmd", "slurmstepd", "nsenter", "unshare"):
            present.append((pid, f"{comm}: {cmd}"))
    for pid, _ in present:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return [cmd for _, cmd in present]


def has_raylet(node: NetNode) -> bool:
    """Whether a raylet process runs in the node's namespace (by its process name: a Ray worker's command line
    names the raylet's socket too)."""
    for pid in node.pids():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                return True
        except OSError:
            continue
    return False


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
        time.sleep(0.5)


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


def running_checkpointed(sweep_dir: Path, hosts: set[str], left: int = 3) -> dict[str, str]:
    """run name -> host, for runs on ``hosts`` that saved an epoch checkpoint, have not finished and have at
    least ``left`` epochs to go (so a stop sent now finds them training)."""
    out = {}
    for p in (sweep_dir / "runs").glob("*/progress.json"):
        run = p.parent
        try:
            progress = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        host = progress.get("host")
        if (host in hosts and progress["epoch"] <= progress["epochs"] - left and (run / "resume.pt").is_file()
                and not (run / "metrics.json").exists()):
            out[run.name] = host
    return out


def checkpoint_epoch(run: Path) -> int:
    """The epoch a run's resume.pt holds."""
    return torch.load(run / "resume.pt", weights_only=True)["epochs_done"]


def snapshot(sweep_dir: Path) -> dict[str, tuple[int, str]]:
    """run name -> (mtime_ns, text) of every ok metrics.json: what 'not rerun' is checked against."""
    return single._metrics_files(sweep_dir)


def test_worker_node_lost_mid_sweep(cluster: SlurmCluster, ci_assets: list[str], tmp_path: Path) -> None:
    """SIGKILL one worker node's Ray: its trial resumes on another node from its epoch checkpoint."""
    storage = tmp_path / "store"
    sweep_dir = storage / "ci"
    # 6 packs on 3 one-CPU nodes: a second round runs on every node after the first round finished
    r = single._sbatch(cluster, *SBATCH, str(VTAB_SH), str(CI_SWEEP), f"storage_path={storage}", *ci_assets,
                       *SWEEP_ARGS, "seeds=[42,44,46]", cwd=tmp_path, env=job_env(cluster))
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    workers = {n.name: n for n in cluster.nodes[1:]}  # sqn1 is the head (it runs the driver)

    def checkpointed_on_a_live_worker() -> dict[str, str]:
        # the victim's node must show its raylet: a run's progress.json can name a worker whose Ray is still
        # coming up or being restarted (CI once killed a node holding only `ray start`, and nothing was lost)
        running = running_checkpointed(sweep_dir, set(workers))
        return {r: h for r, h in running.items() if has_raylet(workers[h])}

    victim = wait_for(lambda: snapshot(sweep_dir) and checkpointed_on_a_live_worker(),
                      "a finished run and a checkpointed run on a worker node with its raylet", (cluster, job),
                      tmp_path)
    run_name, host = sorted(victim.items())[0]
    done_before = snapshot(sweep_dir)
    killed = kill_ray_on(workers[host])
    assert any(c.startswith("raylet: ") for c in killed), killed
    wait_for(lambda: not has_raylet(workers[host]), "the victim's raylet gone", None, tmp_path, 60)
    kept = checkpoint_epoch(sweep_dir / "runs" / run_name)  # read before another node resumes the run

    state = cluster.wait_job(job, timeout=SWEEP_TIMEOUT)
    logs = single._job_logs(tmp_path)
    assert state == "COMPLETED", f"{state}\n{logs}\n{cluster.logs()}"
    single._check_results(sweep_dir, logs)
    metrics = run_metrics(sweep_dir)
    plan = json.loads((sweep_dir / "plan.json").read_text())
    assert sorted(metrics) == sorted(t["run_name"] for t in plan["trials"])  # nothing lost
    # the interrupted run finished elsewhere, continuing from its epoch checkpoint
    moved = metrics[run_name]["provenance"]
    assert moved["host"] != host and moved["host"] in NODES, moved
    assert moved["resumed_after_epoch"] == kept >= 1, (kept, moved)
    # nothing finished was rerun (same bytes, same mtime)
    after = snapshot(sweep_dir)
    for name, before in done_before.items():
        assert after[name] == before, f"{name} was rerun"
    assert leftovers(cluster) == []


def test_usr1_checkpoints_requeues_and_resumes(cluster: SlurmCluster, ci_assets: list[str], reference: dict,
                                               tmp_path: Path) -> None:
    """``scancel --batch --signal=USR1``: stop, requeue, resume; the same table as the uninterrupted run."""
    assert reference["rc"] == 0, "the uninterrupted reference sweep failed (see the first test)"
    storage = tmp_path / "store"
    sweep_dir = storage / "ci"
    r = single._sbatch(cluster, *SBATCH, str(VTAB_SH), str(CI_SWEEP), f"storage_path={storage}", *ci_assets,
                       *SWEEP_ARGS, cwd=tmp_path, env=job_env(cluster))
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    checkpointed = wait_for(lambda: snapshot(sweep_dir) and running_checkpointed(sweep_dir, NODES),
                            "a finished run and a checkpointed running one", (cluster, job), tmp_path)
    done_before = snapshot(sweep_dir)
    cluster.run("scancel", "--batch", "--signal=USR1", job)

    wait_for(lambda: int(job_field(cluster, job, "Restarts") or 0) >= 1, "the requeue", None, tmp_path, 300)
    requeued_ns = time.time_ns()
    state = cluster.wait_job(job, timeout=SWEEP_TIMEOUT)
    logs = single._job_logs(tmp_path)
    assert state == "COMPLETED", f"{state}\n{logs}\n{cluster.logs()}"
    assert job_field(cluster, job, "Restarts") == "1"
    full = "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("*.err")))
    for expected in ("time limit warning (USR1)", "interrupted: resume with: synqt sweep", f"requeueing job {job}",
                     "already holds this sweep: resuming"):
        assert expected in full, f"{expected!r} missing\n{logs}"
    single._check_results(sweep_dir, logs)
    assert table(sweep_dir) == table(reference["sweep_dir"])
    metrics, ref = run_metrics(sweep_dir), run_metrics(reference["sweep_dir"])
    assert sorted(metrics) == sorted(ref)
    for name, m in metrics.items():  # every run: the uninterrupted run's accuracies, epoch by epoch
        assert m["eval_history"] == ref[name]["eval_history"], name
    after = snapshot(sweep_dir)
    for name, before in done_before.items():
        assert after[name] == before, f"{name} was rerun after the requeue"
    # runs that were still training when the job stopped continued from their epoch checkpoint (one
    # checkpointed at the signal may have finished during the stop: then it is among the untouched ones)
    resumed = [n for n, m in metrics.items() if (m["provenance"]["resumed_after_epoch"] or 0) >= 1]
    assert resumed and not set(resumed) & set(done_before), {n: m["provenance"] for n, m in metrics.items()}
    assert set(checkpointed) <= set(resumed) | {n for n in metrics if after[n][0] < requeued_ns}
    assert leftovers(cluster) == []


def test_ray_start_in_namespaces_and_job_submit(cluster: SlurmCluster, ci_assets: list[str], tmp_path: Path) -> None:
    """The same nodes without SLURM: ``ray start`` in each namespace, ``ray job submit`` from outside."""
    head, *workers = cluster.nodes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    gcs, dash = f"{head.addr}:6379", f"http://{head.addr}:8265"
    common = ["--num-cpus=1", "--object-store-memory=200000000", f"--temp-dir={cluster.local_dir}/ray",
              "--disable-usage-stats", "--block"]
    ray_bin = str(Path(sys.executable).with_name("ray"))
    procs = [subprocess.Popen(node_command(cluster, head, [
        ray_bin, "start", "--head", f"--node-ip-address={head.addr}", "--port=6379",
        f"--dashboard-host={head.addr}", "--dashboard-port=8265", *common]),
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT)]
    try:
        waiter = ("import ray,sys,time\nray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
                  "t=time.time()+240\nwhile sum(n['Alive'] for n in ray.nodes())<3 and time.time()<t: time.sleep(1)\n"
                  "print('ALIVE', sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']))\n")
        up = subprocess.run([sys.executable, "-c", "import socket,sys,time\nfor _ in range(240):\n"
                             " try: socket.create_connection((sys.argv[1], 6379), 1); break\n"
                             " except OSError: time.sleep(1)\n", head.addr], timeout=300)
        assert up.returncode == 0
        for w in workers:
            procs.append(subprocess.Popen(node_command(cluster, w, [ray_bin, "start", f"--address={gcs}",
                                                                    f"--node-ip-address={w.addr}", *common]),
                                          env=env, stdout=open(tmp_path / f"{w.name}.log", "w"),
                                          stderr=subprocess.STDOUT))
        # a driver needs a raylet of its own: wait from the head node, as vtab.sh does
        alive = subprocess.run(node_command(cluster, head, [sys.executable, "-c", waiter, gcs]), env=env,
                               capture_output=True, text=True, timeout=300)
        assert f"ALIVE {sorted(n.addr for n in cluster.nodes)}" in alive.stdout, alive.stdout + alive.stderr

        storage = tmp_path / "store"
        submit = ray_job_submit(
            [ray_bin, "job", "submit", "--address", dash, "--", "synqt", "sweep", str(CI_SWEEP),
             f"storage_path={storage}", *ci_assets, *SWEEP_ARGS],
            env, timeout=SWEEP_TIMEOUT)
        assert submit.returncode == 0, submit.stdout[-5000:] + submit.stderr[-3000:]
        assert "succeeded" in (submit.stdout + submit.stderr).lower()  # "Job 'raysubmit_...' succeeded"
        single._check_results(storage / "ci", submit.stdout[-3000:])
        hosts = {m["provenance"]["host"] for m in run_metrics(storage / "ci").values()}
        assert hosts == NODES
    finally:
        for p in procs:
            p.terminate()
        for n in cluster.nodes:
            kill_ray_on(n)
        for p in procs:
            p.wait(timeout=60)
