"""Sweeps on a real local Ray cluster (CPU): combinations, aggregate, two stages, retry, resume, jobs, demo."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_helpers import ray_job_submit

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CI = REPO / "configs" / "sweeps" / "ci.yaml"
TASKS = ["syn_texture", "syn_blobs", "syn_count", "syn_orientation"]  # Natural, Specialized, 2 x Structured


@pytest.fixture(scope="module")
def assets(request, tmp_path_factory) -> tuple[Path, Path]:
    """(tiny data root, pre-trained demo checkpoint): the shared cached backbone + small task copies."""
    try:
        got = request.getfixturevalue("demo_assets")
        ckpt = Path(got[1] if isinstance(got, tuple | list) else got.checkpoint)
    except pytest.FixtureLookupError:
        from synqt.tools.pretrain import ensure_demo_assets

        ckpt = Path(ensure_demo_assets()[1])
    from synqt.data.synthetic import write_benchmark

    root = tmp_path_factory.mktemp("tiny") / "data"
    write_benchmark(root, tasks=TASKS, n_train=64, n_val=32, n_test=48)
    return root, ckpt


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def _sweep(args: list[str], env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", "sweep", *args],
        cwd=REPO,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _metrics(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (sweep_dir / "runs").glob("*/metrics.json")}


def _base(assets, tmp_path, *extra: str) -> list[str]:
    root, ckpt = assets
    return [
        str(CI),
        f"storage_path={tmp_path}",
        f"data_root={root}",
        f"checkpoint={ckpt}",
        "epochs=2",
        "warmup_epochs=1",
        "eval_every=1",
        "batch_size=16",
        *extra,
    ]


def test_sweep_every_combination_aggregate_and_retry(assets, tmp_path):
    fail = "final-syn_count-lr0.001-s44"
    out = _sweep(_base(assets, tmp_path, f"datasets=[{','.join(TASKS)}]", "pack=2"), env=_env(SYNQT_FAIL_ONCE=fail))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweep_dir = tmp_path / "ci"
    plan = json.loads((sweep_dir / "plan.json").read_text())
    m = _metrics(sweep_dir)
    expected = {f"final-{d}-lr{lr}-s{s}" for d in TASKS for lr in ("0.002", "0.001") for s in (42, 44)}
    assert {t["run_name"] for t in plan["trials"]} == expected
    assert set(m) == expected and all(v["status"] == "ok" for v in m.values())
    # the failing trial raised after epoch 1 and its retry resumed at epoch 2 (not from scratch)
    marker = (sweep_dir / "runs" / fail / ".synqt_fail_once").read_text().split()
    assert marker == ["1", "2"]
    assert m[fail]["epochs_done"] == 2
    # the aggregate, recomputed from the per-trial files: the best grid point's mean over seeds per task
    results = json.loads((sweep_dir / "results.json").read_text())
    acc = {}
    for d in TASKS:
        by_point: dict[str, list[float]] = {}
        for v in m.values():
            if v["dataset"] == d:
                by_point.setdefault(str(v["hparams"]["lr"]), []).append(v["test_acc"])
        assert all(len(a) == 2 for a in by_point.values())
        acc[d] = max(statistics.mean(a) for a in by_point.values())
        assert results["datasets"][d]["accuracy"] == pytest.approx(acc[d], abs=1e-6)
    groups = {
        "Natural": [acc["syn_texture"]],
        "Specialized": [acc["syn_blobs"]],
        "Structured": [acc["syn_count"], acc["syn_orientation"]],
    }
    for g, vals in groups.items():
        assert results["groups"][g] == pytest.approx(statistics.mean(vals), abs=1e-6)
    assert results["mean_of_groups"] == pytest.approx(
        statistics.mean(statistics.mean(v) for v in groups.values()), abs=1e-6
    )
    assert "Structured" in out.stdout  # the table is printed at the end


def test_vtab_two_stage_retrains_the_best_val_point(assets, tmp_path):
    out = _sweep(
        _base(
            assets,
            tmp_path,
            "protocol=vtab",
            "datasets=[syn_count,syn_blobs]",
            "grid.lr=[3e-3,1e-5]",
            "seeds=[42,44]",
            "pack=off",
            "name=two",
        )
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    m = _metrics(tmp_path / "two")
    search = {k: v for k, v in m.items() if k.startswith("search-")}
    final = {k: v for k, v in m.items() if k.startswith("final-")}
    assert len(search) == 4 and all(v["seed"] == 42 and v["val_acc"] is not None for v in search.values())
    assert len(final) == 4
    for d in ("syn_count", "syn_blobs"):
        points = [
            (v["val_acc"], -[3e-3, 1e-5].index(v["hparams"]["lr"]), v["hparams"]["lr"])
            for v in search.values()
            if v["dataset"] == d
        ]
        best_lr = max(points)[2]  # highest val_acc; ties -> first grid point
        chosen = [v for v in final.values() if v["dataset"] == d]
        assert sorted(v["seed"] for v in chosen) == [42, 44]
        assert all(v["hparams"]["lr"] == best_lr and v["stage"] == "final" for v in chosen)
        assert all(v["test_acc"] is not None for v in chosen)
    plan = json.loads((tmp_path / "two" / "plan.json").read_text())
    assert plan["stage2_pending"] is False and len(plan["trials"]) == 8


@pytest.mark.parametrize("ray_state", ["intact", "from_before_an_upgrade"])
def test_sigkill_then_resume_does_not_rerun_finished_trials(assets, tmp_path, ray_state):
    """Killed mid-sweep, then resumed: Ray's saved experiment is restored (intact), or, when it cannot be read
    (a sweep started before an upgrade moved a module that Tune pickled by path: launcher.ray_backend ->
    launcher.run.ray_backend), a new Ray experiment runs; either way no finished trial runs again."""
    args = _base(
        assets,
        tmp_path,
        "datasets=[syn_count,syn_blobs,syn_texture]",
        "seeds=[42]",
        "pack=off",
        "max_concurrent=1",
        "epochs=3",
        "name=killed",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "sweep", *args],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    runs = tmp_path / "killed" / "runs"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            done = [k for k, v in _metrics(tmp_path / "killed").items() if v["status"] == "ok"] if runs.exists() else []
            if len(done) >= 2:
                break
            assert proc.poll() is None, "sweep ended before it could be killed"
            time.sleep(0.5)
        else:
            pytest.fail("no trial finished in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        proc.wait()
    finished = {
        p.parent.name: (p.stat().st_mtime_ns, p.read_text())
        for p in runs.glob("*/metrics.json")
        if json.loads(p.read_text())["status"] == "ok"
    }
    assert 2 <= len(finished) < 6
    refused = _sweep(args)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    saved = sorted((tmp_path / "killed" / "_ray").glob("*/tuner.pkl"))
    assert saved, "the killed sweep left no Ray experiment to restore"
    if ray_state == "from_before_an_upgrade":  # the callback class by its old module path, as Tune pickled it
        for f in saved:
            f.write_bytes(b"clauncher.ray_backend\n_PendingReporter\n.")
    out = _sweep([*args, "--resume"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stdout + out.stderr
    fresh = "cannot be restored (ModuleNotFoundError" in out.stdout and "running a new Ray experiment" in out.stdout
    assert fresh == (ray_state == "from_before_an_upgrade"), out.stdout[-3000:]
    m = _metrics(tmp_path / "killed")
    assert len(m) == 6 and all(v["status"] == "ok" for v in m.values())
    for name, (mtime, text) in finished.items():
        p = runs / name / "metrics.json"
        assert p.stat().st_mtime_ns == mtime and p.read_text() == text, f"{name} was rerun"
    assert (tmp_path / "killed" / "results.json").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_to_a_started_cluster(assets, tmp_path):
    root, ckpt = assets
    env = _env(RAY_TMPDIR=str(tmp_path / "rt"))
    port, dash = _free_port(), _free_port()
    tmp_ray = Path("/tmp") / f"rayt{os.getpid()}"  # short: unix socket paths are limited to 107 bytes
    # --block keeps `ray start` in the foreground: its process group (gcs, raylet, dashboard, workers)
    # is ours to end, without touching any other Ray cluster on the machine.
    head = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--dashboard-port={dash}",
            # the agent's HTTP port (which serves job submission) defaults to 52365 for every Ray on the
            # machine: a second cluster (another test's, a labmate's) would leave this one without a job agent
            f"--dashboard-agent-listen-port={_free_port()}",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=2",
            f"--temp-dir={tmp_ray}",
            "--include-dashboard=true",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_for_dashboard(dash, head)
        storage = tmp_path / "jobruns"
        submit = (
            [
                "ray",
                "job",
                "submit",
                "--address",
                f"http://127.0.0.1:{dash}",
                "--working-dir",
                str(REPO),
                "--",
                "synqt",
                "sweep",
                "configs/sweeps/ci.yaml",
                f"storage_path={storage}",
                f"data_root={root}",
                f"checkpoint={ckpt}",
                "datasets=[syn_count]",
                "seeds=[42]",
                "epochs=1",
                "warmup_epochs=0",
                "eval_every=1",
                "batch_size=16",
            ]
        )
        job = ray_job_submit(submit, env, timeout=400)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in (job.stdout + job.stderr).lower()
        m = _metrics(storage / "ci")
        assert len(m) == 2 and all(v["status"] == "ok" for v in m.values())
        results = json.loads((storage / "ci" / "results.json").read_text())
        assert "syn_count" in results["datasets"]
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(3)
        head.wait()


def _wait_for_dashboard(port: int, head: subprocess.Popen, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert head.poll() is None, "ray start --head exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2):
                return
        except OSError:
            time.sleep(1)
    pytest.fail("the Ray dashboard did not come up")


def test_demo_end_to_end(assets, tmp_path):
    root, ckpt = assets
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            "demo",
            "--out",
            str(tmp_path / "demo"),
            f"data_root={root}",
            "datasets=[syn_count,syn_blobs]",
            "epochs=2",
            "warmup_epochs=1",
            "eval_every=1",
        ],
        cwd=REPO,
        env=_env(SYNQT_DEMO_DIR=str(ckpt.parent)),  # the cached backbone: no second pre-training
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    d = tmp_path / "demo" / "demo"
    assert (d / "results.json").is_file() and (d / "results.png").is_file()
    assert "syn_count" in out.stdout and "TensorBoard" in out.stdout and str(d / "results.png") in out.stdout
    assert len(_metrics(d)) == 4


def test_packed_sweep_aggregates_to_the_unpacked_table(assets, tmp_path):
    """Issue 7: the same sweep packed (one frozen pass per dataset and seed) and unpacked gives the same table."""
    tables = {}
    for pack in ("2", "off"):
        out = _sweep(_base(assets, tmp_path / pack, "datasets=[syn_texture,syn_count]", f"pack={pack}", "seeds=[42]",
                           "max_concurrent=1"))
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        sweep_dir = tmp_path / pack / "ci"
        plan = json.loads((sweep_dir / "plan.json").read_text())
        packs = {t["pack"] for t in plan["trials"]}
        assert len(packs) == (2 if pack == "2" else 4), plan["trials"]  # 2 datasets x 2 lr, packed in twos or alone
        tables[pack] = json.loads((sweep_dir / "results.json").read_text())
        assert {m["provenance"]["packed_with"] for m in _metrics(sweep_dir).values()} == {2 if pack == "2" else 1}
    packed, alone = tables["2"], tables["off"]
    assert packed["datasets"].keys() == alone["datasets"].keys() == {"syn_texture", "syn_count"}
    for name, row in packed["datasets"].items():
        assert row["accuracy"] == pytest.approx(alone["datasets"][name]["accuracy"], abs=1e-9), name
        assert row["best_of_test"] == pytest.approx(alone["datasets"][name]["best_of_test"], abs=1e-9), name
        assert row["hparams"] == alone["datasets"][name]["hparams"], name
    for key in ("mean_of_tasks", "mean_of_groups"):
        assert packed[key] == alone[key]


def test_multi_device_trial_runs_deepspeed_under_torchtrainer(assets, tmp_path):
    """resources.devices=2: each Tune trial drives a TorchTrainer of 2 gloo workers (DeepSpeed ZeRO-2),
    and the workers' per-epoch results are forwarded into the Tune trial's own results."""
    out = _sweep(
        _base(
            assets,
            tmp_path,
            "datasets=[syn_count]",
            "grid.lr=[2e-3]",
            "seeds=[42]",
            "resources.devices=2",
            "resources.cpus=1",
            "max_concurrent=1",
            "name=ds",
        )
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweep_dir = tmp_path / "ds"
    (name, m), = _metrics(sweep_dir).items()
    assert m["status"] == "ok", m.get("error")
    assert m["trainer"] == "deepspeed" and m["epochs_done"] == 2
    assert m["deepspeed"]["world_size"] == 2 and m["deepspeed"]["backend"] == "gloo"
    assert len(m["deepspeed"]["weights_sha256"]["branch"]) == 2
    assert len(set(m["deepspeed"]["weights_sha256"]["branch"])) == 1
    # the workers' frozen backbone (from the driver's object-store copy) is bitwise the checkpoint's
    from synqt.config import load_config
    from synqt.model.stream import build_backbone
    from synqt.training.deepspeed import state_sha256

    cfg = load_config([str(sweep_dir / "runs" / name / "config.yaml")])
    expected = state_sha256(build_backbone(cfg.backbone, checkpoint=cfg.checkpoint, **cfg.backbone_kwargs))
    assert m["deepspeed"]["weights_sha256"]["backbone_start"] == expected
    # what the Tune trial recorded: the forwarded epoch results, then the trial's final result
    (result_file,) = (sweep_dir / "_ray" / "final").glob("*/result.json")
    rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
    assert [r["epoch"] for r in rows if f"{name}/train_loss" in r] == [1, 2]  # every epoch forwarded
    # deferred evaluation (the default): epoch 1's accuracy is scored with the final weights after epoch 2,
    # so the test accuracy first comes with epoch 2's result
    forwarded = [r for r in rows if f"{name}/test_acc" in r]
    assert [r["epoch"] for r in forwarded] == [2] and [e["epoch"] for e in m["eval_history"]] == [1, 2]
    assert forwarded[0][f"{name}/test_acc"] == m["eval_history"][-1]["acc"]
    assert rows[-1]["done"] == 1 and rows[-1]["ok"] == 1 and rows[-1]["score"] == m["test_acc"]
    results = json.loads((sweep_dir / "results.json").read_text())
    assert results["datasets"]["syn_count"]["accuracy"] == pytest.approx(m["test_acc"])


def test_sequential_sweep_gives_the_ray_sweeps_results(assets, tmp_path):
    """`synqt sweep --sequential` (no Ray) runs the same packs to the same numbers as the Ray backend."""
    from synqt.weights.checkpoint import read_trainable

    args = ["datasets=[syn_blobs]", "seeds=[42,44]", "pack=2"]
    ray_run = _sweep(_base(assets, tmp_path / "ray", *args))
    assert ray_run.returncode == 0, ray_run.stdout[-3000:] + ray_run.stderr[-3000:]
    seq_run = _sweep([*_base(assets, tmp_path / "seq", *args), "--sequential"])
    assert seq_run.returncode == 0, seq_run.stdout[-3000:] + seq_run.stderr[-3000:]
    assert "one after another in this process (no Ray)" in seq_run.stdout
    assert not (tmp_path / "seq" / "ci" / "_ray").exists() and (tmp_path / "ray" / "ci" / "_ray").is_dir()
    ray_m, seq_m = _metrics(tmp_path / "ray" / "ci"), _metrics(tmp_path / "seq" / "ci")
    assert set(seq_m) == set(ray_m) and len(seq_m) == 4
    for name, m in seq_m.items():
        assert m["status"] == "ok" and m["provenance"]["packed_with"] == 2
        assert m["eval_history"] == ray_m[name]["eval_history"] and m["test_acc"] == ray_m[name]["test_acc"]
        seq_w, _ = read_trainable(tmp_path / "seq" / "ci" / "runs" / name / "trainable.safetensors")
        ray_w, _ = read_trainable(tmp_path / "ray" / "ci" / "runs" / name / "trainable.safetensors")
        # Ray's trials ran on 1 thread (resources.cpus=1), this process on all cores: the sums are ordered
        # differently, so the weights agree to float rounding, not bit for bit
        assert seq_w.keys() == ray_w.keys()
        worst = max(float((seq_w[k] - ray_w[k]).abs().max()) for k in seq_w)
        assert worst < 1e-4, f"{name}: weights differ by {worst:.3g}"
    ray_res = json.loads((tmp_path / "ray" / "ci" / "results.json").read_text())
    seq_res = json.loads((tmp_path / "seq" / "ci" / "results.json").read_text())
    for d, row in seq_res["datasets"].items():  # everything but the measured peak memory
        assert {k: v for k, v in row.items() if k != "peak_memory_bytes"} == {
            k: v for k, v in ray_res["datasets"][d].items() if k != "peak_memory_bytes"}
    assert seq_res["mean_of_groups"] == ray_res["mean_of_groups"]


def test_cached_sweep_builds_each_split_once_and_equals_the_live_sweep(assets, tmp_path):
    """The CI sweep (2 tasks x 2 lr x 2 seeds: 4 packs on 2 concurrent Tune trials whose actors are reused) with
    the K/V cache on (fp32 storage) against the same sweep live: every pack of a task reads the one cache of
    each split (builds.log: one build per task and split), and every run ends with the live run's accuracies."""
    tasks = "datasets=[syn_count,syn_blobs]"
    cache = tmp_path / "node-cache"
    live = _sweep(_base(assets, tmp_path / "live", tasks, "kv_cache=off", f"cache_dir={cache}"))
    assert live.returncode == 0, live.stdout[-3000:] + live.stderr[-3000:]
    cached = _sweep(_base(assets, tmp_path / "cached", tasks, "kv_cache=auto", "kv_cache_dtype=fp32",
                          f"cache_dir={cache}"))
    assert cached.returncode == 0, cached.stdout[-3000:] + cached.stderr[-3000:]
    builds = [line.split("\t") for line in (cache / "kv" / "builds.log").read_text().splitlines()]
    assert sorted((b[2], b[3]) for b in builds) == [("syn_blobs", "test"), ("syn_blobs", "train800val200"),
                                                     ("syn_count", "test"), ("syn_count", "train800val200")], builds
    m_live, m_cached = _metrics(tmp_path / "live" / "ci"), _metrics(tmp_path / "cached" / "ci")
    assert sorted(m_live) == sorted(m_cached) and len(m_live) == 8
    for name, m in m_cached.items():
        assert m["status"] == "ok"
        assert m["eval_history"] == m_live[name]["eval_history"], name
    results = [json.loads((tmp_path / d / "ci" / "results.json").read_text())["datasets"] for d in ("live", "cached")]
    assert {d: e["accuracy"] for d, e in results[0].items()} == {d: e["accuracy"] for d, e in results[1].items()}
