"""What a user sees: a real Ray sweep's console, then TensorBoard started on it and read over HTTP.

One sweep (2 tasks x 2 learning rates x 2 seeds, packed in pairs, 2 epochs) on a local Ray cluster. The
test reads what `synqt sweep` printed, then starts `tensorboard --logdir <sweep>` (bound to 127.0.0.1)
and asks its data API what the browser would get: the run list (`/data/runs`), the scalar tags
(`/data/plugin/scalars/tags`), a curve (`/data/plugin/scalars/scalars`), the HParams experiment
(`POST /data/plugin/hparams/experiment`) and its table rows (`POST /data/plugin/hparams/session_groups`).
Expected values come from the command line (the grid, the seeds) and from each run's metrics.json.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TASKS = ["syn_blobs", "syn_count"]
LRS = [0.002, 0.001]
SEEDS = [42, 44]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """(sweep dir, completed `synqt sweep` process) of the small Ray sweep."""
    from synqt.data.synthetic import write_benchmark
    from synqt.tools.pretrain import ensure_demo_assets

    ckpt = Path(ensure_demo_assets()[1])
    root = tmp_path_factory.mktemp("tb_view")
    data = root / "data"
    write_benchmark(data, tasks=TASKS, n_train=64, n_val=32, n_test=48)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "SYNQT_NO_PROGRESS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "sweep", str(REPO / "configs" / "sweeps" / "ci.yaml"),
         f"storage_path={root}", f"data_root={data}", f"checkpoint={ckpt}", f"datasets=[{','.join(TASKS)}]",
         f"grid.lr=[{','.join(map(str, LRS))}]", f"seeds=[{','.join(map(str, SEEDS))}]", "pack=2", "epochs=2",
         "warmup_epochs=1", "eval_every=1", "batch_size=16"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "ci", proc


def _metrics(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (sweep_dir / "runs").glob("*/metrics.json")}


def test_sweep_prints_one_line_per_trial_and_a_running_count(sweep):
    sweep_dir, proc = sweep
    m = _metrics(sweep_dir)
    assert len(m) == len(TASKS) * len(LRS) * len(SEEDS)
    lines = proc.stdout.splitlines()
    done = [x for x in lines if x.startswith("done   ")]
    assert len(done) == len(m)  # each trial once
    for name, metrics in m.items():
        line = next(x for x in done if x.split()[1] == name)
        assert f"test {metrics['test_acc']:.2f}%" in line
        assert f"best of test {metrics['best_of_test']:.2f}%" in line
        assert re.search(rf"{metrics['wall_time_s'] / 60:.1f} min$", line)
    counts = [x for x in lines if x.startswith("[")]
    assert counts, proc.stdout
    assert re.fullmatch(rf"\[{len(m)}/{len(m)}\] done {len(m)} · running 0 · pending 0 · failed 0 · left .+",
                        counts[-1])
    finished = [int(re.match(r"\[(\d+)/", x)[1]) for x in counts]
    assert finished == sorted(finished)  # a running count
    # no step lines, no epoch lines, no Ray table or Ray header without -v
    assert not any(x.startswith(("epoch ", "[synqt]")) for x in lines)
    for ray_text in ("Trial status", "Configuration for experiment", "View detailed results", "pack_trainable"):
        assert ray_text not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorBoard:
    """`tensorboard --logdir DIR` on 127.0.0.1 as a subprocess, and its HTTP data API."""

    def __init__(self, logdir: Path, log: Path) -> None:
        self.port = _free_port()
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
             "--port", str(self.port), "--load_fast=false", "--reload_interval", "1"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def get(self, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def wait_for_runs(self, n: int, timeout: float = 180) -> list[str]:
        deadline, runs = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"tensorboard exited: {Path(self.log.name).read_text()[-2000:]}"
            try:
                runs = self.get("/data/runs")
                tags = self.get("/data/plugin/scalars/tags")
                if len(runs) >= n and all(r in tags or r == "_sweep_summary" for r in runs):
                    return runs
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(f"TensorBoard listed {runs} after {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def board(sweep, tmp_path_factory):
    sweep_dir, _ = sweep
    tb = TensorBoard(sweep_dir, tmp_path_factory.mktemp("tb_log") / "tensorboard.log")
    try:
        yield tb
    finally:
        tb.stop()


def test_runs_are_the_trials_and_the_sweep_summary(sweep, board):
    sweep_dir, _ = sweep
    names = set(_metrics(sweep_dir))
    runs = board.wait_for_runs(len(names) + 1)
    assert sorted(runs) == sorted([f"runs/{n}" for n in names] + ["_sweep_summary"])
    assert not any(r.startswith("_ray") or r.startswith("tensorboard") for r in runs)


def test_scalar_tags_share_one_x_axis_and_memory_is_mib_by_kind(sweep, board):
    sweep_dir, _ = sweep
    m = _metrics(sweep_dir)
    board.wait_for_runs(len(m) + 1)
    tags = board.get("/data/plugin/scalars/tags")
    assert "_sweep_summary" not in tags  # no one-point scalars in the summary run
    want = {"train/loss", "train/lr", "train/epoch", "eval/test_acc", "perf/images_per_s",
            "perf/process_peak_cpu_rss_mib", "final/test_acc", "final/best_of_test", "final/trainable_params",
            "final/peak_memory_mib", "final/images_per_s", "final/wall_time_min"}
    for name in m:
        assert set(tags[f"runs/{name}"]) == want, name
    name = sorted(m)[0]
    run = urllib.parse.quote(f"runs/{name}")

    def curve(tag: str) -> list[list[float]]:
        return board.get(f"/data/plugin/scalars/scalars?run={run}&tag={urllib.parse.quote(tag)}")

    epochs = {int(v): int(step) for _, step, v in curve("train/epoch")}
    assert sorted(epochs) == [1, 2]
    steps_per_epoch = epochs[1]
    assert epochs[2] == 2 * steps_per_epoch
    assert 1 <= min(s for _, s, _ in curve("train/loss")) and max(s for _, s, _ in curve("train/loss")) <= epochs[2]
    # evaluation after epoch E is drawn at the optimizer step that ended epoch E: one x-axis with training
    assert [(int(s), round(v, 4)) for _, s, v in curve("eval/test_acc")] == [
        (epochs[h["epoch"]], round(h["acc"], 4)) for h in m[name]["eval_history"]]
    mib = [v for _, _, v in curve("perf/process_peak_cpu_rss_mib")]
    assert all(50 < v < 100_000 for v in mib)  # MiB of a CPU process, not bytes
    assert curve("final/peak_memory_mib")[-1][2] == pytest.approx(m[name]["peak_memory_bytes"] / 2**20, rel=1e-6)


def test_hparams_view_shows_what_varied_with_the_final_metrics(sweep, board):
    sweep_dir, _ = sweep
    m = _metrics(sweep_dir)
    board.wait_for_runs(len(m) + 1)
    # the request the HParams dashboard sends (it asks for a limited number of hparam columns)
    exp = board.get("/data/plugin/hparams/experiment",
                    {"experimentName": "", "includeMetrics": True, "hparamsLimit": 5})
    infos = {h["name"]: h for h in exp["hparamInfos"]}
    # what the sweep varied comes first and is marked as differing, with every value as its domain
    shown = [h["name"] for h in exp["hparamInfos"]]
    assert len(shown) == 5 and shown[:3] == ["dataset", "lr", "seed"], shown
    assert [bool(h.get("differs")) for h in exp["hparamInfos"]] == [True, True, True, False, False]
    assert infos["dataset"]["domainDiscrete"] == sorted(TASKS)
    assert infos["lr"]["domainDiscrete"] == sorted(LRS)
    assert infos["seed"]["domainDiscrete"] == sorted(SEEDS)
    metrics = {x["name"]["tag"]: x.get("displayName") for x in exp["metricInfos"]}
    assert list(metrics)[:2] == ["final/test_acc", "final/best_of_test"]
    assert "final/val_acc" not in metrics  # the paper protocol never scores val200
    assert metrics["final/best_of_test"] == "best of test % (selected on test)"

    # every hparam is in the full experiment (nothing lost, the constant ones after the varied ones)
    full = board.get("/data/plugin/hparams/experiment", {"experimentName": "", "includeMetrics": True})
    assert {"token_nums", "weight_decay", "protocol", "trainer"} <= {h["name"] for h in full["hparamInfos"]}

    # the table rows: one session per run, its hparams and its final test accuracy as in metrics.json
    groups = board.get("/data/plugin/hparams/session_groups", {
        "experimentName": "", "startIndex": 0, "sliceSize": 100, "includeMetrics": True,
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "colParams": [{"hparam": "lr"}, {"hparam": "seed"}, {"hparam": "dataset"},
                      {"metric": {"tag": "final/test_acc", "group": ""}}]})
    sessions = [s for g in groups["sessionGroups"] for s in g["sessions"]]
    assert sorted(s["name"] for s in sessions) == sorted(f"runs/{n}" for n in m)
    for g in groups["sessionGroups"]:
        for s in g["sessions"]:
            run = m[s["name"].removeprefix("runs/")]
            assert g["hparams"]["lr"] == pytest.approx(run["hparams"]["lr"])
            assert g["hparams"]["dataset"] == run["dataset"] and g["hparams"]["seed"] == run["seed"]
            assert s["status"] == "STATUS_SUCCESS"
            value = {v["name"]["tag"]: v["value"] for v in s["metricValues"]}["final/test_acc"]
            assert value == pytest.approx(run["test_acc"], abs=1e-4)


def test_resume_with_v_shows_rays_own_output(sweep):
    """Last in this module (it re-aggregates the sweep): `--resume -v` lets Ray's output through, and the
    finished trials are counted, not listed or rerun. The resume adds a grid point, so it has trials to run (a
    resume of a fully finished sweep aggregates without starting Ray: tests/test_polish.py)."""
    sweep_dir, first = sweep
    before = {n: m["wall_time_s"] for n, m in _metrics(sweep_dir).items()}
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    added = 0.003
    proc = subprocess.run([*first.args, f"grid.lr=[{','.join(map(str, [*LRS, added]))}]", "--resume", "-v"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"synqt sweep: {len(before)} trial(s) already finished" in proc.stdout
    done = [x for x in proc.stdout.splitlines() if x.startswith("done   ")]
    assert len(done) == len(TASKS) * len(SEEDS) and all(f"lr{added}" in x for x in done), done  # only the new
    assert "Configuration for experiment" in proc.stdout  # Tune's header, hidden without -v
    after = _metrics(sweep_dir)
    assert {n: m["wall_time_s"] for n, m in after.items() if n in before} == before  # nothing was retrained
