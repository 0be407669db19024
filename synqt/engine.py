"""One SynQT trial, or a pack of trials sharing one frozen forward pass (recipe: setup / train / cleanup).

An unpacked trial is a pack of one, so both paths are the same code. Each branch of a pack has its own
config, optimizer, schedule, random generator and run directory, and leaves exactly the files a solo
run leaves: ``config.yaml``, ``progress.json``, ``resume.pt`` (while running), TensorBoard events,
``trainable.safetensors`` and ``metrics.json``.

Determinism that makes packing exact: data order comes from ``data_seed`` and the epoch only; a
branch's initial weights come from ``torch.manual_seed(init_seed)``; its dropout / drop path draw
from its own generator, saved in its resume checkpoint; the image stream's drop path from a
generator reseeded from ``(data_seed, epoch)`` every epoch.
"""

from __future__ import annotations

import logging
import math
import platform
import subprocess
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from synqt import progress
from synqt.checkpoint import load_official_state_dict, load_trainable, save_trainable
from synqt.config import TrialConfig, config_to_dict, effective_seeds, save_config, splits_for
from synqt.errors import ConfigError
from synqt.fileio import atomic_write, atomic_write_json
from synqt.memory import keep_freed_host_memory
from synqt.model import PackedSynQT, QueryBranch, SynQT, build_backbone, count_trainable, new_branch
from synqt.schedule import adamw, lr_at

log = logging.getLogger("synqt.engine")

# keys that must agree between the branches of one pack (they share batches and the frozen stream)
PACK_KEYS = (
    "dataset", "data_root", "layout", "num_classes", "image_size", "interpolation", "mean", "std", "cache_dir",
    "backbone", "backbone_kwargs", "checkpoint", "drop_path_rate", "backbone_drop_path", "memory_mode",
    "protocol", "stage", "epochs", "batch_size", "eval_batch_size", "grad_accum_steps", "eval_every",
    "precision", "trainer", "num_devices", "device",
)
# the settings recorded as a run's hyperparameters (besides whatever a sweep varied)
HPARAM_KEYS = ("lr", "weight_decay", "token_nums", "feat_scale", "attn_scale", "ffn_scale", "warmup_epochs",
               "epochs", "batch_size", "memory_mode", "precision")
METRIC_KEYS = ("dataset", "group", "protocol", "stage", "seed", "hparams", "val_acc", "test_acc", "best_of_test",
               "trainable_params", "peak_memory_bytes", "images_per_s", "wall_time_s", "versions", "provenance",
               "status", "error")


def pack_key(cfg: TrialConfig) -> tuple:
    """Trials with equal pack keys can be trained in lockstep over one frozen image stream."""
    data_seed, _ = effective_seeds(cfg)
    return tuple(repr(getattr(cfg, k)) for k in PACK_KEYS) + (repr(data_seed),)


def metrics_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "metrics.json"


def read_metrics(run_dir: str | Path) -> dict | None:
    import json

    path = metrics_path(run_dir)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str | None]:
    import accelerate
    import timm

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "accelerate": accelerate.__version__, "numpy": np.__version__, "git_commit": _git_commit()}


def device_peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_max_rss"


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike hash())."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
    return value & 0x7FFFFFFFFFFFFFFF


