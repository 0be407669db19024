"""bf16 on a CPU without native bf16 (issue 14 item 3): refused before training by one rule, said in
`synqt bench` and `synqt sweep --dry-run`; fp32 (the default) keeps working on such a CPU.

An AVX2-only CPU is made with torch's own switch: ``ATEN_CPU_CAPABILITY=avx2`` caps the kernels torch
dispatches (``torch.backends.cpu.get_cpu_capability()`` then reports AVX2), as on an AVX2-only EPYC.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import TASK, TINY_BACKBONE, TINY_KW, tiny_overrides, write_tiny_assets

REPO = Path(__file__).resolve().parent.parent
CI = REPO / "configs" / "sweeps" / "ci.yaml"
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2"}


def _synqt(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "SYNQT_ALLOW_SLOW_BF16"}
    full.update({"OMP_NUM_THREADS": "1", "SYNQT_NO_PROGRESS": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("precision")
    data_root, ckpt = write_tiny_assets(root)
    return data_root, ckpt, root / "cache"


def _train(assets, run: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    data_root, ckpt, cache = assets
    return _synqt("train", "--dataset", TASK, "--data-root", str(data_root), "--out", str(run),
                  *tiny_overrides(data_root, ckpt, cache), "epochs=1", "eval_every=1", *extra, env=env)


def test_the_switch_really_makes_torch_an_avx2_cpu():
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         env={**os.environ, **AVX2}, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "AVX2"


def test_bf16_on_an_avx2_cpu_is_refused_before_training(assets, tmp_path):
    run = tmp_path / "run"
    proc = _train(assets, run, "precision=bf16", env=AVX2)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "precision=bf16" in proc.stderr and "AVX2" in proc.stderr and "precision=no" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run / "metrics.json").exists() and not (run / "resume.pt").exists()


def test_fp32_default_trains_on_an_avx2_cpu(assets, tmp_path):
    proc = _train(assets, tmp_path / "run", env=AVX2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "ok"


def test_bf16_emulated_when_asked_for_explicitly(assets, tmp_path):
    proc = _train(assets, tmp_path / "run", "precision=bf16", env={**AVX2, "SYNQT_ALLOW_SLOW_BF16": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["hparams"]["precision"] == "bf16"


def test_dry_run_says_bf16_trials_would_be_refused_on_this_cpu_and_exits_2(tmp_path):
    proc = _synqt("sweep", str(CI), f"storage_path={tmp_path}", "precision=bf16", "--dry-run", env=AVX2)
    # the plan is printed, and a plan that would be refused exits 2 (issue 21: a dry run never says 0 for it)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "would be refused" in proc.stderr and "precision=bf16" in proc.stderr
    line = next((x for x in proc.stdout.splitlines() if x.startswith("bf16:")), "")
    assert "NOT native" in line and "AVX2" in line and "refused" in line


TINY_BENCH = [f"backbone={TINY_BACKBONE}", *[f"backbone_kwargs.{k}={v}" for k, v in TINY_KW.items()], "batch_size=4"]


def test_bench_says_so_and_refuses_bf16_on_an_avx2_cpu():
    fp32 = _synqt("bench", "--steps", "1", "--modes", "keep", "--no-baselines", *TINY_BENCH, env=AVX2)
    assert fp32.returncode == 0, fp32.stderr[-2000:]
    assert any(x.startswith("bf16: not native") and "AVX2" in x for x in fp32.stdout.splitlines())
    bf16 = _synqt("bench", "--steps", "1", "--modes", "keep", "--no-baselines", "precision=bf16", *TINY_BENCH,
                  env=AVX2)
    assert bf16.returncode == 2 and "precision=bf16" in bf16.stderr and "AVX2" in bf16.stderr
