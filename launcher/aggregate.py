"""Turn the ``metrics.json`` files of a finished (or partly finished) sweep into the VTAB-1k table.

Only run directories are read (never Ray's files), through ``synqt.rundir.scan_runs`` (the reader
``synqt status`` uses too), so trials run by hand with ``synqt train`` aggregate exactly like sweep
trials, and two copies of one trial count once (the one finished last). Every mean that a missing or
failed dataset would change is reported as null ("incomplete") rather than silently averaged over fewer
tasks. Never imports ray.
"""

from __future__ import annotations

import io
import json
import logging
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from synqt import registry, rundir
from synqt.config import LABELS
from synqt.errors import SynQTError
from synqt.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from synqt.tblog import SWEEP_SUMMARY_RUN

log = logging.getLogger(__name__)

GROUPS: tuple[str, ...] = registry.VTAB_GROUPS

SEED_KEYS = rundir.SEED_KEYS  # identify a run, not a hyperparameter point: never used to group runs into points

GROUP_COLOURS = {"Natural": "#2e8b57", "Specialized": "#e08a1e", "Structured": "#3a6fb0", None: "#8c8c8c"}

OUTPUT_FILES = ("results.json", "results.csv", "results.md", "results.png")


# ----------------------------------------------------------------------------- dataset metadata


def dataset_group(name: str) -> str | None:
    """VTAB group of ``name`` (a task or an alias) from the registry; None for FGVC and "other" datasets."""
    info = registry.lookup(name)
    return info.group if info is not None else None


def _benchmark(name: str) -> str | None:
    info = registry.lookup(name)
    return info.benchmark if info is not None else None


def _canonical_order() -> tuple[str, ...]:
    return tuple(d.name for d in registry.datasets())


def _sort_datasets(names: Iterable[str], groups: Mapping[str, str | None]) -> list[str]:
    """VTAB groups in table order, then the spec's order inside a group, then FGVC/others by name."""
    order = _canonical_order()

    def key(name: str) -> tuple[int, int, str]:
        g = groups.get(name)
        gi = GROUPS.index(g) if g in GROUPS else len(GROUPS)
        return gi, order.index(name) if name in order else len(order), name

    return sorted(set(names), key=key)


# ----------------------------------------------------------------------------- reading runs


def load_runs(run_dir: str | Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]], dict[str, Any]]:
    """(plan, runs, accounting) of a sweep or run folder, read with ``synqt.rundir.scan_runs``.

    runs: the parsed metrics.json of every done or failed run that counts (a superseded copy does not),
    with ``_path`` and ``dataset`` set to the task's registry name (an alias folder reports as its task).
    accounting: the state counts and the broken / superseded runs, each naming its path(s); the same
    states ``synqt status`` shows.
    """
    plan, records = rundir.scan_runs(run_dir)
    runs = []
    for rec in rundir.counting(records):
        if rec.state not in ("done", "failed"):
            continue
        data = dict(rec.metrics or {})
        data["_path"] = str(rec.dir / rundir.METRICS)
        data["dataset"] = registry.canonical(data["dataset"])
        if not data.get("run_name"):
            data["run_name"] = rec.dir.name
        runs.append(data)
    for rec in records:
        if rec.state == "broken":
            log.warning("skipping %s: %s", rec.dir, rec.error)
    accounting = {
        "counts": {s: sum(r.state == s for r in rundir.counting(records)) for s in rundir.STATES},
        "broken": [{"path": str(r.dir), "error": r.error} for r in records if r.state == "broken"],
        "superseded": [{"path": str(r.dir), "counted": str(r.superseded_by)} for r in records
                       if r.superseded_by is not None],
    }
    return plan, runs, accounting


# ----------------------------------------------------------------------------- selection


def hparams_key(hparams: Mapping[str, Any] | None) -> str:
    """Canonical JSON of a hyperparameter point (seed keys dropped): groups runs and breaks ties."""
    clean = {k: v for k, v in (hparams or {}).items() if k not in SEED_KEYS}
    return json.dumps(clean, sort_keys=True, default=str)


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _stdev(values: Sequence[float]) -> float | None:
    return statistics.stdev(values) if len(values) >= 2 else None


