"""A refused command leaves nothing behind (issue 21 item 2): every check that can refuse a sweep, a SLURM
array submission or a trial runs before the first write, so the corrected command is never refused for the
leftovers of the refused one. (The Ray member, resources the cluster lacks: tests/test_cluster_resources.py;
a resume with changed keys rewriting sweep.yaml / plan.json: tests/test_sweep_resume.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import (  # noqa: F401 - _one_thread_no_progress is an autouse fixture
    TASK,
    _one_thread_no_progress,
    tiny_overrides,
    tiny_sweep_overrides,
    write_tiny_assets,
)

from launcher.cli import main

REPO = Path(__file__).resolve().parent.parent
CI = REPO / "configs" / "sweeps" / "ci.yaml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_assets(tmp_path_factory.mktemp("refusals"))


def _nothing_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_a_checkpoint_that_does_not_fit_refuses_the_sweep_before_its_folder_exists(assets, tmp_path, capsys):
    """d5b98fd wrote plan.json and sweep.yaml, then every trial failed on the geometry (exit 3); the corrected
    rerun was refused ("sweep folder already exists")."""
    storage = tmp_path / "runs"
    args = ["sweep", str(CI), *tiny_sweep_overrides(*assets, storage), "backbone_kwargs.embed_dim=64", "--sequential"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "width (embed_dim) 32 in the checkpoint, 64 in the backbone" in err, err
    assert _nothing_under(storage / "ci") == []
    # the corrected command is not refused for the refused one's leftovers
    assert main(["sweep", str(CI), *tiny_sweep_overrides(*assets, storage), "--sequential"]) == 0
    plan = json.loads((storage / "ci" / "plan.json").read_text())
    assert [t["epochs"] for t in plan["trials"]] == [1, 1]


def test_a_missing_stage2_split_refuses_a_vtab_sweep_before_stage_1(assets, tmp_path, capsys):
    """Stage 2 trains on train800val200 and scores test: without test.json the sweep ran all of stage 1 and then
    failed; now it is refused before anything is written."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(assets[0] / TASK, data / TASK)
    (data / TASK / "test.json").unlink()
    storage = tmp_path / "runs"
    over = tiny_sweep_overrides(data, assets[1], storage)
    assert main(["sweep", str(CI), *over, "protocol=vtab", "--sequential"]) == 2
    err = capsys.readouterr().err
    assert "test" in err and TASK in err, err
    assert _nothing_under(storage / "ci") == []


def test_a_refused_sbatch_leaves_no_plan(assets, tmp_path, capsys, monkeypatch):
    """`synqt slurm array` wrote plan.json before sbatch ran; with sbatch missing it exited 2 and left it."""
    storage = tmp_path / "runs"
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no sbatch on PATH
    code = main(["slurm", "array", str(CI), *tiny_sweep_overrides(*assets, storage)])
    assert code == 2
    assert "sbatch not found" in capsys.readouterr().err
    assert _nothing_under(storage / "ci") == []


def test_a_refused_deepspeed_trial_is_exit_2_and_leaves_no_run_dir(assets, tmp_path, capsys):
    """trainer=deepspeed refused fp16 inside its spawned ranks: a worker traceback, exit 1, an empty run dir."""
    out = tmp_path / "run"
    code = main(["train", "--dataset", TASK, "--data-root", str(assets[0]), "--out", str(out),
                 *tiny_overrides(assets[0], assets[1], tmp_path / "cache"), "trainer=deepspeed", "num_devices=2",
                 "precision=fp16"])
    assert code == 2
    assert "precision=fp16 is not offered with trainer=deepspeed" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("extra, says", [
    ("datasets=[syn_nope]", "syn_nope"),
    ("checkpoint=/nonexistent/vit.npz", "/nonexistent/vit.npz"),
    # trials that would never see a GPU (here: in-process on a machine without one) are refused, not failed
    # one by one (on Ray: resources.gpus 0, see tests/test_cluster_resources.py)
    ("device=cuda", "needs a GPU"),
    ("precision=fp16", "needs a GPU"),
])
def test_other_refusals_leave_no_sweep_folder(assets, tmp_path, extra, says, capsys):
    if "needs a GPU" in says:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA GPU: device=cuda / fp16 are not refused in-process here")
    storage = tmp_path / "runs"
    code = main(["sweep", str(CI), *tiny_sweep_overrides(*assets, storage), extra, "--sequential"])
    err = capsys.readouterr().err
    assert code == 2 and says in err, err
    assert _nothing_under(storage / "ci") == []


# ------------------------------------------------------------------ a file option is checked first (item 5)


def test_eval_names_missing_weights_first(tmp_path, capsys):
    """d5b98fd: `synqt eval --weights missing.safetensors` said "data_root is empty"."""
    missing = tmp_path / "missing.safetensors"
    assert main(["eval", "--weights", str(missing)]) == 2
    assert f"--weights {missing}: file not found" in capsys.readouterr().err
    assert main(["eval", "--weights", str(missing), "--official", "--dataset", "cifar", "--data-root",
                 str(tmp_path / "nodata"), "--checkpoint", "random"]) == 2
    assert f"--weights {missing}: file not found" in capsys.readouterr().err


def test_train_names_a_missing_checkpoint_before_the_data(assets, tmp_path, capsys):
    missing = tmp_path / "ViT-B_16.npz"
    for how in (["--checkpoint", str(missing)], [f"checkpoint={missing}"]):
        assert main(["train", "--dataset", TASK, "--data-root", str(tmp_path / "nodata"), "--out",
                     str(tmp_path / "run"), *how]) == 2
        assert f"{missing}: file not found" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_sweep_names_a_missing_checkpoint_before_building_demo_assets(tmp_path):
    """ci.yaml has demo_assets: true; d5b98fd pre-trained the demo backbone for minutes, then refused the path."""
    env = {**os.environ, "SYNQT_DEMO_DIR": str(tmp_path / "demo-cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "sweep", str(CI), f"storage_path={tmp_path}",
                           f"checkpoint={tmp_path / 'none.npz'}", "--sequential"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "none.npz" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "demo-cache" / "vit_tiny_demo.safetensors").exists()
    assert not (tmp_path / "ci").exists()


def test_bench_loader_checks_its_data_root_before_timing(tmp_path, capsys):
    """d5b98fd timed every model for minutes before it read --data-root."""
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "bench", "--loader", "--data-root",
                           str(tmp_path / "nodata"), "--dataset", "cifar", "--steps", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and str(tmp_path / "nodata") in proc.stderr, proc.stderr[-2000:]


def test_compare_names_a_missing_source(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "published.csv"), str(tmp_path)]) == 2
    assert f"{tmp_path / 'published.csv'}: file or folder not found" in capsys.readouterr().err
