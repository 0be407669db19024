"""DeepSpeed trials: one trial over 2 CPU processes (gloo), ZeRO-2 on the trainable branch only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from synqt.config import TrialConfig, load_config
from synqt.errors import ConfigError
from synqt.run.rundir import METRIC_KEYS
from synqt.training.deepspeed import DEFAULT_DS_CONFIG, deepspeed_config, run_local, state_sha256


@pytest.fixture(scope="session")
def ds_assets() -> tuple[Path, Path]:
    """The cached synthetic benchmark + pre-trained tiny ViT (what conftest's demo_assets provides)."""
    from synqt.tools.pretrain import ensure_demo_assets

    root, ckpt = ensure_demo_assets()
    return Path(root).absolute(), Path(ckpt).absolute()


def _cfg(assets: tuple[Path, Path], tmp: Path, *extra: str) -> TrialConfig:
    root, ckpt = assets
    return load_config(["configs/demo.yaml"] if Path("configs/demo.yaml").is_file() else [], [
        f"data_root={root}", f"checkpoint={ckpt}", "dataset=syn_colour_shape", "protocol=paper",
        "backbone=vit_tiny_patch16_224", "epochs=2", "warmup_epochs=1", "eval_every=1", "batch_size=32",
        "grad_accum_steps=2", "eval_batch_size=64", "trainer=deepspeed", "num_devices=2", "device=cpu",
        f"cache_dir={tmp / 'cache'}", *extra])


# ---------------------------------------------------------------------------------------------- config filling


def test_shipped_config_autos_filled() -> None:
    cfg = TrialConfig(batch_size=64, grad_accum_steps=2)
    raw = json.loads(DEFAULT_DS_CONFIG.read_text())
    assert "auto" in json.dumps(raw)
    out = deepspeed_config(cfg, world_size=2)
    assert "auto" not in json.dumps(out) and "_comment" not in out
    assert (out["train_batch_size"], out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"]) == (
        64, 16, 2)
    assert out["train_batch_size"] == out["train_micro_batch_size_per_gpu"] * 2 * out["gradient_accumulation_steps"]
    assert out["zero_optimization"]["stage"] == 2
    assert "optimizer" not in out and not out["bf16"]["enabled"]


def test_config_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="divisible by grad_accum_steps"):
        deepspeed_config(TrialConfig(batch_size=30, grad_accum_steps=2), world_size=2)
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="stage=3 is not offered"):
        deepspeed_config(TrialConfig(batch_size=8, deepspeed_config=str(zero3)), world_size=2)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"train_batch_size": 128}))
    with pytest.raises(ConfigError, match=r"wrong.json: train_batch_size=128 contradicts"):
        deepspeed_config(TrialConfig(batch_size=64, deepspeed_config=str(wrong)), world_size=2)
    with pytest.raises(ConfigError, match="does not exist"):
        deepspeed_config(TrialConfig(deepspeed_config=str(tmp_path / "none.json")), world_size=2)


# ---------------------------------------------------------------------------------------------- 2-process trial


