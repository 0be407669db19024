"""The plan: sweep files and overrides, the trial plan, packs and the dry-run text (pure: runs nothing).

Nothing here imports ray or another launcher module: the plan, the validation and `--dry-run` must work
(and fail fast on a bad sweep file or a missing dataset) before any cluster resource is requested. The
`synqt sweep` / `synqt demo` commands are in `launcher.commands`; execution in `launcher.stages` and
`launcher.ray_backend`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from synqt import registry, rundir
from synqt.ckptfile import RANDOM, is_random, require_backbone_weights
from synqt.config import TAGS, Schema, pack_key, setting
from synqt.errors import ConfigError, DataError
from synqt.fileio import atomic_write_json, atomic_write_text
from synqt.resources import shipped_config_dir

log = logging.getLogger(__name__)

# The shipped sweeps (synqt/configs/sweeps inside the installed package; `configs/sweeps` in a checkout).
SWEEP_DIR = shipped_config_dir() / "sweeps"

PROTOCOLS = ("paper", "vtab")
SEARCHES = ("grid", "random")
DEFAULT_SEEDS = {"paper": [42], "vtab": [42, 44, 82, 100, 800]}
DATASET_GROUPS = ("vtab1k", *(g.lower() for g in registry.VTAB_GROUPS), "fgvc", "demo")
RESOURCE_KEYS = ("cpus", "gpus", "devices")
ASHA_KEYS = ("max_t", "grace_period", "reduction_factor")
MAX_AUTO_PACK = 8
DEFAULT_TRAIN_IMAGES = 1000


@dataclass
class Sweep:
    """A resolved sweep file (after overrides). Field names are the sweep file keys; scalar keys are declared
    with synqt.config's ``setting`` and checked by the same typed check as TrialConfig keys (``SWEEP``)."""

    name: str = setting("sweep")
    datasets: list[str] = setting(factory=list)
    protocol: str = setting("paper", choices=PROTOCOLS)
    grid: dict[str, list[Any]] = setting(factory=dict)
    search: str = setting("grid", choices=SEARCHES)
    num_samples: int | None = setting(None, min=1)
    asha: dict[str, Any] | None = setting(None)
    seeds: list[int] | None = setting(None)
    resources: dict[str, Any] = setting(factory=lambda: {"cpus": 1, "gpus": 0, "devices": 1})
    max_concurrent: int | None = setting(None, min=1)
    storage_path: str = setting("runs", path=True)
    data_root: str | None = setting(None, path=True)
    checkpoint: str | None = setting(None, path=True)
    pack: str | int = setting("off")
    pack_memory_gb: float | None = setting(None, min=0)
    trial: dict[str, Any] = setting(factory=dict)
    per_dataset: dict[str, dict[str, Any]] = setting(factory=dict)
    retries: int = setting(2, min=0)
    # a Ray trial waiting longer than this many seconds for its resources is reported by name
    pending_report_s: float = setting(600.0, min=0)
    demo_assets: bool = setting(False)
    # split leaks (`synqt data check`: an image twice in a split, test in a training split, val200 in train800)
    # refuse the sweep before Ray starts instead of a warning; `--strict` on the command line sets it
    strict: bool = setting(False)
    source: str = field(default="<sweep>", metadata={})

    @property
    def sweep_dir(self) -> Path:
        return Path(self.storage_path) / self.name

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


SWEEP_KEYS = tuple(f.name for f in dataclasses.fields(Sweep) if f.name != "source")
SWEEP = Schema.of(Sweep)


@dataclass
class PlannedTrial:
    """One (dataset, grid point, seed, stage) run: its name, settings and resolved TrialConfig."""

    index: int
    run_name: str
    dataset: str
    seed: int
    stage: str
    hparams: dict[str, Any]
    config: Any  # synqt.config.TrialConfig
    pack: int = -1

    def run_dir(self, sweep: Sweep) -> Path:
        return sweep.sweep_dir / rundir.RUNS / self.run_name

    def summary(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "run_name": self.run_name,
            "stage": self.stage,
            "dataset": self.dataset,
            "seed": self.seed,
            "hparams": self.hparams,
            "epochs": self.config.epochs,
            "pack": self.pack,
        }


# ----------------------------------------------------------------------------------------------
# sweep file + overrides


def _trial_keys() -> list[str]:
    from synqt.config import CONFIG_KEYS

    return list(CONFIG_KEYS)


def _set_dotted(d: dict[str, Any], parts: list[str], value: Any, where: str) -> None:
    for part in parts[:-1]:
        sub = d.get(part)
        if sub is None:
            sub = d[part] = {}
        if not isinstance(sub, dict):
            raise ConfigError(f"{where}: {'.'.join(parts)!r}: {part!r} is not a mapping")
        d = sub
    d[parts[-1]] = value


