"""What a plan will cost before it runs: images per split (the list files, else the registry's official sizes;
both stages of a vtab sweep), the K/V cache plan, and where its trials compute. A pack's memory estimate is
``launcher.plan.packing.estimate_memory``.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from launcher.plan.packing import packs_of
from launcher.plan.schema import DEFAULT_TRAIN_IMAGES, Sweep
from launcher.plan.trials import PlannedTrial, grid_points, plan_trials
from synqt.config import pack_key
from synqt.run import rundir

log = logging.getLogger(__name__)


def _split_size(cfg: Any, split: str) -> tuple[int, str]:
    """(images, source) in one split of a trial's dataset. source: ``list`` (its list file was read),
    ``official`` (the data is not in place: the benchmark's official size from the registry,
    ``synqt.data.splits.official_split_size``) or ``assumed`` (neither: DEFAULT_TRAIN_IMAGES)."""
    from synqt.data.splits import official_split_size

    if cfg.data_root:
        try:
            from synqt.data.splits import read_split

            return len(read_split(cfg.data_root, cfg.dataset, split, cfg.layout)), "list"
        except Exception:  # noqa: BLE001 - a dry run also works before the data is in place
            pass
    n = official_split_size(cfg.dataset, split)
    return (n, "official") if n is not None else (DEFAULT_TRAIN_IMAGES, "assumed")


def count_train_images(cfg: Any) -> tuple[int, str]:
    """(images, source) of the trial's training split (see ``_split_size``)."""
    from synqt.config import splits_for

    return _split_size(cfg, splits_for(cfg)[0])


def count_eval_images(cfg: Any) -> tuple[int, str]:
    """(images, source) of the trial's evaluation split (see ``_split_size``)."""
    from synqt.config import splits_for

    return _split_size(cfg, splits_for(cfg)[1])


def img_count(n: int, source: str) -> str:
    return {"list": f"{n} img", "official": f"{n} img (official)",
            "assumed": f"~{n} img (assumed: data not found)"}[source]


def stage2_stand_ins(sweep: Sweep, trials: list[PlannedTrial]) -> list[PlannedTrial]:
    """The vtab protocol's stage-2 trials as the dry run counts them before stage 1 chose: each dataset's first
    grid point with every seed (the grid point changes no split, and the image count only through epochs or
    eval_every set in the grid). Empty for the paper protocol or a plan that is stage 2 already."""
    if sweep.protocol != "vtab" or not trials or trials[0].stage != "search":
        return []
    first = grid_points(sweep)[0]
    return plan_trials(sweep, "final", best={d: dict(first) for d in sweep.datasets})


_planned: dict[str, dict[str, Any]] = {}


def planned_cache(cfg: Any, n_train: int, n_eval: int) -> dict[str, Any]:
    """``synqt.training.kv_cache.planned_cache`` once per configuration that differs in more than its seeds (it builds
    the backbone on the meta device: a stage 2 of 19 tasks x 5 seeds called it 95 times)."""
    from synqt.config import config_to_dict
    from synqt.training.kv_cache import planned_cache

    key = json.dumps([{k: v for k, v in config_to_dict(cfg).items() if k not in rundir.SEED_KEYS}, n_train, n_eval],
                     sort_keys=True, default=str)
    if key not in _planned:
        _planned[key] = planned_cache(cfg, n_train, n_eval)
    return _planned[key]


def estimated_images(sweep: Sweep, trials: list[PlannedTrial]) -> dict[str, int]:
    """Images through the frozen backbone's image stream, three ways; ``assumed`` is 1 when some split's size is
    assumed (its list file could not be read).

    - ``planned``: what the sweep will run: a pack shares one image stream; a split held in the K/V cache
      (``synqt.training.kv_cache.planned_cache``: ``kv_cache`` on, ``backbone_drop_path: false``, within
      ``kv_cache_max_gb``) passes the backbone once per dataset and node (counted once: one node), every epoch
      and evaluation then reads the cache; the paper protocol's evaluations are one deferred pass
      (``deferred_eval``, either trainer) instead of one per evaluation epoch.
    - ``packed``: the same packs with every split live and every evaluation periodic.
    - ``unpacked``: every trial alone, live and periodic (epochs x train images + evaluations x eval images).
    """

    assumed = False
    built: set[tuple[str, str, str]] = set()  # (dataset, split, cache-relevant config) built once per node
    per_config: dict[str, tuple[int, list[tuple[str, int, int, bool]], str]] = {}  # pack_key -> counts

    def counts(cfg: Any) -> tuple[int, list[tuple[str, int, int, bool]], str]:
        """(live periodic images, [(split, images, passes, cached)], cache identity) of one pack of ``cfg``;
        computed once per pack configuration (``planned_cache`` builds the backbone on the meta device)."""
        nonlocal assumed
        key = pack_key(cfg)
        if key not in per_config:
            (n_eval, eval_source), (n_train, train_source) = count_eval_images(cfg), count_train_images(cfg)
            assumed = assumed or "assumed" in (eval_source, train_source)
            evals = math.ceil(cfg.epochs / max(1, cfg.eval_every)) if cfg.protocol == "paper" else 1
            plan = planned_cache(cfg, n_train, n_eval)
            eval_passes = 1 if (cfg.protocol == "paper" and cfg.deferred_eval) else evals
            identity = json.dumps([cfg.backbone, dict(cfg.backbone_kwargs), cfg.checkpoint, cfg.image_size,
                                   cfg.kv_cache_dtype, cfg.precision], sort_keys=True, default=str)
            per_config[key] = (cfg.epochs * n_train + evals * n_eval,
                               [("train", n_train, cfg.epochs, plan["train_cached"]),
                                ("eval", n_eval, eval_passes, plan["eval_cached"])], identity)
        return per_config[key]

    unpacked = packed = planned = 0
    for p in packs_of(trials):
        cfg = p[0].config
        live, splits, identity = counts(cfg)
        unpacked += live * len(p)
        packed += live
        for split, n, passes, cached in splits:
            if not cached:
                planned += passes * n
            elif (cfg.dataset, split, identity) not in built:  # a cached split passes once per dataset and node
                built.add((cfg.dataset, split, identity))
                planned += n
    return {"planned": planned, "unpacked": unpacked, "packed": packed, "assumed": int(assumed)}


def trial_device(sweep: Sweep) -> str:
    """Where the sweep's trials will compute, judged from this machine: cuda when they ask for GPUs."""
    return "cuda" if sweep.resources["gpus"] > 0 else "cpu"
