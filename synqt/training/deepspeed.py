"""One SynQT trial over several processes: data parallel, DeepSpeed ZeRO stage 2 on the trainable branch.

Why a separate trainer: the pack trainer (``synqt.training.pack``) packs many trials on one device;
this one spreads ONE trial over ``num_devices`` processes (a trial too large or too slow for one
device). Only the query branch (queries, prompt FFNs, QSM blocks, head) is handed to DeepSpeed, through
``_TrainableView``, whose only registered submodule is the branch: the frozen backbone is never
wrapped, broadcast, all-reduced or partitioned; every rank holds its own full frozen copy.

Launch: Ray Train's ``TorchTrainer`` (``launcher/run/ray_backend.py``) calls ``train_worker`` in each worker
after it has set up the process group; ``run_local`` does the same without Ray (torch.multiprocessing,
gloo), for tests and single-node use. This module never imports ray: the Ray glue passes
``ray.train.report`` as ``report``.

Equivalence with the single-device engine: the same data order (``derive_seed(data_seed, epoch)``
permutation, one optimizer step per ``batch_size`` images), each global batch split across ranks as
``batch[rank::world]``, and the loss weighted so that the averaged gradient is exactly the mean over
the whole global batch (also for the last, short batch). Dropout / drop path draw from per-rank
generators reseeded every epoch, so a resumed run draws the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from synqt.config import (
    TrialConfig,
    config_dir,
    config_from_dict,
    config_to_dict,
    effective_seeds,
    save_config,
    splits_for,
)
from synqt.errors import ConfigError
from synqt.model.memory import keep_freed_host_memory
from synqt.model.precision import check_precision
from synqt.model.stream import PackedSynQT, count_trainable
from synqt.run import rundir
from synqt.training.build import branch_for, frozen_backbone, seeded_branch
from synqt.training.loop import (
    RunData,
    TrialOutcome,
    derive_seed,
    device_peak_memory,
    epoch_order,
    memory_tag,
    open_writer,
    run_hparams,
    should_eval,
    summary,
    trial_metrics,
    write_hparams,
)
from synqt.training.schedule import adamw, lr_at
from synqt.training.snapshots import count_correct, deferred, load_snapshots, remove_snapshots, save_snapshot
from synqt.weights.checkpoint import save_trainable
from synqt.weights.compat import check_same_run

log = logging.getLogger("synqt.deepspeed")

DEFAULT_DS_CONFIG = config_dir() / "deepspeed" / "zero2.json"
CHECKPOINT_DIR = rundir.DS_CHECKPOINT  # DeepSpeed's resume checkpoint inside the run dir (last epoch only)
SHM_OP = "deepspeed_shm_comm"


# ---------------------------------------------------------------------------------------------- helpers


class _TrainableView(nn.Module):
    """What DeepSpeed sees: the query branch as the only submodule; the frozen SynQT is held unregistered.

    ``parameters()`` / ``state_dict()`` / ``.to()`` / DeepSpeed's broadcast and ZeRO partitioning therefore
    touch only the trainable branch, never the backbone.
    """

    def __init__(self, model: PackedSynQT) -> None:
        super().__init__()
        (self.branch,) = model.branches
        object.__setattr__(self, "frozen_model", model)  # plain attribute, not a submodule

    def forward(self, images: torch.Tensor | None = None, kv: torch.Tensor | None = None) -> torch.Tensor:
        return self.frozen_model(images, kv=kv)[0]

    def train(self, mode: bool = True) -> _TrainableView:
        super().train(mode)
        self.frozen_model.train(mode)  # SynQT keeps its backbone in eval mode itself
        return self


def state_sha256(state: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 over the sorted names and raw bytes of a module's (or state dict's) tensors: equal iff bitwise equal."""
    items = state.state_dict() if isinstance(state, nn.Module) else state
    h = hashlib.sha256()
    for name in sorted(items):
        t = torch.as_tensor(items[name]).detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _avoid_jit_ops() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce op (C++, ~2 min on 2 cores).

    ``deepspeed.comm``'s TorchBackend builds ``deepspeed_shm_comm`` when it is "compatible"; the op only
    serves ``inference_all_reduce`` (inference kernels), never ZeRO training, whose collectives go
    through torch.distributed. Marking it incompatible before ``init_distributed`` skips both the
    build and the compatibility probe (which itself runs compiler subprocesses). Set
    ``SYNQT_DS_ALLOW_JIT=1`` to leave DeepSpeed alone.
    """
    if os.environ.get("SYNQT_DS_ALLOW_JIT") == "1":
        return
    import deepspeed.ops as ds_ops

    compatible = ds_ops.__dict__.get("__compatible_ops__")
    if compatible is None:
        ds_ops.__dict__["__compatible_ops__"] = {SHM_OP: False}
    else:
        compatible[SHM_OP] = False


def _check_device(cfg: TrialConfig) -> None:
    """The device and precision checks a rank makes, without touching a device (``run_local`` makes them in
    the launching process, so bad input is refused there, before any run directory exists)."""
    if cfg.precision == "fp16":
        raise ConfigError("precision=fp16 is not offered with trainer=deepspeed (it would need DeepSpeed's loss "
                          "scaling on an fp16 copy of the branch); use precision=bf16 or precision=no")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible (use device=auto or cpu)")
    if cfg.device == "cpu" or not torch.cuda.is_available():
        check_precision(cfg.precision, "cpu")


def _device(cfg: TrialConfig) -> torch.device:
    _check_device(cfg)
    if cfg.device == "cpu" or not torch.cuda.is_available():
        check_precision(cfg.precision, "cpu")  # bf16 only where it is native (synqt/model/precision.py)
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    check_precision(cfg.precision, torch.device("cuda", local))
    return torch.device("cuda", local)


def _init_distributed(device: torch.device) -> None:
    """Join the process group Ray Train / run_local / torchrun set up (or create it from the env)."""
    import deepspeed

    _avoid_jit_ops()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
            if key not in os.environ:
                raise ConfigError(f"train_worker needs an initialised torch.distributed process group or the "
                                  f"environment variable {key} (set by Ray Train, torchrun or run_local)")
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))  # DeepSpeed reads it
    deepspeed.init_distributed(dist_backend=backend)


def _fill_auto(obj: Any, values: Mapping[str, Any], path: str, source: str) -> Any:
    if isinstance(obj, dict):
        return {k: _fill_auto(v, values, f"{path}.{k}" if path else k, source)
                for k, v in obj.items() if not k.startswith("_")}
    if obj == "auto":
        if path not in values:
            raise ConfigError(f"{source}: key {path} is \"auto\" but synqt only fills {sorted(values)}")
        return values[path]
    return obj


def deepspeed_config(cfg: TrialConfig, world_size: int) -> dict[str, Any]:
    """The trial's DeepSpeed config: the JSON file with every "auto" filled from the trial's keys.

    Fails (ConfigError naming the file and key) on a batch that does not split evenly, explicit values
    that contradict the trial config, a ZeRO stage other than 0-2, or a DeepSpeed optimizer/scheduler.
    """
    path = Path(cfg.deepspeed_config) if cfg.deepspeed_config else DEFAULT_DS_CONFIG
    if not path.is_file():
        raise ConfigError(f"deepspeed_config {path} does not exist (expected a JSON file like {DEFAULT_DS_CONFIG})")
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"deepspeed_config {path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"deepspeed_config {path} must hold a JSON object")
    gas = cfg.grad_accum_steps
    if cfg.batch_size % (gas * world_size):
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by grad_accum_steps * num_devices = "
                          f"{gas} * {world_size} (DeepSpeed's train_micro_batch_size_per_gpu, {path})")
    values = {"train_batch_size": cfg.batch_size, "gradient_accumulation_steps": gas,
              "train_micro_batch_size_per_gpu": cfg.batch_size // (gas * world_size),
              "bf16.enabled": False, "fp16.enabled": False}
    out = _fill_auto(raw, values, "", f"deepspeed_config {path}")
    for key in ("train_batch_size", "gradient_accumulation_steps", "train_micro_batch_size_per_gpu"):
        if key in out and out[key] != values[key]:
            raise ConfigError(f"deepspeed_config {path}: {key}={out[key]} contradicts the trial "
                              f"(batch_size={cfg.batch_size}, grad_accum_steps={gas}, num_devices={world_size}: "
                              f"expected {values[key]} or \"auto\")")
        out[key] = values[key]
    for key in ("optimizer", "scheduler"):
        if key in out:
            raise ConfigError(f"deepspeed_config {path}: remove the {key!r} section: the trainer passes a torch "
                              "AdamW and sets the lr every step with synqt.training.schedule.lr_at "
                              "(no JIT-built optimizer)")
    for key in ("bf16", "fp16"):
        if (out.get(key) or {}).get("enabled"):
            raise ConfigError(f"deepspeed_config {path}: {key}.enabled must be false or \"auto\": mixed precision "
                              "comes from the trial's precision key (torch autocast around an fp32 branch)")
    stage = int((out.get("zero_optimization") or {}).get("stage", 0))
    if stage not in (0, 1, 2):
        raise ConfigError(f"deepspeed_config {path}: zero_optimization.stage={stage} is not offered (0, 1 or 2): "
                          "ZeRO-3 would partition parameters that the query stream slices (see docs/deepspeed.md)")
    out.setdefault("zero_allow_untested_optimizer", True)
    out.setdefault("steps_per_print", 10**9)
    return out


def collective_device() -> torch.device:
    """Where the default process group's collectives need their tensors: the current CUDA device under nccl
    (NCCL reduces device memory only; a CPU tensor is refused), else the CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(values: list[float], op: Any = None, device: torch.device | None = None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device or collective_device())
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def _all_gather_str(text: str, device: torch.device) -> list[str]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, text)
    return [str(s) for s in out]


