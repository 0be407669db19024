"""``synqt compare A B ...``: two or more sweeps (or published tables given as CSV) side by side per task.

A source is
- a sweep or run folder: its ``results.json`` if present, else aggregated on the fly (nothing written);
- a ``results.json`` file;
- a CSV with columns ``dataset`` and ``accuracy`` (and optionally ``method``: one source per method),
  e.g. another sweep's ``results.csv``;
- a CSV in the paper layout: a ``method`` column and one column per task, named as in the paper tables
  (``CIFAR-100``, ``Caltech101``, ..., ``sNORB-Elev``), as NOAH / VPT write them (``Cifar100``, ``sNORB-Ele``,
  ``Clevr/count``) or by dataset name, one row per method; group, Mean and parameter columns are ignored
  (recomputed). A published table is typed in this way. Headings and the long layout's own column names are
  read in any case; the spellings are the registry's titles and aliases (configs/datasets.yaml).

The first source is the baseline; every other source gets a difference column (other − baseline, in
accuracy points). Means (per VTAB group and over all tasks) are taken over the tasks every source has,
so the differences of means compare like with like; the tasks left out are named.
"""

from __future__ import annotations

import json
import numbers
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synqt.errors import ConfigError, SynQTError

METRICS = ("accuracy", "best_of_test")
GROUPS = ("Natural", "Specialized", "Structured")


@dataclass
class Source:
    """One column of the comparison: per-task accuracy (%) and the task's VTAB group (None if unknown)."""

    name: str
    origin: str
    acc: dict[str, float] = field(default_factory=dict)
    groups: dict[str, str | None] = field(default_factory=dict)


def _from_results(name: str, origin: str, results: Mapping[str, Any], metric: str) -> Source:
    src = Source(name, origin)
    for task, d in results.get("datasets", {}).items():
        src.groups[task] = d.get("group")
        value = d.get(metric)
        if d.get("status") == "ok" and isinstance(value, (int, float)):
            src.acc[task] = float(value)
    return src


def _task_of_column(column: str) -> str | None:
    """The task a published table's heading (or row) names: a dataset name, a paper title (``CIFAR-100``) or
    a spelling NOAH / VPT / SynQT tables use (``Cifar100``, ``sNORB-Ele``, ``Clevr/count``): the registry's
    titles and aliases (configs/datasets.yaml), any case, punctuation and spaces ignored."""
    from synqt.data.registry import from_heading

    info = from_heading(str(column))
    return info.name if info is not None else None


# Columns of a paper-layout table that are not tasks: group means, means, parameter counts (recomputed or not
# compared); matched on the heading's letters and digits, any case ("Mean", "Natural (7)", "Params (M)").
IGNORED_PREFIXES = ("natural", "specialized", "structured", "mean", "average", "avg", "param", "tunedparam",
                    "trainableparam", "group")
LONG_COLUMNS = ("method", "dataset", "accuracy", "group", "kind", "best_of_test", "best_of_test_selected_on_test")
LAYOUTS_TEXT = ("either the long layout (columns dataset and accuracy, optionally method and group: one row per "
                "task) or the paper layout (a method column and one column per task, headed by dataset names or "
                "the paper tables' titles: CIFAR-100, Caltech101, ..., sNORB-Elev, as NOAH / VPT / SynQT write "
                "them; one row per method)")


def _ignored_column(column: str) -> bool:
    key = "".join(ch for ch in column.lower() if ch.isalnum())
    return key.startswith(IGNORED_PREFIXES)


MISSING_CELLS = ("", "–", "-", "—")


def _cell_value(path: Path, index: Any, row_name: str, column: str, raw: Any) -> float | None:
    """The number in a CSV cell; None for an empty cell or a dash; a ConfigError for anything else."""
    import pandas as pd

    if raw is None or (not isinstance(raw, str) and pd.isna(raw)):
        return None
    if isinstance(raw, str) and raw.strip() in MISSING_CELLS:
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = None
    if value is None or value != value:
        line = f"line {int(index) + 2}" if isinstance(index, numbers.Integral) else f"row {index}"
        raise ConfigError(f"{path}: {line} ({row_name}), column {column!r}: {raw!r} is not a number "
                          "(leave the cell empty or write – for a missing task)")
    return value


