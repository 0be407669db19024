"""scripts/gpu_check.sh inside the normal suite (issue 22): its ``--cpu`` run, the ``gpu`` marker's deselection,
the Ray blocker of its sweep check, and the CUDA-path fixes that can be observed on a CPU.

The ``--cpu`` run starts a DeepSpeed trial (tests/test_gpu.py): run this file under the shared lock.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


@pytest.mark.slow
def test_gpu_check_script_cpu_mode_passes_every_check(tmp_path):
    """`scripts/gpu_check.sh --cpu`: the device checks on the CPU at small sizes; its JSON lists every check as
    passed, with sane figures."""
    out = tmp_path / "check"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu", "--no-install", "--out", str(out)],
                          env=_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=1000)
    result = json.loads((out / "gpu_check.json").read_text())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "ALL CHECKS PASSED" in proc.stdout
    assert result["mode"] == "cpu" and result["passed"] is True
    checks = {c["name"]: c for c in result["checks"]}
    assert all(c["status"] == "pass" for c in checks.values()), {n: c["detail"] for n, c in checks.items()}
    names = list(checks)
    # the pytest checks minus the CUDA-only ones (pinned memory, CUDA allocator peak, fp16), each one row
    expected_tests = ["test_logits_and_gradients_match_the_cpu_fp32_result[no]",
                      "test_logits_and_gradients_match_the_cpu_fp32_result[bf16]",
                      "test_memory_cache_trial_equals_the_live_trial[device]",
                      "test_pack_of_four_equals_four_solo_trials", "test_deferred_evaluation_equals_periodic",
                      "test_deepspeed_trial_is_killed_and_resumes"]
    assert sorted(n.removeprefix("pytest ") for n in names if n.startswith("pytest ")) == sorted(expected_tests)
    assert names[-3:] == ["synqt bench --kv-cache", "synqt train (time / floor)", "synqt sweep --sequential ci.yaml"]

    figures = {n.removeprefix("pytest "): c["figures"] for n, c in checks.items()}
    numerics = figures["test_logits_and_gradients_match_the_cpu_fp32_result[bf16]"]["numerics_bf16"]
    assert 0 < numerics["relative_error"]["grads"] <= numerics["tolerance"]["grads"]  # bf16 really differs
    assert figures["test_pack_of_four_equals_four_solo_trials"]["pack_of_4"]["max_weight_diff"] <= 1e-5
    kv = figures["test_memory_cache_trial_equals_the_live_trial[device]"]["kv_memory_device"]
    assert kv["where"] == "host" and kv["max_weight_diff"] <= 1e-5
    ds = figures["test_deepspeed_trial_is_killed_and_resumes"]["deepspeed_kill_resume"]
    assert ds["backend"] == "gloo" and ds["resumed_after_epoch"] == 1

    bench = checks["synqt bench --kv-cache"]["figures"]
    for key in ("forward_images_per_s", "full_step_images_per_s", "cached_step_images_per_s",
                "memory_cached_step_images_per_s", "paper_trial_cached_x_forward"):
        assert math.isfinite(bench[key]) and bench[key] > 0, (key, bench[key])
    assert bench["memory_cache_where"] == "host"

    train = checks["synqt train (time / floor)"]["figures"]
    parts = [train[k] for k in ("decode_s", "kv_cache_s", "train_s", "eval_s", "start_up_and_rest_s")]
    assert all(p >= 0 for p in parts) and sum(parts) == pytest.approx(train["whole_s"], rel=1e-6)
    assert train["train_s"] > 0 and train["kv_cache_s"] > 0  # epochs ran, and from a cache that was built
    assert train["floor_s"] == pytest.approx(train["floor_decode_s"] + train["floor_forward_s"])
    assert train["whole_over_floor"] == pytest.approx(train["whole_s"] / train["floor_s"])
    assert train["epochs"] == 3 and train["evaluations"] == 1 and train["goal_met"] is None

    sweep = checks["synqt sweep --sequential ci.yaml"]["figures"]
    assert sweep == {"trials": 2, "ok": 2, "ray_imported": False, "devices": ["cpu"]}
    assert "trial / floor:" in proc.stdout


def test_gpu_tests_are_deselected_in_the_normal_run():
    """Without ``-m gpu`` the device checks are reported as deselected: none passes, none is skipped."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider",
                           "--collect-only"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert "9 deselected" in proc.stdout, proc.stdout[-2000:]
    assert "test_gpu.py::" not in proc.stdout  # nothing collected to run
    readme_fast = subprocess.run([sys.executable, "-m", "pytest", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider",
                                  "--collect-only", "-m", "not slow"], cwd=REPO, env=_env(), capture_output=True,
                                 text=True, timeout=300)
    assert "9 deselected" in readme_fast.stdout, readme_fast.stdout[-2000:]  # README's `-m "not slow"` too


