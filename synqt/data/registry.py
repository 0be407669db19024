"""The dataset registry: which tasks exist, in which order, in which group, with how many classes and
under which other names, read from the shipped YAML (never written out a second time in code).

Sources: ``configs/datasets.yaml`` gives each benchmark's tasks in table order and their aliases;
``configs/<vtab|fgvc>/<task>.yaml`` gives the task's group, class count and recipe; the synthetic demo
tasks come from ``synqt.data.synthetic.DEMO_TASKS``. A name that is neither a task nor an alias is an
"other" dataset: no group, no benchmark, never averaged into a VTAB group, never called FGVC.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from synqt.errors import ConfigError
from synqt.shipped import shipped_config_dir

log = logging.getLogger("synqt.data.registry")

VTAB_GROUPS = ("Natural", "Specialized", "Structured")
BENCHMARKS = ("vtab1k", "fgvc")
BENCHMARK_DIRS = {"vtab1k": "vtab", "fgvc": "fgvc"}
_BENCHMARK_NAMES = {"vtab1k": "vtab1k", "vtab-1k": "vtab1k", "vtab": "vtab1k", "fgvc": "fgvc"}
REGISTRY_FILE = "datasets.yaml"
# VTAB-1k's fixed splits and their sizes, the same for every task by the benchmark's definition; each task's
# test size is in configs/datasets.yaml (``DatasetInfo.split_sizes``).
VTAB1K_SPLIT_SIZES: dict[str, int] = {"train800": 800, "val200": 200, "train800val200": 1000}

# The shipped configs live inside the package (synqt/configs, found through importlib.resources) so that a
# wheel install finds them; the repository root links configs -> synqt/configs.
CONFIG_DIR = shipped_config_dir()


def config_dir() -> Path:
    """``$SYNQT_CONFIG_DIR`` if set, else ``CONFIG_DIR`` (the shipped ``synqt/configs``); read at call time."""
    env = os.environ.get("SYNQT_CONFIG_DIR")
    return Path(env) if env else CONFIG_DIR


@dataclass(frozen=True)
class DatasetInfo:
    """One task of the registry."""

    name: str  # the task's name (its shipped config's file name)
    benchmark: str  # vtab1k, fgvc or demo
    group: str | None  # Natural / Specialized / Structured for VTAB-1k and the demo tasks, None for FGVC
    num_classes: int | None
    aliases: tuple[str, ...] = ()
    config_path: Path | None = None  # configs/<vtab|fgvc>/<name>.yaml (None for the demo tasks)
    title: str | None = None  # the paper tables' column title (CIFAR-100, sNORB-Elev, ...)
    # images per official list file: VTAB-1k {"test": n} (plus VTAB1K_SPLIT_SIZES), FGVC {"train", "val", "test"}
    split_sizes: Mapping[str, int] = field(default_factory=dict)


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_")


_cache: dict[tuple, Any] = {}


def _read_yaml(path: Path) -> Any:
    """A shipped YAML file, cached by modification time (TrialConfig's strict loader checks these files too)."""
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return None
    key = ("yaml", str(path), stamp)
    if key not in _cache:
        try:
            _cache[key] = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read the dataset registry ({err})") from None
    return _cache[key]


@dataclass(frozen=True)
class _Entry:
    """One task's line of configs/datasets.yaml."""

    aliases: tuple[str, ...] = ()
    title: str | None = None
    sizes: Mapping[str, int] = field(default_factory=dict)


_ENTRY_KEYS = ("title", "sizes", "aliases")


def _entry(path: Path, bench: str, task: str, value: Any) -> _Entry:
    where = f"{path}: {bench}.{task}"
    if value is None or isinstance(value, list):  # the short form: a list of aliases
        return _Entry(tuple(str(a) for a in (value or [])))
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a list of aliases or a mapping with keys {', '.join(_ENTRY_KEYS)}")
    for k in value:
        if k not in _ENTRY_KEYS:
            raise ConfigError(f"{where}: unknown key {k!r}; allowed keys: {', '.join(_ENTRY_KEYS)}")
    sizes = value.get("sizes") or {}
    if not isinstance(sizes, dict) or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                                              for n in sizes.values()):
        raise ConfigError(f"{where}.sizes: expected a mapping list file -> image count > 0, got {sizes!r}")
    title = value.get("title")
    if title is not None and not isinstance(title, str):
        raise ConfigError(f"{where}.title: expected a string, got {title!r}")
    aliases = value.get("aliases") or []
    if not isinstance(aliases, list):
        raise ConfigError(f"{where}.aliases: expected a list, got {aliases!r}")
    return _Entry(tuple(str(a) for a in aliases), title, {str(k): int(n) for k, n in sizes.items()})


