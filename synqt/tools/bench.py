"""`synqt bench`: saved-activation memory, peak memory and images/s of SynQT's memory modes.

Every figure is measured on the same frozen backbone (random weights unless ``checkpoint`` is
set) against full fine-tuning and a linear probe of that backbone, plus a "naive SynQT" baseline:
the same model computed the straightforward way (explicit ``softmax(q k^T) v`` in the image stream,
K/V kept as slices of the fused ``qkv`` output, query-path attention left to autograd), which the
speed goals of issue 6 are measured against.
"""

from __future__ import annotations

import copy
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from synqt.config import MEMORY_MODES
from synqt.errors import ConfigError, DataError
from synqt.model.branch import drop_path, dropout
from synqt.model.memory import (
    GIB,
    _geometry,
    _image_size,
    estimate_trial_memory,
    keep_freed_host_memory,
    model_tensors,
    peak_memory,
    saved_activation_bytes,
)
from synqt.model.precision import autocast_for
from synqt.model.stream import PackedSynQT, SynQT, count_trainable, new_branch
from synqt.training.build import frozen_backbone
from synqt.training.schedule import adamw
from synqt.weights.identify import RANDOM

NAIVE_ROW = "naive synqt"  # the fp32 straightforward implementation every row's speed is compared with
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
BENCH_NUM_CLASSES = 100


# ---------------------------------------------------------------------------------------------------------------
# hardware


