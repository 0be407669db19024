"""Shared helpers for the engine, pack and `synqt train` tests: a tiny backbone, tiny data, readers.

Everything here is CPU-sized (a 2-block, 32-wide ViT on 16x16 images, 64 training images), so a
three-epoch trial takes a few seconds. Tests pin torch to one intra-op thread: on a shared
two-core machine two threads spin against each other and a tiny model runs ~5x slower.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from synqt.config import TrialConfig

TINY_BACKBONE = "vit_tiny_patch16_224"
TINY_KW: dict = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
TASK = "syn_count"  # 6 classes
TASK_CLASSES = 6
N_TRAIN, N_VAL, N_TEST = 48, 16, 32  # train800val200 = 64 images = 4 steps of 16


@contextlib.contextmanager
def quiet_single_thread() -> Iterator[None]:
    """One intra-op thread and plain log lines (module-scoped fixtures cannot use monkeypatch)."""
    before_threads = torch.get_num_threads()
    before_env = {k: os.environ.get(k) for k in ("SYNQT_NO_PROGRESS", "OMP_NUM_THREADS")}
    # OMP_NUM_THREADS too: the trainers set torch's thread count from it (synqt.training.threads)
    os.environ.update(SYNQT_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before_threads)
        for key, value in before_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(autouse=True)
def _one_thread_no_progress() -> Iterator[None]:
    """Autouse in every test module that imports it."""
    with quiet_single_thread():
        yield


def write_tiny_assets(root: Path) -> tuple[Path, Path]:
    """A 6-class synthetic dataset (vtab_json layout) and a randomly initialised tiny backbone file.

    The backbone is saved as a checkpoint so that every run, resume and ``evaluate_checkpoint`` load
    exactly the same frozen weights through the normal checkpoint path.
    """
    import timm
    from safetensors.torch import save_file

    from synqt.data.synthetic import write_benchmark

    data_root = write_benchmark(root / "data", image_size=16, tasks=[TASK], n_train=N_TRAIN, n_val=N_VAL,
                                n_test=N_TEST, seed=3)
    ckpt = root / "tiny_backbone.safetensors"
    if not ckpt.is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(123)
            model = timm.create_model(TINY_BACKBONE, pretrained=False, num_classes=0, **TINY_KW)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    return data_root, ckpt


def tiny_cfg(data_root: Path, ckpt: Path, cache_dir: Path, **overrides) -> TrialConfig:
    """A TrialConfig for the tiny assets: paper protocol, 3 epochs, batch 16, every scalar logged."""
    values = dict(
        dataset=TASK, data_root=str(data_root), checkpoint=str(ckpt), backbone=TINY_BACKBONE,
        backbone_kwargs=dict(TINY_KW), cache_dir=str(cache_dir), epochs=3, warmup_epochs=1, batch_size=16,
        eval_batch_size=32, eval_every=2, log_every=1, lr=1e-3, seed=7, device="cpu",
    )
    values.update(overrides)
    return TrialConfig(**values)


def tiny_overrides(data_root: Path, ckpt: Path, cache_dir: Path) -> list[str]:
    """The same settings as ``tiny_cfg`` as ``key=value`` command-line overrides."""
    kw = [f"backbone_kwargs.{k}={v}" for k, v in TINY_KW.items()]
    return [f"backbone={TINY_BACKBONE}", *kw, f"checkpoint={ckpt}", f"cache_dir={cache_dir}", "epochs=3",
            "warmup_epochs=1", "batch_size=16", "eval_batch_size=32", "eval_every=2", "log_every=1", "lr=1e-3",
            "seed=7", "device=cpu"]


def tiny_sweep_overrides(data_root: Path, ckpt: Path, storage: Path) -> list[str]:
    """Overrides that turn configs/sweeps/ci.yaml into a one-task, one-seed, one-epoch sweep on the tiny ViT."""
    kw = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_KW.items()) + "}"
    return [f"storage_path={storage}", f"data_root={data_root}", f"checkpoint={ckpt}", f"datasets=[{TASK}]",
            "seeds=[42]", "pack=off", "demo_assets=false", f"backbone={TINY_BACKBONE}", f"backbone_kwargs={kw}",
            "epochs=1", "warmup_epochs=0", "batch_size=16", f"cache_dir={storage / 'cache'}"]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def trainable_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from synqt.weights.checkpoint import read_trainable

    tensors, _ = read_trainable(Path(run_dir) / "trainable.safetensors")
    return tensors


def max_weight_diff(run_a: Path, run_b: Path) -> float:
    """Largest absolute difference between two runs' trainable weights (same keys required)."""
    a, b = trainable_tensors(run_a), trainable_tensors(run_b)
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def event_accumulator(run_dir: Path):
    """TensorBoard's own reader over every events file of a run directory, nothing dropped."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0,
                                                         "images": 0, "audio": 0, "compressedHistograms": 0})
    acc.Reload()
    return acc


def scalar_steps(run_dir: Path, tag: str) -> list[int]:
    return [e.step for e in event_accumulator(run_dir).Scalars(tag)]


def file_kinds(run_dir: Path) -> set[str]:
    """File names of a run directory, with TensorBoard's per-process events names folded to one kind."""
    return {"events.out.tfevents.*" if p.name.startswith("events.out.tfevents.") else p.name
            for p in Path(run_dir).iterdir()}


class Interrupt(RuntimeError):
    """Raised from a report callback to simulate a trial killed after an epoch's checkpoint."""


def interrupt_after(epoch: int):
    def report(payload: dict) -> None:
        if payload["epoch"] >= epoch:
            raise Interrupt(f"simulated kill after epoch {payload['epoch']}")

    return report


def comparable(metrics: dict) -> dict:
    """The outcome fields of a metrics.json that must agree between equivalent runs."""
    keys = ("status", "val_acc", "test_acc", "best_of_test", "epochs_done", "eval_history", "trainable_params",
            "hparams", "dataset", "protocol", "stage", "seed")
    return {k: metrics[k] for k in keys}


def env_one_thread() -> dict[str, str]:
    """Environment for a `synqt` subprocess: one thread, no progress bar."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SYNQT_NO_PROGRESS": "1"}

