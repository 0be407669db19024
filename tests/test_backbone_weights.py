"""Issue 12 kind 4: the missing backbone. A trial or sweep with no `checkpoint` is refused before
anything runs; `checkpoint=random` asks for a random backbone on purpose; the dry run, the trial
log and metrics.json say which weights were used (path + sha256 computed here with hashlib)."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import (  # noqa: F401 - _one_thread_no_progress is an autouse fixture
    TASK,
    _one_thread_no_progress,
    env_one_thread,
    read_json,
    tiny_cfg,
    tiny_overrides,
    write_tiny_assets,
)

from launcher.plan.checks import validate
from launcher.plan.dryrun import dry_run_text
from launcher.plan.schema import load_sweep
from launcher.plan.trials import plan_trials
from launcher.run import commands
from synqt.errors import ConfigError, DataError
from synqt.training import run_trial

REPO = Path(__file__).resolve().parents[1]
VTAB = REPO / "configs" / "sweeps" / "vtab1k.yaml"
FGVC = REPO / "configs" / "sweeps" / "fgvc.yaml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights_assets")
    data_root, ckpt = write_tiny_assets(root)
    return data_root, ckpt, root / "cache"


def test_trial_without_checkpoint_is_refused_before_anything(assets, tmp_path):
    data_root, _, cache = assets
    with pytest.raises(ConfigError, match=r"dataset 'syn_count': no backbone weights: key 'checkpoint' is not set.*"
                                          r"checkpoint=random"):
        run_trial(tiny_cfg(data_root, None, cache), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_train_without_checkpoint_exits_2_without_traceback(assets, tmp_path):
    data_root, ckpt, cache = assets
    ov = [o for o in tiny_overrides(data_root, ckpt, cache) if not o.startswith("checkpoint=")]
    cmd = [sys.executable, "-m", "launcher.cli", "train", "--dataset", TASK, "--data-root", str(data_root),
           "--out", str(tmp_path / "run"), *ov]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_one_thread(), timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert "no backbone weights" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_random_on_purpose_trains_and_is_recorded(assets, tmp_path, caplog):
    data_root, _, cache = assets
    with caplog.at_level(logging.INFO, logger="synqt"):
        metrics = run_trial(tiny_cfg(data_root, None, cache, checkpoint="random", epochs=1, warmup_epochs=0),
                            tmp_path / "run")
    assert metrics["status"] == "ok"
    prov = read_json(tmp_path / "run" / "metrics.json")["provenance"]
    assert prov["backbone_checkpoint"] == "random" and prov["backbone_checkpoint_sha256"] is None
    assert prov["backbone_weights"] == "random initialisation (checkpoint=random)"
    assert any("weights: random initialisation (checkpoint=random)" in r.getMessage() for r in caplog.records)


def test_trial_log_names_the_checkpoint_and_its_sha256(assets, tmp_path, caplog):
    data_root, ckpt, cache = assets
    want = f"{Path(ckpt).absolute()} (sha256 {hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()})"
    with caplog.at_level(logging.INFO, logger="synqt"):
        run_trial(tiny_cfg(data_root, ckpt, cache, epochs=1, warmup_epochs=0), tmp_path / "run")
    assert sum(f"weights: {want}" in r.getMessage() for r in caplog.records) == 1
    assert read_json(tmp_path / "run" / "metrics.json")["provenance"]["backbone_weights"] == want


@pytest.mark.parametrize("sweep_file", [VTAB, FGVC], ids=["vtab1k", "fgvc"])
def test_shipped_sweep_without_checkpoint_is_refused_before_ray(tmp_path, assets, sweep_file):
    import ray

    data_root, _, _ = assets
    ov = [f"storage_path={tmp_path}", f"data_root={data_root}", f"datasets=[{TASK}]"]
    with pytest.raises(ConfigError, match=r"no backbone weights: key 'checkpoint' is not set"):
        commands.run_sweep_command(str(sweep_file), ov)
    assert not ray.is_initialized() and not list(tmp_path.iterdir())


def test_sweep_refuses_a_checkpoint_that_is_not_weights_before_ray(tmp_path, assets):
    data_root, _, _ = assets
    page = tmp_path / "ViT-B_16.npz"
    page.write_bytes(b"<html><body>404 Not Found</body></html>")
    ov = [f"storage_path={tmp_path / 'runs'}", f"data_root={data_root}", f"datasets=[{TASK}]", f"checkpoint={page}"]
    with pytest.raises(Exception, match=r"ViT-B_16.npz is an HTML/XML page"):
        commands.run_sweep_command(str(VTAB), ov)
    assert not (tmp_path / "runs").exists()


def test_dry_run_says_which_weights(tmp_path, assets):
    data_root, ckpt, _ = assets
    base = [f"storage_path={tmp_path}", f"data_root={data_root}", f"datasets=[{TASK}]"]
    digest = hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()

    def text(*extra: str) -> str:
        s = load_sweep(str(VTAB), [*base, *extra])
        return dry_run_text(s, plan_trials(s))

    assert f"backbone weights: {Path(ckpt).absolute()} (sha256 {digest})" in text(f"checkpoint={ckpt}")
    assert "backbone weights: random initialisation (checkpoint=random)" in text("checkpoint=random")
    assert "backbone weights: NONE yet: key 'checkpoint' is not set" in text()
    demo = load_sweep(str(REPO / "configs" / "sweeps" / "demo.yaml"), [f"storage_path={tmp_path}"])
    assert "backbone weights: the pre-trained demo backbone" in dry_run_text(demo, plan_trials(demo))


def test_random_sweep_passes_preflight_and_keeps_the_word(tmp_path, assets):
    data_root, _, _ = assets
    s = load_sweep(str(VTAB), [f"storage_path={tmp_path}", f"data_root={data_root}", f"datasets=[{TASK}]",
                                  "checkpoint=random"])
    assert s.checkpoint == "random"  # not turned into the path <cwd>/random
    trials = plan_trials(s)
    assert {t.config.checkpoint for t in trials} == {"random"}
    validate(s, trials)  # no error: random was asked for


def test_slurm_array_without_checkpoint_is_refused_before_sbatch(tmp_path, assets, capsys):
    from launcher.run.slurm import submit_array

    data_root, ckpt, _ = assets
    ov = [f"storage_path={tmp_path}", f"data_root={data_root}", f"datasets=[{TASK}]"]
    with pytest.raises(ConfigError, match=r"vtab1k.yaml: dataset 'syn_count': no backbone weights"):
        submit_array(str(VTAB), ov)  # a submission: refused before sbatch is called
    # a preview (--print) needs no weights (issue 21): it shows the lines and names what a submission lacks
    assert submit_array(str(VTAB), ov, print_only=True) == 0
    out = capsys.readouterr().out
    assert "sbatch" in out and "not set yet: checkpoint" in out
    assert submit_array(str(VTAB), [*ov, f"checkpoint={ckpt}"], print_only=True) == 0
    out = capsys.readouterr().out
    assert "sbatch" in out and "not set yet" not in out


def test_slurm_array_refuses_missing_data_or_weights_file_before_sbatch(tmp_path, assets):
    """`synqt slurm array` runs the sweep's own pre-flight: nothing is queued for a typo in a path."""
    from launcher.run.slurm import submit_array

    data_root, ckpt, _ = assets
    ov = [f"storage_path={tmp_path}", f"datasets=[{TASK}]"]
    with pytest.raises(DataError, match=r"nonexistent"):
        submit_array(str(VTAB), [*ov, f"data_root={tmp_path / 'nonexistent'}", f"checkpoint={ckpt}"], print_only=True)
    with pytest.raises(ConfigError, match=r"typo.npz.*does not exist"):
        submit_array(str(VTAB), [*ov, f"data_root={data_root}", f"checkpoint={tmp_path / 'typo.npz'}"],
                     print_only=True)
    assert not (tmp_path / "vtab1k").exists()  # no plan written, nothing queued