def _entries() -> dict[str, dict[str, _Entry]]:
    """{benchmark: {task: entry}} from configs/datasets.yaml (empty when the file is absent)."""
    path = config_dir() / REGISTRY_FILE
    data = _read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping benchmark -> {{task: {{title, sizes, aliases}}}}")
    out: dict[str, dict[str, _Entry]] = {}
    for bench, tasks in data.items():
        if bench not in BENCHMARKS or not isinstance(tasks, dict):
            raise ConfigError(f"{path}: key {bench!r} must be one of {', '.join(BENCHMARKS)} holding "
                              "a mapping task -> {title, sizes, aliases} (or a list of aliases)")
        out[bench] = {str(t): _entry(path, bench, str(t), v) for t, v in tasks.items()}
    return out


def _order_and_aliases() -> dict[str, dict[str, tuple[str, ...]]]:
    """{benchmark: {task: aliases}} from configs/datasets.yaml."""
    return {bench: {t: e.aliases for t, e in tasks.items()} for bench, tasks in _entries().items()}


def _info(bench: str, name: str, aliases: tuple[str, ...] | None = None) -> DatasetInfo | None:
    path = config_dir() / BENCHMARK_DIRS[bench] / f"{name}.yaml"
    if not path.is_file():
        return None
    data = _read_yaml(path) or {}
    group = data.get("group") if isinstance(data, dict) else None
    classes = data.get("num_classes") if isinstance(data, dict) else None
    if isinstance(group, str):
        group = {g.lower(): g for g in VTAB_GROUPS}.get(group.lower(), group)
    entry = _entries().get(bench, {}).get(name, _Entry())
    return DatasetInfo(name, bench, group if isinstance(group, str) else None,
                       classes if isinstance(classes, int) else None,
                       entry.aliases if aliases is None else aliases, path, entry.title, dict(entry.sizes))


def datasets(benchmark: str | None = None, group: str | None = None) -> list[DatasetInfo]:
    """Tasks with a shipped config, VTAB-1k first in table order, then FGVC; files not listed in
    datasets.yaml come after their benchmark's listed ones, by name.

    ``group``: natural / specialized / structured (any case); ``benchmark``: vtab1k (or vtab, vtab-1k) or fgvc.
    """
    if benchmark is not None:
        if benchmark.lower() not in _BENCHMARK_NAMES:
            raise ConfigError(f"unknown benchmark {benchmark!r}; expected one of {', '.join(BENCHMARKS)}")
        benchmarks = [_BENCHMARK_NAMES[benchmark.lower()]]
    else:
        benchmarks = list(BENCHMARKS)
    want = None
    if group is not None:
        want = {g.lower(): g for g in VTAB_GROUPS}.get(group.lower())
        if want is None:
            raise ConfigError(f"unknown group {group!r}; expected one of {', '.join(VTAB_GROUPS)} (any case)")
    listed = _order_and_aliases()
    out: list[DatasetInfo] = []
    for bench in benchmarks:
        order = listed.get(bench, {})
        folder = config_dir() / BENCHMARK_DIRS[bench]
        names = [p.stem for p in folder.glob("*.yaml")] if folder.is_dir() else []
        names.sort(key=lambda n: (list(order).index(n) if n in order else len(order), n))
        for name in names:
            info = _info(bench, name, order.get(name, ()))
            if info is not None and (want is None or info.group == want):
                out.append(info)
    return out


