"""Resources the cluster does not have, and Ray hygiene (issue 14 items 3 and 5), on real local Ray clusters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import TASK, tiny_sweep_overrides, write_tiny_assets

from launcher.run.cluster import check_fits, concurrency_cap
from synqt.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
CI = REPO / "configs" / "sweeps" / "ci.yaml"


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SYNQT_NO_PROGRESS": "1", "RAY_AUTH_MODE": "disabled",
           "PYTHONUNBUFFERED": "1", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_assets(tmp_path_factory.mktemp("cluster_resources"))


def _sweep_args(assets, storage: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "launcher.cli", "sweep", str(CI), *tiny_sweep_overrides(*assets, storage), *extra]


# ------------------------------------------------------------------------------------------- pure checks


def test_check_fits_names_the_request_and_the_cluster():
    with pytest.raises(ConfigError) as err:
        check_fits({"cpus": 1, "gpus": 1, "devices": 1}, [{"CPU": 2.0}], {"CPU": 2.0})
    assert "gpus=1" in str(err.value) and "2 CPU, 0 GPU in total" in str(err.value)
    with pytest.raises(ConfigError, match="cpus=8"):
        check_fits({"cpus": 8, "gpus": 0, "devices": 1}, [{"CPU": 4.0}, {"CPU": 4.0}], {"CPU": 8.0})
    with pytest.raises(ConfigError, match="only 3 worker"):  # 3 one-GPU workers over two nodes, 4 needed
        check_fits({"cpus": 1, "gpus": 1, "devices": 4}, [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}],
                   {"CPU": 16.0, "GPU": 3.0})
    check_fits({"cpus": 1, "gpus": 0.5, "devices": 1}, [{"CPU": 1.0, "GPU": 1.0}], {"CPU": 1.0, "GPU": 1.0})


def test_multi_device_trial_drivers_are_capped_by_what_their_workers_need():
    # two 4-GPU nodes, 2-device trials of 1 GPU + 2 CPUs per worker: 8 workers fit at once -> 4 trials
    nodes = [{"CPU": 16.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 4.0}]
    assert concurrency_cap({"cpus": 2, "gpus": 1, "devices": 2}, nodes, None) == 4
    assert concurrency_cap({"cpus": 2, "gpus": 1, "devices": 2}, nodes, 3) == 3
    # CPU only: 2 CPUs, 1 CPU per worker, 2 devices -> 1 trial at a time (the old code let 8 drivers wait)
    assert concurrency_cap({"cpus": 1, "gpus": 0, "devices": 2}, [{"CPU": 2.0}], 8) == 1
    assert concurrency_cap({"cpus": 1, "gpus": 0, "devices": 1}, [{"CPU": 2.0}], 8) == 8  # unchanged


# ------------------------------------------------------------------------------------------ real Ray runs


@pytest.mark.slow
def test_gpus_on_a_cluster_without_gpus_is_refused_before_any_trial(assets, tmp_path):
    """The old code left every trial PENDING forever (this run timed out)."""
    proc = subprocess.run(_sweep_args(assets, tmp_path, "resources.gpus=1"), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "resources.gpus" in proc.stderr or "gpus=1" in proc.stderr
    assert "0 GPU in total" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("metrics.json"))  # refused before any trial started
    # ... and before the sweep folder's first write (issue 21 item 2: d5b98fd left plan.json and sweep.yaml,
    # and the corrected command was then refused: "sweep folder already exists")
    assert not (tmp_path / "ci").exists(), sorted(str(p) for p in (tmp_path / "ci").rglob("*"))
    fixed = subprocess.run([*_sweep_args(assets, tmp_path), "--sequential"], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=240)
    assert fixed.returncode == 0, fixed.stdout[-2000:] + fixed.stderr[-2000:]


@pytest.mark.slow
def test_a_trial_pending_too_long_is_reported_by_name_and_tune_writes_no_duplicate_logs(assets, tmp_path):
    """Two trials that each take both CPUs: the second waits; with pending_report_s=1 it is named. Tune's
    automatic TBX/CSV/JSON loggers are off (only the JSON record is kept, explicitly), so TensorBoard over the
    sweep sees each trial once."""
    proc = subprocess.run(_sweep_args(assets, tmp_path, "grid.lr=[1e-3,2e-3]", "resources.cpus=2",
                                      "pending_report_s=1"), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = [f"final-{TASK}-lr{lr}-s42" for lr in ("0.001", "0.002")]
    pending = [line for line in proc.stdout.splitlines() if "pending" in line and any(n in line for n in names)]
    assert pending, proc.stdout[-3000:]
    ray_dir = tmp_path / "ci" / "_ray"
    tune_logs = [p for pattern in ("events.out.tfevents*", "progress.csv") for p in ray_dir.rglob(pattern)]
    assert ray_dir.is_dir() and not tune_logs, tune_logs
    assert list(ray_dir.rglob("result.json"))  # Ray's own JSON record of each Tune trial's reports


@pytest.mark.slow
def test_local_ray_takes_the_cgroup_cpu_count(tmp_path):
    """Inside a cpuset of one CPU (as under salloc), os.cpu_count() still says every core; Ray's own
    detection reads the cgroup. The sweep must not override it with num_cpus=os.cpu_count()."""
    if (os.cpu_count() or 1) < 2:
        pytest.fail("needs a machine with at least 2 CPUs to tell the counts apart")
    cpuset = tmp_path / "cpuset.cpus"
    cpuset.write_text("0\n")  # this process's view: one CPU, id 0
    code = ("import os, ray; from launcher.run.ray_backend import _start_ray; _start_ray(None); "
            "print('CPUS', ray.cluster_resources()['CPU'], os.cpu_count()); ray.shutdown()")
    script = (f"mount --bind {cpuset} /sys/fs/cgroup/cpuset/cpuset.cpus && "
              f"{sys.executable} -c \"{code}\"")
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], cwd=REPO,
                          env=_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=180)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("CPUS")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-2000:]
    _, ray_cpus, cpu_count = line.split()
    assert float(ray_cpus) == 1.0 and int(cpu_count) >= 2


@pytest.mark.slow
def test_the_frozen_backbone_is_put_once_per_sweep(assets, tmp_path):
    """Every trial's workers get the one object-store reference the driver made (the old code called
    ray.put inside each DeepSpeed trial, one copy of the backbone per trial)."""
    import ray
    from safetensors.torch import load_file

    from launcher.plan.schema import load_sweep
    from launcher.plan.trials import plan_trials
    from launcher.run.ray_backend import _payload, backbone_key, deepspeed_loop_config, shared_backbones

    sweep = load_sweep(CI, _sweep_args(assets, tmp_path, "grid.lr=[1e-3,2e-3]", "resources.devices=2")[5:])
    trials = plan_trials(sweep)
    packs = _payload(sweep, trials)
    assert len(packs) == 2
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        entries = shared_backbones(trials)
        assert len(entries) == 1
        entry = entries[backbone_key(trials[0].config)]
        refs = [deepspeed_loop_config(p["cfgs"][0], p["run_dirs"][0], entry)["backbone"] for p in packs]
        assert isinstance(refs[0], ray.ObjectRef) and refs[0].hex() == refs[1].hex()
        state = ray.get(refs[0])
        expected = load_file(str(assets[1]))
        assert state.keys() == expected.keys()
        assert all((state[k] == expected[k].numpy()).all() for k in expected)
    finally:
        ray.shutdown()
