"""The `--dry-run` text: trials, packs, images, cache, precision and weights lines of a plan.
"""

from __future__ import annotations

import logging
from pathlib import Path

from launcher.plan.estimates import (
    count_eval_images,
    count_train_images,
    estimated_images,
    img_count,
    planned_cache,
    stage2_stand_ins,
    trial_device,
)
from launcher.plan.packing import packs_of
from launcher.plan.schema import DEFAULT_TRAIN_IMAGES, Sweep
from launcher.plan.trials import PlannedTrial, grid_points, stage_names
from synqt.data import registry
from synqt.run import rundir
from synqt.weights.identify import is_random

log = logging.getLogger(__name__)


def _bf16_line(sweep: Sweep, trials: list[PlannedTrial]) -> str | None:
    """The dry run's word on bf16 (synqt/model/precision.py), for the device the trials would use on this machine."""
    if not any(t.config.precision == "bf16" for t in trials):
        return None
    import torch

    from synqt.model.precision import describe

    device = trial_device(sweep)
    if device == "cuda" and not torch.cuda.is_available():
        return "bf16: this machine has no GPU to judge; each trial checks its own device before training"
    return describe("bf16", device)


def kv_cache_lines(trials: list[PlannedTrial]) -> list[str]:
    """Per dataset: the K/V cache its trials share on a node (size per split), or why they run live."""
    from synqt.config import splits_for
    from synqt.training.kv_cache import format_bytes

    lines = ["K/V cache per dataset (built once per node, shared by its trials; kv_cache / kv_cache_max_gb; "
             "img (official): the benchmark's official split size, the data not being in place):"]
    seen: set[tuple[str, str]] = set()
    stages = {t.stage for t in trials}
    for t in trials:
        if (t.dataset, t.stage) in seen:
            continue
        seen.add((t.dataset, t.stage))
        cfg = t.config
        train_split, eval_split = splits_for(cfg)
        (n_train, train_source), (n_eval, eval_source) = count_train_images(cfg), count_eval_images(cfg)
        plan = planned_cache(cfg, n_train, n_eval)
        sizes = (f"{train_split} {img_count(n_train, train_source)} {format_bytes(plan['train_bytes'])}"
                 f"{'' if plan['train_cached'] else ' (live)'}, {eval_split} {img_count(n_eval, eval_source)} "
                 f"{format_bytes(plan['eval_bytes'])}{'' if plan['eval_cached'] else ' (live)'}")
        state = f"cached ({cfg.kv_cache_dtype})" if plan["active"] else f"live: {plan['reason']}"
        where = f"{t.dataset} ({t.stage})" if len(stages) > 1 else t.dataset
        lines.append(f"  {where:<24} {state}; {sizes}")
    return lines


def weights_lines(sweep: Sweep, trials: list[PlannedTrial]) -> list[str]:
    """Which backbone weights the trials will use: path + sha256, random, the demo backbone, or none."""
    out: dict[str, list[str]] = {}
    for t in trials:
        ckpt = t.config.checkpoint
        if is_random(ckpt):
            text = "random initialisation (checkpoint=random)"
        elif not ckpt and sweep.demo_assets:
            text = "the pre-trained demo backbone (demo_assets: created or reused when the sweep starts)"
        elif not ckpt:
            text = ("NONE yet: key 'checkpoint' is not set; the sweep starts only once it is: set "
                    "checkpoint=/path/ViT-B_16.npz or checkpoint=random")
        elif Path(ckpt).is_file():
            digest = rundir.weights_id(ckpt).removeprefix("sha256:")  # hashed once per file, not once per trial
            text = f"{Path(ckpt).absolute()} (sha256 {digest})"
        else:
            text = f"{ckpt} (file not found: the sweep will be refused)"
        out.setdefault(text, []).append(t.dataset)
    if len(out) == 1:
        return [f"backbone weights: {next(iter(out))}"]
    lines = ["backbone weights:"]
    for text, datasets in out.items():
        lines.append(f"  {', '.join(dict.fromkeys(datasets))}: {text}")
    return lines


def dry_run_text(sweep: Sweep, trials: list[PlannedTrial]) -> str:
    """The human-readable plan: counts, per-dataset trials, packs, resources, estimated images."""
    lines = [
        f"sweep {sweep.name!r} ({sweep.source}) -> {sweep.sweep_dir}",
        f"protocol: {sweep.protocol}; grid: {len(grid_points(sweep))} point(s) "
        f"({', '.join(f'{k}={v}' for k, v in sweep.grid.items()) or 'none'}); seeds: {sweep.seeds}",
    ]
    packs = packs_of(trials)
    stage = trials[0].stage if trials else stage_names(sweep)[0]
    lines.append(f"stage {stage}: {len(trials)} trial(s) in {len(packs)} Ray trial(s) (pack: {sweep.pack})")
    if sweep.protocol == "vtab":
        lines.append(
            f"stage final (after stage 1): {len(sweep.datasets) * len(sweep.seeds)} trial(s) "
            f"= {len(sweep.datasets)} dataset(s) x {len(sweep.seeds)} seed(s), best val200 point each"
        )
    per: dict[str, int] = {}
    for t in trials:
        per[t.dataset] = per.get(t.dataset, 0) + 1
    lines.append("trials per dataset:")
    lines.extend(f"  {d:<24} {n}" + (f"  <- not a known task{hint}" if (hint := registry.did_you_mean(d)) else "")
                 for d, n in per.items())
    res = sweep.resources
    lines.append(
        f"resources per Ray trial: cpus={res['cpus']} gpus={res['gpus']} devices={res['devices']}; "
        f"max_concurrent={sweep.max_concurrent or 'as resources allow'}; retries={sweep.retries}"
    )
    if sweep.asha:
        lines.append(f"ASHA on stage 1: {sweep.asha}")
    lines.append("packs:")
    for i, p in enumerate(packs):
        lines.append(f"  pack {i:>3} ({len(p)}): " + ", ".join(t.run_name for t in p))
    lines.extend(weights_lines(sweep, trials))
    bf16 = _bf16_line(sweep, trials)
    if bf16:
        lines.append(bf16)
    stage2 = stage2_stand_ins(sweep, trials)
    lines.extend(kv_cache_lines(trials + stage2))
    imgs = estimated_images(sweep, trials)
    both = ""
    if stage2:  # a stage's K/V cache holds other splits than the other stage's: counted per stage, then added
        imgs2 = estimated_images(sweep, stage2)
        both = (f" (stage 1: {imgs['planned']:,}, stage 2: {imgs2['planned']:,}, its grid point not chosen yet: "
                "counted with the first)")
        imgs = {k: imgs[k] + imgs2[k] for k in ("planned", "packed", "unpacked")} | {
            "assumed": imgs["assumed"] or imgs2["assumed"]}
    lines.append(
        f"estimated images through the backbone{', both stages' if stage2 else ''}: {imgs['planned']:,} as planned"
        f"{both} (packs share one image stream; a K/V-cached split passes once per dataset and node; deferred "
        f"evaluation: one pass); live: {imgs['packed']:,} packed, {imgs['unpacked']:,} if every trial ran alone "
        f"(epochs x train images + evaluations x eval images)"
        + (f"; includes assumed split sizes (data not found and no official size: ~{DEFAULT_TRAIN_IMAGES} images "
           "each, marked above)" if imgs["assumed"] else "")
    )
    return "\n".join(lines)