def _build_seeded_backbone(cfg: TrialConfig) -> torch.nn.Module:
    """The frozen backbone of ``cfg``; without a checkpoint its random init is drawn from ``data_seed``.

    A randomly initialised backbone (tests, smoke runs) must be the same in a resumed run, in every
    branch of a pack and in ``evaluate_checkpoint``, so it never depends on the global RNG state.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(effective_seeds(cfg)[0], 3))
        return build_backbone(cfg.backbone, drop_path_rate=cfg.drop_path_rate, checkpoint=cfg.checkpoint,
                              **cfg.backbone_kwargs)


def _hparams(cfg: TrialConfig, extra: dict | None) -> dict[str, Any]:
    out = {k: getattr(cfg, k) for k in HPARAM_KEYS}
    out.update(extra or {})
    return out


@dataclass
class _Branch:
    """Runtime state of one trial inside a pack."""

    cfg: TrialConfig
    run_dir: Path
    hparams: dict[str, Any]
    status: str = "pending"  # pending -> running -> ok | failed; "skipped" when already finished
    error: str | None = None
    module: QueryBranch | None = None
    optimizer: torch.optim.Optimizer | None = None
    step: int = 0
    epochs_done: int = 0
    eval_history: list[dict] = field(default_factory=list)
    loss_sum: float = 0.0
    loss_count: int = 0
    writer: Any = None
    last_loss: float | None = None
    index: int = -1  # position in the PackedSynQT
    trainable_params: int | None = None  # per branch: token_nums differs between pack-mates

    @property
    def run_name(self) -> str:
        return self.run_dir.name


class TrialRecipe:
    """Train a pack of SynQT branches on one dataset: ``setup()``, ``train()``, ``cleanup()``."""

    def __init__(self, cfgs: Sequence[TrialConfig], run_dirs: Sequence[str | Path], *, resume: bool = True,
                 backbone: torch.nn.Module | None = None, report: Callable[[dict], None] | None = None,
                 hparams: Sequence[dict] | None = None) -> None:
        if not cfgs or len(cfgs) != len(run_dirs):
            raise ConfigError(
                f"a pack needs one run directory per config (got {len(cfgs)} configs, {len(run_dirs)} dirs)")
        first = pack_key(cfgs[0])
        for cfg in cfgs[1:]:
            if pack_key(cfg) != first:
                diff = [k for k in PACK_KEYS if repr(getattr(cfg, k)) != repr(getattr(cfgs[0], k))]
                raise ConfigError(f"trials of one pack must agree on {diff or ['data_seed']} (they share batches)")
        self.cfg = cfgs[0]
        self.resume = resume
        self.report = report
        self.shared_backbone = backbone
        self.branches = [
            _Branch(cfg=c, run_dir=Path(d), hparams=_hparams(c, (hparams or [None] * len(cfgs))[i]))
            for i, (c, d) in enumerate(zip(cfgs, run_dirs, strict=True))
        ]
        self.start_time = time.time()

    # ------------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        self.train_split, self.eval_split = splits_for(cfg)
        self.device = self._device()
        self.accelerator = self._accelerator()
        self.device = self.accelerator.device
        keep_freed_host_memory(self.device)  # on CPU: no page faults for every step's activations
        for branch in self.branches:
            previous = read_metrics(branch.run_dir)
            if previous and previous.get("status") == "ok":
                branch.status = "skipped"
                log.info("%s already finished; skipping", branch.run_name)
        if all(b.status == "skipped" for b in self.branches):
            return
        self._setup_data()
        self._setup_model()

    def _device(self) -> torch.device:
        want = self.cfg.device
        if want == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is visible (use device=auto or cpu)")
        if self.cfg.precision == "fp16" and (want == "cpu" or not torch.cuda.is_available()):
            raise ConfigError("precision=fp16 needs a CUDA GPU and none is in use: on CPU autocast would silently "
                              "stay fp32; use precision=bf16 or precision=no")
        if want == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(want)

    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        # a process may run several trials with different precisions (tests, packs run one after another)
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(mixed_precision=self.cfg.precision, cpu=self.device.type == "cpu")

    def _setup_data(self) -> None:
        from synqt.data import dataset_num_classes, load_images, read_split, validate_dataset

        cfg = self.cfg
        if not cfg.dataset or not cfg.data_root:
            raise ConfigError("dataset and data_root must be set (e.g. --dataset cifar --data-root /data/vtab-1k)")
        validate_dataset(cfg.data_root, cfg.dataset, [self.train_split, self.eval_split], cfg.num_classes,
                         layout=cfg.layout)
        self.num_classes = cfg.num_classes or dataset_num_classes(cfg.data_root, cfg.dataset, layout=cfg.layout)
        self.train_list = read_split(cfg.data_root, cfg.dataset, self.train_split, layout=cfg.layout)
        self.eval_list = read_split(cfg.data_root, cfg.dataset, self.eval_split, layout=cfg.layout)
        self._backbone = self.shared_backbone or _build_seeded_backbone(cfg)
        size = cfg.image_size or int(self._backbone.patch_embed.img_size[0])
        self.image_size = size
        load = dict(interpolation=cfg.interpolation, cache_dir=cfg.cache_dir)
        self.train_images, self.train_labels = load_images(self.train_list, size, **load)
        self.eval_images, self.eval_labels = load_images(self.eval_list, size, **load)
        self.mean, self.std = list(cfg.mean), list(cfg.std)

    def _setup_model(self) -> None:
        cfg = self.cfg
        modules = []
        for branch in self.branches:
            if branch.status == "skipped":
                continue
            _, init_seed = effective_seeds(branch.cfg)
            torch.manual_seed(init_seed)
            module = new_branch(self._backbone, self.num_classes, token_nums=branch.cfg.token_nums,
                                feat_scale=branch.cfg.feat_scale, attn_scale=branch.cfg.attn_scale,
                                ffn_scale=branch.cfg.ffn_scale).to(self.device)
            module.seed_generator(derive_seed(init_seed, 1), self.device)
            branch.module = module
            branch.index = len(modules)
            branch.trainable_params = count_trainable(module)
            branch.optimizer = adamw(module.parameters(), lr=branch.cfg.lr, weight_decay=branch.cfg.weight_decay)
            modules.append(module)
            if self.resume:
                self._load_resume(branch)
            branch.status = "running"
            save_config(branch.cfg, branch.run_dir / "config.yaml")
        self.model = PackedSynQT(self._backbone, modules, drop_path_rate=cfg.drop_path_rate,
                                 backbone_drop_path=cfg.backbone_drop_path, memory_mode=cfg.memory_mode)
        self.model.to(self.device)
        self.model.image_generator = torch.Generator(device=self.device)
        prepared = self.accelerator.prepare(*[b.optimizer for b in self.active])
        prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
        for branch, opt in zip(self.active, prepared, strict=True):
            branch.optimizer = opt
        from torch.utils.tensorboard import SummaryWriter

        for branch in self.active:
            branch.writer = SummaryWriter(log_dir=str(branch.run_dir))

    @property
    def active(self) -> list[_Branch]:
        return [b for b in self.branches if b.status == "running"]

    # --------------------------------------------------------------------------------------------- checkpoints
    def _load_resume(self, branch: _Branch) -> None:
        path = branch.run_dir / "resume.pt"
        if not path.is_file():
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        branch.module.load_state_dict(state["branch"])
        branch.optimizer.load_state_dict(state["optimizer"])
        branch.step = int(state["step"])
        branch.epochs_done = int(state["epochs_done"])
        branch.eval_history = list(state["eval_history"])
        branch.module.generator.set_state(state["generator"])
        log.info("%s resumed after epoch %d (step %d)", branch.run_name, branch.epochs_done, branch.step)

    def _save_resume(self, branch: _Branch) -> None:
        state = {
            "branch": branch.module.state_dict(),
            "optimizer": branch.optimizer.state_dict(),
            "step": branch.step,
            "epochs_done": branch.epochs_done,
            "eval_history": branch.eval_history,
            "generator": branch.module.generator.get_state(),
        }
        atomic_write(branch.run_dir / "resume.pt", lambda tmp: torch.save(state, tmp))

    # ----------------------------------------------------------------------------------------------- training
    def _batch(self, images: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        from synqt.data import to_tensor_batch

        x = to_tensor_batch(images[idx], self.mean, self.std).to(self.device, non_blocking=True)
        y = torch.as_tensor(labels[idx], dtype=torch.long).to(self.device, non_blocking=True)
        return x, y

    def _epoch_order(self, epoch: int) -> np.ndarray:
        data_seed, _ = effective_seeds(self.cfg)
        gen = torch.Generator().manual_seed(derive_seed(data_seed, epoch))
        return torch.randperm(len(self.train_labels), generator=gen).numpy()

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_labels) / self.cfg.batch_size)

    def train(self) -> None:
        cfg = self.cfg
        if not self.active:
            return
        start_epoch = min(b.epochs_done for b in self.active)
        micro = cfg.batch_size // cfg.grad_accum_steps
        images_seen, train_seconds = 0, 0.0
        total_steps = cfg.epochs * self.steps_per_epoch
        progress.emit(progress.TrainStart(tuple(b.run_name for b in self.active), cfg.epochs, self.steps_per_epoch,
                                          start_epoch * self.steps_per_epoch))
        for epoch in range(start_epoch, cfg.epochs):
            # branches ahead of the others (resumed from a later checkpoint) sit this epoch out
            training = [b for b in self.active if b.epochs_done <= epoch]
            if not training:
                continue
            index = [b.index for b in training]
            self.model.train()
            self.model.image_generator.manual_seed(derive_seed(effective_seeds(cfg)[0], epoch, 7))
            order = self._epoch_order(epoch)
            t0 = time.perf_counter()
            epoch_images = 0
            epoch_loss = {id(b): [0.0, 0] for b in training}  # sum, count: the epoch's mean loss
            for start in range(0, len(order), cfg.batch_size):
                batch_idx = order[start:start + cfg.batch_size]
                for b in training:
                    lr = lr_at(b.step, self.steps_per_epoch, epochs=b.cfg.epochs, warmup_epochs=b.cfg.warmup_epochs,
                               base_lr=b.cfg.lr, min_lr=b.cfg.min_lr)
                    for group in b.optimizer.param_groups:
                        group["lr"] = lr
                    b.optimizer.zero_grad(set_to_none=True)
                losses = {id(b): 0.0 for b in training}
                for m_start in range(0, len(batch_idx), micro):
                    idx = batch_idx[m_start:m_start + micro]
                    x, y = self._batch(self.train_images, self.train_labels, idx)
                    with self.accelerator.autocast():
                        logits = self.model(x, active=index)
                    weight = len(idx) / len(batch_idx)
                    terms = []
                    for b, out in zip(training, logits, strict=True):
                        loss = F.cross_entropy(out.float(), y)
                        if not torch.isfinite(loss):
                            self._fail(b, f"non-finite training loss ({loss.item()}) at epoch {epoch + 1}, "
                                          f"step {b.step}")
                            continue
                        losses[id(b)] += loss.item() * weight
                        terms.append(loss * weight)
                    if terms:
                        self.accelerator.backward(torch.stack(terms).sum())
                    if any(b.status != "running" for b in training):
                        training = [b for b in training if b.status == "running"]
                        index = [b.index for b in training]
                        if not training:
                            break
                for b in training:
                    b.optimizer.step()
                    b.step += 1
                    b.loss_sum += losses[id(b)]
                    b.loss_count += 1
                    b.last_loss = losses[id(b)]
                    epoch_loss[id(b)][0] += losses[id(b)]
                    epoch_loss[id(b)][1] += 1
                    if b.step % cfg.log_every == 0 or b.step == 1:
                        b.writer.add_scalar("train/loss", b.loss_sum / b.loss_count, b.step)
                        b.writer.add_scalar("train/lr", b.optimizer.param_groups[0]["lr"], b.step)
                        b.loss_sum, b.loss_count = 0.0, 0
                images_seen += len(batch_idx)
                epoch_images += len(batch_idx)
                if training:
                    progress.emit(progress.Step(epoch * self.steps_per_epoch + start // cfg.batch_size + 1,
                                                total_steps, {b.run_name: losses[id(b)] for b in training}))
                if not training:
                    break
            epoch_s = time.perf_counter() - t0
            train_seconds += epoch_s
            self.images_per_s = images_seen / max(train_seconds, 1e-9)
            for b in training:
                b.epochs_done = epoch + 1
                total, count = epoch_loss[id(b)]
                progress.emit(progress.EpochEnd(b.run_name, epoch + 1, b.cfg.epochs, total / count if count else None,
                                                b.optimizer.param_groups[0]["lr"],
                                                epoch_images / max(epoch_s, 1e-9), epoch_s))
            self._after_epoch(epoch + 1, training)
        if not hasattr(self, "images_per_s"):
            self.images_per_s = None

    def _should_eval(self, epoch: int) -> bool:
        cfg = self.cfg
        if epoch == cfg.epochs:
            return True
        if cfg.protocol == "vtab" and cfg.stage == "final":
            return False  # the retrain stage scores test once, at the end
        return cfg.eval_every > 0 and epoch % cfg.eval_every == 0

    def _after_epoch(self, epoch: int, trained: list[_Branch]) -> None:
        trained = [b for b in trained if b.status == "running"]
        if trained and self._should_eval(epoch):
            accs = self.evaluate([b.index for b in trained])
            for b, acc in zip(trained, accs, strict=True):
                b.eval_history.append({"epoch": epoch, "split": self.eval_split, "acc": acc})
                # every scalar of a run shares one x-axis, the optimizer step (train/epoch maps it to epochs)
                b.writer.add_scalar(f"eval/{self.eval_split}_acc", acc, b.step)
                progress.emit(progress.Eval(b.run_name, epoch, b.cfg.epochs, self.eval_split, acc))
        peak, peak_kind = device_peak_memory(self.device)
        for b in trained:
            b.writer.add_scalar("train/epoch", epoch, b.step)
            b.writer.add_scalar("perf/images_per_s", self.images_per_s, b.step)
            b.writer.add_scalar(memory_tag(peak_kind), peak / 2**20, b.step)
            b.writer.flush()
            every = b.cfg.checkpoint_every
            if every and (epoch % every == 0) and epoch < b.cfg.epochs:
                self._save_resume(b)
            atomic_write_json(b.run_dir / "progress.json", {
                "epoch": epoch, "epochs": b.cfg.epochs, "wall_time_s": time.time() - self.start_time,
                "updated": time.time(), "status": "running"})
        for b in trained:
            if epoch >= b.cfg.epochs:
                self._finish(b)
        if self.report is not None:
            self.report({"epoch": epoch, "branches": [self._summary(b) for b in self.branches]})

    @torch.no_grad()
    def evaluate(self, index: list[int]) -> list[float]:
        """Accuracy (percent) of the given branches on the eval split: one frozen pass feeds them all."""
        self.model.eval()
        correct = torch.zeros(len(index), dtype=torch.long, device=self.device)
        total = 0
        bs = self.cfg.eval_batch_size
        for start in range(0, len(self.eval_labels), bs):
            idx = np.arange(start, min(start + bs, len(self.eval_labels)))
            x, y = self._batch(self.eval_images, self.eval_labels, idx)
            with self.accelerator.autocast():
                logits = self.model(x, active=index)
            preds = torch.stack([out.argmax(dim=-1) for out in logits])
            preds, y = self.accelerator.gather_for_metrics((preds.T.contiguous(), y))
            correct += (preds.T == y).sum(dim=1)
            total += y.numel()
        self.model.train()
        return [100.0 * c / max(total, 1) for c in correct.tolist()]

    # --------------------------------------------------------------------------------------------- outcomes
    def _summary(self, b: _Branch) -> dict[str, Any]:
        last = b.eval_history[-1]["acc"] if b.eval_history else None
        return {"run_name": b.run_name, "status": b.status, "epoch": b.epochs_done, "train_loss": b.last_loss,
                "val_acc": last if self.eval_split == "val200" else None,
                "test_acc": last if self.eval_split == "test" else None}

    def _metrics(self, b: _Branch) -> dict[str, Any]:
        peak, peak_kind = device_peak_memory(self.device)
        identity = self._backbone.synqt_identity if hasattr(self, "_backbone") else {}
        return trial_metrics(b, self, peak=peak, peak_kind=peak_kind, identity=identity,
                             packed_with=len(self.branches))

    def _finish(self, b: _Branch) -> None:
        b.status = "ok"
        identity = self._backbone.synqt_identity
        extra = {"dataset": b.cfg.dataset, "run_name": b.run_name, "num_classes": self.num_classes}
        save_trainable(b.module, b.run_dir / "trainable.safetensors", backbone_identity=identity, extra=extra)
        atomic_write_json(b.run_dir / "trainable.json", {
            "weights": "trainable.safetensors", "backbone": identity, "token_nums": b.cfg.token_nums,
            "trainable_params": b.trainable_params, **extra})
        metrics = self._metrics(b)
        self._write_hparams(b, metrics)
        atomic_write_json(metrics_path(b.run_dir), metrics)
        (b.run_dir / "resume.pt").unlink(missing_ok=True)
        (b.run_dir / "progress.json").unlink(missing_ok=True)
        _emit_end(b.run_dir, metrics)

    def _fail(self, b: _Branch, error: str) -> None:
        b.status = "failed"
        b.error = error
        log.error("%s failed: %s", b.run_name, error)
        metrics = self._metrics(b)
        atomic_write_json(metrics_path(b.run_dir), metrics)
        _emit_end(b.run_dir, metrics)
        (b.run_dir / "progress.json").unlink(missing_ok=True)

    def _write_hparams(self, b: _Branch, metrics: dict) -> None:
        write_hparams(b.writer, b.cfg, b.hparams, metrics, step=b.step)

    def cleanup(self) -> None:
        for b in self.branches:
            if b.writer is not None:
                b.writer.close()
                b.writer = None

    def results(self) -> list[dict]:
        out = []
        for b in self.branches:
            out.append(read_metrics(b.run_dir) or self._metrics(b))
        return out


def trial_metrics(run: Any, data: Any, *, peak: int | None, peak_kind: str, identity: dict,
                  packed_with: int) -> dict[str, Any]:
    """metrics.json of one trial (every key of the contract in docs/DESIGN.md, null where it does not apply).

    ``run`` holds the trial's outcome (cfg, hparams, eval_history, epochs_done, status, error, run_dir,
    trainable_params); ``data`` what it ran on (train_split, eval_split, train_list, eval_list, image_size,
    images_per_s, start_time). A pack branch and a DeepSpeed worker both provide them.
    """
    cfg = run.cfg
    evals = [e["acc"] for e in run.eval_history]
    final = evals[-1] if evals and run.epochs_done >= cfg.epochs else None
    is_test = data.eval_split == "test"
    train_list, eval_list = getattr(data, "train_list", None), getattr(data, "eval_list", None)
    return {
        "dataset": cfg.dataset,
        "group": cfg.group,
        "protocol": cfg.protocol,
        "stage": cfg.stage if cfg.protocol == "vtab" else "final",
        "seed": cfg.seed,
        "hparams": run.hparams,
        "val_acc": final if not is_test else None,
        "test_acc": final if is_test else None,
        "best_of_test": (max(evals) if evals else None) if (cfg.protocol == "paper" and is_test) else None,
        "trainable_params": getattr(run, "trainable_params", None),
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "images_per_s": getattr(data, "images_per_s", None),
        "wall_time_s": time.time() - data.start_time,
        "versions": library_versions(),
        "provenance": {
            "backbone": identity.get("name"),
            "backbone_checkpoint": identity.get("checkpoint"),
            "backbone_checkpoint_sha256": identity.get("checkpoint_sha256"),
            "train_split": data.train_split,
            "eval_split": data.eval_split,
            "train_list_sha256": getattr(train_list, "list_hash", None),
            "eval_list_sha256": getattr(eval_list, "list_hash", None),
            "derived_splits": bool(getattr(train_list, "derived", False) or getattr(eval_list, "derived", False)),
            "image_size": getattr(data, "image_size", None),
            "data_seed": effective_seeds(cfg)[0],
            "init_seed": effective_seeds(cfg)[1],
            "packed_with": packed_with,
        },
        "status": "ok" if run.status == "ok" else "failed",
        "error": run.error,
        "run_name": Path(run.run_dir).name,
        "epochs_done": run.epochs_done,
        "eval_history": run.eval_history,
        "config": config_to_dict(cfg),
    }


def write_hparams(writer: Any, cfg: TrialConfig, hparams: dict, metrics: dict, extra: dict | None = None,
                  step: int = 0) -> None:
    """The run's hyperparameters (session) and final metrics for TensorBoard's HParams view; see synqt.tblog."""
    if writer is None:
        return
    from synqt.tblog import write_session

    write_session(writer, metrics, extra=extra, step=step)


def memory_tag(peak_kind: str) -> str:
    """TensorBoard tag of a peak-memory scalar in MiB, named by what was measured (see device_peak_memory)."""
    return {"cuda_max_allocated": "perf/process_peak_cuda_alloc_mib",
            "cpu_max_rss": "perf/process_peak_cpu_rss_mib"}.get(peak_kind, f"perf/process_peak_{peak_kind}_mib")


def _emit_end(run_dir: Path, metrics: dict) -> None:
    progress.emit(progress.TrialEnd(
        run_name=Path(run_dir).name, run_dir=str(run_dir), status=metrics["status"], val_acc=metrics["val_acc"],
        test_acc=metrics["test_acc"], best_of_test=metrics["best_of_test"], wall_time_s=metrics["wall_time_s"],
        error=metrics.get("error")))


def run_pack(cfgs: Sequence[TrialConfig], run_dirs: Sequence[str | Path], *, resume: bool = True,
             backbone: torch.nn.Module | None = None, report: Callable[[dict], None] | None = None,
             hparams: Sequence[dict] | None = None) -> list[dict]:
    """Train a pack (k >= 1) of trials; returns each branch's metrics dict (also in its metrics.json)."""
    recipe = TrialRecipe(cfgs, run_dirs, resume=resume, backbone=backbone, report=report, hparams=hparams)
    try:
        recipe.setup()
        recipe.train()
    except Exception as err:
        # leave a readable failure behind for every unfinished branch, keep resume.pt, then let the caller retry
        message = f"{type(err).__name__}: {err}"
        for b in recipe.branches:
            if b.status == "running":
                b.status = "failed"
                b.error = message + "\n" + traceback.format_exc(limit=5)
                atomic_write_json(metrics_path(b.run_dir), recipe._metrics(b))
        raise
    finally:
        recipe.cleanup()
    return recipe.results()