def _is_final(run: Mapping[str, Any]) -> bool:
    return run.get("stage") in ("final", None)


def _is_ok(run: Mapping[str, Any]) -> bool:
    return run.get("status") == "ok" and isinstance(run.get("test_acc"), (int, float))


def _point_stats(runs: list[dict[str, Any]]) -> tuple[float, float | None]:
    accs = [float(r["test_acc"]) for r in runs]
    return statistics.fmean(accs), _stdev(accs)


def choose_point(points: Mapping[str, list[dict[str, Any]]]) -> str:
    """Key of the point with the highest mean final test accuracy.

    Ties: lower sample std first (a single seed, with no std, counts as 0), then the
    lexicographically smallest canonical hparams JSON. Deterministic whatever the file order.
    """

    def rank(key: str) -> tuple[float, float, str]:
        mean, std = _point_stats(points[key])
        return -mean, std if std is not None else 0.0, key

    return min(points, key=rank)


def _failed_entry(run: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "run_name": run.get("run_name"),
        "stage": run.get("stage"),
        "seed": run.get("seed"),
        "error": run.get("error") or "unknown error",
        "path": run.get("_path"),
    }


def _summarise_dataset(name: str, group: str | None, runs: list[dict[str, Any]]) -> dict[str, Any]:
    finals_ok = [r for r in runs if _is_final(r) and _is_ok(r)]
    failed = sorted(
        (r for r in runs if r.get("status") != "ok"), key=lambda r: (not _is_final(r), r["_path"])
    )
    search_ok = [r for r in runs if r.get("stage") == "search" and r.get("status") == "ok"]
    entry: dict[str, Any] = {
        "group": group,
        "accuracy": None,
        "std": None,
        "seeds": [],
        "hparams": None,
        "status": "ok",
        "best_of_test": None,
        "val_acc": None,
        "trainable_params": None,
        "peak_memory_bytes": None,
        "n_runs": 0,
        "selection": None,
        "n_failed": len(failed),
        "failed_runs": [_failed_entry(r) for r in failed],
        "protocol": None,
        "n_points": 0,
        "error": None,
    }
    if not finals_ok:
        if failed:
            entry["status"] = "failed"
            entry["error"] = failed[0].get("error") or "unknown error"
        else:
            entry["status"] = "missing"
            entry["error"] = (
                f"no final-stage run (search stage only: {len(search_ok)} ok run(s))" if search_ok
                else "no metrics.json found"
            )
        protocols = {r.get("protocol") for r in runs if r.get("protocol")}
        entry["protocol"] = protocols.pop() if len(protocols) == 1 else None
        return entry

    points: dict[str, list[dict[str, Any]]] = {}
    for run in finals_ok:
        points.setdefault(hparams_key(run.get("hparams")), []).append(run)
    key = choose_point(points)
    chosen = points[key]
    mean, std = _point_stats(chosen)
    protocols = {r.get("protocol") for r in chosen}
    protocol = protocols.pop() if len(protocols) == 1 else None

    search_of_point = [
        r for r in search_ok
        if hparams_key(r.get("hparams")) == key and isinstance(r.get("val_acc"), (int, float))
    ]
    if len(points) > 1:
        selection = "test"
    elif protocol == "vtab" and search_ok:
        selection = "val200"
    else:
        selection = "fixed"

    if protocol == "vtab":
        val_acc = _mean([float(r["val_acc"]) for r in search_of_point])
    else:
        vals = [float(r["val_acc"]) for r in chosen if isinstance(r.get("val_acc"), (int, float))]
        val_acc = _mean(vals) if len(vals) == len(chosen) else None

    bests = [r.get("best_of_test") for r in chosen]
    best_of_test = (
        statistics.fmean(float(b) for b in bests)
        if protocol == "paper" and all(isinstance(b, (int, float)) for b in bests)
        else None
    )
    params = [r.get("trainable_params") for r in chosen if isinstance(r.get("trainable_params"), int)]
    peaks = [
        r.get("peak_memory_bytes") for r in chosen if isinstance(r.get("peak_memory_bytes"), (int, float))
    ]
    entry.update(
        accuracy=mean,
        std=std,
        seeds=sorted((r.get("seed") for r in chosen), key=lambda s: (s is None, s if s is not None else 0)),
        hparams=json.loads(key),
        best_of_test=best_of_test,
        val_acc=val_acc,
        trainable_params=max(params) if params else None,
        peak_memory_bytes=int(max(peaks)) if peaks else None,
        n_runs=len(chosen),
        selection=selection,
        protocol=protocol,
        n_points=len(points),
    )
    return entry