# Trial keys whose value the sweep itself sets, for each trial, and the sweep key that owns each (a `trial`,
# `per_dataset` or grid value of one would be overwritten: refused, naming both).
OWNED_TRIAL_KEYS = {"dataset": "datasets", "seed": "seeds", "stage": "protocol (paper: final; vtab: search, then "
                    "final)", "protocol": "protocol"}
# Set by resources.devices > 1 (one trial over several DeepSpeed processes).
DEVICE_OWNED_KEYS = ("trainer", "num_devices")
# Trial keys that are also sweep-level keys (the sweep's value is every trial's, below `trial`, `per_dataset`
# and the grid, which may set them per dataset or per point).
SHARED_KEYS = ("data_root", "checkpoint")


def apply_sweep_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key=value` overrides to a sweep mapping; every one is applied or refused (ConfigError naming the key).

    One override syntax and parser with `synqt train` (``synqt.config.parse_override_value``: text keys keep
    their text, other values are YAML 1.2 scalars or flow lists/mappings). Sweep keys (dotted into mappings:
    ``grid.lr=[...]``, ``trial.lr=...``, ``resources.cpus=2``) set the sweep key. A TrialConfig key sets that key
    for every trial, above every layer of the sweep file: ``seed=7`` is ``seeds=[7]``, ``dataset=x`` is
    ``datasets=[x]``, a key the grid varies becomes a one-value grid axis (``lr=0.5``: ``grid.lr=[0.5]``, so run
    names and hparams say 0.5), and a ``per_dataset`` value of the key gives way. ``stage`` is refused (the
    protocol sets it), as is a trial key given together with the sweep key that owns it.
    """
    from synqt.config import TRIAL, parse_override_value, split_override

    raw = json.loads(json.dumps(raw, default=str)) if raw else {}
    trial_keys = _trial_keys()
    given: dict[str, str] = {}  # top-level sweep key -> the override that set it

    def claim(sweep_key: str, item: str) -> None:
        """A repeated key: the last wins (as in `synqt train`); two keys setting one sweep key: refused."""
        earlier = given.get(sweep_key)
        if earlier is not None and earlier.partition("=")[0].strip() != item.partition("=")[0].strip():
            raise ConfigError(f"command line: {item!r} and {earlier!r} both set {sweep_key!r}; give one")
        given[sweep_key] = item

    for item in overrides:
        key, text = split_override(item, "command line")
        parts = key.split(".")
        top = parts[0]
        if top in ("seed", "dataset") and len(parts) == 1:
            value = TRIAL.check(top, parse_override_value(key, text, "command line"), "command line")
            owner = OWNED_TRIAL_KEYS[top]
            claim(owner, item)
            raw[owner] = [value]
        elif top == "stage":
            raise ConfigError(f"command line: {item!r}: key 'stage' is set by the sweep for each of its stages; it is "
                              f"owned by {OWNED_TRIAL_KEYS['stage']}: run one trial with `synqt train` instead")
        elif top in SWEEP_KEYS:
            if len(parts) == 1:
                value = parse_override_value(key, text, "command line", SWEEP)
                claim(top, item)
                raw[top] = value
                if top in SHARED_KEYS:
                    _override_trial_key(raw, top, value)
            elif top in ("trial", "per_dataset") and len(parts) > (1 if top == "trial" else 2):
                sub = parts[1:] if top == "trial" else parts[2:]
                value = parse_override_value(".".join(sub), text, "command line")
                _set_dotted(raw, parts, value, "command line")
            elif top == "grid" and len(parts) == 2 and parts[1] in trial_keys:
                value = parse_override_value(key, text, "command line", SWEEP)
                _set_dotted(raw, parts, [_grid_text(parts[1], v) for v in value]
                            if isinstance(value, list) else _grid_text(parts[1], value), "command line")
            else:
                _set_dotted(raw, parts, parse_override_value(key, text, "command line", SWEEP), "command line")
        elif top in trial_keys:
            value = parse_override_value(key, text, "command line")
            if len(parts) == 1:
                value = TRIAL.check(top, value, "command line")
            if len(parts) == 1 and top in (raw.get("grid") or {}):
                raw["grid"][top] = [value]  # one value of the axis: run names and hparams record it
                continue
            trial = raw.setdefault("trial", {}) or {}
            raw["trial"] = trial
            _set_dotted(trial, parts, value, "command line")
            if len(parts) == 1:
                _override_trial_key(raw, top, value, keep_trial=True)
        else:
            raise ConfigError(
                f"command line: unknown key {top!r}; sweep keys: {', '.join(SWEEP_KEYS)}; "
                f"trial keys: {', '.join(trial_keys)}"
            )
    return raw


def _grid_text(key: str, value: Any) -> Any:
    """A grid value of a text trial key from the command line: a YAML scalar it was read as is kept as the
    text typed would be (``grid.precision=[no, bf16]``); other values go to the typed check unchanged."""
    from synqt.config import TRIAL

    if TRIAL.types.get(key) in (str, str | None) and isinstance(value, bool | int | float):
        raise ConfigError(f"command line: grid.{key}: {value!r} is not text; key {key!r} expects "
                          f"{TRIAL.types[key]}: quote it")
    return value


def _override_trial_key(raw: dict[str, Any], key: str, value: Any, keep_trial: bool = False) -> None:
    """A command-line value of trial key ``key`` is every trial's: it replaces the file's `trial` and
    `per_dataset` values of the key and, where the grid varies it, becomes the axis's one value."""
    if not keep_trial and isinstance(raw.get("trial"), dict):
        raw["trial"].pop(key, None)
    for entry in (raw.get("per_dataset") or {}).values():
        if isinstance(entry, dict):
            entry.pop(key, None)
    grid = raw.get("grid")
    if isinstance(grid, dict) and key in grid:
        grid[key] = [value]


def _expect(cond: bool, source: str, key: str, value: Any, expected: str) -> None:
    if not cond:
        raise ConfigError(f"{source}: key {key!r} has value {value!r}; expected {expected}")


def _check_trial_mapping(mapping: Any, source: str, key: str, trial_keys: list[str]) -> dict[str, Any]:
    if mapping is None:
        return {}
    _expect(isinstance(mapping, dict), source, key, mapping, "a mapping of TrialConfig keys")
    for k in mapping:
        if k not in trial_keys:
            raise ConfigError(
                f"{source}: unknown trial key {k!r} under {key!r}; allowed keys: {', '.join(trial_keys)}"
            )
    return dict(mapping)


def sweep_from_dict(raw: dict[str, Any], source: str = "<sweep>") -> Sweep:
    """Check every key and type of a sweep mapping and build a `Sweep` (strict: unknown keys refused)."""
    _expect(isinstance(raw, dict), source, "<top level>", raw, "a mapping of sweep keys")
    for key in raw:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"{source}: unknown key {key!r}; allowed keys: {', '.join(SWEEP_KEYS)}")
    trial_keys = _trial_keys()
    s = Sweep(source=source)
    if "name" in raw:
        SWEEP.check("name", raw["name"], source)
    if "name" in raw:
        _expect(
            isinstance(raw["name"], str) and re.fullmatch(r"[A-Za-z0-9._-]+", raw["name"] or "") is not None,
            source,
            "name",
            raw["name"],
            "a folder name (letters, digits, . _ -)",
        )
        s.name = raw["name"]
    ds = raw.get("datasets", [])
    if isinstance(ds, str):
        ds = [d.strip() for d in ds.split(",") if d.strip()]
    _expect(
        isinstance(ds, list) and ds and all(isinstance(d, str) for d in ds),
        source,
        "datasets",
        ds,
        "a non-empty list of dataset names or groups (" + ", ".join(DATASET_GROUPS) + ")",
    )
    s.datasets = list(ds)
    s.protocol = SWEEP.check("protocol", raw.get("protocol", "paper"), source)
    grid = raw.get("grid") or {}
    _expect(isinstance(grid, dict), source, "grid", grid, "a mapping: TrialConfig key -> list of values")
    for k, values in grid.items():
        if k not in trial_keys:
            raise ConfigError(
                f"{source}: grid key {k!r} is not a TrialConfig key; allowed keys: {', '.join(trial_keys)}"
            )
        if k in ("seed", "dataset", "stage", "protocol"):
            raise ConfigError(
                f"{source}: grid key {k!r} is set by the sweep itself (use `seeds`, `datasets`, `protocol`)"
            )
        if not isinstance(values, list):
            values = [values]
        _expect(len(values) > 0, source, f"grid.{k}", values, "a non-empty list")
        grid[k] = values
    s.grid = dict(grid)
    s.search = SWEEP.check("search", raw.get("search", "grid"), source)
    s.num_samples = SWEEP.check("num_samples", raw.get("num_samples"), source)
    _expect(
        s.search == "grid" or s.num_samples is not None,
        source,
        "num_samples",
        None,
        "a positive integer with search: random",
    )
    asha = raw.get("asha")
    if asha is not None:
        _expect(
            isinstance(asha, dict), source, "asha", asha, "a mapping {max_t, grace_period, reduction_factor}"
        )
        for k in asha:
            if k not in ASHA_KEYS:
                raise ConfigError(
                    f"{source}: unknown key {k!r} under 'asha'; allowed keys: {', '.join(ASHA_KEYS)}"
                )
        for k, v in asha.items():
            _expect(isinstance(v, int | float) and v > 0, source, f"asha.{k}", v, "a positive number")
        _expect(
            s.protocol == "vtab", source, "asha", asha, "only with protocol: vtab (it stops stage-1 trials)"
        )
        s.asha = dict(asha)
    seeds = raw.get("seeds")
    if seeds is None:
        seeds = list(DEFAULT_SEEDS[s.protocol])
    if isinstance(seeds, int):
        seeds = [seeds]
    _expect(
        isinstance(seeds, list)
        and seeds
        and all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)
        and len(set(seeds)) == len(seeds),
        source,
        "seeds",
        seeds,
        "a non-empty list of distinct integers",
    )
    s.seeds = list(seeds)
    res = dict(s.resources)
    given = raw.get("resources") or {}
    _expect(isinstance(given, dict), source, "resources", given, "a mapping {cpus, gpus, devices}")
    for k in given:
        if k not in RESOURCE_KEYS:
            raise ConfigError(
                f"{source}: unknown key {k!r} under 'resources'; allowed keys: {', '.join(RESOURCE_KEYS)}"
            )
    res.update(given)
    _expect(
        isinstance(res["cpus"], int | float) and res["cpus"] > 0,
        source,
        "resources.cpus",
        res["cpus"],
        "a number > 0",
    )
    _expect(
        isinstance(res["gpus"], int | float) and res["gpus"] >= 0,
        source,
        "resources.gpus",
        res["gpus"],
        "a number >= 0 (fractions share a GPU)",
    )
    _expect(
        res["gpus"] <= 1 or float(res["gpus"]).is_integer(),
        source,
        "resources.gpus",
        res["gpus"],
        "a fraction <= 1 or a whole number",
    )
    _expect(
        isinstance(res["devices"], int) and res["devices"] >= 1,
        source,
        "resources.devices",
        res["devices"],
        "an integer >= 1 (> 1: one trial over several DeepSpeed processes)",
    )
    s.resources = res
    s.max_concurrent = SWEEP.check("max_concurrent", raw.get("max_concurrent"), source)
    sp = SWEEP.check("storage_path", raw.get("storage_path", s.storage_path), source)
    _expect(sp != "", source, "storage_path", sp, "a folder path")
    s.storage_path = str(Path(os.path.expanduser(sp)).absolute())
    for k in ("data_root", "checkpoint"):
        v = SWEEP.check(k, raw.get(k), source)
        if k == "checkpoint" and is_random(v):
            s.checkpoint = RANDOM  # said on purpose: a randomly initialised backbone, not the path <cwd>/random
            continue
        setattr(s, k, str(Path(os.path.expanduser(v)).absolute()) if v else None)
    pack = raw.get("pack", "off")
    if isinstance(pack, bool):
        pack = "auto" if pack else "off"
    _expect(
        pack in ("auto", "off") or (isinstance(pack, int) and pack >= 1),
        source,
        "pack",
        pack,
        "auto, off or a pack size >= 1",
    )
    s.pack = pack
    pm = SWEEP.check("pack_memory_gb", raw.get("pack_memory_gb"), source)
    _expect(pm is None or pm > 0, source, "pack_memory_gb", pm, "a number > 0")
    s.pack_memory_gb = pm
    s.trial = _check_trial_mapping(raw.get("trial"), source, "trial", trial_keys)
    pdm = raw.get("per_dataset") or {}
    _expect(isinstance(pdm, dict), source, "per_dataset", pdm, "a mapping dataset -> TrialConfig overrides")
    s.per_dataset = {
        d: _check_trial_mapping(v, source, f"per_dataset.{d}", trial_keys) for d, v in pdm.items()
    }
    _check_layers(s, source)
    s.retries = SWEEP.check("retries", raw.get("retries", 2), source)
    s.pending_report_s = SWEEP.check("pending_report_s", raw.get("pending_report_s", 600.0), source)
    s.demo_assets = SWEEP.check("demo_assets", raw.get("demo_assets", False), source)
    s.strict = SWEEP.check("strict", raw.get("strict", False), source)
    s.datasets = expand_datasets(s.datasets, source)
    for d in s.per_dataset:
        if d not in s.datasets:
            raise ConfigError(
                f"{source}: per_dataset names {d!r}, which is not among the sweep's datasets "
                f"({', '.join(s.datasets)})"
            )
    return s


def _check_layers(s: Sweep, source: str) -> None:
    """Refuse a trial key set in a layer whose value another layer would silently replace: a key the sweep owns
    (seed, dataset, stage, protocol; trainer and num_devices under resources.devices > 1) in `trial`,
    `per_dataset` or the grid, and a shared key (data_root, checkpoint) both at the top and in `trial`."""
    layers = [("trial", s.trial), *((f"per_dataset.{d}", v) for d, v in s.per_dataset.items()),
              *((f"grid.{k}", {k: None}) for k in s.grid)]
    devices = s.resources["devices"]
    fixed = {"trainer": "deepspeed", "num_devices": devices}
    for where, layer in layers:
        for key in layer:
            if key in OWNED_TRIAL_KEYS:
                raise ConfigError(f"{source}: {where if where.startswith('grid.') else f'{where}.{key}'} sets "
                                  f"{key!r}, which the sweep sets for each trial from {OWNED_TRIAL_KEYS[key]}: "
                                  f"set it there")
            if key in DEVICE_OWNED_KEYS and devices > 1:
                values = s.grid[key] if where.startswith("grid.") else [layer[key]]
                if any(v != fixed[key] for v in values):
                    raise ConfigError(f"{source}: {where if where.startswith('grid.') else f'{where}.{key}'} = "
                                      f"{values if where.startswith('grid.') else values[0]!r}, but "
                                      f"resources.devices: {devices} runs every trial with {key}={fixed[key]}")
    for key in SHARED_KEYS:
        if getattr(s, key) is not None and s.trial.get(key) is not None:
            raise ConfigError(f"{source}: {key!r} is set both at the top ({getattr(s, key)}) and in "
                              f"trial.{key} ({s.trial[key]}): set it in one place (per_dataset or the grid "
                              f"may still set it per dataset or per point)")


def resolve_sweep_path(path: str | Path) -> Path:
    """A sweep file path, or a bare name of a shipped sweep (`demo` -> configs/sweeps/demo.yaml)."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = SWEEP_DIR / (p.name if p.suffix else f"{p.name}.yaml")
    if shipped.is_file() and len(p.parts) == 1:
        return shipped
    raise ConfigError(
        f"sweep file {str(path)!r} does not exist (shipped sweeps: "
        f"{', '.join(sorted(q.stem for q in SWEEP_DIR.glob('*.yaml')))})"
    )


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read a sweep YAML file strictly and apply command-line overrides."""
    p = resolve_sweep_path(path)
    from synqt.config import load_yaml_file

    raw = load_yaml_file(p)
    # Check the file alone first, so an error names the file rather than the command line.
    for key in raw:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"{p}: unknown key {key!r}; allowed keys: {', '.join(SWEEP_KEYS)}")
    src = str(p) if not overrides else f"{p} (+ command line)"
    return sweep_from_dict(apply_sweep_overrides(raw, list(overrides or [])), src)


def expand_datasets(entries: list[str], source: str = "<sweep>") -> list[str]:
    """Dataset names and group names -> a list of dataset names (order kept, duplicates dropped).

    Groups: vtab1k, natural / specialized / structured, fgvc (the registry's tasks), demo (the synthetic tasks).
    Two different names of one task (a task and its alias, or two aliases) are refused: both folders would
    be reported under the task's name and collide in the table.
    """
    out: list[str] = []
    seen: dict[str, tuple[str, str]] = {}  # task -> (entry, dataset name) that first gave it
    for entry in entries:
        key = entry.lower()
        if key in ("vtab1k", "fgvc"):
            names = registry.list_datasets(benchmark=key)
        elif key in (g.lower() for g in registry.VTAB_GROUPS):
            names = registry.list_datasets(group=key)
        elif key == "demo":
            names = [d.name for d in registry.demo_tasks()]
        else:
            names = [entry]
        if not names:
            raise ConfigError(f"{source}: dataset group {entry!r} has no datasets")
        for n in names:
            task = registry.canonical(n)
            if task in seen:
                first_entry, first_name = seen[task]
                if first_name != n:
                    raise ConfigError(
                        f"{source}: datasets {first_entry!r} and {entry!r} are both the task {task!r} "
                        f"({first_name!r} and {n!r}); two folders of one task would collide in the table: "
                        f"keep one"
                    )
                continue
            seen[task] = (entry, n)
            out.append(n)
    return out


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
    """True when the run directory's result is the planned trial's (``synqt.rundir.trial_identity``: every key
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


# ----------------------------------------------------------------------------------------------
# packs


def estimate_memory(cfg: Any, n_branches: int) -> float:
    """Peak training memory (bytes) of a pack of ``n_branches`` (``synqt.memory.estimate_trial_memory``)."""
    from synqt.memory import estimate_trial_memory

    return float(estimate_trial_memory(cfg, n_branches))


def auto_pack_size(sweep: Sweep, cfg: Any) -> int:
    """Largest pack (<= 8) whose estimate fits the trial's memory budget.

    Budget: `pack_memory_gb` if set, else 16 GB per whole GPU (x resources.gpus), else 4 GB per CPU.
    """
    if sweep.pack_memory_gb:
        budget = sweep.pack_memory_gb * 2**30
    elif sweep.resources["gpus"] > 0:
        budget = sweep.resources["gpus"] * 16 * 2**30
    else:
        budget = sweep.resources["cpus"] * 4 * 2**30
    n = 1
    while n < MAX_AUTO_PACK and estimate_memory(cfg, n + 1) <= budget:
        n += 1
    return n


def assign_packs(sweep: Sweep, trials: list[PlannedTrial]) -> list[list[PlannedTrial]]:
    """Group trials with the same pack key (plan order kept) into packs; set each trial's `pack`."""
    groups: dict[str, list[PlannedTrial]] = {}
    for t in trials:
        # ASHA stops whole Tune trials, so stage-1 trials are not packed under ASHA.
        packing = (
            sweep.pack != "off"
            and sweep.resources["devices"] == 1
            and not (sweep.asha and t.stage == "search")
        )
        key = pack_key(t.config) if packing else t.run_name
        groups.setdefault(key, []).append(t)
    packs: list[list[PlannedTrial]] = []
    for members in groups.values():
        size = 1
        if sweep.pack == "auto" and len(members) > 1:
            size = auto_pack_size(sweep, members[0].config)
        elif isinstance(sweep.pack, int) and not isinstance(sweep.pack, bool):
            size = sweep.pack
        for i in range(0, len(members), size):
            packs.append(members[i : i + size])
    packs.sort(key=lambda p: p[0].index)
    for i, p in enumerate(packs):
        for t in p:
            t.pack = i
    return packs


def packs_of(trials: list[PlannedTrial]) -> list[list[PlannedTrial]]:
    out: dict[int, list[PlannedTrial]] = {}
    for t in trials:
        out.setdefault(t.pack, []).append(t)
    return [out[k] for k in sorted(out)]


# ----------------------------------------------------------------------------------------------
# validation, plan.json, dry run


def check_storage(sweep: Sweep, trials: list[PlannedTrial] | None = None) -> None:
    """Before data, backbone or cluster: the sweep folder (``storage_path``/``name``) must take a new file
    (``synqt.fileio.check_writable``; a folder not made yet is not made here: its nearest existing parent is
    probed), and the trials' cache folders are checked (an unwritable one is said once)."""
    from synqt.fileio import check_writable
    from synqt.training import check_outputs

    check_writable(sweep.sweep_dir, "storage_path")
    if trials:
        check_outputs([t.config for t in trials], [])


def set_aside_broken_plan(sweep: Sweep) -> bool:
    """The broken-file rule for ``plan.json`` of a sweep being continued: an empty, cut or malformed plan is
    moved aside (``synqt.fileio.set_aside``), named once, and written again from the sweep file. True if moved."""
    from synqt.errors import SynQTError
    from synqt.fileio import set_aside

    try:
        rundir.read_plan(sweep.sweep_dir)
    except SynQTError as err:
        return set_aside(sweep.sweep_dir / rundir.PLAN, str(err), "it is written again from the sweep file") is not None
    return False


def prepare_demo_assets(sweep: Sweep) -> None:
    """demo_assets: create (or reuse) the cached synthetic data + pre-trained backbone; fill missing paths."""
    if not sweep.demo_assets or (sweep.data_root and sweep.checkpoint):
        return
    # a path given but wrong is refused now, not after minutes of building the assets it would not use
    if sweep.checkpoint and not is_random(sweep.checkpoint) and not Path(sweep.checkpoint).is_file():
        raise ConfigError(f"{sweep.source}: backbone checkpoint {sweep.checkpoint} (key 'checkpoint') does not exist")
    if sweep.data_root and not Path(sweep.data_root).is_dir():
        raise DataError(f"{sweep.source}: data_root {sweep.data_root} does not exist or is not a folder")
    from synqt.pretrain import ensure_demo_assets

    data_root, ckpt = ensure_demo_assets()
    sweep.data_root = sweep.data_root or str(Path(data_root).absolute())
    sweep.checkpoint = sweep.checkpoint or str(Path(ckpt).absolute())


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def validate(sweep: Sweep, trials: list[PlannedTrial], *, in_process: bool = False, preview: bool = False,
             check_gpus: bool = True) -> None:
    """Refuse a sweep before any Ray resource and before its first write: checkpoint file, data folders + list
    files (also stage 2's), device and precision against the GPUs the trials will get (``in_process``: the
    trials run in this process, ``--sequential``, and see this machine's GPUs). Raises ConfigError /
    DataError naming the key, file or dataset.

    ``preview`` (``--dry-run``): what is not set yet (data_root, checkpoint) is not refused, what is set and
    wrong is; without data_root a dataset name that is no known task but close to one is refused (a typo).
    ``check_gpus=False``: the trials' GPUs are not known here (a SLURM array: its sbatch arguments give them)."""
    from synqt.ckptfile import check_file
    from synqt.config import splits_for
    from synqt.data import validate_dataset

    # Ray hides every GPU from a trial that asked for none; in this process (--sequential) the trials see this
    # machine's GPUs
    no_gpu = not _has_cuda() if in_process else sweep.resources["gpus"] == 0
    if no_gpu and check_gpus:
        where = "this machine has no CUDA GPU" if in_process else "resources.gpus is 0, so no trial gets one"
        for t in trials:
            for key, value in (("device", "cuda"), ("precision", "fp16")):
                if getattr(t.config, key) == value:
                    raise ConfigError(
                        f"{sweep.source}: dataset {t.dataset!r}: {key}={value} needs a GPU, but {where}; "
                        + ("" if in_process else "set resources.gpus (e.g. resources.gpus=1) or ")
                        + ("device=auto" if key == "device" else "precision=bf16 or precision=no"))
    if _trial_device(sweep) == "cpu" and any(t.config.precision == "bf16" for t in trials):
        from synqt.precision import check_precision

        check_precision("bf16", "cpu")  # CPU trials: this node's CPU stands for the cluster's (each trial rechecks)

    seen: set[tuple] = set()
    checked: set[str] = set()
    folders: dict[tuple[str, str, str], str] = {}  # (data_root, dataset folder, layout) -> the sweep's name
    for t, cfg in _with_stage2(sweep, trials):
        where = f"{sweep.source}: dataset {t.dataset!r}"
        # the files first (checkpoint), then the data: a missing file is named before the data it would read
        if cfg.checkpoint or not preview:
            require_backbone_weights(cfg.checkpoint, where)
        if cfg.checkpoint and not is_random(cfg.checkpoint) and cfg.checkpoint not in checked:
            if not Path(cfg.checkpoint).is_file():
                raise ConfigError(
                    f"{sweep.source}: backbone checkpoint {cfg.checkpoint} (key 'checkpoint', "
                    f"dataset {t.dataset!r}) does not exist"
                )
            check_file(Path(cfg.checkpoint))  # a cut-off download or an HTML page: refused before Ray
            checked.add(cfg.checkpoint)
        if not cfg.data_root:
            if preview:  # the data may not be in place yet; a name that is no task but close to one is a typo
                if hint := registry.did_you_mean(t.dataset):
                    raise DataError(f"{where}: {t.dataset!r} is not a known task{hint}, and no data_root is "
                                    "set to find it as a folder of your own")
                continue
            raise ConfigError(
                f"{sweep.source}: no data_root for dataset {t.dataset!r} (set data_root=... "
                "in the sweep file or on the command line)"
            )
        folder = Path(cfg.data_root) / cfg.dataset
        if not folder.is_dir():
            raise DataError(
                f"dataset {t.dataset!r}: folder {folder} does not exist (data_root={cfg.data_root})"
                f"{registry.did_you_mean(t.dataset)}"
            )
        splits = tuple(splits_for(cfg))
        key = (cfg.data_root, cfg.dataset, splits, cfg.num_classes, cfg.layout)
        if key not in seen:
            seen.add(key)
            try:
                validate_dataset(cfg.data_root, cfg.dataset, list(splits), cfg.num_classes, cfg.layout)
            except DataError as err:
                raise DataError(f"dataset {t.dataset!r} ({folder}): {err}") from None
        folders.setdefault((cfg.data_root, cfg.dataset, cfg.layout), t.dataset)
    if not preview:  # --dry-run decodes nothing: `synqt data check` runs the leak check on its own
        check_split_leaks(sweep, folders)


def check_split_leaks(sweep: Sweep, folders: dict[tuple[str, str, str], str]) -> None:
    """The pre-flight leak check: one warning per dataset with the counts (``synqt.data.split_leaks``, by file and
    decoded pixels, every split the folder has), or with ``sweep.strict`` a DataError naming each dataset."""
    from synqt.data import split_leaks

    if not folders:
        return
    log.info("checking %d dataset(s) for split leaks (by file and by decoded pixels; pixel hashes are cached) ...",
             len(folders))
    leaky = []
    for (root, folder, layout), name in folders.items():
        report = split_leaks(root, folder, layout)
        if report.findings:
            where = f"dataset {name!r} ({Path(root) / folder}): {report.summary()}"
            leaky.append(where)
            if not sweep.strict:
                log.warning("split leak in %s; see `synqt data check %s %s`; strict=true (--strict) refuses the "
                            "sweep", where, root, folder)
    if leaky and sweep.strict:
        raise DataError("strict: split leaks found (see `synqt data check`): " + " | ".join(leaky))


def _with_stage2(sweep: Sweep, trials: list[PlannedTrial]) -> list[tuple[PlannedTrial, Any]]:
    """(trial, config) pairs to validate: each trial, and for a vtab stage-1 trial also the config its dataset's
    stage 2 will have (train800val200 + test): a missing test list must refuse the sweep now, not after
    stage 1 has run."""
    out = [(t, t.config) for t in trials]
    if sweep.protocol == "vtab":
        out += [(t, dataclasses.replace(t.config, stage="final")) for t in trials if t.stage == "search"]
    return out


def _split_size(cfg: Any, split: str) -> tuple[int, str]:
    """(images, source) in one split of a trial's dataset. source: ``list`` (its list file was read),
    ``official`` (the data is not in place: the benchmark's official size from the registry,
    ``synqt.data.official_split_size``) or ``assumed`` (neither: DEFAULT_TRAIN_IMAGES)."""
    from synqt.data import official_split_size

    if cfg.data_root:
        try:
            from synqt.data import read_split

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


def _img_count(n: int, source: str) -> str:
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


def _planned_cache(cfg: Any, n_train: int, n_eval: int) -> dict[str, Any]:
    """``synqt.kv_cache.planned_cache`` once per configuration that differs in more than its seeds (it builds
    the backbone on the meta device: a stage 2 of 19 tasks x 5 seeds called it 95 times)."""
    from synqt.config import config_to_dict
    from synqt.kv_cache import planned_cache

    key = json.dumps([{k: v for k, v in config_to_dict(cfg).items() if k not in rundir.SEED_KEYS}, n_train, n_eval],
                     sort_keys=True, default=str)
    if key not in _planned:
        _planned[key] = planned_cache(cfg, n_train, n_eval)
    return _planned[key]


def estimated_images(sweep: Sweep, trials: list[PlannedTrial]) -> dict[str, int]:
    """Images through the frozen backbone's image stream, three ways; ``assumed`` is 1 when some split's size is
    assumed (its list file could not be read).

    - ``planned``: what the sweep will run: a pack shares one image stream; a split held in the K/V cache
      (``synqt.kv_cache.planned_cache``: ``kv_cache`` on, ``backbone_drop_path: false``, within
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
            plan = _planned_cache(cfg, n_train, n_eval)
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


def _trial_device(sweep: Sweep) -> str:
    """Where the sweep's trials will compute, judged from this machine: cuda when they ask for GPUs."""
    return "cuda" if sweep.resources["gpus"] > 0 else "cpu"


def _bf16_line(sweep: Sweep, trials: list[PlannedTrial]) -> str | None:
    """The dry run's word on bf16 (synqt/precision.py), for the device the trials would use on this machine."""
    if not any(t.config.precision == "bf16" for t in trials):
        return None
    import torch

    from synqt.precision import describe

    device = _trial_device(sweep)
    if device == "cuda" and not torch.cuda.is_available():
        return "bf16: this machine has no GPU to judge; each trial checks its own device before training"
    return describe("bf16", device)


def kv_cache_lines(trials: list[PlannedTrial]) -> list[str]:
    """Per dataset: the K/V cache its trials share on a node (size per split), or why they run live."""
    from synqt.config import splits_for
    from synqt.kv_cache import format_bytes

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
        plan = _planned_cache(cfg, n_train, n_eval)
        sizes = (f"{train_split} {_img_count(n_train, train_source)} {format_bytes(plan['train_bytes'])}"
                 f"{'' if plan['train_cached'] else ' (live)'}, {eval_split} {_img_count(n_eval, eval_source)} "
                 f"{format_bytes(plan['eval_bytes'])}{'' if plan['eval_cached'] else ' (live)'}")
        state = f"cached ({cfg.kv_cache_dtype})" if plan["active"] else f"live: {plan['reason']}"
        where = f"{t.dataset} ({t.stage})" if len(stages) > 1 else t.dataset
        lines.append(f"  {where:<24} {state}; {sizes}")
    return lines


def plan_dict(sweep: Sweep, trials: list[PlannedTrial], stage2_pending: bool) -> dict[str, Any]:
    return {
        "name": sweep.name,
        "protocol": sweep.protocol,
        "datasets": sweep.datasets,
        "sweep_dir": str(sweep.sweep_dir),
        "seeds": sweep.seeds,
        "grid": sweep.grid,
        "resources": sweep.resources,
        "pack": sweep.pack,
        "trials": [t.summary() for t in trials],
        "stage2_pending": stage2_pending,
    }


def sweep_yaml_text(sweep: Sweep) -> str:
    """The resolved sweep (every key, after overrides) as ``sweep.yaml`` holds it."""
    return yaml.safe_dump(sweep.to_dict(), sort_keys=False)


def write_plan(sweep: Sweep, trials: list[PlannedTrial], stage2_pending: bool) -> Path:
    """Write ``sweep.yaml`` and ``plan.json`` (creating the sweep folder). Callers write only after every check
    passed (``launcher.commands.write_sweep_files``, the SLURM array once its array job is queued)."""
    d = sweep.sweep_dir
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(d / rundir.SWEEP, sweep_yaml_text(sweep))
    return atomic_write_json(d / rundir.PLAN, plan_dict(sweep, trials, stage2_pending))


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