def run_trial(cfg: TrialConfig, run_dir: str | Path, *, resume: bool = True,
              backbone: torch.nn.Module | None = None, report: Callable[[dict], None] | None = None,
              hparams: dict | None = None) -> dict:
    """One trial (a pack of one); see ``run_pack``."""
    return run_pack([cfg], [run_dir], resume=resume, backbone=backbone, report=report,
                    hparams=[hparams] if hparams else None)[0]


def evaluate_checkpoint(cfg: TrialConfig, weights: str | Path, *, split: str = "test", official: bool = False,
                        out: str | Path | None = None) -> dict:
    """Score a trainable-only checkpoint (or an official full state dict) on one split."""
    from synqt.checkpoint import read_state_dict, read_trainable
    from synqt.data import dataset_num_classes, load_images, read_split, to_tensor_batch, validate_dataset

    validate_dataset(cfg.data_root, cfg.dataset, [split], cfg.num_classes, layout=cfg.layout)
    if official:
        state = read_state_dict(weights)
        num_classes = int(state["head.weight"].shape[0])
    else:
        _, header = read_trainable(weights)
        num_classes = int(header["branch"]["num_classes"])
    if official:
        backbone = build_backbone(cfg.backbone, drop_path_rate=cfg.drop_path_rate, checkpoint=None,
                                  **cfg.backbone_kwargs)
    else:
        backbone = _build_seeded_backbone(cfg)
    token_nums = int(state["synqt.q"].shape[1]) if official else int(header["branch"]["token_nums"])
    model = SynQT(backbone, num_classes, token_nums=token_nums, drop_path_rate=cfg.drop_path_rate,
                  backbone_drop_path=cfg.backbone_drop_path, memory_mode=cfg.memory_mode)
    if official:
        load_official_state_dict(model, state)
    else:
        load_trainable(model, weights)
    data_classes = cfg.num_classes or dataset_num_classes(cfg.data_root, cfg.dataset, layout=cfg.layout)
    if data_classes > num_classes:
        raise ConfigError(f"{weights} has {num_classes} classes but {cfg.dataset} has {data_classes}")
    split_list = read_split(cfg.data_root, cfg.dataset, split, layout=cfg.layout)
    size = cfg.image_size or int(backbone.patch_embed.img_size[0])
    images, labels = load_images(split_list, size, interpolation=cfg.interpolation, cache_dir=cfg.cache_dir)
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), cfg.eval_batch_size):
            idx = np.arange(start, min(start + cfg.eval_batch_size, len(labels)))
            logits = model(to_tensor_batch(images[idx], cfg.mean, cfg.std))
            correct += int((logits.argmax(-1) == torch.as_tensor(labels[idx])).sum())
    acc = 100.0 * correct / max(len(labels), 1)
    result = {"dataset": cfg.dataset, "split": split, "acc": acc, "images": int(len(labels)),
              "weights": str(weights), "official": official, "test_acc" if split == "test" else "val_acc": acc}
    out_path = Path(out) if out else Path(weights).parent / "eval_metrics.json"
    atomic_write_json(out_path if out_path.suffix == ".json" else out_path / "eval_metrics.json", result)
    return result
