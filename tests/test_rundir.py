"""The run-directory contract (synqt/run/rundir.py) on run directories written by hand: states, the duplicate
rule, and `synqt aggregate` and `synqt status` agreeing on what they read."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest

from launcher.results.aggregate import aggregate, format_table
from launcher.results.status import collect_status, status_text
from synqt.run import rundir
from synqt.run.rundir import METRIC_KEYS


def metrics(dataset: str, seed: int, test_acc: float | None, *, status: str = "ok", finished_at: float | None = None,
            group: str | None = "Natural") -> dict:
    m = dict.fromkeys(METRIC_KEYS)
    m.update(dataset=dataset, group=group, protocol="paper", stage="final", seed=seed,
             hparams={"lr": 0.001, "token_nums": 1}, test_acc=test_acc, best_of_test=test_acc, status=status,
             error=None if status == "ok" else "RuntimeError: boom", run_name=f"final-{dataset}-s{seed}",
             epochs_done=2, wall_time_s=10.0)
    if finished_at is not None:
        m["finished_at"] = finished_at
    return m


def write(path: Path, obj: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_states_of_one_run_dir(tmp_path):
    assert rundir.read_run(tmp_path / "nothing").state == "pending"
    write(tmp_path / "run" / "progress.json", {"epoch": 3, "epochs": 10, "updated": 1000.0})
    rec = rundir.read_run(tmp_path / "run")
    assert (rec.state, rec.epoch, rec.epochs, rec.updated) == ("running", 3, 10, 1000.0)
    write(tmp_path / "run" / "metrics.json", metrics("dtd", 1, 40.0))  # metrics.json wins over progress.json
    assert rundir.read_run(tmp_path / "run").state == "done"
    write(tmp_path / "bad" / "metrics.json", metrics("dtd", 1, None, status="failed"))
    assert (rundir.read_run(tmp_path / "bad").state, rundir.read_run(tmp_path / "bad").error) == (
        "failed", "RuntimeError: boom")
    write(tmp_path / "cut" / "metrics.json", '{"dataset": "dtd", "stat')  # a write cut off (not atomic)
    rec = rundir.read_run(tmp_path / "cut")
    assert rec.state == "broken" and str(tmp_path / "cut" / "metrics.json") in rec.error
    write(tmp_path / "list" / "metrics.json", "[1, 2]")
    assert rundir.read_run(tmp_path / "list").state == "broken"
    # a metrics.json without a dataset is attributable only through the plan
    write(tmp_path / "anon" / "metrics.json", {"status": "ok"})
    assert rundir.read_run(tmp_path / "anon").state == "broken"
    assert rundir.read_run(tmp_path / "anon", {"run_name": "anon", "dataset": "dtd"}).state == "done"


def test_write_metrics_stamps_finished_at_and_is_read_back(tmp_path):
    rundir.write_metrics(tmp_path, {"dataset": "dtd", "status": "ok"})
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["dataset"] == "dtd" and isinstance(on_disk["finished_at"], float)
    assert rundir.is_done(tmp_path)


def stale_copy_sweep(root: Path, *, stamp: bool) -> tuple[Path, Path]:
    """Two seeds of dtd under runs/; a copy of seed 44 with its OLD result (100 %) under a_copy/, which sorts
    before runs/. Fresh: seed 42 = 1/3, seed 44 = 2/3 of the test images right."""
    t_old, t_new = 1_700_000_000.0, 1_700_000_500.0
    write(root / "runs" / "final-dtd-s42" / "metrics.json",
          metrics("dtd", 42, 100 / 3, finished_at=t_new if stamp else None))
    fresh = write(root / "runs" / "final-dtd-s44" / "metrics.json",
                  metrics("dtd", 44, 200 / 3, finished_at=t_new if stamp else None))
    stale = write(root / "a_copy" / "final-dtd-s44" / "metrics.json",
                  metrics("dtd", 44, 100.0, finished_at=t_old if stamp else None))
    if not stamp:  # files of an older release: the modification time decides
        os.utime(stale, (t_old, t_old))
        os.utime(fresh, (t_new, t_new))
    return stale.parent, fresh.parent


@pytest.mark.parametrize("stamp", [True, False], ids=["finished_at", "mtime"])
def test_a_stale_copy_does_not_count_the_later_run_does(tmp_path, stamp):
    stale, fresh = stale_copy_sweep(tmp_path, stamp=stamp)
    res = aggregate(tmp_path, out_dir=tmp_path / "report")
    d = res["datasets"]["dtd"]
    expected = [100 / 3, 200 / 3]  # the fresh runs; the stale copy would give [100/3, 100] = 66.67 +- 47.14
    assert d["accuracy"] == pytest.approx(statistics.fmean(expected))
    assert d["std"] == pytest.approx(statistics.stdev(expected))
    assert f"{d['accuracy']:.2f} ± {d['std']:.2f}" == "50.00 ± 23.57"
    assert res["runs"]["superseded"] == [{"path": str(stale), "counted": str(fresh)}]
    table = format_table(res)
    assert f"duplicate: {stale} is the same trial as {fresh}" in table

    st = collect_status(tmp_path)
    assert st["counts"]["done"] == 2  # the copy is listed, not counted
    assert [t["dir"] for t in st["superseded"]] == [stale]
    assert f"{stale} -> counted: {fresh}" in status_text(tmp_path)


def test_aggregate_and_status_agree_on_every_state(tmp_path):
    write(tmp_path / "runs" / "ok1" / "metrics.json", metrics("dtd", 1, 50.0))
    write(tmp_path / "runs" / "ok2" / "metrics.json", metrics("svhn", 1, 60.0))
    write(tmp_path / "runs" / "failed" / "metrics.json", metrics("svhn", 2, None, status="failed"))
    write(tmp_path / "runs" / "cut" / "metrics.json", "{not json")
    write(tmp_path / "runs" / "going" / "progress.json", {"epoch": 1, "epochs": 2})
    write(tmp_path / "_ray" / "x" / "metrics.json", metrics("dtd", 9, 0.0))  # Ray's folder: never a run
    write(tmp_path / ".hidden" / "metrics.json", metrics("dtd", 8, 0.0))
    res = aggregate(tmp_path, out_dir=tmp_path / "report")
    st = collect_status(tmp_path)
    assert res["runs"]["counts"] == st["counts"] == {"done": 2, "failed": 1, "broken": 1, "running": 1,
                                                     "pending": 0}
    assert res["runs"]["broken"][0]["path"] == str(tmp_path / "runs" / "cut")
    assert "broken 1" in status_text(tmp_path)
    assert res["datasets"]["dtd"]["seeds"] == [1]  # not 9 (under _ray) nor 8 (hidden)