def list_datasets(group: str | None = None, benchmark: str | None = None) -> list[str]:
    """Names of ``datasets(benchmark, group)``."""
    return [d.name for d in datasets(benchmark, group)]


def demo_tasks() -> list[DatasetInfo]:
    """The synthetic demo tasks (``synqt.data.synthetic.DEMO_TASKS``), in their order."""
    from synqt.data.synthetic import DEMO_TASKS

    return [DatasetInfo(name, "demo", group, classes) for name, (group, classes, _) in DEMO_TASKS.items()]


_logged: set[tuple[str, str]] = set()


def lookup(name: str) -> DatasetInfo | None:
    """The task ``name`` is, by its own name or an alias (case-insensitive, ``-`` = ``_``); None for an
    "other" dataset. A folder named by an alias is logged once per process."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    for bench in BENCHMARKS:  # a task's own name first: it always wins over another task's alias
        info = _info(bench, name, _order_and_aliases().get(bench, {}).get(name, ()))
        if info is not None:
            return info
    for d in demo_tasks():
        if d.name == name:
            return d
    key = _norm(name)
    for bench, tasks in _order_and_aliases().items():
        for task, aliases in tasks.items():
            if key == _norm(task) or key in {_norm(a) for a in aliases}:
                info = _info(bench, task, aliases)
                if info is not None:
                    if (name, task) not in _logged:
                        _logged.add((name, task))
                        log.warning("dataset folder %r is the %s task %r (a known alias): using its recipe, group "
                                    "(%s) and %s classes; it is reported as %r", name, bench, task,
                                    info.group or "none", info.num_classes, task)
                    return info
    return None


def canonical(name: str) -> str:
    """The task name of ``name`` (itself for an "other" dataset)."""
    info = lookup(name)
    return info.name if info is not None else name


def did_you_mean(name: str) -> str:
    """`` (did you mean 'cifar'?)`` when ``name`` is no known task or alias but close to some (difflib), else ``""``."""
    import difflib

    if lookup(name) is not None:
        return ""
    known = {d.name for d in demo_tasks()}
    for tasks in _order_and_aliases().values():
        for task, aliases in tasks.items():
            known.add(task)
            known.update(aliases)
    for bench in BENCHMARKS:
        known.update(list_datasets(benchmark=bench))
    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.75)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _heading_key(text: str) -> str:
    return "".join(ch for ch in str(text).lower() if ch.isalnum())


def from_heading(text: str) -> DatasetInfo | None:
    """The task a published table names by ``text``: its name, title or an alias, ignoring case and every
    character that is not a letter or digit (``Cifar100``, ``CIFAR-100``, ``Clevr/count``, ``sNORB-Ele``,
    ``dSpr-Loc``, ``Patch Camelyon``); None when no task matches."""
    key = _heading_key(text)
    if not key:
        return None
    for bench in BENCHMARKS:
        for info in datasets(bench):
            if key in {_heading_key(n) for n in (info.name, info.title or "", *info.aliases) if n}:
                return info
    for d in demo_tasks():
        if key == _heading_key(d.name):
            return d
    return None


def title(name: str) -> str:
    """The paper tables' column title of the task named ``name`` (CIFAR-100 for cifar); ``name`` itself for
    anything else (an alias is reported under its task's name before it is titled)."""
    for bench in BENCHMARKS:
        info = _info(bench, name) if name and "/" not in name and not name.startswith(".") else None
        if info is not None and info.title:
            return info.title
    return name


def dataset_config_path(name: str) -> Path | None:
    """The shipped config of the task ``name`` is (or is an alias of), or None."""
    info = lookup(name)
    return info.config_path if info is not None else None


__all__ = ["VTAB_GROUPS", "BENCHMARKS", "VTAB1K_SPLIT_SIZES", "DatasetInfo", "config_dir", "datasets", "list_datasets",
           "demo_tasks", "lookup", "canonical", "did_you_mean", "from_heading", "title", "dataset_config_path"]