@pytest.fixture(scope="module")
def uninterrupted(ds_assets: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One 2-process trial run start to finish: (its tmp dir, rank 0's returned metrics)."""
    tmp = tmp_path_factory.mktemp("ds")
    return tmp, run_local(_cfg(ds_assets, tmp), tmp / "sweep" / "runs" / "ds_trial", nprocs=2)


@pytest.mark.slow
def test_two_process_cpu_trial(ds_assets: tuple[Path, Path], uninterrupted: tuple[Path, dict]) -> None:
    from launcher.results.aggregate import aggregate
    from synqt.model.stream import build_backbone, count_trainable, new_branch
    from synqt.weights.checkpoint import read_trainable

    tmp_path, metrics = uninterrupted
    cfg = _cfg(ds_assets, tmp_path)
    run_dir = tmp_path / "sweep" / "runs" / "ds_trial"

    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    missing = [k for k in (*METRIC_KEYS, "run_name", "epochs_done", "eval_history") if k not in on_disk]
    assert not missing, missing
    assert on_disk["status"] == "ok", on_disk["error"]
    assert on_disk["test_acc"] is not None and 0.0 <= on_disk["test_acc"] <= 100.0
    assert on_disk["epochs_done"] == 2 and [e["epoch"] for e in on_disk["eval_history"]] == [1, 2]
    assert on_disk["images_per_s"] > 0
    ds = on_disk["deepspeed"]
    assert ds["world_size"] == 2 and ds["backend"] == "gloo"
    # only the trainable branch went to DeepSpeed
    backbone = build_backbone(cfg.backbone, drop_path_rate=cfg.drop_path_rate, checkpoint=cfg.checkpoint,
                              **cfg.backbone_kwargs)
    expected = count_trainable(new_branch(backbone, 9, token_nums=cfg.token_nums))
    assert ds["params_in_deepspeed"] == on_disk["trainable_params"] == expected
    # data parallel correctness: both ranks ended with bitwise identical trainable weights
    hashes = ds["weights_sha256"]
    assert len(hashes["branch"]) == 2 and hashes["branch"][0] == hashes["branch"][1]
    tensors, header = read_trainable(run_dir / "trainable.safetensors")
    assert state_sha256(tensors) == hashes["branch"][0]
    assert header["extra"]["trainer"] == "deepspeed"
    # ... which moved away from the initial branch
    torch.manual_seed(cfg.seed)
    assert state_sha256(new_branch(backbone, 9, token_nums=cfg.token_nums)) != hashes["branch"][0]
    # the frozen backbone is unchanged on every rank
    fresh = state_sha256(backbone)
    assert hashes["backbone_start"] == fresh and hashes["backbone_end"] == [fresh, fresh]
    # run dir like the engine's; resume state removed at the end
    assert (run_dir / "config.yaml").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/epoch", "eval/test_acc", "perf/images_per_s",
            "perf/process_peak_cpu_rss_mib_max_over_ranks", "final/test_acc"} <= tags
    # one x-axis: evaluations sit at the optimizer step where train/epoch records their epoch
    assert [e.step for e in events.Scalars("eval/test_acc")] == [
        e.step for e in events.Scalars("train/epoch") if e.value in {h["epoch"] for h in on_disk["eval_history"]}]
    assert [round(e.value, 4) for e in events.Scalars("eval/test_acc")] == [
        round(e["acc"], 4) for e in on_disk["eval_history"]]
    assert not (run_dir / "ds_checkpoint").exists() and not (run_dir / "progress.json").exists()
    # the aggregator accepts it
    results = aggregate(tmp_path / "sweep")
    assert results["datasets"]["syn_colour_shape"]["status"] == "ok"


@pytest.mark.slow
def test_killed_worker_is_retried_from_the_epoch_checkpoint(
    ds_assets: tuple[Path, Path],
    uninterrupted: tuple[Path, dict],
    tmp_path: Path,
    capfd: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGKILL one rank during epoch 2: run_local restarts both ranks, they resume after epoch 1 from the
    DeepSpeed checkpoint, and the trial ends exactly as the uninterrupted run did."""
    import os
    import signal
    import threading
    import time

    import psutil

    run_dir = tmp_path / "runs" / "ds_trial"
    killed: list[int] = []

    def kill_a_rank_after_epoch_1() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            progress = run_dir / "progress.json"  # written after the epoch-1 checkpoint and its barrier
            try:
                epoch = json.loads(progress.read_text())["epoch"] if progress.is_file() else 0
            except ValueError:
                epoch = 0
            ranks = [c for c in psutil.Process().children() if "spawn" in " ".join(c.cmdline())]
            if epoch == 1 and len(ranks) == 2:
                victim = max(ranks, key=lambda c: c.create_time())
                os.kill(victim.pid, signal.SIGKILL)
                killed.append(victim.pid)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_a_rank_after_epoch_1, daemon=True)
    watcher.start()
    metrics = run_local(_cfg(ds_assets, tmp_path), run_dir, nprocs=2, retries=1)
    watcher.join(timeout=5)
    err = capfd.readouterr().err
    assert killed, "the watcher never saw epoch 1 finish with both ranks alive"
    assert "terminated with signal SIGKILL; retrying from the last checkpoint" in caplog.text
    assert "rank 0 resumed ds_trial after epoch 1" in err and "rank 1 resumed ds_trial after epoch 1" in err
    ref = uninterrupted[1]
    assert metrics["status"] == "ok" and metrics["epochs_done"] == 2
    assert metrics["eval_history"] == ref["eval_history"] and metrics["test_acc"] == ref["test_acc"]
    assert metrics["deepspeed"]["weights_sha256"]["branch"] == ref["deepspeed"]["weights_sha256"]["branch"]
    assert not (run_dir / "ds_checkpoint").exists()


@pytest.mark.slow
def test_ray_train_torchtrainer_workers(ds_assets: tuple[Path, Path], tmp_path: Path) -> None:
    """launcher.run.ray_backend's worker function under a real TorchTrainer (Ray Train sets up gloo)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from launcher.run.ray_backend import _deepspeed_worker
    from synqt.config import config_to_dict

    cfg = _cfg(ds_assets, tmp_path, "epochs=1")
    run_dir = tmp_path / "runs" / "ray_ds"
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        result = TorchTrainer(
            _deepspeed_worker, train_loop_config={"cfg": config_to_dict(cfg), "run_dir": str(run_dir)},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="ds", storage_path=str(tmp_path / "ray_storage"))).fit()
    finally:
        ray.shutdown()
    assert result.error is None
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "ok" and m["test_acc"] is not None and m["epochs_done"] == 1
    assert m["deepspeed"]["world_size"] == 2 and m["deepspeed"]["backend"] == "gloo"
    assert len(set(m["deepspeed"]["weights_sha256"]["branch"])) == 1


@pytest.mark.slow
def test_two_process_trial_from_the_kv_cache_equals_the_live_one(ds_assets: tuple[Path, Path],
                                                                  tmp_path: Path) -> None:
    """DeepSpeed reads the node's K/V cache through the same query-stream code: weights bitwise equal to live."""
    common = ("backbone_drop_path=false", "kv_cache_dtype=fp32", "epochs=1", "eval_every=1")
    live = run_local(_cfg(ds_assets, tmp_path, "kv_cache=off", *common), tmp_path / "live", nprocs=2)
    cached = run_local(_cfg(ds_assets, tmp_path, "kv_cache=disk", *common), tmp_path / "cached", nprocs=2)
    assert live["status"] == cached["status"] == "ok"
    builds = (tmp_path / "cache" / "kv" / "builds.log").read_text().splitlines()
    assert sorted(line.split("\t")[3] for line in builds) == ["test", "train800val200"]  # rank 0 built, once
    assert cached["eval_history"] == live["eval_history"]
    from synqt.weights.checkpoint import read_trainable

    a, _ = read_trainable(tmp_path / "live" / "trainable.safetensors")
    b, _ = read_trainable(tmp_path / "cached" / "trainable.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


# ---------------------------------------------------------------------------------------------- deferred evaluation
# The tiny 2-block ViT of engine_helpers (64 train images = 4 optimizer steps per epoch, 32 test images):
# 4 epochs with an evaluation after each, over 2 processes.


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from engine_helpers import write_tiny_assets

    root = tmp_path_factory.mktemp("ds_tiny")
    return (*write_tiny_assets(root), root)


def _tiny(assets: tuple[Path, Path, Path], **kw) -> TrialConfig:
    from engine_helpers import tiny_cfg

    data_root, ckpt, root = assets
    values = dict(trainer="deepspeed", num_devices=2, epochs=4, eval_every=1, kv_cache="off")
    values.update(kw)
    return tiny_cfg(data_root, ckpt, root / "cache", **values)


def _eval_events(run_dir: Path) -> list[tuple[int, float]]:
    from engine_helpers import event_accumulator

    return [(e.step, round(e.value, 6)) for e in event_accumulator(run_dir).Scalars("eval/test_acc")]


@pytest.fixture(scope="module")
def periodic_tiny(tiny_assets: tuple[Path, Path, Path],
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The reference: the tiny 2-process trial evaluating the test split after every epoch."""
    run = tmp_path_factory.mktemp("ds_periodic") / "run"
    return run, run_local(_tiny(tiny_assets, deferred_eval=False), run, nprocs=2)


def _same_as_periodic(metrics: dict, run: Path, periodic_tiny: tuple[Path, dict]) -> None:
    ref_dir, ref = periodic_tiny
    assert ref["status"] == metrics["status"] == "ok", metrics["error"]
    assert [e["epoch"] for e in metrics["eval_history"]] == [1, 2, 3, 4]
    assert metrics["eval_history"] == ref["eval_history"]  # exactly, not approximately
    assert metrics["best_of_test"] == ref["best_of_test"] and metrics["test_acc"] == ref["test_acc"]
    assert metrics["deepspeed"]["weights_sha256"]["branch"] == ref["deepspeed"]["weights_sha256"]["branch"]
    # TensorBoard (its own reader): the accuracies at the optimizer steps the periodic run wrote them at
    assert _eval_events(run) == _eval_events(ref_dir) == [
        (4 * h["epoch"], round(h["acc"], 6)) for h in ref["eval_history"]]
    assert not (run / "eval_snapshots").exists() and not (run / "ds_checkpoint").exists()


@pytest.mark.slow
def test_deferred_evaluation_reproduces_periodic_evaluation(tiny_assets: tuple[Path, Path, Path],
                                                            periodic_tiny: tuple[Path, dict], tmp_path: Path) -> None:
    """deferred_eval=true: snapshots after epochs 1-3, one packed pass over them and the final weights at the
    end, on each rank's share of the test split: the periodic run's accuracies, steps and final weights."""
    run = tmp_path / "deferred"
    metrics = run_local(_tiny(tiny_assets), run, nprocs=2)
    _same_as_periodic(metrics, run, periodic_tiny)
    assert len({e["acc"] for e in metrics["eval_history"]}) > 1  # the four weight sets really differ
    # ... scored in one pass at the end: every accuracy was written after epoch 3 (step 12) had ended,
    # where the periodic run wrote epoch 1's before epoch 2 began
    from engine_helpers import event_accumulator

    def first_eval_after_epoch_3(run_dir: Path) -> bool:
        events = event_accumulator(run_dir)
        epoch_3 = next(e.wall_time for e in events.Scalars("train/epoch") if e.step == 12)
        return min(e.wall_time for e in events.Scalars("eval/test_acc")) > epoch_3

    assert first_eval_after_epoch_3(run) and not first_eval_after_epoch_3(periodic_tiny[0])


def _stop_after_epoch_2(payload: dict) -> None:
    """train_worker's report on every rank (module level: spawned processes unpickle it by name)."""
    if payload["epoch"] >= 2:
        raise RuntimeError(f"simulated stop after epoch {payload['epoch']}")


@pytest.mark.slow
def test_deferred_evaluation_survives_a_resume(tiny_assets: tuple[Path, Path, Path],
                                               periodic_tiny: tuple[Path, dict], tmp_path: Path) -> None:
    """Both ranks stop after epoch 2's checkpoint with two snapshots pending (listed in the DeepSpeed
    checkpoint's client state); the resumed trial scores them and ends with the periodic accuracies."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    from synqt.config import config_to_dict
    from synqt.training.deepspeed import _free_port, _spawn_entry

    cfg, run = _tiny(tiny_assets), tmp_path / "run"
    run.mkdir()
    with pytest.raises(ProcessException):  # raised by both ranks (or, rarely, their exit)
        mp.spawn(_spawn_entry, args=(2, _free_port(), config_to_dict(cfg), str(run), 1, _stop_after_epoch_2),
                 nprocs=2, join=True)
    assert sorted(p.name for p in (run / "eval_snapshots").iterdir()) == [
        "epoch00001.safetensors", "epoch00002.safetensors"]
    client = torch.load(run / "ds_checkpoint" / "epoch0002" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)
    assert client["pending_evals"] == [[1, 4], [2, 8]] and client["eval_history"] == []
    metrics = run_local(cfg, run, nprocs=2)
    assert metrics["provenance"]["resumed_after_epoch"] == 2
    _same_as_periodic(metrics, run, periodic_tiny)


def test_sigterm_to_a_two_process_train_stops_every_rank(ds_assets: tuple[Path, Path], tmp_path: Path) -> None:
    """Issue 19: `synqt train trainer=deepspeed num_devices=2` sent SIGTERM (kill / scancel of the parent only)
    exits 130 with the resume command, stops both ranks (none trains on), and keeps the epoch checkpoint."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    root, ckpt = ds_assets
    run_dir = tmp_path / "run"
    repo = Path(__file__).resolve().parents[1]
    args = ["train", "--config", "configs/demo.yaml", "--dataset", "syn_colour_shape", "--data-root", str(root),
            "--checkpoint", str(ckpt), "--out", str(run_dir), "protocol=paper", "epochs=30", "warmup_epochs=1",
            "eval_every=100", "batch_size=32", "eval_batch_size=64", "trainer=deepspeed", "num_devices=2",
            "device=cpu", f"cache_dir={tmp_path / 'cache'}"]
    log = tmp_path / "train.log"
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", *args], stdout=open(log, "w"), cwd=repo,
                            stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ranks: list[psutil.Process] = []
    try:
        deadline = time.time() + 300
        while not (run_dir / "progress.json").is_file():  # written after the epoch-1 checkpoint
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.2)
        ranks = psutil.Process(proc.pid).children(recursive=True)
        assert len([r for r in ranks if "spawn" in " ".join(r.cmdline())]) == 2
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        _, alive = psutil.wait_procs(ranks, timeout=10)
    finally:
        proc.kill()
        for r in ranks:  # never leave a rank training on after the test
            with contextlib.suppress(psutil.Error):
                r.kill()
    out = log.read_text()
    assert proc.returncode == 130, out
    assert f"interrupted: resume with: synqt {' '.join(args)} --resume" in out, out
    assert not alive, alive
    assert (run_dir / "ds_checkpoint").is_dir() and not (run_dir / "metrics.json").exists()

def _stop_after_epoch_3(payload: dict) -> None:
    """train_worker's report on every rank (module level: spawned processes unpickle it by name)."""
    if payload["epoch"] >= 3:
        raise RuntimeError(f"simulated stop after epoch {payload['epoch']}")


@pytest.mark.slow
def test_resumed_deepspeed_trial_logs_each_step_once(tiny_assets: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Checkpoints every 2 epochs; both ranks stop after epoch 3, whose steps 9-12 were logged after the
    epoch-2 checkpoint; the resumed trial logs them again. TensorBoard's own reader must see one point per
    step for every tag (the resumed writer purges from its resume step), HParams session included."""
    import math

    import torch.multiprocessing as mp
    from engine_helpers import N_TRAIN, N_VAL, event_accumulator
    from torch.multiprocessing.spawn import ProcessException

    from synqt.config import config_to_dict
    from synqt.training.deepspeed import _free_port, _spawn_entry

    cfg, run = _tiny(tiny_assets, checkpoint_every=2, deferred_eval=False), tmp_path / "run"
    run.mkdir()
    with pytest.raises(ProcessException):
        mp.spawn(_spawn_entry, args=(2, _free_port(), config_to_dict(cfg), str(run), 1, _stop_after_epoch_3),
                 nprocs=2, join=True)
    metrics = run_local(cfg, run, nprocs=2)
    assert metrics["status"] == "ok" and metrics["provenance"]["resumed_after_epoch"] == 2
    per_epoch = math.ceil((N_TRAIN + N_VAL) / cfg.batch_size)  # paper protocol: train800val200
    events = event_accumulator(run)
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert steps["train/loss"] == steps["train/lr"] == list(range(1, cfg.epochs * per_epoch + 1))
    ends = [e * per_epoch for e in range(1, cfg.epochs + 1)]
    assert steps["train/epoch"] == steps["eval/test_acc"] == ends  # eval_every=1
    for tag, got in steps.items():
        assert len(got) == len(set(got)), f"{tag}: {got}"
    sessions = [t for t in events.Tags()["tensors"] if t.endswith("session_start_info")]
    assert sessions and all(len(events.Tensors(t)) == 1 for t in sessions)