def _from_wide(path: Path, frame: Any) -> list[Source]:
    """One source per row of a paper-style table: ``method`` + one column per task (titles or names);
    group and Mean columns are ignored (recomputed over the common tasks)."""

    tasks = {c: _task_of_column(str(c)) for c in frame.columns if c != "method"}
    known = {c: t for c, t in tasks.items() if t is not None}
    ignored = [str(c) for c, t in tasks.items() if t is None and not _ignored_column(str(c))]
    if not known or ignored:
        raise SynQTError(f"{path}: a paper-layout table needs a 'method' column and task columns (dataset names or "
                         f"titles like CIFAR-100, Cifar100, sNORB-Ele); unknown columns: "
                         f"{', '.join(ignored) or '(no task column)'}")
    twice = {t for t in known.values() if list(known.values()).count(t) > 1}
    if twice:
        cols = [str(c) for c, t in known.items() if t in twice]
        raise SynQTError(f"{path}: columns {', '.join(cols)} name the same task ({', '.join(sorted(twice))}); keep one")
    out = []
    for index, row in frame.iterrows():
        src = Source(str(row["method"]), str(path))
        for column, task in known.items():
            value = _cell_value(path, index, f"method {row['method']}", str(column), row[column])
            if value is not None:
                src.acc[task] = value
        out.append(src)
    return out


def _from_csv(path: Path, metric: str) -> list[Source]:
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise SynQTError(f"{path}: not a readable CSV ({err})") from err
    # the layout's own columns in any case and spacing ("Method", " Dataset")
    frame = frame.rename(columns={c: str(c).strip().lower() for c in frame.columns
                                  if str(c).strip().lower() in LONG_COLUMNS})
    if "dataset" not in frame.columns and "method" in frame.columns:
        return _from_wide(path, frame)
    column = metric if metric in frame.columns else ("accuracy" if metric == "accuracy" else None)
    if metric == "best_of_test" and "best_of_test_selected_on_test" in frame.columns:
        column = "best_of_test_selected_on_test"
    if "dataset" not in frame.columns or column is None or column not in frame.columns:
        raise SynQTError(f"{path}: expected columns 'dataset' and '{metric}' (optional 'method', 'group') or a "
                         f"paper-layout table; found {', '.join(map(str, frame.columns))}. A published table is "
                         f"{LAYOUTS_TEXT}")
    if "kind" in frame.columns:  # an older results.csv: task rows and mean rows
        frame = frame[frame["kind"] == "task"]
    methods = frame["method"].astype(str) if "method" in frame.columns else None
    out = []
    for method in (list(dict.fromkeys(methods)) if methods is not None else [None]):
        part = frame if method is None else frame[methods == method]
        src = Source(method or path.stem, str(path))
        for index, row in part.iterrows():
            task = _task_of_column(str(row["dataset"])) or str(row["dataset"])  # Cifar100 -> cifar; own tasks kept
            if "group" in part.columns and isinstance(row["group"], str):
                src.groups[task] = row["group"]
            value = _cell_value(path, index, f"dataset {task}", column, row[column])
            if value is not None:
                src.acc[task] = value
        out.append(src)
    return out


def load_source(spec: str, metric: str = "accuracy") -> list[Source]:
    """Sources named by ``spec`` (a folder, a results.json or a CSV); ``NAME=PATH`` names the column."""
    if metric not in METRICS:
        raise SynQTError(f"unknown metric {metric!r}: expected one of {', '.join(METRICS)}")
    name = None
    if "=" in spec and not Path(spec).exists():
        name, spec = spec.split("=", 1)
    path = Path(spec)
    if path.is_dir():
        results_file = path / "results.json"
        if results_file.is_file():
            results = json.loads(results_file.read_text())
        else:
            from launcher.results.aggregate import build_results

            results = build_results(path)
        srcs = [_from_results(name or path.name, str(path), results, metric)]
    elif path.suffix == ".json" and path.is_file():
        try:
            results = json.loads(path.read_text())
        except ValueError as err:
            raise SynQTError(f"{path}: not readable JSON ({err}); expected a results.json") from err
        srcs = [_from_results(name or path.parent.name, str(path), results, metric)]
    elif path.suffix == ".csv" and path.is_file():
        srcs = _from_csv(path, metric)
        if name and len(srcs) == 1:
            srcs[0].name = name
    elif not path.exists():
        raise SynQTError(f"{spec}: file or folder not found (expected a sweep folder, a results.json or a .csv file)")
    else:
        raise SynQTError(f"{spec}: not a sweep folder, a results.json or a .csv file")
    return srcs


@dataclass
class Comparison:
    sources: list[Source]
    tasks: list[str]
    groups: dict[str, str | None]
    common: list[str]
    means: list[tuple[str, list[str], list[float | None]]]  # (label, member tasks, one mean per source)


