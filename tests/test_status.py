"""`synqt status`: trial states from plan.json + run directories, and the time-left estimate."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from launcher.results.status import collect_status, format_duration, status_text
from synqt.errors import SynQTError


def _trial(i: int, dataset: str, epochs: int = 10, stage: str = "final") -> dict:
    return {"index": i, "run_name": f"{dataset}_s{i}", "stage": stage, "dataset": dataset, "seed": i,
            "hparams": {"lr": 1e-3}, "epochs": epochs}


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


T0 = 1_700_000_000.0  # "now" of the estimates below


def make_sweep(root: Path, stage2_pending: int = 0) -> list[dict]:
    """6 trials of 10 epochs: 2 done (100 s each, side by side, ending at T0), 1 failed, 1 running at epoch 4
    (for 40 s until T0 - 30), 2 pending."""
    trials = [_trial(i, d) for i, d in enumerate(["cifar", "dtd", "svhn", "kitti", "dmlab", "eurosat"])]
    _write(root / "plan.json", {"name": "demo", "protocol": "paper", "trials": trials,
                                "datasets": [t["dataset"] for t in trials], "stage2_pending": stage2_pending})
    runs = root / "runs"
    for t in trials[:2]:
        _write(runs / t["run_name"] / "metrics.json",
               {"status": "ok", "error": None, "wall_time_s": 100.0, "epochs_done": 10, "finished_at": T0})
    _write(runs / trials[2]["run_name"] / "metrics.json",
           {"status": "failed", "error": "DataError: svhn/test.json missing", "wall_time_s": 3.0,
            "epochs_done": 0, "finished_at": T0 - 50})
    _write(runs / trials[3]["run_name"] / "progress.json",
           {"epoch": 4, "epochs": 10, "wall_time_s": 40.0, "updated": T0 - 30})
    return trials


def test_counts_and_estimate(tmp_path):
    make_sweep(tmp_path)
    st = collect_status(tmp_path, now=T0)
    assert st["counts"] == {"done": 2, "failed": 1, "broken": 0, "running": 1, "pending": 2}
    assert st["seconds_per_trial_epoch"] == pytest.approx(200.0 / 20)
    # remaining: running 10 - 4 = 6, pending 2 x 10 = 20. Throughput: 10 + 10 + 4 epochs while something ran,
    # [T0 - 100, T0] (the running trial's [T0 - 70, T0] and the failed one's inside it): 24 epochs per 100 s
    assert st["remaining_epochs"] == 26
    assert st["completed_epochs"] == 24 and st["busy_s"] == pytest.approx(100.0)
    assert st["eta_s"] == pytest.approx(26 * 100.0 / 24)

    text = status_text(tmp_path, st)
    assert "done 2 | failed 1 | running 1 | pending 2" in text
    assert "svhn_s2: DataError: svhn/test.json missing" in text
    assert "kitti_s3: epoch 4/10" in text
    assert "estimated time left: ~1 min 48 s at the sweep's throughput so far (24 trial-epochs done in" in text
    assert "stale" not in text


def test_stage2_and_parallel_running(tmp_path):
    trials = make_sweep(tmp_path, stage2_pending=3)
    _write(tmp_path / "runs" / trials[4]["run_name"] / "progress.json",
           {"epoch": 9, "epochs": 10, "wall_time_s": 90.0, "updated": T0 - 7200})
    st = collect_status(tmp_path, now=T0)
    assert st["counts"]["running"] == 2 and st["counts"]["pending"] == 1
    # running 6 + 1, pending 10, 3 unplanned final trials at the plan's 10 epochs each
    assert st["remaining_epochs"] == 6 + 1 + 10 + 30
    # the stale trial ran [T0 - 7290, T0 - 7200] (not until now): 90 s + the 100 s above, 24 + 9 epochs
    assert st["busy_s"] == pytest.approx(190.0) and st["completed_epochs"] == 33
    assert st["eta_s"] == pytest.approx(47 * 190.0 / 33)
    text = status_text(tmp_path, st)
    assert "plus 3 final-stage trial(s)" in text
    assert "stale?" in text  # progress.json not updated for 2 h


def test_nothing_finished_is_unknown(tmp_path):
    trials = [_trial(0, "cifar"), _trial(1, "dtd")]
    _write(tmp_path / "plan.json", {"name": "x", "protocol": "vtab", "datasets": ["cifar", "dtd"],
                                    "trials": trials, "stage2_pending": 0})
    _write(tmp_path / "runs" / "cifar_s0" / "progress.json", {"epoch": 1, "epochs": 10, "wall_time_s": 5.0,
                                                              "updated": "2024-01-01T00:00:00+00:00"})
    st = collect_status(tmp_path)
    assert st["eta_s"] is None
    assert st["counts"] == {"done": 0, "failed": 0, "broken": 0, "running": 1, "pending": 1}
    assert "estimated time left: unknown" in status_text(tmp_path)


def test_without_plan_infers_from_run_dirs(tmp_path, capsys):
    from launcher.cli import main

    _write(tmp_path / "a" / "metrics.json", {"status": "ok", "dataset": "cifar", "wall_time_s": 50.0,
                                             "epochs_done": 5})
    _write(tmp_path / "b" / "metrics.json", {"status": "failed", "error": "boom", "dataset": "dtd"})
    _write(tmp_path / "c" / "progress.json",
           {"epoch": 2, "epochs": 5, "wall_time_s": 20.0, "updated": time.time()})
    _write(tmp_path / "_ray" / "d" / "metrics.json", {"status": "ok"})  # Ray internals: ignored
    st = collect_status(tmp_path)
    assert st["plan"] is False and st["total"] == 3
    assert st["counts"] == {"done": 1, "failed": 1, "broken": 0, "running": 1, "pending": 0}
    # a: 5 epochs in [mtime - 50, mtime]; c: 2 epochs in [now - 20, now] inside it; 3 epochs remain
    assert st["eta_s"] == pytest.approx(3 * 50.0 / 7, rel=0.05)
    assert main(["status", str(tmp_path)]) == 3  # a failed trial: "finished with failed runs"
    out = capsys.readouterr().out
    assert "no plan.json" in out and "b: boom" in out


def test_errors_and_durations(tmp_path):
    with pytest.raises(SynQTError, match="does not exist"):
        status_text(tmp_path / "missing")
    (tmp_path / "plan.json").write_text("{not json")
    with pytest.raises(SynQTError, match="plan.json"):
        status_text(tmp_path)
    assert format_duration(3725) == "1 h 02 min"
    assert format_duration(59) == "59 s"
    assert format_duration(90000) == "1 d 1 h"
