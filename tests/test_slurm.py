"""slurm/vtab.sh and slurm/vtab_array.sh against real SLURM daemons (tests/slurm_harness.py).

Each test submits real jobs to a throw-away single-node cluster; the sweep tests run the CI
sweep (configs/sweeps/ci.yaml) end to end and check the aggregate it leaves.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_harness import SlurmCluster, missing_binaries, slurm_cluster

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VTAB_SH = REPO / "slurm" / "vtab.sh"
CI_SWEEP = REPO / "configs" / "sweeps" / "ci.yaml"
FAKE_SYNQT = f"{sys.executable} {REPO / 'tests' / 'slurm_fake_synqt.py'}"
SWEEP_TIMEOUT = 900


@pytest.fixture(scope="session")
def slurm() -> SlurmCluster:
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM not installed (missing {', '.join(missing)}); .ci/slurm_setup.sh installs it")
    with slurm_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def ci_assets() -> list[str]:
    """data_root/checkpoint overrides for the cached synthetic benchmark + pre-trained tiny ViT."""
    from synqt.tools.pretrain import ensure_demo_assets

    data_root, ckpt = ensure_demo_assets()
    return [f"data_root={Path(data_root).absolute()}", f"checkpoint={Path(ckpt).absolute()}"]


def _sbatch(slurm: SlurmCluster, *args: str, cwd: Path, env: dict | None = None, wait: bool = False,
            timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *args]
    return subprocess.run(cmd, cwd=cwd, env=env or slurm.env, capture_output=True, text=True, timeout=timeout)


def _job_logs(directory: Path) -> str:
    return "\n".join(f"===== {p.name} =====\n{p.read_text(errors='replace')[-5000:]}"
                     for p in sorted(directory.glob("*.out")) + sorted(directory.glob("*.err")))


def _check_results(sweep_dir: Path, context: str) -> dict:
    results_file = sweep_dir / "results.json"
    assert results_file.is_file(), f"no {results_file}\n{context}"
    results = json.loads(results_file.read_text())
    datasets = results["datasets"]
    assert set(datasets) == {"syn_colour_shape", "syn_count"}, datasets.keys()
    for name, entry in datasets.items():
        assert entry["status"] == "ok", f"{name}: {entry}\n{context}"
    return results


def _metrics_files(sweep_dir: Path) -> dict[str, tuple[float, str]]:
    out = {}
    for p in sorted((sweep_dir / "runs").glob("*/metrics.json")):
        text = p.read_text()
        if json.loads(text).get("status") == "ok":
            out[p.parent.name] = (p.stat().st_mtime_ns, text)
    return out


def _no_ray_left(job_id: str) -> list[str]:
    """Command lines of processes still naming the job's private Ray dir."""
    r = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True)
    return [line for line in r.stdout.splitlines() if f"/tmp/ray-{job_id}/" in line]


# ---------------------------------------------------------------------------------------------


def test_harness_runs_a_batch_job(slurm: SlurmCluster, tmp_path: Path) -> None:
    r = _sbatch(slurm, "--output=hello-%j.out", "--wrap", "echo hello from $SLURM_JOB_ID > hello.txt; srun hostname",
                cwd=tmp_path, wait=True)
    assert r.returncode == 0, r.stderr + _job_logs(tmp_path) + slurm.logs()
    job_id = r.stdout.strip()
    assert (tmp_path / "hello.txt").read_text().strip() == f"hello from {job_id}"
    assert slurm.node in (tmp_path / f"hello-{job_id}.out").read_text()


def test_vtab_sh_ray_cluster_is_token_protected(slurm: SlurmCluster, tmp_path: Path) -> None:
    """Ray started by vtab.sh: right token connects, wrong token is refused, token is private."""
    env = slurm.env | {"SYNQT_BIN": FAKE_SYNQT, "SYNQT_JOIN_TIMEOUT": "120"}
    storage = tmp_path / "store"
    (tmp_path / "sweep.yaml").write_text("name: fake\n")
    r = _sbatch(slurm, "--cpus-per-task=2", str(VTAB_SH), "sweep.yaml", f"storage_path={storage}",
                cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    seen_file = storage / "fake" / "seen.json"
    try:
        deadline = time.time() + 180
        while not seen_file.exists():
            assert time.time() < deadline, f"Ray never came up\n{_job_logs(tmp_path)}"
            state = slurm.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip()
            assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job_id} {state}\n{_job_logs(tmp_path)}"
            time.sleep(1)
        seen = json.loads(seen_file.read_text())
        assert seen["auth_mode"] == "token"
        # SLURM's CPU count, not the node's
        assert seen["resources"]["CPU"] == 2.0
        host, port = seen["address"].rsplit(":", 1)
        token_file = Path(seen["token_path"])
        job_dir = token_file.parent
        assert job_dir == Path(f"/tmp/ray-{job_id}")
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(job_dir.stat().st_mode) == 0o700

        probe = ("import ray,sys\n"
                 "try:\n  ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
                 "except Exception as e:\n  print('REFUSED', type(e).__name__); sys.exit(3)\n"
                 "print('CONNECTED', ray.cluster_resources().get('CPU'))\n")
        bad = tmp_path / "bad_token"
        bad.write_text("0" * 64)
        bad.chmod(0o600)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        wrong = subprocess.run([sys.executable, "-c", probe, seen["address"]], capture_output=True, text=True,
                               timeout=120, env=base_env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(bad)})
        assert wrong.returncode == 3 and "REFUSED" in wrong.stdout, wrong.stdout + wrong.stderr
        no_auth = subprocess.run([sys.executable, "-c", probe, seen["address"]], capture_output=True,
                                 text=True, timeout=120, env=base_env | {"RAY_AUTH_MODE": "disabled"})
        assert no_auth.returncode == 3, no_auth.stdout + no_auth.stderr
        right = subprocess.run([sys.executable, "-c", probe, seen["address"]], capture_output=True, text=True,
                               timeout=120,
                               env=base_env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)})
        assert right.returncode == 0 and "CONNECTED 2.0" in right.stdout, right.stdout + right.stderr

        # the job server (dashboard) listens on the node's address only and wants the token
        import urllib.error
        import urllib.request

        dash = f"http://{host}:{int(port) + 1}/api/jobs/"
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(urllib.request.Request(dash, headers={"Authorization": "Bearer " + "0" * 64}),
                                   timeout=10)
        assert denied.value.code in (401, 403)
        good = urllib.request.Request(dash, headers={"Authorization": "Bearer " + token_file.read_text()})
        with urllib.request.urlopen(good, timeout=10) as resp:
            assert resp.status == 200
        if not host.startswith("127."):
            with pytest.raises(urllib.error.URLError):
                urllib.request.urlopen(f"http://127.0.0.1:{int(port) + 1}/api/jobs/", timeout=5)

        # a second Unix user can neither read the token nor enter the private dir
        user = "synqtprobe"
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", user], check=True)
        as_other = subprocess.run(["su", "-s", "/bin/sh", user, "-c", f"cat {token_file}; ls {job_dir}"],
                                  capture_output=True, text=True, timeout=30)
        assert as_other.returncode != 0
        assert token_file.read_text() not in as_other.stdout
        assert "Permission denied" in as_other.stderr, as_other.stderr
    finally:
        seen_file.parent.mkdir(parents=True, exist_ok=True)
        (seen_file.parent / "release").write_text("")
    state = slurm.wait_job(job_id, timeout=120)
    assert state == "COMPLETED", f"{state}\n{_job_logs(tmp_path)}"
    assert (storage / "fake" / "released").exists()
    assert not Path(f"/tmp/ray-{job_id}").exists(), "the per-job dir (token) outlived the job"
    assert _no_ray_left(job_id) == []