def hardware_info(device: torch.device) -> dict[str, Any]:
    """The GPU name, or the CPU model and its flags that matter for fp32/bf16 matmuls."""
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        return info
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and model in ("unknown", "", platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    info["cpu"] = model
    info["cpu_flags"] = {f: f in flags for f in CPU_FLAGS}
    return info


# ---------------------------------------------------------------------------------------------------------------
# the straightforward baseline and the comparison models


class NaiveSynQT(nn.Module):
    """SynQT computed the straightforward way, sharing the weights of a ``SynQT`` model.

    Image stream: ``qkv`` then explicit ``softmax(q k^T * scale) v`` per block; the query stream
    reads K and V as slices of that ``qkv`` output (so autograd keeps the whole fused buffer) and
    applies the full ``qkv`` projection to the query tokens, discarding its K/V thirds. Same math
    and the same random draws (global RNG) as ``SynQT`` in ``keep`` mode.
    """

    def __init__(self, model: SynQT) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m, branch = self.model, self.model.branch
        bb = m.backbone
        training = m.training
        stochastic = training and m.backbone_drop_path
        B = images.shape[0]
        with torch.no_grad():
            x = m._embed(images)
        prev = None
        hs, atts, ffns = [], [], []
        for i, blk in enumerate(bb.blocks):
            attn = blk.attn
            heads, rate = attn.num_heads, m.drop_path_rates[i]
            with torch.no_grad():
                N, C = x.shape[1], x.shape[2]
                qkv = attn.qkv(blk.norm1(x)).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
                q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
                a = torch.softmax(q @ k.transpose(-2, -1) * attn.scale, dim=-1)
                if stochastic:
                    a = F.dropout(a, attn.attn_drop.p, True)
                out = attn.proj((a @ v).transpose(1, 2).reshape(B, N, C))
                x = x + drop_path(blk.ls1(out), rate, stochastic, None)
                x = x + drop_path(blk.ls2(blk.mlp(blk.norm2(x))), rate, stochastic, None)
            p = branch.synthesize(i, prev, B)
            T = p.shape[1]
            h = blk.norm1(p)
            qp = attn.qkv(h).reshape(B, T, 3, heads, C // heads).permute(2, 0, 3, 1, 4)[0]
            qp = attn.q_norm(qp)
            o = torch.softmax(qp @ k.transpose(-2, -1) * attn.scale, dim=-1) @ v
            o = dropout(attn.proj(attn.norm(o.transpose(1, 2).reshape(B, T, C))), attn.proj_drop.p, training, None)
            f_att = drop_path(blk.ls1(o), rate, training, None)
            p = p + f_att
            f_ffn = drop_path(blk.ls2(blk.mlp(blk.norm2(p))), rate, training, None)
            p = p + f_ffn
            if T > 1:
                p, f_att, f_ffn = p.mean(1, keepdim=True), f_att.mean(1, keepdim=True), f_ffn.mean(1, keepdim=True)
            prev = p
            hs.append(p)
            atts.append(f_att)
            ffns.append(f_ffn)
        return branch.head(torch.cat([hs[-1], *hs, *atts, *ffns], dim=1), None)


class LinearProbe(nn.Module):
    """Frozen backbone features (timm pre-logits) and a trainable linear classifier."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(int(backbone.num_features), num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)
        return self.head(feats)


def full_finetune_model(backbone: nn.Module, num_classes: int) -> nn.Module:
    """A trainable copy of the backbone (timm forward, drop path on) with a new classifier."""
    model = copy.deepcopy(backbone)
    model.reset_classifier(num_classes)
    model.requires_grad_(True)
    return model.train()


# ---------------------------------------------------------------------------------------------------------------
# measuring one configuration


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, model: nn.Module, trainable: list[nn.Parameter], images: torch.Tensor, labels: torch.Tensor,
            *, device: torch.device, precision: str, steps: int, forward: Callable[[], Any] | None = None,
            loss_fn: Callable[[Any], torch.Tensor] | None = None, total_params: int | None = None,
            eval_steps: int | None = None) -> dict[str, Any]:
    """Saved-activation bytes, peak memory, parameter counts and train / eval images/s of one model.

    Step 1 counts the saved activations (and warms up), step 2 runs under ``peak_memory``, then
    ``steps`` steps are timed. ``forward`` / ``loss_fn`` default to ``model(images)`` and cross-entropy.
    """
    opt = adamw(trainable, lr=1e-4, weight_decay=1e-2)
    fwd = forward or (lambda: model(images))
    to_loss = loss_fn or (lambda out: F.cross_entropy(out, labels))
    batch = images.shape[0]

    def loss() -> torch.Tensor:
        with autocast_for(device, precision):
            return to_loss(fwd())

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()

    model.train()
    saved = saved_activation_bytes(loss, exclude=lambda: model_tensors(model), backward=True)
    opt.step()
    peak = peak_memory(step, device)  # untimed: the CPU sampler thread would slow the step it watches
    times = []
    for _ in range(max(1, steps)):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    model.eval()
    eval_times = []
    with torch.no_grad():
        with autocast_for(device, precision):
            fwd()  # warm-up
        for _ in range(max(1, eval_steps if eval_steps is not None else steps)):
            _sync(device)
            t0 = time.perf_counter()
            with autocast_for(device, precision):
                fwd()
            _sync(device)
            eval_times.append(time.perf_counter() - t0)
    model.train()
    n_train = sum(p.numel() for p in trainable)
    return {
        "name": name,
        "precision": "fp32" if precision in ("no", "fp32") else precision,
        "saved_bytes": saved["bytes"],
        "saved_gib": saved["gib"],
        "saved_top": saved["by_shape"][:4],
        "peak_bytes": peak["bytes"],
        "peak_gib": peak["gib"],
        "peak_kind": peak["kind"],
        "trainable_params": int(n_train),
        "total_params": int(total_params if total_params is not None else sum(p.numel() for p in model.parameters())),
        "train_step_s": sum(times) / len(times),
        "train_step_s_min": min(times),
        "train_images_per_s": batch * len(times) / sum(times),
        "eval_images_per_s": batch * len(eval_times) / sum(eval_times),
    }


# ---------------------------------------------------------------------------------------------------------------
# config and the memory estimate


def bench_config(overrides: Sequence[str]) -> Any:
    from synqt.config import load_config

    return load_config([], list(overrides), base=True)


def _device(cfg: Any) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------
# the three benches


def _synqt(backbone: nn.Module, cfg: Any, mode: str, num_classes: int) -> SynQT:
    return SynQT(backbone, num_classes, token_nums=cfg.token_nums, feat_scale=cfg.feat_scale,
                 attn_scale=cfg.attn_scale, ffn_scale=cfg.ffn_scale, drop_path_rate=cfg.drop_path_rate,
                 backbone_drop_path=cfg.backbone_drop_path, memory_mode=mode)


def bench_models(cfg: Any, modes: Sequence[str], *, steps: int, baselines: bool = True,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    device = _device(cfg)
    torch.manual_seed(cfg.seed)
    backbone = frozen_backbone(cfg, checkpoint=cfg.checkpoint or RANDOM).to(device)  # timing: random is fine
    size = _image_size(cfg, backbone)
    B = int(cfg.batch_size)
    classes = int(cfg.num_classes or BENCH_NUM_CLASSES)
    images = torch.randn(B, 3, size, size, device=device)
    labels = torch.randint(0, classes, (B,), device=device)
    backbone_params = sum(p.numel() for p in backbone.parameters())
    common = {"device": device, "precision": cfg.precision, "steps": steps}
    rows = []
    for mode in modes:
        log(f"bench: SynQT memory_mode={mode} ...")
        model = _synqt(backbone, cfg, mode, classes).to(device)
        rows.append(measure(f"synqt {mode}", model, model.trainable_parameters(), images, labels,
                            total_params=backbone_params + count_trainable(model), **common))
        rows[-1]["kv_bytes_fp32"] = 2 * len(backbone.blocks) * B * _tokens(backbone, size) * int(backbone.embed_dim) * 4
        del model
    if baselines:
        # the speed reference is the straightforward implementation in fp32, whatever precision is benched
        log("bench: naive SynQT in fp32 (explicit attention, fp32 K/V slices of qkv) ...")
        model = _synqt(backbone, cfg, "keep", classes).to(device)
        naive = NaiveSynQT(model)
        rows.append(measure(NAIVE_ROW, naive, model.trainable_parameters(), images, labels,
                            total_params=backbone_params + count_trainable(model), **{**common, "precision": "no"}))
        del model, naive
        log("bench: linear probe ...")
        probe = LinearProbe(backbone, classes).to(device)
        rows.append(measure("linear probe", probe, list(probe.head.parameters()), images, labels, **common))
        del probe
        log("bench: full fine-tuning ...")
        full = full_finetune_model(backbone, classes).to(device)
        rows.append(measure("full fine-tuning", full, list(full.parameters()), images, labels, **common))
        del full
    naive_rows = [r for r in rows if r["name"] == NAIVE_ROW]
    for r in rows:
        r["vs_naive_fp32"] = r["train_images_per_s"] / naive_rows[0]["train_images_per_s"] if naive_rows else None
    return {"rows": rows, "geometry": {"batch_size": B, "image_size": size, "tokens": _tokens(backbone, size),
                                       "embed_dim": int(backbone.embed_dim), "depth": len(backbone.blocks)}}


def _tokens(backbone: nn.Module, size: int) -> int:
    with torch.no_grad():
        x = backbone.patch_embed(torch.zeros(1, 3, size, size, device=next(backbone.parameters()).device))
        return int(backbone._pos_embed(x).shape[1])


def bench_pack(cfg: Any, n: int, *, steps: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Wall time of one training step of a pack of ``n`` branches against ``n`` single-branch steps."""
    device = _device(cfg)
    torch.manual_seed(cfg.seed)
    backbone = frozen_backbone(cfg, checkpoint=cfg.checkpoint or RANDOM).to(device)  # timing: random is fine
    size = _image_size(cfg, backbone)
    classes = int(cfg.num_classes or BENCH_NUM_CLASSES)
    images = torch.randn(cfg.batch_size, 3, size, size, device=device)
    labels = torch.randint(0, classes, (cfg.batch_size,), device=device)
    common = {"device": device, "precision": cfg.precision, "steps": steps, "eval_steps": 1}
    log(f"bench: one trial (memory_mode={cfg.memory_mode}) ...")
    single = _synqt(backbone, cfg, cfg.memory_mode, classes).to(device)
    one = measure("one trial", single, single.trainable_parameters(), images, labels, **common)
    del single
    log(f"bench: pack of {n} ...")
    branches = [new_branch(backbone, classes, token_nums=cfg.token_nums, feat_scale=cfg.feat_scale,
                           attn_scale=cfg.attn_scale, ffn_scale=cfg.ffn_scale) for _ in range(n)]
    packed = PackedSynQT(backbone, branches, drop_path_rate=cfg.drop_path_rate,
                         backbone_drop_path=cfg.backbone_drop_path, memory_mode=cfg.memory_mode).to(device)
    params = [p for b in packed.branches for p in b.parameters()]
    pack = measure(f"pack of {n}", packed, params, images, labels,
                   loss_fn=lambda outs: sum(F.cross_entropy(o, labels) for o in outs), **common)
    separate = n * one["train_step_s"]
    return {
        "n": n,
        "one_trial": one,
        "pack": pack,
        "pack_step_s": pack["train_step_s"],
        "separate_step_s": separate,
        "speedup": separate / pack["train_step_s"],
        "memory_ratio": pack["saved_bytes"] / max(1, one["saved_bytes"]),
        "note": f"separate = {n} x the measured single-trial step time (the {n} trials are identical in cost)",
    }


def bench_loader(cfg: Any, data_root: str, dataset: str, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Images/s of the loader: decoding every image vs building the decoded-image cache vs reading it."""
    from synqt.config import splits_for
    from synqt.data.images import load_images, to_tensor_batch
    from synqt.data.splits import read_split

    train_split, _ = splits_for(cfg)
    split = read_split(data_root, dataset, train_split, cfg.layout)
    size = int(cfg.image_size or _geometry(cfg)["image_size"])
    n = len(split.paths)
    if n == 0:
        raise DataError(f"split {train_split!r} of {dataset!r} under {data_root} is empty")

    def batches(arr: Any) -> None:
        for i in range(0, n, cfg.batch_size):
            to_tensor_batch(arr[i:i + cfg.batch_size], cfg.mean, cfg.std)

    out: dict[str, Any] = {"dataset": dataset, "split": train_split, "images": n, "image_size": size}
    with tempfile.TemporaryDirectory(prefix="synqt-bench-cache-") as tmp:
        for label, kwargs in (("no_cache", {"use_cache": False}),
                              ("cache_build", {"use_cache": True, "cache_dir": tmp}),
                              ("cache_hit", {"use_cache": True, "cache_dir": tmp})):
            log(f"bench: loader {label} ...")
            t0 = time.perf_counter()
            arr, _ = load_images(split, size, interpolation=cfg.interpolation, **kwargs)
            batches(arr)
            dt = time.perf_counter() - t0
            out[f"{label}_images_per_s"] = n / dt
            out[f"{label}_s"] = dt
            del arr
    return out


# ---------------------------------------------------------------------------------------------------------------
# the table and the command


def _fmt_bytes(b: float) -> str:
    return f"{b / GIB:.3f}"


def format_table(result: dict[str, Any]) -> str:
    lines = []
    hw = result["hardware"]
    lines.append(f"device: {hw.get('gpu') or hw.get('cpu')} ({hw['device']}, torch {hw['torch']}, "
                 f"{hw['threads']} threads)")
    if "cpu_flags" in hw:
        lines.append("cpu flags: " + " ".join(f"{k}={'yes' if v else 'no'}" for k, v in hw["cpu_flags"].items()))
    if "bf16" in hw:
        lines.append(hw["bf16"])
    cfg = result["config"]
    lines.append(f"config: backbone={cfg['backbone']} image_size={result['geometry']['image_size']} "
                 f"batch_size={cfg['batch_size']} token_nums={cfg['token_nums']} precision={cfg['precision']}")
    rows = result["rows"]
    if rows:
        kind = rows[0]["peak_kind"]
        head = (f"| {'model':<18} | precision | saved GiB | peak GiB ({kind}) | trainable | total params | "
                "train img/s | vs naive fp32 | eval img/s |")
        lines.append(head)
        lines.append("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
        for r in rows:
            ratio = f"{r['vs_naive_fp32']:.2f}x" if r.get("vs_naive_fp32") is not None else "-"
            lines.append(
                f"| {r['name']:<18} | {r['precision']:>9} | {_fmt_bytes(r['saved_bytes']):>9} "
                f"| {_fmt_bytes(r['peak_bytes']):>{len(kind) + 11}} "
                f"| {r['trainable_params']:>9,} | {r['total_params']:>12,} | {r['train_images_per_s']:>11.2f} "
                f"| {ratio:>13} | {r['eval_images_per_s']:>10.2f} |"
            )
    pack = result.get("pack")
    if pack:
        lines.append(
            f"pack of {pack['n']}: {pack['pack_step_s']:.3f} s/step vs {pack['separate_step_s']:.3f} s for "
            f"{pack['n']} separate steps ({pack['speedup']:.2f}x); saved activations "
            f"{_fmt_bytes(pack['pack']['saved_bytes'])} GiB vs {_fmt_bytes(pack['one_trial']['saved_bytes'])} GiB "
            f"for one trial ({pack['memory_ratio']:.2f}x)"
        )
    loader = result.get("loader")
    if loader:
        lines.append(
            f"loader ({loader['dataset']}/{loader['split']}, {loader['images']} images at {loader['image_size']} px): "
            f"no cache {loader['no_cache_images_per_s']:.1f} img/s, cache build "
            f"{loader['cache_build_images_per_s']:.1f} img/s, cache hit {loader['cache_hit_images_per_s']:.1f} img/s"
        )
    if result.get("kv_cache"):
        from synqt.tools.kv_bench import format_kv

        lines.append(format_kv(result["kv_cache"]))
    est = result.get("estimate_bytes")
    if est is not None:
        lines.append(f"estimate_trial_memory (memory_mode={cfg['memory_mode']}, 1 branch): {_fmt_bytes(est)} GiB")
    return "\n".join(lines)


def run_bench(overrides: Sequence[str] = (), *, steps: int = 3, modes: Sequence[str] | None = None, pack: int = 0,
              loader: bool = False, data_root: str | None = None, dataset: str | None = None,
              baselines: bool = True, kv_cache: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`synqt bench`: the figures as a dict (``format_table`` renders them); ``overrides`` are TrialConfig
    ``key=value``; ``modes`` the memory modes to time (default: all); ``pack`` > 0 also times a pack of that
    size against as many separate trials; ``loader`` the data loader with and without its cache
    (alone unless ``modes`` is given, like ``kv_cache``); ``kv_cache``
    the K/V cache figures (``synqt.tools.kv_bench``; alone unless ``modes`` is given)."""
    from synqt.config import config_to_dict

    cfg = bench_config(list(overrides))
    explicit_modes = bool(modes)
    modes = list(MEMORY_MODES) if not modes else list(modes)
    for m in modes:
        if m not in MEMORY_MODES:
            raise ConfigError(
                f"--modes: {m!r} is not a memory mode; expected a comma list of {', '.join(MEMORY_MODES)}")
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if pack < 0:
        raise ConfigError(f"--pack must be >= 1, got {pack}")
    if loader and not (data_root and dataset):
        raise ConfigError("--loader needs --data-root and --dataset")
    if loader:  # checked now, not after minutes of model timings
        from synqt.config import splits_for
        from synqt.data.splits import validate_dataset

        validate_dataset(data_root, dataset, [splits_for(cfg)[0]], cfg.num_classes, layout=cfg.layout)
    device = _device(cfg)
    from synqt.model.precision import check_precision, describe
    from synqt.training.threads import configure_threads

    threads = configure_threads()
    log(threads.line())

    bf16_line = describe(cfg.precision, device)  # shown in the table (format_table)
    check_precision(cfg.precision, device)  # a refused bf16 bench says why in its error, before any timing
    result: dict[str, Any] = {"hardware": hardware_info(device), "config": config_to_dict(cfg), "rows": []}
    result["hardware"]["bf16"] = bf16_line
    result["hardware"]["threads_decided"] = threads.as_dict()
    if device.type == "cpu":  # as the trainers do; also keeps one model's page faults out of the next one's timing
        result["hardware"]["keep_freed_host_memory"] = keep_freed_host_memory(device)
    if not (kv_cache or loader) or explicit_modes:  # --kv-cache / --loader alone time only what they name
        result.update(bench_models(cfg, modes, steps=steps, baselines=baselines, log=log))
    else:
        result["geometry"] = _geometry(cfg)
    if kv_cache:
        from synqt.tools.kv_bench import bench_kv_cache

        result["kv_cache"] = bench_kv_cache(cfg, steps=steps, device=device, log=log)
    result["estimate_bytes"] = estimate_trial_memory(cfg, 1)
    if pack:
        result["pack"] = bench_pack(cfg, pack, steps=steps, log=log)
    if loader:
        result["loader"] = bench_loader(cfg, data_root, dataset, log=log)
    return result


__all__ = ["run_bench", "estimate_trial_memory", "hardware_info", "measure", "NaiveSynQT", "LinearProbe",
           "full_finetune_model", "bench_models", "bench_pack", "bench_loader", "format_table"]