# ----------------------------------------------------------------------------- results


def _labels(n_vtab: int, n_fgvc: int, protocol: str | None) -> dict[str, str]:
    if protocol == "vtab":
        acc = ("test accuracy of the final run (trained on train800val200) of the point chosen on val200 "
               "in the search stage; mean ± sample std over seeds")
    else:
        acc = ("test accuracy after the last epoch (trained on train800val200); "
               "mean ± sample std over seeds")
    labels = {
        "accuracy": acc,
        "groups": "mean of the group's task accuracies (each task: mean over its seeds)",
        "mean_of_groups": "mean of the three group means (VTAB 'Mean' as in NOAH/SynQT tables)",
        "mean_of_tasks": (
            "plain mean of the 19 tasks" if n_vtab == 19
            else f"plain mean of the {n_vtab} VTAB tasks in this sweep"
        ),
        "best_of_test": (
            "selected on test: the best of the periodic test evaluations of each run (the official SynQT "
            "number), mean over seeds; reported beside accuracy, never instead"
        ),
        "selection": (
            "test: several hyperparameter points had final runs, the one with the highest mean test accuracy "
            "is reported (chosen on test, optimistic); val200: the final run retrains the point chosen on "
            "val200 in the search stage; fixed: a single point, no selection. Ties: higher mean, then lower "
            "std, then the lexicographically smallest JSON of the hparams"
        ),
        "incomplete": "a mean that a missing or failed task would change is null (incomplete)",
    }
    if n_fgvc:
        labels["mean_fgvc"] = f"plain mean of the {n_fgvc} FGVC tasks (not part of any VTAB mean)"
    return labels


def build_results(run_dir: str | Path) -> dict[str, Any]:
    """The results dict (the content of results.json) from a run directory; writes nothing."""
    root = Path(run_dir)
    if not root.is_dir():
        raise SynQTError(f"run directory {root} does not exist; expected a sweep or run directory")
    plan, runs, accounting = load_runs(root)
    plan_datasets: list[str] | None = None
    if plan is not None:
        raw = plan.get("datasets")
        if not isinstance(raw, list) or not all(isinstance(d, str) for d in raw):
            raise SynQTError(
                f"{root / 'plan.json'}: key 'datasets' must be a list of dataset names, got {raw!r}"
            )
        plan_datasets = list(raw)
    if not runs and not plan_datasets:
        raise SynQTError(f"no metrics.json under {root} and no plan.json there; nothing to aggregate")

    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_dataset.setdefault(run["dataset"], []).append(run)
    seen = list(by_dataset)
    expected = plan_datasets if plan_datasets is not None else seen

    groups_of: dict[str, str | None] = {}
    for name in set(expected) | set(seen):
        from_metrics = [r.get("group") for r in by_dataset.get(name, []) if r.get("group")]
        groups_of[name] = from_metrics[0] if from_metrics else dataset_group(name)
    benchmark_of = {name: _benchmark(name) for name in groups_of}
    names = _sort_datasets(set(expected) | set(seen), groups_of)

    datasets = {n: _summarise_dataset(n, groups_of[n], by_dataset.get(n, [])) for n in names}
    for n, d in datasets.items():  # FGVC is a benchmark of the registry; any other name is "other"
        d["benchmark"] = benchmark_of[n] or ("vtab1k" if d["group"] in GROUPS else "other")
    incomplete = [
        {"dataset": n, "group": d["group"], "status": d["status"], "error": d["error"]}
        for n, d in datasets.items()
        if d["status"] != "ok"
    ]

    def mean_over(members: list[str]) -> float | None:
        if not members or any(datasets[m]["status"] != "ok" for m in members):
            return None
        return statistics.fmean(datasets[m]["accuracy"] for m in members)

    vtab = [n for n in names if datasets[n]["group"] in GROUPS]
    fgvc = [n for n in names if datasets[n]["group"] not in GROUPS and datasets[n]["benchmark"] == "fgvc"]
    groups = {g: mean_over([n for n in vtab if datasets[n]["group"] == g]) for g in GROUPS}
    group_means = [groups[g] for g in GROUPS]
    mean_of_groups = statistics.fmean(group_means) if all(m is not None for m in group_means) else None

    if plan is not None and plan.get("protocol"):
        protocol: str | None = str(plan["protocol"])
    else:
        protocols = sorted({d["protocol"] for d in datasets.values() if d["protocol"]})
        protocol = protocols[0] if len(protocols) == 1 else ("mixed" if protocols else None)

    results: dict[str, Any] = {
        "datasets": datasets,
        "groups": groups,
        "mean_of_groups": mean_of_groups,
        "mean_of_tasks": mean_over(vtab),
        "protocol": protocol,
        "incomplete": incomplete,
        "labels": _labels(len(vtab), len(fgvc), protocol),
        "expected_datasets": list(expected),
        "runs": accounting,
    }
    if fgvc:
        results["mean_fgvc"] = mean_over(fgvc)
    return results