def ds_checkpoint_problem(ckpt_dir: Path) -> str | None:
    """None when ``ckpt_dir`` (DeepSpeed's ``save_checkpoint`` folder) holds a complete checkpoint: ``latest``
    names a tag folder whose model and optimizer files are complete ``torch.save`` zips (checked as backbone
    files are, ``synqt.weights.identify.sniff``); else what is broken."""
    from synqt.weights.identify import torch_file_problem

    try:
        tag = (ckpt_dir / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        return f"its 'latest' file is unreadable ({err})"
    if not tag or "/" in tag or not (ckpt_dir / tag).is_dir():
        return f"its 'latest' file names {tag!r}, which is not a checkpoint folder there"
    files = sorted((ckpt_dir / tag).glob("*.pt"))
    if not any(f.name.endswith("model_states.pt") for f in files):
        return f"{tag}/ holds no model states file"
    for f in files:
        problem = torch_file_problem(f)
        if problem is not None:
            return f"{tag}/{f.name} is {problem}"
    return None


# ---------------------------------------------------------------------------------------------- the worker


class _Worker:
    """State of one rank of a DeepSpeed trial (setup, epochs, evaluation, outputs)."""

    def __init__(self, cfg: TrialConfig, run_dir: Path, report: Callable[[dict], None] | None,
                 backbone_state: Mapping[str, Any] | None) -> None:
        self.cfg, self.run_dir, self.report = cfg, run_dir, report
        self.backbone_state = backbone_state
        self.start_time = time.time()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.train_split, self.eval_split = splits_for(cfg)
        self.step = 0
        self.epochs_done = 0
        self.resumed_after_epoch: int | None = None
        self.eval_history: list[dict] = []
        # deferred evaluation (synqt.training.snapshots): (epoch, optimizer step) of each snapshot still to score
        self.deferred = deferred(cfg)
        self.pending_evals: list[tuple[int, int]] = []
        self.last_loss: float | None = None
        self.images_per_s: float | None = None
        self.status = "running"
        self.error: str | None = None
        self.writer: Any = None
        self.init_seconds: float | None = None
        self.hparams = run_hparams(cfg, {"num_devices": self.world})
        self.trainable_params: int | None = None
        self.train_list = self.eval_list = self.image_size = None
        # set as setup and training go; a trial failing early still writes its metrics.json
        self.device = torch.device("cpu")
        self.backbone: nn.Module | None = None
        self.peak: int | None = None
        self.ds_params: int | None = None
        self.ds_config: dict[str, Any] | None = None
        self.rank_hashes: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------- setup
    def setup(self, device: torch.device) -> None:
        from synqt.data.images import load_images
        from synqt.data.splits import dataset_num_classes, read_split, validate_dataset

        cfg = self.cfg
        self.device = device
        keep_freed_host_memory(device)  # on CPU: no page faults for every step's activations
        if not cfg.dataset or not cfg.data_root:
            raise ConfigError("dataset and data_root must be set (e.g. --dataset cifar --data-root /data/vtab-1k)")
        if self.is_main:  # one rank checks the folder; the others wait, then read the same lists
            validate_dataset(cfg.data_root, cfg.dataset, [self.train_split, self.eval_split], cfg.num_classes,
                             layout=cfg.layout)
        dist.barrier()
        self.num_classes = cfg.num_classes or dataset_num_classes(cfg.data_root, cfg.dataset, layout=cfg.layout)
        self.train_list = read_split(cfg.data_root, cfg.dataset, self.train_split, layout=cfg.layout)
        self.eval_list = read_split(cfg.data_root, cfg.dataset, self.eval_split, layout=cfg.layout)
        self.backbone = frozen_backbone(cfg, state=self.backbone_state)
        if self.is_main:
            from synqt.weights.checkpoint import weights_text

            log.info("%s: backbone %s, weights: %s", Path(self.run_dir).name, cfg.backbone,
                     weights_text(getattr(self.backbone, "synqt_identity", None)))
        self.image_size = cfg.image_size or int(self.backbone.patch_embed.img_size[0])
        load = dict(interpolation=cfg.interpolation, cache_dir=cfg.cache_dir)
        # rank 0 builds the decoded-image cache first (the file lock would serialise them anyway)
        for turn in (0, 1):
            if (turn == 0) == self.is_main:
                self.train_images, self.train_labels = load_images(self.train_list, self.image_size, **load)
                self.eval_images, self.eval_labels = load_images(self.eval_list, self.image_size, **load)
            dist.barrier()
        self.backbone_sha256_start = state_sha256(self.backbone)

        # same initial branch on every rank (DeepSpeed also broadcasts rank 0's)
        self.branch = seeded_branch(cfg, self.backbone, self.num_classes)
        self.model = PackedSynQT(self.backbone, [self.branch], drop_path_rate=cfg.drop_path_rate,
                                 backbone_drop_path=cfg.backbone_drop_path, memory_mode=cfg.memory_mode)
        self.model.to(device)
        self.model.image_generator = torch.Generator(device=device)
        self.branch.seed_generator(0, device)
        self._setup_kv_cache()
        self.view = _TrainableView(self.model)
        self.trainable_params = count_trainable(self.branch)
        self.ds_config = deepspeed_config(cfg, self.world)
        self._initialize()
        if self.is_main:
            save_config(cfg, self.run_dir / rundir.CONFIG)
            self.writer = open_writer(self.run_dir, self.step)

    def _setup_kv_cache(self) -> None:
        """The node's K/V caches of both splits (rank 0 builds first; the others then map the same files)."""
        from synqt.training.kv_cache import CacheRequest, open_trial_caches

        cfg = self.cfg
        requests = [(name, CacheRequest(split=split, images=images, image_size=self.image_size,
                                        interpolation=cfg.interpolation))
                    for name, images, split in (("train", self.train_images, self.train_list),
                                                ("eval", self.eval_images, self.eval_list))]
        caches: dict = {}
        for turn in (0, 1):
            if (turn == 0) == self.is_main:
                caches = open_trial_caches(self.model, cfg, requests, device=self.device, mean=cfg.mean,
                                           std=cfg.std, autocast=self._autocast, who=f"rank {self.rank}: ",
                                           say_live=self.is_main)
            if cfg.kv_cache != "off" and not cfg.backbone_drop_path:
                dist.barrier()
        self.train_kv, self.eval_kv = caches.get("train"), caches.get("eval")

    def _inputs(self, cache, images: np.ndarray, idx: np.ndarray) -> dict[str, torch.Tensor]:
        from synqt.data.images import to_tensor_batch

        if cache is not None:
            return {"kv": cache.batch(idx)}
        return {"images": to_tensor_batch(images[idx], self.cfg.mean, self.cfg.std).to(self.device, non_blocking=True)}

    def _initialize(self) -> None:
        import deepspeed

        params = [p for p in self.view.parameters() if p.requires_grad]
        optimizer = adamw(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        t0 = time.perf_counter()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.view, model_parameters=params, optimizer=optimizer, config=self.ds_config)
        self.init_seconds = time.perf_counter() - t0
        self.ds_params = sum(p.numel() for p in self.engine.module.parameters())
        log.info("rank %d: deepspeed.initialize took %.1f s (%d trainable parameters)", self.rank,
                 self.init_seconds, self.ds_params)
        self._load_resume()

    # ------------------------------------------------------------------------------------------ resume
    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR

    def _load_resume(self) -> None:
        if not (self.ckpt_dir / "latest").is_file():
            return
        problem = ds_checkpoint_problem(self.ckpt_dir)  # the same files, so the same answer, on every rank
        if problem is not None:
            dist.barrier()  # every rank has looked before rank 0 moves the folder
            if self.is_main:
                from synqt.storage import set_aside

                set_aside(self.ckpt_dir, problem, f"{self.run_dir.name} restarts from epoch 0")
            dist.barrier()
            return
        path, client = self.engine.load_checkpoint(str(self.ckpt_dir))
        if path is None or not client:
            return
        self.step = int(client["step"])
        self.epochs_done = int(client["epochs_done"])
        self.eval_history = list(client["eval_history"])
        self.pending_evals = [(int(e), int(s)) for e, s in client.get("pending_evals", [])]
        self.resumed_after_epoch = self.epochs_done
        log.info("rank %d resumed %s after epoch %d (step %d)", self.rank, self.run_dir.name, self.epochs_done,
                 self.step)

    def _save_resume(self) -> None:
        """DeepSpeed checkpoint (branch, ZeRO optimizer partitions) of this epoch; older tags are removed."""
        tag = f"epoch{self.epochs_done:04d}"
        client = {"step": self.step, "epochs_done": self.epochs_done, "eval_history": self.eval_history,
                  "pending_evals": [list(p) for p in self.pending_evals]}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client)  # writes `latest` last
        dist.barrier()
        if self.is_main:
            for old in self.ckpt_dir.iterdir():
                if old.is_dir() and old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)

    # ---------------------------------------------------------------------------------------- training
    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_labels) / self.cfg.batch_size)

    def _batch(self, images: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        from synqt.data.images import to_tensor_batch

        x = to_tensor_batch(images[idx], self.cfg.mean, self.cfg.std)
        return x.to(self.device, non_blocking=True), torch.as_tensor(labels[idx], device=self.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train(self) -> None:
        cfg, engine = self.cfg, self.engine
        gas, world = cfg.grad_accum_steps, self.world
        images_seen, seconds = 0, 0.0
        data_seed, init_seed = effective_seeds(cfg)
        for epoch in range(self.epochs_done, cfg.epochs):
            engine.train()
            self.model.image_generator.manual_seed(derive_seed(data_seed, epoch, 7, self.rank))
            self.branch.generator.manual_seed(derive_seed(init_seed, 1, epoch, self.rank))
            order = epoch_order(cfg, len(self.train_labels), epoch)
            loss_sum, loss_count = 0.0, 0
            t0 = time.perf_counter()
            for start in range(0, len(order), cfg.batch_size):
                batch_idx = order[start:start + cfg.batch_size]
                lr = lr_at(self.step, self.steps_per_epoch, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                           base_lr=cfg.lr, min_lr=cfg.min_lr)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                mine = batch_idx[self.rank::world]
                local = 0.0
                for idx in np.array_split(mine, gas):  # exactly gas backward calls per step on every rank
                    if len(idx):
                        x = self._inputs(self.train_kv, self.train_images, idx)
                        y = torch.as_tensor(self.train_labels[idx], device=self.device)
                        with self._autocast():
                            logits = engine(**x)
                        ce = F.cross_entropy(logits.float(), y, reduction="sum")
                        local += ce.item()
                    else:  # an empty share of a short last batch: zero gradients, same collectives
                        ce = sum(p.sum() for p in engine.module.parameters()) * 0.0
                    # DeepSpeed divides by gas and averages over ranks: this makes the gradient the
                    # mean over the global batch, as in the single-device engine
                    engine.backward(ce * (world * gas / len(batch_idx)))
                    engine.step()  # optimizer step only at the accumulation boundary
                (total,) = _all_reduce([local], device=self.device)
                if not math.isfinite(total):
                    raise FloatingPointError(f"non-finite training loss ({total}) at epoch {epoch + 1}, "
                                             f"step {self.step}")
                self.last_loss = total / len(batch_idx)
                self.step += 1
                loss_sum += self.last_loss
                loss_count += 1
                images_seen += len(batch_idx)
                if self.writer is not None and (self.step % cfg.log_every == 0 or self.step == 1):
                    self.writer.add_scalar("train/loss", loss_sum / loss_count, self.step)
                    self.writer.add_scalar("train/lr", lr, self.step)
                    loss_sum, loss_count = 0.0, 0
            seconds += time.perf_counter() - t0
            self.images_per_s = images_seen / max(seconds, 1e-9)
            self.epochs_done = epoch + 1
            self._after_epoch(self.epochs_done)

    @torch.no_grad()
    def evaluate(self, branches: list[nn.Module] | None = None) -> list[float]:
        """Accuracy (percent) of each branch (default: the trained one) on the eval split, all branches in one
        frozen forward per batch: each rank scores indices rank::world, the counts are summed over ranks."""
        mine = np.arange(self.rank, len(self.eval_labels), self.world)
        bs = self.cfg.eval_batch_size
        batches = [mine[start:start + bs] for start in range(0, len(mine), bs)]
        inputs = (self._inputs(self.eval_kv, self.eval_images, idx) for idx in batches)
        correct, total = count_correct(self.model, branches or [self.branch], batches, inputs, self.eval_labels,
                                       device=self.device, autocast=self._autocast)
        self.engine.train()
        *correct, total = _all_reduce([*correct, total], device=self.device)
        return [100.0 * c / max(total, 1) for c in correct]

    def _snapshot(self, epoch: int) -> None:
        """Deferred evaluation: the branch's weights at ``epoch``, scored at the end. ZeRO-2 replicates the
        parameters, so every rank holds the same weights and rank 0 alone writes them."""
        if self.is_main:
            save_snapshot(self.branch, self.run_dir, epoch)
        self.pending_evals.append((epoch, self.step))

    def _evaluate_now(self, epoch: int) -> None:
        """Score the current weights, and with them every pending snapshot (deferred evaluation) in the same
        packed pass; record each accuracy at the epoch and optimizer step its weights are from."""
        pending, snapshots = self.pending_evals, []
        if pending:
            dist.barrier()  # rank 0 has written every snapshot before any rank reads one
            snapshots = load_snapshots(self.run_dir, [e for e, _ in pending],
                                       lambda: branch_for(self.cfg, self.backbone, self.num_classes), self.device,
                                       run_name=self.run_dir.name)
        # evaluate's all-reduce returns on a rank only once every rank has loaded its snapshots
        accs = self.evaluate([*snapshots, self.branch])
        for (e, step), acc in zip([*pending, (epoch, self.step)], accs, strict=True):
            self.eval_history.append({"epoch": e, "split": self.eval_split, "acc": acc})
            if self.writer is not None:  # x: the optimizer step (of the snapshot, as a periodic evaluation wrote it)
                self.writer.add_scalar(f"eval/{self.eval_split}_acc", acc, step)
        if pending and self.is_main:
            remove_snapshots(self.run_dir, [e for e, _ in pending])
        self.pending_evals = []

    def _after_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        if should_eval(cfg, epoch):
            if self.deferred and epoch < cfg.epochs:
                self._snapshot(epoch)
            else:
                self._evaluate_now(epoch)
        peak, peak_kind = device_peak_memory(self.device)
        self.peak = int(_all_reduce([peak], dist.ReduceOp.MAX, self.device)[0])
        if self.writer is not None:
            self.writer.add_scalar("train/epoch", epoch, self.step)
            self.writer.add_scalar("perf/images_per_s", self.images_per_s, self.step)
            self.writer.add_scalar(memory_tag(peak_kind) + "_max_over_ranks", self.peak / 2**20, self.step)
            self.writer.flush()
        if cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0 and epoch < cfg.epochs:
            self._save_resume()
        if self.is_main and epoch < cfg.epochs:
            rundir.write_progress(self.run_dir, epoch, cfg.epochs, self.start_time)
        if epoch >= cfg.epochs:
            self.finish()
        if self.report is not None:  # every rank reports (Ray Train expects all workers to call report)
            self.report({"epoch": epoch, "branches": [self.summary()]})

    # ---------------------------------------------------------------------------------------- outcomes
    def outcome(self) -> TrialOutcome:
        """This trial's outcome so far (typed, for the report payload and metrics.json)."""
        return TrialOutcome(cfg=self.cfg, run_dir=self.run_dir, hparams=self.hparams, status=self.status,
                            error=self.error, epochs_done=self.epochs_done, eval_history=self.eval_history,
                            trainable_params=self.trainable_params, last_loss=self.last_loss,
                            resumed_after_epoch=self.resumed_after_epoch)

    def summary(self) -> dict[str, Any]:
        return summary(self.outcome(), self.eval_split)

    def finish(self) -> None:
        """All ranks: hash the weights (they must agree); rank 0 writes trainable + metrics, drops resume state."""
        branch_hashes = _all_gather_str(state_sha256(self.branch), self.device)
        backbone_hashes = _all_gather_str(state_sha256(self.backbone), self.device)
        self.status = "ok"
        self.rank_hashes = {"branch": branch_hashes, "backbone_start": self.backbone_sha256_start,
                            "backbone_end": backbone_hashes}
        if len(set(branch_hashes)) != 1:
            self.status, self.error = "failed", f"ranks ended with different trainable weights: {branch_hashes}"
        if not self.is_main:
            return
        if self.status == "ok":
            save_trainable(self.branch, self.run_dir / rundir.TRAINABLE,
                           backbone_identity=self.backbone.synqt_identity,
                           extra={"dataset": self.cfg.dataset, "run_name": self.run_dir.name,
                                  "num_classes": self.num_classes, "image_size": self.image_size,
                                  "trainer": "deepspeed"})
        metrics = build_metrics(self)
        self._write_hparams(metrics)
        rundir.write_metrics(self.run_dir, metrics)
        shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        rundir.clear_progress(self.run_dir)
        self.metrics = metrics

    def _write_hparams(self, metrics: dict) -> None:
        write_hparams(self.writer, self.cfg, self.hparams, metrics, extra={"trainer": "deepspeed"}, step=self.step)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as err:  # a full or read-only disk: the events already written stay readable
                log.warning("%s: TensorBoard events could not be flushed: %s", self.run_dir.name, err)
            self.writer = None


def build_metrics(w: _Worker) -> dict[str, Any]:
    """metrics.json of a DeepSpeed trial: the engine's keys (``trial_metrics``) plus a ``deepspeed`` section."""
    import deepspeed

    peak, peak_kind = device_peak_memory(w.device)
    peak = w.peak or peak
    identity = w.backbone.synqt_identity if w.backbone is not None else {}
    data = RunData(w.train_split, w.eval_split, w.start_time, w.train_list, w.eval_list, w.image_size,
                   w.images_per_s)
    metrics = trial_metrics(w.outcome(), data, peak=peak, peak_kind=f"{peak_kind} (max over ranks)",
                            identity=identity, packed_with=1)
    metrics["versions"]["deepspeed"] = deepspeed.__version__
    metrics["trainer"] = "deepspeed"
    metrics["deepspeed"] = {
        "world_size": w.world,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "initialize_s": w.init_seconds,
        "params_in_deepspeed": w.ds_params,
        "config": w.ds_config,
        "weights_sha256": w.rank_hashes,
    }
    return metrics


def train_worker(cfg: TrialConfig | dict, run_dir: str | Path, *, report: Callable[[dict], None] | None = None,
                 backbone_state: Mapping[str, Any] | None = None) -> dict | None:
    """One rank of a DeepSpeed trial; call it on every rank. Returns the metrics on rank 0, None elsewhere.

    Runs inside an initialised torch.distributed group (Ray Train's TorchTrainer, ``run_local`` or
    torchrun; otherwise it joins from MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE). ``report(payload)`` is
    called on every rank after each epoch with the engine's payload ``{"epoch", "branches": [...]}``.
    ``backbone_state``: the frozen ViT's state dict (tensors or numpy arrays), e.g. the launcher's shared
    copy, instead of reading ``cfg.checkpoint``. A run dir whose metrics.json says ok is left alone.
    """
    cfg = cfg if isinstance(cfg, TrialConfig) else config_from_dict(cfg, "train_worker(cfg=...)")
    run_dir = Path(run_dir)
    device = _device(cfg)
    _init_distributed(device)
    if dist.get_rank() == 0:
        rundir.set_aside_broken_state(run_dir)  # a cut metrics.json / progress.json: named, moved aside
    dist.barrier()
    done = rundir.read_metrics(run_dir)
    check_same_run(cfg, run_dir)  # a resume continues exactly the same run, or stops naming each change
    if rundir.is_done(run_dir):
        log.info("%s already finished; skipping", run_dir.name)
        return done if dist.get_rank() == 0 else None
    if dist.get_rank() == 0:
        from synqt.storage import check_writable, folder_key

        check_writable(run_dir, folder_key(run_dir) or "the run directory")
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    worker = _Worker(cfg, run_dir, report, backbone_state)
    try:
        worker.setup(device)
        worker.train()
    except Exception as err:
        from synqt.storage import as_write_failed

        worker.status = "failed"
        storage = as_write_failed(err, run_dir)  # the file, free space and key: no traceback needed
        worker.error = str(storage) if storage else f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}"
        if worker.is_main:  # a readable failure; the DeepSpeed checkpoint stays for a retry
            with contextlib.suppress(Exception):
                rundir.write_metrics(run_dir, build_metrics(worker))
        raise
    finally:
        worker.close()
    log.info("rank %d: %s finished (%s)", worker.rank, run_dir.name, worker.status)
    return getattr(worker, "metrics", None) if worker.is_main else None


# ---------------------------------------------------------------------------------------------- local launcher


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn_entry(rank: int, world: int, port: int, cfg: dict, run_dir: str, threads: int,
                 report: Callable[[dict], None] | None = None) -> None:
    """One process of ``run_local`` (``report``: train_worker's per-epoch callback, e.g. a test's interrupt)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    faulthandler.enable(all_threads=True)  # a rank killed by a signal (e.g. SIGABRT) prints its Python stacks
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(name)s: %(message)s", stream=sys.stderr)
    backend = "nccl" if (cfg.get("device") != "cpu" and torch.cuda.is_available()) else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10))
    try:
        train_worker(cfg, run_dir, report=report)
    finally:
        dist.destroy_process_group()
        logging.getLogger("synqt.deepspeed").info("rank %d: process group destroyed; exiting", rank)
    # Leave without interpreter finalization. A gloo worker thread (ProcessGroupGloo::runLoop) may still
    # be destroying the last collective's work object, whose tensors hold Python objects; its decref
    # needs the GIL, and a thread asking for the GIL while Python finalizes is ended by pthread_exit
    # inside a C++ destructor: std::terminate, SIGABRT ("terminate called without an active exception",
    # about 1 run in 20 on 2 CPUs; core dump backtrace in docs/deepspeed.md). Everything the trial
    # writes is closed and flushed by now; an exception above still takes the normal path to the parent.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _stop_ranks(processes: Sequence[Any], grace_s: float = 30.0) -> None:
    """SIGTERM every rank still alive, wait up to ``grace_s`` for them, then SIGKILL what is left."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in processes:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def run_local(cfg: TrialConfig | dict, run_dir: str | Path, nprocs: int = 2, retries: int = 1,
              report: Callable[[dict], None] | None = None) -> dict:
    """Run one DeepSpeed trial on this machine with ``nprocs`` processes (gloo on CPU, nccl on GPUs).

    The Ray-free path for tests and single-node use; returns rank 0's metrics (also in metrics.json).
    A worker process that dies (killed, out of memory) is retried up to ``retries`` times from the
    trial's last DeepSpeed checkpoint, as Ray's FailureConfig does for a trial in a sweep; a finished
    trial (metrics.json ok) is not rerun. ``report``: ``train_worker``'s per-epoch callback in every process (a
    module-level function: the spawned processes unpickle it by name).
    """
    import torch.multiprocessing as mp

    cfg = cfg if isinstance(cfg, TrialConfig) else config_from_dict(cfg, "run_local(cfg=...)")
    if nprocs < 1:
        raise ConfigError(f"run_local: nprocs={nprocs}; expected >= 1")
    if cfg.device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() < nprocs:
        raise ConfigError(f"run_local: nprocs={nprocs} but only {torch.cuda.device_count()} CUDA device(s)")
    run_dir = Path(run_dir)
    # the ranks' checks, made here first: a refusal inside a spawned rank would surface as a worker's
    # traceback (exit 1) and leave the run directory behind; rank 0 creates the run directory
    _check_device(cfg)
    check_same_run(cfg, run_dir)
    if not rundir.is_done(run_dir):
        from synqt.data.splits import validate_dataset

        if not cfg.dataset or not cfg.data_root:
            raise ConfigError("dataset and data_root must be set (e.g. --dataset cifar --data-root /data/vtab-1k)")
        validate_dataset(cfg.data_root, cfg.dataset, list(splits_for(cfg)), cfg.num_classes, layout=cfg.layout)
    from synqt.training.threads import choose_threads

    threads = max(1, choose_threads().threads // nprocs)  # the process's CPUs, shared by the ranks
    for attempt in range(retries + 1):
        try:
            context = mp.start_processes(_spawn_entry, nprocs=nprocs, join=False, start_method="spawn",
                                         args=(nprocs, _free_port(), config_to_dict(cfg), str(run_dir), threads,
                                               report))
            try:
                while not context.join():
                    pass
            except KeyboardInterrupt:
                # Ctrl-C or SIGTERM reached this process only (kill, scancel of the parent): stop the ranks too,
                # or they would train on, and the interpreter would wait for them at exit; the last epoch's
                # DeepSpeed checkpoint stays for --resume
                _stop_ranks(context.processes)
                raise
            break
        except mp.ProcessExitedException as err:  # a crashed process, not a Python error of the trial
            if attempt == retries:
                raise
            log.warning("run_local: %s; retrying from the last checkpoint (attempt %d of %d)", err, attempt + 2,
                        retries + 1)
    metrics = rundir.read_metrics(run_dir)
    if metrics is None:
        raise ConfigError(f"run_local: the workers finished but wrote no {run_dir / rundir.METRICS}")
    return metrics


__all__ = ["train_worker", "run_local", "deepspeed_config", "state_sha256", "build_metrics", "DEFAULT_DS_CONFIG"]
