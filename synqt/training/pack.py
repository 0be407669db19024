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
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from synqt.config import PACK_KEYS, TrialConfig, effective_seeds, pack_key, save_config, splits_for
from synqt.errors import ConfigError
from synqt.model.branch import QueryBranch
from synqt.model.memory import keep_freed_host_memory
from synqt.model.precision import check_precision
from synqt.model.stream import PackedSynQT, SynQT, count_trainable
from synqt.run import progress, rundir
from synqt.storage import as_write_failed, atomic_write_json, atomic_write_torch
from synqt.training.build import branch_for, frozen_backbone, seeded_branch
from synqt.training.loop import (
    BranchScaler,
    RunData,
    TrialOutcome,
    derive_seed,
    device_peak_memory,
    emit_end,
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
from synqt.weights.checkpoint import load_official_state_dict, load_trainable, save_trainable, weights_text
from synqt.weights.compat import BACKBONE_IDENTITY_KEYS, check_same_run, check_weights_fit

log = logging.getLogger("synqt.training.pack")


@dataclass
class _Branch(TrialOutcome):
    """Runtime state of one trial inside a pack (its outcome plus its module, optimizer and writer)."""

    module: QueryBranch | None = None
    optimizer: torch.optim.Optimizer | None = None
    step: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    writer: Any = None
    index: int = -1  # position in the PackedSynQT
    scaler: BranchScaler | None = None  # fp16 loss scale of this branch alone
    # deferred evaluation: (epoch, optimizer step) of each weight snapshot still to be scored
    pending_evals: list[tuple[int, int]] = field(default_factory=list)


class TrialRecipe:
    """Train a pack of SynQT branches on one dataset: ``setup()``, ``train()``, ``cleanup()``."""

    def __init__(self, cfgs: Sequence[TrialConfig], run_dirs: Sequence[str | Path], *, resume: bool = True,
                 backbone: torch.nn.Module | None = None, report: Callable[[dict], None] | None = None,
                 hparams: Sequence[dict] | None = None, cpus: float | None = None) -> None:
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
            _Branch(cfg=c, run_dir=Path(d), hparams=run_hparams(c, (hparams or [None] * len(cfgs))[i]))
            for i, (c, d) in enumerate(zip(cfgs, run_dirs, strict=True))
        ]
        self.start_time = time.time()
        self.cpus = cpus  # the CPUs Ray assigned (None elsewhere): synqt.training.threads decides the thread count
        self.threads = None
        self.train_split, self.eval_split = splits_for(self.cfg)
        self.train_list = self.eval_list = self.image_size = self.images_per_s = None
        # wall seconds by phase (metrics.json "timings_s"): what a trial's time goes to, e.g. on a GPU where the
        # cached steps are cheap and decoding, the cache build and evaluation weigh (scripts/gpu_check.sh)
        self.timings = {"decode_s": 0.0, "kv_cache_s": 0.0, "train_s": 0.0, "eval_s": 0.0}

    # ------------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        from synqt.training.threads import configure_threads

        self.threads = configure_threads(self.cpus)
        self.device = self._device()
        self.accelerator = self._accelerator()
        self.device = self.accelerator.device
        keep_freed_host_memory(self.device)  # on CPU: no page faults for every step's activations
        for branch in self.branches:
            rundir.set_aside_broken_state(branch.run_dir)  # a cut metrics.json / progress.json: named, moved aside
            finished = rundir.is_done(branch.run_dir)
            if self.resume or finished:  # continue exactly the same run, or stop naming what changed
                check_same_run(branch.cfg, branch.run_dir)
            if finished:
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
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want)
        check_precision(self.cfg.precision, device)  # bf16 only where it is native (synqt/model/precision.py)
        return device

    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        # a process may run several trials with different precisions (tests, packs run one after another)
        AcceleratorState._reset_state(reset_partial_state=True)
        handlers = []
        if self.cfg.precision == "fp16":  # one GradScaler per branch instead of accelerate's shared one
            from accelerate.utils import GradScalerKwargs

            handlers.append(GradScalerKwargs(enabled=False))
        return Accelerator(mixed_precision=self.cfg.precision, cpu=self.device.type == "cpu",
                           kwargs_handlers=handlers)

    def _setup_data(self) -> None:
        from synqt.data.images import load_images
        from synqt.data.splits import dataset_num_classes, read_split, validate_dataset

        cfg = self.cfg
        if not cfg.dataset or not cfg.data_root:
            raise ConfigError("dataset and data_root must be set (e.g. --dataset cifar --data-root /data/vtab-1k)")
        validate_dataset(cfg.data_root, cfg.dataset, [self.train_split, self.eval_split], cfg.num_classes,
                         layout=cfg.layout)
        self.num_classes = cfg.num_classes or dataset_num_classes(cfg.data_root, cfg.dataset, layout=cfg.layout)
        self.train_list = read_split(cfg.data_root, cfg.dataset, self.train_split, layout=cfg.layout)
        self.eval_list = read_split(cfg.data_root, cfg.dataset, self.eval_split, layout=cfg.layout)
        self._backbone = self.shared_backbone or frozen_backbone(cfg)
        log.info("%s: backbone %s, weights: %s", ", ".join(b.run_name for b in self.branches), cfg.backbone,
                 weights_text(getattr(self._backbone, "synqt_identity", None)))
        size = cfg.image_size or int(self._backbone.patch_embed.img_size[0])
        self.image_size = size
        load = dict(interpolation=cfg.interpolation, cache_dir=cfg.cache_dir)
        t0 = time.perf_counter()
        self.train_images, self.train_labels = load_images(self.train_list, size, **load)
        self.eval_images, self.eval_labels = load_images(self.eval_list, size, **load)
        self.timings["decode_s"] += time.perf_counter() - t0
        self.mean, self.std = list(cfg.mean), list(cfg.std)

    def _setup_model(self) -> None:
        cfg = self.cfg
        modules = []
        for branch in self.branches:
            if branch.status == "skipped":
                continue
            _, init_seed = effective_seeds(branch.cfg)
            module = seeded_branch(branch.cfg, self._backbone, self.num_classes).to(self.device)
            module.seed_generator(derive_seed(init_seed, 1), self.device)
            branch.module = module
            branch.index = len(modules)
            branch.trainable_params = count_trainable(module)
            branch.optimizer = adamw(module.parameters(), lr=branch.cfg.lr, weight_decay=branch.cfg.weight_decay)
            branch.scaler = BranchScaler(cfg.precision == "fp16", self.device.type)
            modules.append(module)
            if self.resume:
                self._load_resume(branch)
            branch.status = "starting"
        self.model = PackedSynQT(self._backbone, modules, drop_path_rate=cfg.drop_path_rate,
                                 backbone_drop_path=cfg.backbone_drop_path, memory_mode=cfg.memory_mode)
        self.model.to(self.device)
        self.model.image_generator = torch.Generator(device=self.device)
        starting = [b for b in self.branches if b.status == "starting"]
        prepared = self.accelerator.prepare(*[b.optimizer for b in starting])
        prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
        for branch, opt in zip(starting, prepared, strict=True):
            branch.optimizer = opt
        self._setup_kv_cache()
        # the run directories' first write, once every check of setup passed: a refused trial leaves none behind
        for branch in starting:
            branch.status = "running"
            save_config(branch.cfg, branch.run_dir / rundir.CONFIG)
            branch.writer = open_writer(branch.run_dir, branch.step)

    def _setup_kv_cache(self) -> None:
        """Open (building once per node) the K/V caches of the train and eval splits, or say once why not."""
        from synqt.training.kv_cache import CacheRequest, open_trial_caches

        self.deferred = deferred(self.cfg)
        requests = [(name, CacheRequest(split=split, images=images, image_size=self.image_size,
                                        interpolation=self.cfg.interpolation))
                    for name, images, split in (("train", self.train_images, self.train_list),
                                                ("eval", self.eval_images, self.eval_list))]
        t0 = time.perf_counter()
        caches = open_trial_caches(self.model, self.cfg, requests, device=self.device, mean=self.mean, std=self.std,
                                   autocast=self.accelerator.autocast)
        self.timings["kv_cache_s"] += time.perf_counter() - t0
        self.train_kv, self.eval_kv = caches.get("train"), caches.get("eval")

    @property
    def active(self) -> list[_Branch]:
        return [b for b in self.branches if b.status == "running"]

    # --------------------------------------------------------------------------------------------- checkpoints
    def _read_resume(self, branch: _Branch) -> dict | None:
        """The branch's resume state, or None (absent, or broken: the broken-file rule, said once).

        resume.pt is checked as backbone files are (``synqt.weights.identify.sniff``: empty, cut-off zip, CRC) and
        must load with every key; each deferred-evaluation snapshot it lists must be a complete safetensors
        file. A broken one is moved aside (``synqt.storage.set_aside``) and the run restarts from epoch 0.
        """
        from synqt.storage import set_aside
        from synqt.training.snapshots import snapshot_path
        from synqt.weights.identify import sniff, torch_file_problem

        path = branch.run_dir / rundir.RESUME
        if not path.is_file():
            return None
        problem = torch_file_problem(path)
        state = None
        if problem is None:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                for key in ("branch", "optimizer", "step", "epochs_done", "eval_history", "generator"):
                    state[key]  # noqa: B018 - every key a resume needs
            except Exception as err:  # noqa: BLE001 - any unreadable content is the same fault
                problem = f"not a resume state ({type(err).__name__}: {err})"
        if problem is None:
            for epoch, _ in state.get("pending_evals", []):
                snap = snapshot_path(branch.run_dir, int(epoch))
                kind, what = sniff(snap) if snap.is_file() else ("bad", "missing")
                if kind != "safetensors":
                    problem = f"the epoch-{epoch} evaluation snapshot it lists, {snap.name}, is {what}"
                    set_aside(snap, what, "the run restarts from epoch 0")
                    break
        if problem is not None:
            set_aside(path, problem, f"{branch.run_name} restarts from epoch 0")
            return None
        return state

    def _load_resume(self, branch: _Branch) -> None:
        path = branch.run_dir / rundir.RESUME
        state = self._read_resume(branch)
        if state is None:
            return
        fits = state.get("fits") or {}
        if "num_classes" not in fits and "head.classifier.weight" in state["branch"]:  # older resume.pt
            fits = {**fits, "num_classes": int(state["branch"]["head.classifier.weight"].shape[0])}
        check_weights_fit(str(path), fits, dataset=branch.cfg.dataset, num_classes=self.num_classes,
                          image_size=self.image_size, backbone=getattr(self._backbone, "synqt_identity", {}))
        branch.module.load_state_dict(state["branch"])
        branch.optimizer.load_state_dict(state["optimizer"])
        branch.step = int(state["step"])
        branch.epochs_done = int(state["epochs_done"])
        branch.eval_history = list(state["eval_history"])
        branch.pending_evals = [(int(e), int(s)) for e, s in state.get("pending_evals", [])]
        branch.module.generator.set_state(state["generator"])
        branch.scaler.load_state_dict(state.get("scaler"))
        branch.resumed_after_epoch = branch.epochs_done
        log.info("%s resumed after epoch %d (step %d)", branch.run_name, branch.epochs_done, branch.step)

    def _save_resume(self, branch: _Branch) -> None:
        state = {
            "branch": branch.module.state_dict(),
            "optimizer": branch.optimizer.state_dict(),
            "step": branch.step,
            "epochs_done": branch.epochs_done,
            "eval_history": branch.eval_history,
            "generator": branch.module.generator.get_state(),
            "scaler": branch.scaler.state_dict(),
            # what the weights fit, checked before they are loaded again (synqt.weights.compat)
            "fits": {"dataset": branch.cfg.dataset, "num_classes": self.num_classes, "image_size": self.image_size,
                     "backbone": {k: v for k, v in getattr(self._backbone, "synqt_identity", {}).items()
                                  if k in BACKBONE_IDENTITY_KEYS}},
            "pending_evals": branch.pending_evals,
        }
        atomic_write_torch(branch.run_dir / rundir.RESUME, state)

    # ----------------------------------------------------------------------------------------------- training
    def _batch(self, images: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        from synqt.data.images import to_tensor_batch

        x = to_tensor_batch(images[idx], self.mean, self.std).to(self.device, non_blocking=True)
        y = torch.as_tensor(labels[idx], dtype=torch.long).to(self.device, non_blocking=True)
        return x, y

    def _feed(self, cache: Any, images: np.ndarray, micro_batches: list[np.ndarray], then: np.ndarray | None = None):
        """Model inputs per micro-batch: cached K/V (``kv=``) or normalised images (``images=``)."""
        from synqt.data.images import to_tensor_batch
        from synqt.training.kv_cache import feed

        def live(idx: np.ndarray) -> torch.Tensor:
            return to_tensor_batch(images[idx], self.mean, self.std).to(self.device, non_blocking=True)

        return feed(cache, live, micro_batches, then)

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
                                          start_epoch * self.steps_per_epoch,
                                          self.threads.line() if self.threads is not None else ""))
        for epoch in range(start_epoch, cfg.epochs):
            # branches ahead of the others (resumed from a later checkpoint) sit this epoch out
            training = [b for b in self.active if b.epochs_done <= epoch]
            if not training:
                continue
            index = [b.index for b in training]
            self.model.train()
            self.model.image_generator.manual_seed(derive_seed(effective_seeds(cfg)[0], epoch, 7))
            order = epoch_order(cfg, len(self.train_labels), epoch)
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
                micro_batches = [batch_idx[m:m + micro] for m in range(0, len(batch_idx), micro)]
                nxt = order[start + cfg.batch_size:start + cfg.batch_size + micro]  # the next step's first micro-batch
                inputs = self._feed(self.train_kv, self.train_images, micro_batches, nxt if len(nxt) else None)
                for idx in micro_batches:
                    x = next(inputs)
                    y = torch.as_tensor(self.train_labels[idx], dtype=torch.long).to(self.device, non_blocking=True)
                    with self.accelerator.autocast():
                        logits = self.model(**x, active=index)
                    weight = len(idx) / len(batch_idx)
                    terms = []
                    for b, out in zip(training, logits, strict=True):
                        loss = F.cross_entropy(out.float(), y)
                        if not torch.isfinite(loss):
                            self._fail(b, f"non-finite training loss ({loss.item()}) at epoch {epoch + 1}, "
                                          f"step {b.step}")
                            continue
                        losses[id(b)] += loss.item() * weight
                        terms.append(b.scaler.scale(loss * weight))
                    if terms:
                        self.accelerator.backward(torch.stack(terms).sum())
                    if any(b.status != "running" for b in training):
                        training = [b for b in training if b.status == "running"]
                        index = [b.index for b in training]
                        if not training:
                            break
                for b in training:
                    b.scaler.step(b.optimizer)  # fp16: this branch's own scale; otherwise optimizer.step()
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
            self.timings["train_s"] += epoch_s
            self.images_per_s = images_seen / max(train_seconds, 1e-9)
            for b in training:
                b.epochs_done = epoch + 1
                total, count = epoch_loss[id(b)]
                progress.emit(progress.EpochEnd(b.run_name, epoch + 1, b.cfg.epochs, total / count if count else None,
                                                b.optimizer.param_groups[0]["lr"],
                                                epoch_images / max(epoch_s, 1e-9), epoch_s))
            self._after_epoch(epoch + 1, training)

    def _after_epoch(self, epoch: int, trained: list[_Branch]) -> None:
        trained = [b for b in trained if b.status == "running"]
        t0 = time.perf_counter()
        if trained and should_eval(self.cfg, epoch):
            if self.deferred and epoch < self.cfg.epochs:
                for b in trained:
                    save_snapshot(b.module, b.run_dir, epoch)
                    b.pending_evals.append((epoch, b.step))
            elif self.deferred:
                self._deferred_evaluation(trained, epoch)
            else:
                accs = self.evaluate([b.index for b in trained])
                for b, acc in zip(trained, accs, strict=True):
                    b.eval_history.append({"epoch": epoch, "split": self.eval_split, "acc": acc})
                    # every scalar of a run shares one x-axis, the optimizer step (train/epoch maps it to epochs)
                    b.writer.add_scalar(f"eval/{self.eval_split}_acc", acc, b.step)
                    progress.emit(progress.Eval(b.run_name, epoch, b.cfg.epochs, self.eval_split, acc))
        self.timings["eval_s"] += time.perf_counter() - t0
        peak, peak_kind = device_peak_memory(self.device)
        for b in trained:
            b.writer.add_scalar("train/epoch", epoch, b.step)
            b.writer.add_scalar("perf/images_per_s", self.images_per_s, b.step)
            b.writer.add_scalar(memory_tag(peak_kind), peak / 2**20, b.step)
            b.writer.flush()
            every = b.cfg.checkpoint_every
            if every and (epoch % every == 0) and epoch < b.cfg.epochs:
                self._save_resume(b)
            rundir.write_progress(b.run_dir, epoch, b.cfg.epochs, self.start_time)
        for b in trained:
            if epoch >= b.cfg.epochs:
                self._finish(b)
        if self.report is not None:
            self.report({"epoch": epoch, "branches": [summary(b, self.eval_split) for b in self.branches]})

    def _deferred_evaluation(self, trained: list[_Branch], epoch: int) -> None:
        """Score every pending snapshot and the final weights of ``trained`` as branches of one packed pass
        (``synqt.training.snapshots``)."""
        modules, owners = [], []
        for b in trained:
            modules += load_snapshots(b.run_dir, [e for e, _ in b.pending_evals],
                                      lambda c=b.cfg: branch_for(c, self._backbone, self.num_classes), self.device,
                                      run_name=b.run_name)
            owners += [(b, e, step) for e, step in b.pending_evals]
            modules.append(b.module)
            owners.append((b, epoch, b.step))
        accs = self.evaluate(branches=modules)
        for (b, e, step), acc in zip(owners, accs, strict=True):
            b.eval_history.append({"epoch": e, "split": self.eval_split, "acc": acc})
            # at the optimizer step the snapshot was taken, as a periodic evaluation would have written it
            b.writer.add_scalar(f"eval/{self.eval_split}_acc", acc, step)
            progress.emit(progress.Eval(b.run_name, e, b.cfg.epochs, self.eval_split, acc))
        for b in trained:
            remove_snapshots(b.run_dir, [e for e, _ in b.pending_evals])
            b.pending_evals = []

    @torch.no_grad()
    def evaluate(self, index: list[int] | None = None, branches: list[QueryBranch] | None = None) -> list[float]:
        """Accuracy (percent) of branches (by pack index, or given modules) on the eval split, one frozen pass."""
        chosen = branches if branches is not None else [self.model.branches[i] for i in index]
        bs = self.cfg.eval_batch_size
        batches = [np.arange(s, min(s + bs, len(self.eval_labels))) for s in range(0, len(self.eval_labels), bs)]

        def gather(preds: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            preds, y = self.accelerator.gather_for_metrics((preds.T.contiguous(), y))
            return preds.T, y

        correct, total = count_correct(self.model, chosen, batches,
                                       self._feed(getattr(self, "eval_kv", None), self.eval_images, batches),
                                       self.eval_labels, device=self.device, autocast=self.accelerator.autocast,
                                       gather=gather)
        self.model.train()
        return [100.0 * c / max(total, 1) for c in correct]

    # --------------------------------------------------------------------------------------------- outcomes
    def _metrics(self, b: _Branch) -> dict[str, Any]:
        peak, peak_kind = device_peak_memory(self.device)
        identity = self._backbone.synqt_identity if hasattr(self, "_backbone") else {}
        data = RunData(self.train_split, self.eval_split, self.start_time, self.train_list, self.eval_list,
                       self.image_size, self.images_per_s,
                       self.threads.as_dict() if self.threads is not None else None)
        metrics = trial_metrics(b, data, peak=peak, peak_kind=peak_kind, identity=identity,
                                packed_with=len(self.branches))
        metrics["timings_s"] = {k: round(v, 4) for k, v in self.timings.items()}
        return metrics

    def _finish(self, b: _Branch) -> None:
        try:
            self._write_outputs(b)
        except BaseException:
            b.status = "running"  # not finished: train_pack marks it failed (where the folder still takes it)
            raise

    def _write_outputs(self, b: _Branch) -> None:
        b.status = "ok"
        identity = self._backbone.synqt_identity
        extra = {"dataset": b.cfg.dataset, "run_name": b.run_name, "num_classes": self.num_classes,
                 "image_size": self.image_size}
        save_trainable(b.module, b.run_dir / rundir.TRAINABLE, backbone_identity=identity, extra=extra)
        atomic_write_json(b.run_dir / rundir.TRAINABLE_INFO, {
            "weights": rundir.TRAINABLE, "backbone": identity, "token_nums": b.cfg.token_nums,
            "trainable_params": b.trainable_params, **extra})
        metrics = self._metrics(b)
        self._write_hparams(b, metrics)
        rundir.write_metrics(b.run_dir, metrics)
        (b.run_dir / rundir.RESUME).unlink(missing_ok=True)
        rundir.clear_progress(b.run_dir)
        emit_end(b.run_dir, metrics)

    def _fail(self, b: _Branch, error: str) -> None:
        b.status = "failed"
        b.error = error
        log.error("%s failed: %s", b.run_name, error)
        metrics = self._metrics(b)
        rundir.write_metrics(b.run_dir, metrics)
        rundir.clear_progress(b.run_dir)
        emit_end(b.run_dir, metrics)

    def _write_hparams(self, b: _Branch, metrics: dict) -> None:
        write_hparams(b.writer, b.cfg, b.hparams, metrics, step=b.step)

    def cleanup(self) -> None:
        for b in self.branches:
            if b.writer is not None:
                try:
                    b.writer.close()
                except OSError as err:  # a full or read-only disk: the events already written stay readable
                    log.warning("%s: TensorBoard events could not be flushed: %s", b.run_name, err)
                b.writer = None

    def results(self) -> list[dict]:
        out = []
        for b in self.branches:
            out.append(rundir.read_metrics(b.run_dir) or self._metrics(b))
        return out


def train_pack(cfgs: Sequence[TrialConfig], run_dirs: Sequence[str | Path], *, resume: bool = True,
               backbone: torch.nn.Module | None = None, report: Callable[[dict], None] | None = None,
               hparams: Sequence[dict] | None = None, cpus: float | None = None) -> list[dict]:
    """Train a pack (k >= 1) of trials; returns each branch's metrics dict (also in its metrics.json).
    ``cpus``: the CPUs Ray assigned to the trial (``synqt.training.threads``)."""
    recipe = TrialRecipe(cfgs, run_dirs, resume=resume, backbone=backbone, report=report, hparams=hparams,
                         cpus=cpus)
    try:
        recipe.setup()
        recipe.train()
    except Exception as err:
        # leave a readable failure behind for every unfinished branch, keep resume.pt, then let the caller retry
        storage = as_write_failed(err, recipe.branches[0].run_dir)  # the file, free space and key: no traceback
        message = str(storage) if storage else f"{type(err).__name__}: {err}\n" + traceback.format_exc(limit=5)
        for b in recipe.branches:
            if b.status == "running":
                b.status = "failed"
                b.error = message
                try:
                    rundir.write_metrics(b.run_dir, recipe._metrics(b))
                except OSError as again:  # the folder takes no small write either: say so, keep the first error
                    log.error("%s: could not mark the run failed in %s either: %s", b.run_name,
                              b.run_dir / rundir.METRICS, again)
        if storage is not None and storage is not err:
            raise storage from err
        raise
    finally:
        recipe.cleanup()
    return recipe.results()


def evaluate_checkpoint(cfg: TrialConfig, weights: str | Path, *, split: str = "test", official: bool = False,
                        out: str | Path | None = None) -> dict:
    """Score a trainable-only checkpoint (or an official full state dict) on one split."""
    from synqt.data.images import load_images, to_tensor_batch
    from synqt.data.splits import dataset_num_classes, read_split, validate_dataset
    from synqt.training.threads import configure_threads
    from synqt.weights.checkpoint import read_state_dict, read_trainable

    validate_dataset(cfg.data_root, cfg.dataset, [split], cfg.num_classes, layout=cfg.layout)
    threads = configure_threads()
    if official:
        state = read_state_dict(weights)
        num_classes = int(state["head.weight"].shape[0])
    else:
        _, header = read_trainable(weights)
        num_classes = int(header["branch"]["num_classes"])
    # official: the state dict holds the backbone too, so it is built without the configured checkpoint
    backbone = frozen_backbone(cfg, checkpoint=None) if official else frozen_backbone(cfg)
    token_nums = int(state["synqt.q"].shape[1]) if official else int(header["branch"]["token_nums"])
    model = SynQT(backbone, num_classes, token_nums=token_nums, drop_path_rate=cfg.drop_path_rate,
                  backbone_drop_path=cfg.backbone_drop_path, memory_mode=cfg.memory_mode)
    if official:
        load_official_state_dict(model, state)
    else:
        load_trainable(model, weights)
    data_classes = cfg.num_classes or dataset_num_classes(cfg.data_root, cfg.dataset, layout=cfg.layout)
    size = cfg.image_size or int(backbone.patch_embed.img_size[0])
    recorded = {"num_classes": num_classes}
    if not official:
        recorded.update({k: header.get("extra", {}).get(k) for k in ("dataset", "image_size")})
    warnings = check_weights_fit(str(weights), recorded, dataset=cfg.dataset, num_classes=data_classes,
                                 image_size=size)
    from synqt.config import training_overlap

    overlap = None if official else training_overlap(cfg, split)  # official weights: their training is unknown
    if overlap:
        log.warning("%s", overlap)
        warnings.append(overlap)
    split_list = read_split(cfg.data_root, cfg.dataset, split, layout=cfg.layout)
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
              "weights": str(weights), "official": official, "test_acc" if split == "test" else "val_acc": acc,
              "warnings": warnings, "threads": threads.as_dict()}
    out_path = Path(out) if out else Path(weights).parent / rundir.EVAL_METRICS
    atomic_write_json(out_path if out_path.suffix == ".json" else out_path / rundir.EVAL_METRICS, result)
    return result
