"""A sweep resumed with a changed plan (issue 14 item 1): finished trials whose resolved config is unchanged
are kept, new and changed trials run as new trials (the old run directory of a changed one is moved aside,
never lost), and the command says so; on Ray, no restored Tune trial runs another pack's work."""

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
    tiny_sweep_overrides,
    write_tiny_assets,
)

from synqt.storage import sha256_file

REPO = Path(__file__).resolve().parent.parent
CI = REPO / "configs" / "sweeps" / "ci.yaml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_assets(tmp_path_factory.mktemp("sweep_resume"))


def _args(assets, storage: Path, *extra: str) -> list[str]:
    return [str(CI), *tiny_sweep_overrides(*assets, storage), "eval_batch_size=32", *extra]


def _run(args: list[str], *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SYNQT_NO_PROGRESS": "1", "RAY_AUTH_MODE": "disabled",
           "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "sweep", *args, *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc


def _state(sweep_dir: Path) -> dict[str, str]:
    """run name -> sha256 of its metrics.json."""
    return {p.parent.name: sha256_file(p) for p in (sweep_dir / "runs").glob("*/metrics.json")}


def _metrics(sweep_dir: Path, name: str) -> dict:
    return json.loads((sweep_dir / "runs" / name / "metrics.json").read_text())


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


A, B, C = (f"final-{TASK}-lr{lr}-s42" for lr in ("0.001", "0.002", "0.005"))


def test_sequential_resume_with_an_added_grid_point_runs_it_and_keeps_the_rest(assets, tmp_path):
    _ok(_run(_args(assets, tmp_path, "grid.lr=[1e-3,2e-3]"), "--sequential"))
    sweep = tmp_path / "ci"
    before = _state(sweep)
    assert set(before) == {A, B}
    proc = _run(_args(assets, tmp_path, "grid.lr=[1e-3,2e-3,5e-3]"), "--sequential", "--resume")
    _ok(proc)
    after = _state(sweep)
    assert set(after) == {A, B, C} and _metrics(sweep, C)["status"] == "ok"
    assert {k: after[k] for k in before} == before  # the finished trials were not rerun
    assert "2 finished trial(s) kept" in proc.stdout and "1 new" in proc.stdout and C in proc.stdout


def test_sequential_resume_with_a_changed_key_reruns_changed_trials_as_new_ones(assets, tmp_path):
    _ok(_run(_args(assets, tmp_path, "grid.lr=[1e-3,2e-3]"), "--sequential"))
    sweep = tmp_path / "ci"
    old = {name: _metrics(sweep, name) for name in (A, B)}
    proc = _run(_args(assets, tmp_path, "grid.lr=[1e-3,2e-3]", "epochs=2"), "--sequential", "--resume")
    _ok(proc)
    for name in (A, B):
        new = _metrics(sweep, name)
        assert new["status"] == "ok" and new["epochs_done"] == 2  # really trained with the new setting
        assert "epochs: 1 -> 2" in proc.stdout
        # the earlier result is kept beside the sweep, byte for byte, and named in the output
        moved = list((tmp_path / "ci.superseded").glob(f"{name}*/metrics.json"))
        assert len(moved) == 1 and json.loads(moved[0].read_text()) == old[name]
        assert str(moved[0].parent) in proc.stdout
    assert "2 changed" in proc.stdout
    # the sweep's files describe what ran (issue 21 item 2: d5b98fd kept epochs 1 in both); the earlier ones kept
    import yaml

    assert {t["epochs"] for t in json.loads((sweep / "plan.json").read_text())["trials"]} == {2}
    assert yaml.safe_load((sweep / "sweep.yaml").read_text())["trial"]["epochs"] == 2
    history = tmp_path / "ci.superseded" / "sweep-files.1"
    assert {t["epochs"] for t in json.loads((history / "plan.json").read_text())["trials"]} == {1}
    assert yaml.safe_load((history / "sweep.yaml").read_text())["trial"]["epochs"] == 1
    assert str(history) in proc.stdout


def test_sequential_resume_with_only_result_neutral_changes_reruns_nothing(assets, tmp_path):
    _ok(_run(_args(assets, tmp_path, "grid.lr=[1e-3,2e-3]"), "--sequential"))
    sweep = tmp_path / "ci"
    before = _state(sweep)
    proc = _run(_args(assets, tmp_path, "grid.lr=[1e-3,2e-3]", "log_every=3", "eval_batch_size=8"),
                "--sequential", "--resume")
    _ok(proc)
    assert _state(sweep) == before
    assert "2 finished trial(s) kept, 0 unfinished continue(s), 0 new, 0 changed" in proc.stdout


def test_sequential_resume_with_a_removed_grid_point_moves_its_run_aside(assets, tmp_path):
    _ok(_run(_args(assets, tmp_path, "grid.lr=[1e-3,2e-3]"), "--sequential"))
    sweep = tmp_path / "ci"
    before = _state(sweep)
    old_b = _metrics(sweep, B)
    proc = _run(_args(assets, tmp_path, "grid.lr=[1e-3]"), "--sequential", "--resume")
    _ok(proc)
    assert _state(sweep) == {A: before[A]}  # A kept as it was; B no longer counts in this plan's table
    moved = list((tmp_path / "ci.superseded").glob(f"{B}*/metrics.json"))
    assert len(moved) == 1 and json.loads(moved[0].read_text()) == old_b  # nothing finished is lost
    assert f"no longer in the plan: {B}; moved to {moved[0].parent}" in proc.stdout
    results = json.loads((sweep / "results.json").read_text())
    assert results["datasets"][TASK]["accuracy"] == _metrics(sweep, A)["test_acc"]  # one seed: its accuracy


@pytest.mark.slow
def test_ray_resume_with_an_added_grid_point_runs_it_in_its_own_trial(assets, tmp_path):
    """Tune's restore bound trials by pack index: the added point never ran and every later --resume
    reported it as "no metrics.json was written". Now it runs, and the finished ones are not rerun."""
    _ok(_run(_args(assets, tmp_path, "grid.lr=[1e-3,2e-3]", "max_concurrent=1")))
    sweep = tmp_path / "ci"
    before = _state(sweep)
    proc = _run(_args(assets, tmp_path, "grid.lr=[1e-3,5e-3,2e-3]", "max_concurrent=1"), "--resume")
    _ok(proc)
    after = _state(sweep)
    assert set(after) == {A, B, C} and _metrics(sweep, C)["status"] == "ok"
    assert {k: after[k] for k in before} == before
    assert "no metrics.json was written" not in proc.stdout + proc.stderr
    assert "1 new" in proc.stdout
    # each Ray trial took its thread count from the CPUs Ray assigned it (resources.cpus 1; issue 21 item 3)
    assert {(m["provenance"]["threads"]["source"], m["provenance"]["threads"]["threads"])
            for m in (_metrics(sweep, n) for n in (A, B, C))} == {("ray", 1)}


@pytest.mark.slow
def test_ray_resume_reruns_a_finished_trial_whose_metrics_were_removed_or_broken(assets, tmp_path):
    """A restored Tune experiment held the pack of a finished trial as TERMINATED: after its metrics.json was
    removed (or set aside as broken) a --resume planned it, never ran it and reported "no metrics.json was
    written". Both members of the kind now rerun that trial in a new Ray experiment; the other is untouched."""
    _ok(_run(_args(assets, tmp_path, "grid.lr=[1e-3,2e-3]", "max_concurrent=1")))
    sweep = tmp_path / "ci"
    for victim, damage in ((A, "removed"), (B, "broken")):
        before = _state(sweep)
        metrics = sweep / "runs" / victim / "metrics.json"
        if damage == "removed":
            metrics.unlink()
        else:
            metrics.write_text(metrics.read_text()[:40])  # cut off mid-write
        proc = _run(_args(assets, tmp_path, "grid.lr=[1e-3,2e-3]", "max_concurrent=1"), "--resume")
        _ok(proc)
        out = proc.stdout + proc.stderr
        assert "no metrics.json was written" not in out, (damage, out[-3000:])
        assert "running a new Ray experiment" in out, (damage, out[-3000:])
        after = _state(sweep)
        assert set(after) == {A, B} and _metrics(sweep, victim)["status"] == "ok", damage
        other = B if victim == A else A
        assert after[other] == before[other], damage  # the untouched trial was not rerun
        if damage == "broken":  # the cut file was kept beside the run, not deleted
            assert list((sweep / "runs" / victim).glob("metrics.json.broken-*")), damage