def test_gpu_tests_fail_clearly_without_cuda():
    """`pytest -m gpu` where no CUDA device is visible: the tests are collected and fail naming the missing
    device (in the setup of their ``device`` fixture; not an import or collection error, not a skip)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_gpu.py", "-m", "gpu", "-x", "-q", "-p",
                           "no:cacheprovider"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=_env(CUDA_VISIBLE_DEVICES="", SYNQT_CHECK_DEVICE="cuda"))
    assert proc.returncode == 1, proc.stdout[-2000:]  # 1: tests failed (2 would be a collection error)
    assert "no CUDA device is visible" in proc.stdout and "1 error" in proc.stdout, proc.stdout[-2000:]
    assert "skipped" not in proc.stdout and "passed" not in proc.stdout


def test_the_sweep_checks_ray_blocker_blocks_an_installed_ray(tmp_path):
    """The sweep check's proof that nothing imports Ray holds only if the blocker works: with it, `import ray` of
    the Ray installed here fails and is recorded (also in a child process)."""
    from launcher.run.gpu_check import RAY_ATTEMPTS
    from launcher.run.gpu_check import _env as check_env

    env = check_env(tmp_path, "cpu", "small", block_ray=True)
    code = ("import subprocess, sys\n"
            "try:\n    import ray\nexcept ImportError as err:\n    print('blocked:', err)\n"
            "subprocess.run([sys.executable, '-c', 'import ray.tune'])\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "blocked: ray is blocked by synqt gpu-check" in proc.stdout, proc.stdout + proc.stderr
    attempts = (tmp_path / RAY_ATTEMPTS).read_text()
    assert attempts.count("ray\n") >= 2 or ("ray\n" in attempts and "ray.tune" in attempts)
    plain = subprocess.run([sys.executable, "-c", "import ray; print(ray.__name__)"], env=_env(),
                           capture_output=True, text=True, timeout=120)
    assert plain.stdout.strip() == "ray"  # without the blocker Ray imports: the blocker made the difference


def test_kv_bench_timing_waits_for_the_device(monkeypatch):
    """On CUDA every timed call is bracketed by torch.cuda.synchronize: kernels run asynchronously, so the clock
    would otherwise stop when they are launched, not when they have run (it did, before issue 22)."""
    from synqt.tools import kv_bench

    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(f"sync {device}"))
    kv_bench._timed(lambda: calls.append("fn"), 2, torch.device("cuda", 0))
    assert calls == ["fn", "sync cuda:0", "fn", "fn", "sync cuda:0"]
    calls.clear()
    kv_bench._timed(lambda: calls.append("fn"), 2, torch.device("cpu"))
    assert calls == ["fn", "fn", "fn"]


def test_deepspeed_collectives_use_the_nccl_device(monkeypatch):
    """NCCL reduces CUDA tensors only: the DeepSpeed trainer's loss, accuracy and peak-memory all-reduces built
    CPU tensors (a RuntimeError on the first step under NCCL) before issue 22."""
    import torch.distributed as dist

    from synqt.training import deepspeed as ds

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert ds.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert ds.collective_device() == torch.device("cpu")
    seen: list[torch.device] = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: seen.append(t.device))
    ds._all_reduce([1.0, 2.0])
    assert seen == [torch.device("cpu")]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_memory_cache_computed_in_place_equals_the_node_file_layout(tiny_vit, dtype):
    """kv_cache=memory computes K/V straight into the tensor it holds (on a GPU: device memory, no host round
    trip); its bits equal the node file's array (compute_kv) moved to the held layout."""
    import numpy as np

    from synqt.model.stream import PackedSynQT, new_branch
    from synqt.training.kv_cache import _NUMPY_OF, STORAGE_DTYPES, _hold_in_memory, compute_held, compute_kv, geometry

    backbone = tiny_vit()
    model = PackedSynQT(backbone, [new_branch(backbone, 3)], backbone_drop_path=False)
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    geom = geometry(backbone, 32)
    kw = dict(dtype=dtype, device=torch.device("cpu"), batch_size=2)
    arr = np.empty((5, *geom.shape), dtype=_NUMPY_OF[dtype])
    compute_kv(model, images, [0.5] * 3, [0.5] * 3, arr, **kw)
    expected, _ = _hold_in_memory(arr, dtype, torch.device("cpu"))
    held, where = compute_held(model, images, [0.5] * 3, [0.5] * 3, geom, **kw)
    assert where == "host" and held.dtype == STORAGE_DTYPES[dtype] and held.shape == (2, 2, 5, 2, 17, 16)
    assert torch.equal(held.view(torch.int16) if dtype == "bf16" else held,
                       expected.view(torch.int16) if dtype == "bf16" else expected)
    assert held.abs().sum() > 0


def test_gpu_check_refuses_bad_input_before_touching_anything(tmp_path, capsys):
    """Exit 2 naming the option: an unknown --only check, and an --out folder that is not an earlier check's
    (it would be emptied: its files stay)."""
    from launcher.cli import main

    assert main(["gpu-check", "--cpu", "--only", "pytest,bogus", "--out", str(tmp_path / "o")]) == 2
    assert "--only: unknown check(s) bogus" in capsys.readouterr().err and not (tmp_path / "o").exists()
    keep = tmp_path / "results"
    keep.mkdir()
    (keep / "table.csv").write_text("precious")
    assert main(["gpu-check", "--cpu", "--only", "sweep", "--out", str(keep)]) == 2
    assert "is not the folder of an earlier gpu-check" in capsys.readouterr().err
    assert (keep / "table.csv").read_text() == "precious"


def test_gpu_check_finds_the_checkout_from_any_folder_and_ray_workers_get_the_packages_root(tmp_path, monkeypatch):
    """After the regrouping (launcher/gpu_check.py -> launcher/run/gpu_check.py) `parents[1]` of the module was
    launcher/, not the checkout: `synqt gpu-check` outside the checkout root failed, and Ray workers got
    launcher/ on PYTHONPATH instead of the folder holding synqt/ and launcher/."""
    from launcher.run.gpu_check import _repo_root
    from synqt.version import PACKAGES_ROOT

    monkeypatch.chdir(tmp_path)
    assert _repo_root() == REPO
    assert PACKAGES_ROOT == REPO
    assert (PACKAGES_ROOT / "synqt" / "__init__.py").is_file() and (PACKAGES_ROOT / "launcher" / "cli.py").is_file()
    pytest.importorskip("ray")  # the GPU machine has no Ray; everywhere else it is installed
    from launcher.run.ray_backend import worker_env

    assert worker_env()["env_vars"]["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)
