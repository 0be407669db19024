"""The sweep file: its schema, the shipped sweeps, overrides on the command line, and every check of
a sweep's own keys (resources, asha, pack, seeds, datasets, the trial layers).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synqt.config import Schema, setting
from synqt.data import registry
from synqt.errors import ConfigError
from synqt.run import rundir
from synqt.shipped import shipped_config_dir
from synqt.weights.identify import RANDOM, is_random

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
