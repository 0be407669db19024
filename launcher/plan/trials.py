"""The trial plan: grid points x datasets x seeds x stages -> PlannedTrials with resolved TrialConfigs,
and stage 2's selection on val200 (big_vision protocol: choose on validation, report test).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

from launcher.plan.packing import assign_packs
from launcher.plan.schema import SHARED_KEYS, PlannedTrial, Sweep
from synqt.config import TAGS
from synqt.data import registry
from synqt.errors import ConfigError
from synqt.run import rundir
from synqt.weights.identify import RANDOM, is_random

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# plan


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict | list):
        v = json.dumps(v, sort_keys=True)
    return re.sub(r"[^A-Za-z0-9.+-]+", "", str(v)) or "x"


def hparam_short(hp: dict[str, Any]) -> str:
    """Readable, deterministic tag of a grid point: {'lr': 0.001, 'weight_decay': 0.01} -> lr0.001_wd0.01."""
    if not hp:
        return "default"
    return "_".join(f"{TAGS.get(k, k.replace('_', ''))}{_fmt(v)}" for k, v in hp.items())


def grid_points(sweep: Sweep) -> list[dict[str, Any]]:
    """Grid points in grid order (the first key varies slowest); random search samples distinct points."""
    keys = list(sweep.grid)
    points = [
        dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(sweep.grid[k] for k in keys))
    ]
    if sweep.search == "random" and sweep.num_samples is not None and sweep.num_samples < len(points):
        chosen = sorted(random.Random(0).sample(range(len(points)), sweep.num_samples))
        points = [points[i] for i in chosen]
    return points or [{}]


def _merge(into: dict[str, Any], layer: dict[str, Any]) -> None:
    """Layer TrialConfig values; dict values (backbone_kwargs) merge key by key."""
    for k, v in layer.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            into[k] = {**into[k], **v}
        else:
            into[k] = v


def _as_path(key: str, value: Any) -> Any:
    """A data_root / checkpoint value as the sweep's own keys hold it: absolute (a trial may run in another
    working folder), ``random`` kept as said."""
    if key not in SHARED_KEYS or not isinstance(value, str) or not value:
        return value
    if key == "checkpoint" and is_random(value):
        return RANDOM
    return str(Path(os.path.expanduser(value)).absolute())


def trial_config(sweep: Sweep, dataset: str, hparams: dict[str, Any], seed: int, stage: str) -> Any:
    """One trial's TrialConfig. Layers, later wins: base < shipped dataset config < the sweep's data_root /
    checkpoint < `trial` < per_dataset < grid point < what the sweep owns (dataset, seed, stage, protocol; trainer
    and num_devices under resources.devices > 1, which no layer may set otherwise: ``sweep_from_dict``)."""
    from synqt.config import config_from_dict, config_to_dict, load_config

    where = f"{sweep.source}: dataset {dataset!r}" + (f", grid point {hparams}" if hparams else "")
    try:
        values = config_to_dict(load_config([], [f"dataset={dataset}"]))
        shared = {k: getattr(sweep, k) for k in SHARED_KEYS if getattr(sweep, k)}
        for layer in (shared, sweep.trial, sweep.per_dataset.get(dataset, {}), hparams):
            _merge(values, {k: _as_path(k, v) for k, v in layer.items()})
        fixed: dict[str, Any] = {"dataset": dataset, "seed": seed, "stage": stage, "protocol": sweep.protocol}
        if sweep.resources["devices"] > 1:
            fixed["trainer"] = "deepspeed"
            fixed["num_devices"] = sweep.resources["devices"]
        values.update(fixed)
        if values.get("group") is None:  # the synthetic tasks report under their VTAB-like group
            info = registry.lookup(dataset)
            values["group"] = info.group if info is not None else None
        return config_from_dict(values, where)
    except ConfigError as err:
        msg = str(err)
        raise ConfigError(msg if msg.startswith(sweep.source) else f"{where}: {msg}") from None


def stage_names(sweep: Sweep) -> list[str]:
    return ["search", "final"] if sweep.protocol == "vtab" else ["final"]


def plan_trials(
    sweep: Sweep,
    stage: str | None = None,
    best: dict[str, dict[str, Any]] | None = None,
) -> list[PlannedTrial]:
    """Every trial of a stage (None: paper -> all; vtab -> stage 1) with its pack number.

    vtab stage `final` needs the selected grid point per dataset: `best` (dataset -> hparams), or
    read from the stage-1 metrics.json files (`select_best`). Datasets without a selection are left out.
    """
    if stage is None:
        stage = stage_names(sweep)[0]
    if stage not in ("search", "final"):
        raise ConfigError(f"stage {stage!r}: expected search or final")
    if sweep.protocol == "paper" and stage == "search":
        raise ConfigError(f"{sweep.source}: the paper protocol has no search stage")
    points = grid_points(sweep)
    trials: list[PlannedTrial] = []
    if sweep.protocol == "vtab" and stage == "search":
        combos = [(d, hp, sweep.seeds[0]) for d in sweep.datasets for hp in points]
    elif sweep.protocol == "vtab":
        if best is None:
            best = select_best(sweep)
        combos = [(d, best[d], s) for d in sweep.datasets if d in best for s in sweep.seeds]
    else:
        combos = [(d, hp, s) for d in sweep.datasets for hp in points for s in sweep.seeds]
    for d, hp, seed in combos:
        name = f"{stage}-{d}-{hparam_short(hp)}-s{seed}"
        cfg = trial_config(sweep, d, hp, seed, stage)
        trials.append(PlannedTrial(len(trials), name, d, seed, stage, dict(hp), cfg))
    if sweep.asha and stage == "search" and "max_t" in sweep.asha:
        longer = [t for t in trials if t.config.epochs > sweep.asha["max_t"]]
        if longer:  # ASHA stops a trial at max_t epochs, before it writes its result: the record would say epochs
            t = longer[0]
            raise ConfigError(
                f"{sweep.source}: asha.max_t={sweep.asha['max_t']} is below epochs={t.config.epochs} of {t.run_name} "
                f"(from the grid, trial or per_dataset): ASHA would stop every such trial at epoch "
                f"{sweep.asha['max_t']} before it records a result; set asha.max_t >= epochs")
    names = [t.run_name for t in trials]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(
            f"{sweep.source}: grid values give identical run names {dup[:3]}; use distinct values"
        )
    assign_packs(sweep, trials)
    return trials


DIVERGED = "non-finite training loss"  # the engine's error for a run whose loss blew up: a search result


def stage1_unfinished(sweep: Sweep, trials: list[PlannedTrial] | None = None) -> dict[str, list[str]]:
    """dataset -> its stage-1 run names that did not finish (no metrics.json, or failed by raising).

    Finished: an ok metrics.json, or a failed one whose loss diverged (``DIVERGED``: a learning rate that
    blows up is an outcome of the search, and takes no part in the selection). With ``asha`` a run without
    metrics.json was stopped early by the scheduler and counts as finished (call this after the stage ended).
    """
    if trials is None:
        trials = plan_trials(sweep, "search")
    out: dict[str, list[str]] = {}
    for t in trials:
        rec = rundir.read_run(t.run_dir(sweep))
        if rec.state in ("pending", "running"):  # no metrics.json
            done = bool(sweep.asha)
        else:
            done = rec.state == "done" or (rec.state == "failed" and DIVERGED in str(rec.error or ""))
            done = done and _same_trial(rec, t)
        if not done:
            out.setdefault(t.dataset, []).append(t.run_name)
    return out


def _same_trial(rec: rundir.RunRecord, t: PlannedTrial) -> bool:
    """True when the run directory's result is the planned trial's (``synqt.run.rundir.trial_identity``: every key
    that can change a result, the checkpoint by content); a run recorded with another config is another trial
    and never selects a point."""
    recorded = rec.config_identity()
    if recorded is None:  # no recorded config (an old metrics.json): its name is all there is to go by
        return True
    from synqt.config import config_to_dict

    same = recorded == rundir.trial_identity(config_to_dict(t.config))
    if not same:
        log.warning("%s holds a result of another configuration than the planned trial %s; it is not counted as "
                    "this trial's result", rec.dir, t.run_name)
    return same


def select_best(sweep: Sweep, trials: list[PlannedTrial] | None = None) -> dict[str, dict[str, Any]]:
    """Stage-1 winner per dataset: highest val_acc; ties -> the grid point first in grid order.

    Only datasets whose stage-1 points all finished (``stage1_unfinished``) are selected: never on
    partial results. Runs that diverged or were stopped early by ASHA take no part.
    """
    if trials is None:
        trials = plan_trials(sweep, "search")
    held = stage1_unfinished(sweep, trials)
    best: dict[str, tuple[float, int, dict[str, Any]]] = {}
    for t in trials:
        if t.dataset in held:
            continue
        m = rundir.read_metrics(t.run_dir(sweep))
        if not m or m.get("status") != "ok" or m.get("val_acc") is None:
            continue
        key = (float(m["val_acc"]), -t.index)
        if t.dataset not in best or key > best[t.dataset][:2]:
            best[t.dataset] = (key[0], key[1], t.hparams)
    return {d: v[2] for d, v in best.items()}