def test_vtab_sh_runs_ci_sweep(slurm: SlurmCluster, ci_assets: list[str], tmp_path: Path) -> None:
    storage = tmp_path / "store"
    r = _sbatch(slurm, "--cpus-per-task=2", str(VTAB_SH), str(CI_SWEEP), f"storage_path={storage}", *ci_assets,
                cwd=tmp_path, wait=True, timeout=SWEEP_TIMEOUT)
    logs = _job_logs(tmp_path)
    assert r.returncode == 0, r.stderr + logs
    _check_results(storage / "ci", logs)
    assert _no_ray_left(r.stdout.strip()) == []


def test_vtab_array_runs_ci_sweep(slurm: SlurmCluster, ci_assets: list[str], tmp_path: Path) -> None:
    storage = tmp_path / "store"
    cmd = [sys.executable, "-m", "launcher.cli", "slurm", "array", str(CI_SWEEP), f"storage_path={storage}",
           *ci_assets, "--concurrency", "2", "--sbatch-args=--cpus-per-task=1 --time=00:20:00"]
    r = subprocess.run(cmd, cwd=tmp_path, env=slurm.env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    ids = re.findall(r"submitted (?:array|aggregate) job (\d+)", r.stdout)
    assert len(ids) == 2, r.stdout
    array_id, agg_id = ids
    info = slurm.run("scontrol", "show", "job", agg_id).stdout
    assert f"afterany:{array_id}" in info, info
    state = slurm.wait_job(agg_id, timeout=SWEEP_TIMEOUT)
    logs = _job_logs(tmp_path)
    assert state == "COMPLETED", f"{state}\n{logs}"
    results = _check_results(storage / "ci", logs)
    # one run dir per planned trial, each finished by its own array task
    plan = json.loads((storage / "ci" / "plan.json").read_text())
    assert len(_metrics_files(storage / "ci")) == len(plan["trials"])
    assert results["datasets"]


def test_cancelled_sweep_resumes_without_rerunning(slurm: SlurmCluster, ci_assets: list[str],
                                                     tmp_path: Path) -> None:
    storage = tmp_path / "store"
    sweep_dir = storage / "ci"
    args = ["--cpus-per-task=2", str(VTAB_SH), str(CI_SWEEP), f"storage_path={storage}", *ci_assets,
            "max_concurrent=1"]
    r = _sbatch(slurm, *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    deadline = time.time() + SWEEP_TIMEOUT
    while not _metrics_files(sweep_dir):
        state = slurm.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip()
        assert state, f"job {job_id} ended before any trial finished\n{_job_logs(tmp_path)}"
        assert time.time() < deadline, _job_logs(tmp_path)
        time.sleep(1)
    slurm.run("scancel", job_id)
    state = slurm.wait_job(job_id, timeout=120)
    assert state == "CANCELLED", state
    assert _no_ray_left(job_id) == []
    done = _metrics_files(sweep_dir)
    plan = json.loads((sweep_dir / "plan.json").read_text())
    assert 0 < len(done) < len(plan["trials"]), f"cancel came too late to test resume: {sorted(done)}"

    r = _sbatch(slurm, *args, cwd=tmp_path, wait=True, timeout=SWEEP_TIMEOUT)
    logs = _job_logs(tmp_path)
    assert r.returncode == 0, r.stderr + logs
    assert "already holds this sweep: resuming" in logs
    _check_results(sweep_dir, logs)
    after = _metrics_files(sweep_dir)
    assert len(after) == len(plan["trials"])
    for name, (mtime, text) in done.items():
        assert after[name] == (mtime, text), f"{name} was rerun after the resubmission"