def compare(sources: Sequence[Source]) -> Comparison:
    """Align ``sources`` per task (VTAB order, then others by name) and compute means over common tasks."""
    if len(sources) < 2:
        raise SynQTError(f"compare needs at least two sources, got {len(sources)}")
    from launcher.results.aggregate import _sort_datasets, dataset_group

    groups: dict[str, str | None] = {}
    for src in sources:
        for task in src.acc:
            if groups.get(task) is None:  # the first source that knows the task's group
                groups[task] = src.groups.get(task)
    for task in groups:
        if groups[task] is None:
            groups[task] = dataset_group(task)
    tasks = _sort_datasets(groups, groups)
    common = [t for t in tasks if all(t in s.acc for s in sources)]
    means = []
    for g in GROUPS:
        members = [t for t in common if groups[t] == g]
        if members:
            means.append((f"{g} (mean of {len(members)})", members,
                          [statistics.fmean(s.acc[t] for t in members) for s in sources]))
    vtab = [t for t in common if groups[t] in GROUPS]
    present = [g for g in GROUPS if any(groups[t] == g for t in vtab)]
    if len(present) == 3:
        means.append(("Mean of groups", vtab, [statistics.fmean(
            statistics.fmean(s.acc[t] for t in vtab if groups[t] == g) for g in GROUPS) for s in sources]))
    if common:
        means.append((f"Mean of {len(common)} common tasks", common,
                      [statistics.fmean(s.acc[t] for t in common) for s in sources]))
    return Comparison(list(sources), tasks, groups, common, means)


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def to_rows(comp: Comparison) -> tuple[list[str], list[list[str]]]:
    base = comp.sources[0]
    header = ["task", "group"] + [s.name for s in comp.sources] + [f"Δ {s.name} − {base.name}"
                                                                   for s in comp.sources[1:]]
    rows = []
    for task in comp.tasks:
        vals = [s.acc.get(task) for s in comp.sources]
        diffs = [None if v is None or vals[0] is None else v - vals[0] for v in vals[1:]]
        rows.append([task, comp.groups[task] or "–", *(_fmt(v) for v in vals), *(_fmt(d, True) for d in diffs)])
    for label, _, vals in comp.means:
        diffs = [v - vals[0] for v in vals[1:]]
        rows.append([f"**{label}**", "", *(_fmt(v) for v in vals), *(_fmt(d, True) for d in diffs)])
    return header, rows


def format_markdown(comp: Comparison, metric: str = "accuracy") -> str:
    header, rows = to_rows(comp)
    what = ("best of test (selected on test)" if metric == "best_of_test"
            else "test accuracy (%) as each source reports it")
    lines = [f"# Comparison: {what}", ""]
    lines += [f"- {s.name}: {s.origin}" + (" (baseline)" if i == 0 else "") for i, s in enumerate(comp.sources)]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    missing = [t for t in comp.tasks if t not in comp.common]
    lines.append("")
    lines.append("Δ: accuracy points, other minus baseline. Means are over the tasks every source has"
                 + (f"; left out: {', '.join(missing)}." if missing else "."))
    return "\n".join(lines) + "\n"


def to_frame(comp: Comparison) -> Any:
    """Tidy CSV: one row per (task or mean) with each source's value and the differences to the baseline."""
    import pandas as pd

    base = comp.sources[0]
    rows = []
    for task in comp.tasks:
        row = {"kind": "task", "name": task, "group": comp.groups[task]}
        for s in comp.sources:
            row[s.name] = s.acc.get(task)
        for s in comp.sources[1:]:
            a, b = s.acc.get(task), base.acc.get(task)
            row[f"diff_{s.name}"] = None if a is None or b is None else a - b
        rows.append(row)
    for label, _members, vals in comp.means:
        row = {"kind": "mean", "name": label, "group": None}
        row.update({s.name: v for s, v in zip(comp.sources, vals, strict=True)})
        row.update({f"diff_{s.name}": v - vals[0] for s, v in zip(comp.sources[1:], vals[1:], strict=True)})
        rows.append(row)
    return pd.DataFrame(rows)


def compare_main(specs: Sequence[str], metric: str = "accuracy", out: str | None = None) -> int:
    """The ``synqt compare`` command: print the Markdown table; with ``out`` also write it and a CSV."""
    sources = [src for spec in specs for src in load_source(spec, metric)]
    names = [s.name for s in sources]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise SynQTError(f"two sources are named {', '.join(sorted(dupes))}: name them with NAME=PATH")
    comp = compare(sources)
    text = format_markdown(comp, metric)
    print(text, end="")
    if out:
        from synqt.storage import atomic_write_text

        base = Path(out)
        base.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(base.with_suffix(".md"), text)
        atomic_write_text(base.with_suffix(".csv"), to_frame(comp).to_csv(index=False, lineterminator="\n"))
        print(f"wrote {base.with_suffix('.md')} and {base.with_suffix('.csv')}")
    return 0
