"""Turn the ``metrics.json`` files of a finished (or partly finished) sweep into the VTAB-1k table.

Only run directories are read (never Ray's files), through ``synqt.run.rundir.scan_runs`` (the reader
``synqt status`` uses too), so trials run by hand with ``synqt train`` aggregate exactly like sweep
trials, and two copies of one trial count once (the one finished last). Every mean that a missing or
failed dataset would change is reported as null ("incomplete") rather than silently averaged over fewer
tasks. Never imports ray.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from synqt.data import registry
from synqt.errors import SynQTError
from synqt.run import rundir
from synqt.run.tblog import SWEEP_SUMMARY_RUN
from synqt.storage import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

GROUPS: tuple[str, ...] = registry.VTAB_GROUPS

SEED_KEYS = rundir.SEED_KEYS  # identify a run, not a hyperparameter point: never used to group runs into points
# Identity keys that never split a task's runs into configurations: seeds (averaged over), the stage (the search
# and final runs of one point), the dataset and its group (the row's task). Every other RESULT_KEYS value that
# is not one of the run's recorded hparams (a point, chosen among) makes another configuration: another row.
NOT_CONFIGURATION = SEED_KEYS | {"stage", "dataset", "group"}


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
    """(plan, runs, accounting) of a sweep or run folder, read with ``synqt.run.rundir.scan_runs``.

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
        data["_identity"] = rec.config_identity()
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
    return rundir.point_key(hparams)