# ----------------------------------------------------------------------------- formatting


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _fmt_num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:g}"


def compact_hparams(hparams: Mapping[str, Any] | None) -> str:
    """``T=4 s_feat=0.1 lr=0.001``: short names for the SynQT keys, everything else as is."""
    if not hparams:
        return "–"
    return " ".join(f"{LABELS.get(k, k)}={_fmt_num(v)}" for k, v in sorted(hparams.items()))


def _mib(value: Any) -> str:
    return "–" if not isinstance(value, (int, float)) else f"{value / 2**20:.0f}"


def _params(value: Any) -> str:
    return "–" if not isinstance(value, int) else f"{value:,}"


def _group_cell(d: Mapping[str, Any]) -> str:
    """The table's group column: the VTAB group, FGVC, or other (a dataset the registry does not know)."""
    if d["group"]:
        return str(d["group"])
    return "FGVC" if d.get("benchmark") == "fgvc" else "other"


def _acc_cell(d: Mapping[str, Any]) -> str:
    if d["status"] != "ok":
        return d["status"]
    text = _fmt(d["accuracy"])
    if d["std"] is not None:
        text += f" ± {_fmt(d['std'])}"
    if d["selection"] == "test":
        text += " (chosen on test)"
    return text


def _incomplete_note(results: Mapping[str, Any], members: Iterable[str]) -> str:
    members = set(members)
    parts: dict[str, list[str]] = {}
    for item in results["incomplete"]:
        if item["dataset"] in members:
            parts.setdefault(item["status"], []).append(item["dataset"])
    return "incomplete (" + "; ".join(f"{s}: {', '.join(n)}" for s, n in parts.items()) + ")"