def _configuration(run: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run's configuration: its identity (``synqt.run.rundir.trial_identity``) less seeds, stage, dataset and
    the keys of its recorded hparams (a grid point, selected among); None when it recorded no config."""
    ident = run.get("_identity")
    if not isinstance(ident, Mapping):
        return None
    hp = run.get("hparams") or {}
    return {k: v for k, v in ident.items() if k not in NOT_CONFIGURATION and k not in hp}


def _shown(key: str, value: Any, run: Mapping[str, Any]) -> str:
    """A configuration value as the table shows it; the checkpoint as its file name and content hash."""
    if key == "checkpoint" and isinstance(value, str) and value.startswith("sha256:"):
        path = (run.get("config") or {}).get("checkpoint")
        return f"{Path(str(path)).name if path else 'checkpoint'} ({value[:15]})"
    return json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)


def split_configurations(runs: list[dict[str, Any]]) -> list[tuple[dict[str, str] | None, list[dict[str, Any]]]]:
    """One task's runs split by configuration: ``[(None, runs)]`` when they share one, else one
    ``({differing key: shown value}, runs)`` per configuration, so different trials are never averaged or
    counted as one."""
    groups: dict[str, list[dict[str, Any]]] = {}
    configs: dict[str, dict[str, Any] | None] = {}
    for run in runs:
        conf = _configuration(run)
        key = json.dumps(conf, sort_keys=True, default=str)
        groups.setdefault(key, []).append(run)
        configs[key] = conf
    if len(groups) <= 1:
        return [(None, runs)]
    keys = sorted({k for c in configs.values() if c for k in c})
    differ = [k for k in keys if len({json.dumps((c or {}).get(k, "?"), sort_keys=True, default=str)
                                      for c in configs.values()}) > 1]
    out = []
    for key, members in groups.items():
        conf = configs[key]
        shown = ({k: _shown(k, conf.get(k), members[0]) for k in differ} if conf is not None
                 else {"config": "not recorded"})
        out.append((shown, members))
    return sorted(out, key=lambda item: json.dumps(item[0], sort_keys=True))


def configuration_label(shown: Mapping[str, str]) -> str:
    """``checkpoint=random, backbone_drop_path=False``: what makes a row's configuration differ."""
    return ", ".join(f"{k}={v}" for k, v in shown.items())


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
    return _build(run_dir)[0]


def _build(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(results, the runs that count, each with ``_row``: its row of ``results["datasets"]``)."""
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

    datasets: dict[str, dict[str, Any]] = {}
    configurations = []
    for n in names:
        parts = split_configurations(by_dataset.get(n, []))
        if len(parts) > 1:
            configurations.append({"dataset": n, "differ_in": list(parts[0][0] or {}),
                                   "rows": [f"{n} [{configuration_label(shown)}]" for shown, _ in parts]})
        for shown, members in parts:
            row = n if shown is None else f"{n} [{configuration_label(shown)}]"
            d = _summarise_dataset(row, groups_of[n], members)
            d.update(task=n, configuration=shown)
            d["benchmark"] = benchmark_of[n] or ("vtab1k" if d["group"] in GROUPS else "other")
            datasets[row] = d
            for run in members:
                run["_row"] = row
    incomplete = [
        {"dataset": n, "group": d["group"], "status": d["status"], "error": d["error"]}
        for n, d in datasets.items()
        if d["status"] != "ok"
    ]

    def mean_over(members: list[str]) -> float | None:
        # a task with several configurations has no one accuracy: a mean would mix different trials
        if not members or any(datasets[m]["status"] != "ok" or datasets[m]["configuration"] for m in members):
            return None
        return statistics.fmean(datasets[m]["accuracy"] for m in members)

    vtab = [n for n in datasets if datasets[n]["group"] in GROUPS]
    fgvc = [n for n in datasets if datasets[n]["group"] not in GROUPS and datasets[n]["benchmark"] == "fgvc"]
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
        # tasks whose runs differ in a key that can change the result (not a grid point, not a seed):
        # one row each, "<task> [key=value, ...]"; every mean over such a task is null
        "configurations": configurations,
        "expected_datasets": list(expected),
        "runs": accounting,
    }
    if fgvc:
        results["mean_fgvc"] = mean_over(fgvc)
    results["best_of_test"] = _best_of_test_block(datasets, vtab, fgvc)
    return results, runs


def _best_of_test_block(datasets: Mapping[str, Any], vtab: list[str], fgvc: list[str]) -> dict[str, Any]:
    """The best-of-test counterparts of the final-accuracy means (selected on test; null where a task of
    the mean has no best-of-test number, e.g. the vtab protocol)."""
    def mean_of(members: list[str]) -> float | None:
        vals = [None if datasets[m]["configuration"] else datasets[m]["best_of_test"] for m in members]
        return statistics.fmean(vals) if vals and all(v is not None for v in vals) else None

    groups = {g: mean_of([n for n in vtab if datasets[n]["group"] == g]) for g in GROUPS}
    block: dict[str, Any] = {
        "label": "selected on test: mean over tasks of the best of each run's periodic test evaluations "
                 "(the official SynQT number); never comparable with val-selected numbers",
        "groups": groups,
        "mean_of_groups": statistics.fmean(groups.values()) if all(v is not None for v in groups.values())
        else None,
        "mean_of_tasks": mean_of(vtab),
    }
    if fgvc:
        block["mean_fgvc"] = mean_of(fgvc)
    return block


# ----------------------------------------------------------------------------- formatting


def format_table(results: Mapping[str, Any], runs: list[dict[str, Any]] | None = None,
                 out_dir: str | Path | None = None) -> str:
    """The Markdown report (results.md); see ``launcher.results.report.format_report``."""
    from launcher.results.report import format_report

    return format_report(results, runs, out_dir)


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
    """Write into out_dir (default run_dir): results.json, results.csv (one row per task), means.csv,
    runs.csv (one row per run), table.md / table.tex (the paper table), results.md, the figures
    results / curves / cost as PNG (300 dpi) and PDF, and the ``_sweep_summary/`` TensorBoard run.

    Returns the content of results.json plus ``files`` (name -> absolute path of everything written).
    """
    from launcher.results.plots import accuracy_figure, write_plots
    from launcher.results.report import write_tables
    from launcher.results.tensorboard import figure_rgb, write_tensorboard

    results, runs = _build(run_dir)
    results = _json_safe(results)
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)

    atomic_write_json(out / "results.json", results)
    files = {"results.json": str((out / "results.json").resolve())}
    files.update(write_tables(results, runs, out))
    files.update(write_plots(results, runs, out))
    files["results.md"] = str((out / "results.md").resolve())
    files["tensorboard"] = str((out / SWEEP_SUMMARY_RUN).resolve())
    table = format_table({**results, "files": files}, runs, out)
    atomic_write_text(out / "results.md", table)
    write_tensorboard(results, table, figure_rgb(accuracy_figure(results, runs)), out / SWEEP_SUMMARY_RUN,
                      runs=runs)
    return {**results, "files": files}