def _mean_rows(results: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(name, value text, how) for every mean, with incomplete/n.a. spelled out."""
    ds = results["datasets"]
    labels = results["labels"]
    rows = []
    for g in GROUPS:
        members = [n for n, d in ds.items() if d["group"] == g]
        if not members:
            value = f"n/a (no {g} task in this sweep)"
        elif results["groups"][g] is None:
            value = _incomplete_note(results, members)
        else:
            value = _fmt(results["groups"][g])
        rows.append((f"{g} (group mean)", value, f"mean of the {len(members)} {g} task accuracies"))
    vtab = [n for n, d in ds.items() if d["group"] in GROUPS]
    vtab_incomplete = any(i["dataset"] in vtab for i in results["incomplete"])
    for key, name in (("mean_of_groups", "Mean of groups"), ("mean_of_tasks", "Mean of tasks")):
        value = results[key]
        if value is not None:
            text = _fmt(value)
        elif not vtab:
            text = "n/a (no VTAB task in this sweep)"
        else:
            notes = [_incomplete_note(results, vtab)] if vtab_incomplete else []
            absent = [g for g in GROUPS if not any(d["group"] == g for d in ds.values())]
            if key == "mean_of_groups" and absent:
                notes.append(f"n/a (no {', '.join(absent)} task in this sweep)")
            text = "; ".join(notes)
        rows.append((name, text, labels[key]))
    if "mean_fgvc" in results:
        fg = [n for n, d in ds.items() if d["group"] not in GROUPS and d.get("benchmark") == "fgvc"]
        value = results["mean_fgvc"]
        rows.append(("FGVC mean", _fmt(value) if value is not None else _incomplete_note(results, fg),
                     labels["mean_fgvc"]))
    return rows


def _best_of_test_means(results: Mapping[str, Any]) -> tuple[dict[str, float | None], float | None]:
    ds = results["datasets"]
    out: dict[str, float | None] = {}
    for g in GROUPS:
        vals = [d["best_of_test"] for d in ds.values() if d["group"] == g]
        out[g] = statistics.fmean(vals) if vals and all(v is not None for v in vals) else None
    both = [out[g] for g in GROUPS]
    return out, statistics.fmean(both) if all(v is not None for v in both) else None


def format_table(results: Mapping[str, Any]) -> str:
    """The Markdown report (also results.md): per-task table, labelled means, incomplete list, files."""
    ds = results["datasets"]
    protocol = results.get("protocol")
    show_best = any(d["best_of_test"] is not None for d in ds.values())
    show_val = any(d["val_acc"] is not None for d in ds.values())
    lines = [f"# VTAB-1k results (protocol: {protocol or 'unknown'})", ""]
    lines.append(f"accuracy: {results['labels']['accuracy']}.")
    if show_best:
        lines.append(f"best of test: {results['labels']['best_of_test']}.")
    lines.append("")

    header = ["task", "group", "test acc (%)"]
    if show_best:
        header.append("best of test (%, selected on test)")
    if show_val:
        header.append("val200 (%)")
    header += ["selection", "hparams", "trainable params", "peak mem (MiB)", "seeds", "failed runs"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for name, d in ds.items():
        row = [name, _group_cell(d), _acc_cell(d)]
        if show_best:
            row.append(_fmt(d["best_of_test"]))
        if show_val:
            row.append(_fmt(d["val_acc"]))
        row += [
            f"test ({d['n_points']} points)" if d["selection"] == "test" else (d["selection"] or "–"),
            compact_hparams(d["hparams"]),
            _params(d["trainable_params"]),
            _mib(d["peak_memory_bytes"]),
            ", ".join(str(s) for s in d["seeds"]) or "–",
            str(d.get("n_failed", 0)),
        ]
        lines.append("| " + " | ".join(row) + " |")

    lines += ["", "| mean | value (%) | how it is computed |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in _mean_rows(results)]

    if show_best:
        bot_groups, bot_mean = _best_of_test_means(results)
        lines += [
            "",
            "best of test (selected on test, the official SynQT number; "
            "not comparable to val-selected results): "
            + ", ".join(f"{g} {_fmt(v)}" for g, v in bot_groups.items())
            + f", mean of groups {_fmt(bot_mean)}",
        ]
    if any(d["selection"] == "test" for d in ds.values()):
        lines += ["", "chosen on test: the hyperparameter point of these tasks was picked by its mean test "
                  "accuracy among the points of the grid; the number is optimistic."]

    failed_runs = [(n, f) for n, d in ds.items() if d["status"] == "ok" for f in d.get("failed_runs", [])]
    if failed_runs:
        lines += ["", "## Failed runs of tasks that also have ok runs", ""]
        lines += [f"- {n}: {f['run_name']} (stage {f['stage']}, seed {f['seed']}): {f['error']}"
                  for n, f in failed_runs]
    if results["incomplete"]:
        lines += ["", "## Incomplete (no ok final run)", ""]
        lines += [f"- {i['dataset']} ({_group_cell(ds[i['dataset']])}): {i['status']}: {i['error']}"
                  for i in results["incomplete"]]
    acc = results.get("runs") or {}
    if acc.get("broken") or acc.get("superseded"):
        lines += ["", "## Run directories not counted", ""]
        lines += [f"- broken: {b['path']}: {b['error']}" for b in acc.get("broken", [])]
        lines += [f"- duplicate: {d['path']} is the same trial as {d['counted']}, which finished later and counts"
                  for d in acc.get("superseded", [])]
    files = results.get("files")
    if files:
        lines += ["", "## Files", ""]
        lines += [f"- {k}: {v}" for k, v in files.items()]
    return "\n".join(lines) + "\n"


def write_csv(results: Mapping[str, Any]) -> str:
    """results.csv: one row per task, then one row per mean (kind=mean), with labelled columns."""
    import csv

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([
        "kind", "dataset", "group", "accuracy", "std", "n_seeds", "seeds",
        "best_of_test (selected on test)", "val_acc", "selection", "accuracy_label", "hparams",
        "trainable_params", "peak_memory_mib", "n_runs", "n_failed", "status", "error",
    ])  # fmt: skip

    def num(v: Any, digits: int = 4) -> str:
        return "" if v is None else f"{v:.{digits}f}"

    for name, d in results["datasets"].items():
        writer.writerow([
            "task", name, d["group"] or "", num(d["accuracy"]), num(d["std"]), len(d["seeds"]),
            " ".join(str(s) for s in d["seeds"]), num(d["best_of_test"]), num(d["val_acc"]),
            d["selection"] or "", "chosen on test" if d["selection"] == "test" else "",
            json.dumps(d["hparams"], sort_keys=True) if d["hparams"] is not None else "",
            d["trainable_params"] if d["trainable_params"] is not None else "",
            num(d["peak_memory_bytes"] / 2**20, 1) if d["peak_memory_bytes"] is not None else "",
            d["n_runs"], d.get("n_failed", 0), d["status"], d["error"] or "",
        ])  # fmt: skip
    means = [(f"group mean: {g}", g, results["groups"][g], results["labels"]["groups"]) for g in GROUPS]
    means.append(("mean_of_groups", "", results["mean_of_groups"], results["labels"]["mean_of_groups"]))
    means.append(("mean_of_tasks", "", results["mean_of_tasks"], results["labels"]["mean_of_tasks"]))
    if "mean_fgvc" in results:
        means.append(("mean_fgvc", "", results["mean_fgvc"], results["labels"]["mean_fgvc"]))
    for name, group, value, label in means:
        writer.writerow(["mean", name, group, num(value), "", "", "", "", "", "", label,
                         "", "", "", "", "", "ok" if value is not None else "incomplete", ""])
    return buf.getvalue()


# ----------------------------------------------------------------------------- chart


def make_figure(results: Mapping[str, Any]) -> Any:
    """Per-task bars (std error bars) coloured by VTAB group, then the group means and overall means."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    ds = results["datasets"]
    names = list(ds)
    extra: list[tuple[str, float | None, str | None]] = [
        (f"{g} mean", results["groups"][g], g) for g in GROUPS if any(d["group"] == g for d in ds.values())
    ]
    extra.append(("Mean of groups", results["mean_of_groups"], None))
    extra.append(("Mean of tasks", results["mean_of_tasks"], None))
    if "mean_fgvc" in results:
        extra.append(("FGVC mean", results["mean_fgvc"], None))

    n = len(names) + len(extra) + 1
    fig = Figure(figsize=(max(6.0, 0.45 * n + 1.5), 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(names)))
    for x, name in zip(xs, names, strict=True):
        d = ds[name]
        colour = GROUP_COLOURS.get(d["group"], GROUP_COLOURS[None])
        if d["status"] == "ok":
            ax.bar(x, d["accuracy"], color=colour, yerr=d["std"] or 0.0, capsize=3, edgecolor="black", lw=0.5)
        else:
            ax.text(x, 2, d["status"], rotation=90, ha="center", va="bottom", fontsize=8, color="#b00020")
    ex = [len(names) + 1 + i for i in range(len(extra))]
    for x, (_, value, group) in zip(ex, extra, strict=True):
        colour = GROUP_COLOURS.get(group, "#444444")
        if value is not None:
            ax.bar(x, value, color=colour, hatch="//", edgecolor="black", lw=0.5)
            ax.text(x, value + 1, f"{value:.1f}", ha="center", va="bottom", fontsize=7)
        else:
            ax.text(x, 2, "incomplete", rotation=90, ha="center", va="bottom", fontsize=8, color="#b00020")
    ax.set_xticks(xs + ex)
    ax.set_xticklabels(names + [e[0] for e in extra], rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("test accuracy (%)")
    fig.suptitle(f"VTAB-1k, protocol {results.get('protocol') or 'unknown'} (bars: mean ± std over seeds)",
                 fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    present = [g for g in GROUPS if any(d["group"] == g for d in ds.values())]
    handles = [Patch(color=GROUP_COLOURS[g], label=g) for g in present]
    if any(d["group"] not in GROUPS for d in ds.values()):
        handles.append(Patch(color=GROUP_COLOURS[None], label="FGVC/other"))
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="means"))
    ax.legend(handles=handles, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(handles),
              frameon=False)
    fig.tight_layout()
    return fig


def _figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _figure_rgb(fig: Any) -> Any:
    import numpy as np

    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


# ----------------------------------------------------------------------------- TensorBoard


def write_tensorboard(results: Mapping[str, Any], table: str, image: Any, log_dir: Path,
                      runs: Sequence[Mapping[str, Any]] = ()) -> Path:
    """The sweep-level TensorBoard run (``_sweep_summary``): the HParams experiment, the table, the chart.

    The experiment (``synqt.tblog.write_experiment``) gives TensorBoard's HParams view the domain of every
    hyperparameter over ``runs`` (their metrics.json), so it shows what the sweep varied, with the ``final/*``
    metrics as columns. The table (text) and the chart (image) sit under ``sweep/``; no one-point scalars
    (the per-task numbers are the HParams view's rows). Earlier event files here are removed first, so
    re-aggregating does not stack.
    """
    from torch.utils.tensorboard import SummaryWriter

    from synqt.tblog import metric_tags_for, session_hparams, write_experiment

    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.glob("events.out.tfevents.*"):
        old.unlink()
    if runs:
        write_experiment(log_dir, [session_hparams(m) for m in runs], metric_tags_for(runs))
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        writer.add_text("sweep/results", table, 0)
        writer.add_image("sweep/chart", image, 0, dataformats="HWC")
        writer.flush()
    finally:
        writer.close()
    return log_dir


def write_planned_experiment(sweep_dir: Path, trials: Sequence[Any]) -> Path:
    """The HParams experiment of a sweep about to run (its planned trials), so TensorBoard shows the
    right columns while it runs; ``aggregate`` rewrites it from the finished runs."""
    from synqt.tblog import planned_metric_tags, planned_session, write_experiment

    return write_experiment(sweep_dir / SWEEP_SUMMARY_RUN,
                            [planned_session(t.config, t.hparams) for t in trials],
                            planned_metric_tags({t.config.protocol for t in trials}))


# ----------------------------------------------------------------------------- entry point


def _json_safe(obj: Any) -> Any:
    """NaN/inf never reach results.json (strict JSON readers reject them)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def aggregate(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Write results.{json,csv,md,png} and the ``_sweep_summary/`` TensorBoard run into out_dir (default run_dir).

    Returns the content of results.json plus ``files`` (name -> path of everything written).
    """
    results = _json_safe(build_results(run_dir))
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: str((out / name).resolve()) for name in OUTPUT_FILES}
    files["tensorboard"] = str((out / SWEEP_SUMMARY_RUN).resolve())

    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.csv", write_csv(results))
    table = format_table({**results, "files": files})
    atomic_write_text(out / "results.md", table)
    fig = make_figure(results)
    atomic_write_bytes(out / "results.png", _figure_png(fig))
    write_tensorboard(results, table, _figure_rgb(fig), out / SWEEP_SUMMARY_RUN, runs=load_runs(run_dir)[1])
    return {**results, "files": files}
