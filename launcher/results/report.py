"""The files a paper needs, from an aggregated sweep: tables (CSV, Markdown, LaTeX) and the report.

Inputs are the results dict of ``launcher.results.aggregate.build_results`` and the parsed ``metrics.json`` files
(``launcher.results.aggregate.load_runs``); nothing here recomputes a selection or a mean. Files written by
``write_tables`` into the output folder:

- ``runs.csv``: one row per run directory (every stage, ok or not), each hyperparameter its own column.
- ``results.csv``: one row per task (tidy); ``means.csv``: one row per mean (group means, mean of
  groups, mean of tasks, FGVC mean), each with its definition.
- ``table.md`` / ``table.tex``: the paper table, one row per method: the VTAB-1k layout (19 tasks, the
  three group means, Mean) or the FGVC layout (5 tasks, Mean), chosen from the sweep's tasks.
- ``results.md``: the report (constant settings once, abbreviations defined, relative links).

All accuracies are percentages. Numbers chosen on test are labelled "selected on test" wherever they appear.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from synqt.run.rundir import point_key as hparams_key

GROUPS: tuple[str, ...] = ("Natural", "Specialized", "Structured")

# Abbreviations used in hyperparameter cells and defined in results.md.
ABBREVIATIONS: dict[str, tuple[str, str]] = {
    "token_nums": ("T", "query tokens per block"),
    "feat_scale": ("s_feat", "initial feature scale of the query branch"),
    "attn_scale": ("s_attn", "initial attention scale"),
    "ffn_scale": ("s_ffn", "initial FFN scale"),
    "weight_decay": ("wd", "AdamW weight decay"),
    "lr": ("lr", "peak learning rate (half-cycle cosine after linear warm-up)"),
}

BEST_OF_TEST_LABEL = (
    "selected on test: the best of the periodic test evaluations of each run (the number the official "
    "SynQT code reports), mean over seeds; optimistic, never comparable with val-selected numbers"
)
MEAN_LABEL = "Mean: the mean of the three group means (the 'Mean' column of NOAH / SynQT tables)"
CHOSEN_ON_TEST_MARK = "†"


# ----------------------------------------------------------------------------- registry


def _dataset_orders() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(VTAB-1k in table order, FGVC in table order), from the shipped dataset registry."""
    from synqt.data import registry

    return (tuple(registry.list_datasets(benchmark="vtab1k")), tuple(registry.list_datasets(benchmark="fgvc")))


def benchmark_of(names: Iterable[str], groups: Mapping[str, str | None]) -> str:
    """``vtab1k`` (every task one of the 19), ``fgvc`` (every task one of the 5), ``vtab-layout`` (tasks with
    VTAB groups that are not VTAB-1k tasks, e.g. the synthetic demo), or ``mixed``."""
    vtab, fgvc = _dataset_orders()
    names = list(names)
    if names and all(n in vtab for n in names):
        return "vtab1k"
    if names and all(n in fgvc for n in names):
        return "fgvc"
    if names and all(groups.get(n) in GROUPS for n in names):
        return "vtab-layout"
    return "mixed"


BENCHMARK_TITLES = {"vtab1k": "VTAB-1k", "fgvc": "FGVC", "vtab-layout": "VTAB-format tasks (not VTAB-1k)",
                    "mixed": "mixed benchmarks"}


# ----------------------------------------------------------------------------- formatting helpers


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:g}"


def short_name(key: str) -> str:
    from synqt.config import LABELS

    return LABELS.get(key, key)


def constant_settings(runs: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """(hyperparameters with one value over every run, names of those that vary), in first-seen order."""
    values: dict[str, list[Any]] = {}
    for run in runs:
        for key, value in (run.get("hparams") or {}).items():
            values.setdefault(key, []).append(json.dumps(value, sort_keys=True, default=str))
    n = len(runs)
    constant = {k: json.loads(v[0]) for k, v in values.items() if len(set(v)) == 1 and len(v) == n}
    varying = [k for k in values if k not in constant]
    return constant, varying


def compact(hparams: Mapping[str, Any] | None, keys: Sequence[str] | None = None) -> str:
    """``lr=0.003 T=4``: the given keys (default all) with short names; ``–`` when none."""
    if not hparams:
        return "–"
    keys = list(hparams) if keys is None else [k for k in keys if k in hparams]
    return " ".join(f"{short_name(k)}={_num(hparams[k])}" for k in keys) or "–"


def relpath(path: str | Path | None, start: Path) -> str:
    """``path`` relative to ``start`` (``../runs/x`` is fine); as is when on another drive or None."""
    if not path:
        return "–"
    try:
        return os.path.relpath(Path(path).resolve(), start.resolve())
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- runs.csv


def _row_of(run: Mapping[str, Any]) -> str:
    """The row of ``results["datasets"]`` a run belongs to (its task, or its task and configuration)."""
    return run.get("_row") or run["dataset"]


def _run_group(run: Mapping[str, Any], results: Mapping[str, Any]) -> str | None:
    ds = results["datasets"].get(_row_of(run))
    return run.get("group") or (ds["group"] if ds else None)


def setup_lines(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """What every run shared (or the distinct values when they differ): backbone, checkpoint, input size,
    data layout and image formats, code and library versions; from each metrics.json's provenance."""
    def distinct(get: Any) -> list[str]:
        seen: list[str] = []
        for run in runs:
            try:
                value = get(run)
            except (KeyError, TypeError, AttributeError):
                value = None
            if value is not None and str(value) not in seen:
                seen.append(str(value))
        return seen

    prov = lambda key: (lambda r: (r.get("provenance") or {}).get(key))  # noqa: E731
    vers = lambda key: (lambda r: (r.get("versions") or {}).get(key))  # noqa: E731
    def train_formats(run: Mapping[str, Any]) -> str | None:
        counts = (run["provenance"].get("train_data") or {}).get("image_formats") or {}
        return ", ".join(f"{k} ({v} images)" for k, v in counts.items()) or None

    formats = distinct(train_formats)
    notes = distinct(lambda r: (r["provenance"].get("train_data") or {}).get("note"))
    items = [
        ("backbone", distinct(prov("backbone"))),
        ("backbone checkpoint", distinct(prov("backbone_checkpoint"))),
        ("input size (px)", distinct(prov("image_size"))),
        ("data layout", distinct(lambda r: (r["provenance"].get("train_data") or {}).get("layout"))),
        ("training images, by format", formats),
        ("synqt", distinct(vers("synqt"))),
        ("git commit", distinct(vers("git_commit"))),
        ("torch / timm", distinct(lambda r: f"{r['versions']['torch']} / {r['versions']['timm']}")),
        ("Pillow", distinct(vers("pillow"))),
        ("Ray", distinct(vers("ray"))),
    ]
    lines = [f"- {name}: {' | '.join(values)}" for name, values in items if values]
    lines += [f"- note: {n}" for n in notes]
    return lines


def runs_frame(runs: Sequence[Mapping[str, Any]], results: Mapping[str, Any], out_dir: Path) -> Any:
    """One row per run, in table order (task, stage, hyperparameters, seed). Columns: identity, one
    column per hyperparameter key (name as in the config; ``hp_<key>`` if it would clash), accuracies,
    cost, status and the run directory relative to ``out_dir``."""
    import pandas as pd

    order = list(results["datasets"])
    fixed = ["run_name", "dataset", "row", "group", "protocol", "stage", "seed"]
    tail = ["val_acc", "test_acc", "best_of_test_selected_on_test", "chosen", "trainable_params",
            "peak_memory_mib", "peak_memory_kind", "images_per_s", "wall_time_s", "epochs_done", "status",
            "error", "run_dir"]
    hp_keys: list[str] = []
    for run in runs:
        for key in run.get("hparams") or {}:
            if key not in hp_keys:
                hp_keys.append(key)
    col = {k: (f"hp_{k}" if k in fixed or k in tail else k) for k in hp_keys}

    rows = []
    for run in runs:
        ds = results["datasets"].get(_row_of(run), {})
        chosen_hp = ds.get("hparams")
        hp = run.get("hparams") or {}
        is_chosen = (chosen_hp is not None and run.get("stage") in ("final", None) and run.get("status") == "ok"
                     and hparams_key(hp) == hparams_key(chosen_hp))
        peak = run.get("peak_memory_bytes")
        row = {
            "run_name": run.get("run_name"), "dataset": run["dataset"], "row": _row_of(run),
            "group": _run_group(run, results),
            "protocol": run.get("protocol"), "stage": run.get("stage"), "seed": run.get("seed"),
        }
        for key in hp_keys:
            value = hp.get(key)
            row[col[key]] = json.dumps(value) if isinstance(value, (list, dict)) else value
        row.update({
            "val_acc": run.get("val_acc"), "test_acc": run.get("test_acc"),
            "best_of_test_selected_on_test": run.get("best_of_test"),
            "chosen": is_chosen,
            "trainable_params": run.get("trainable_params"),
            "peak_memory_mib": peak / 2**20 if isinstance(peak, (int, float)) else None,
            "peak_memory_kind": run.get("peak_memory_kind"),
            "images_per_s": run.get("images_per_s"), "wall_time_s": run.get("wall_time_s"),
            "epochs_done": run.get("epochs_done"), "status": run.get("status"),
            "error": (run.get("error") or None),
            "run_dir": relpath(Path(run["_path"]).parent, out_dir) if run.get("_path") else None,
        })  # fmt: skip
        rows.append(row)
    frame = pd.DataFrame(rows, columns=fixed + [col[k] for k in hp_keys] + tail)
    if len(frame):
        frame["_order"] = [order.index(d) if d in order else len(order) for d in frame["row"]]
        frame["_stage"] = [0 if s == "search" else 1 for s in frame["stage"]]
        frame = frame.sort_values(["_order", "_stage", "run_name"], kind="stable").drop(columns=["_order", "_stage"])
    for name in ("seed", "trainable_params", "epochs_done"):
        frame[name] = frame[name].astype("Int64")
    return frame.reset_index(drop=True)


# ----------------------------------------------------------------------------- results.csv / means.csv


def tasks_frame(results: Mapping[str, Any]) -> Any:
    """results.csv: one row per task; the chosen point's hyperparameters as ``hp_<key>`` columns."""
    import pandas as pd

    hp_keys: list[str] = []
    for d in results["datasets"].values():
        for key in d.get("hparams") or {}:
            if key not in hp_keys:
                hp_keys.append(key)
    rows = []
    for name, d in results["datasets"].items():
        peak = d.get("peak_memory_bytes")
        row = {
            "dataset": name, "task": d.get("task", name),
            "configuration": ", ".join(f"{k}={v}" for k, v in (d.get("configuration") or {}).items()),
            "group": d["group"], "protocol": d["protocol"], "status": d["status"],
            "accuracy": d["accuracy"], "std": d["std"], "n_seeds": len(d["seeds"]),
            "seeds": " ".join(str(s) for s in d["seeds"]),
            "best_of_test_selected_on_test": d["best_of_test"], "val_acc": d["val_acc"],
            "selection": d["selection"], "chosen_on_test": d["selection"] == "test", "n_points": d["n_points"],
        }  # fmt: skip
        for key in hp_keys:
            value = (d.get("hparams") or {}).get(key)
            row[f"hp_{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
        row.update({
            "trainable_params": d["trainable_params"],
            "peak_memory_mib": peak / 2**20 if isinstance(peak, (int, float)) else None,
            "n_runs": d["n_runs"], "n_failed": d.get("n_failed", 0), "error": d["error"],
        })
        rows.append(row)
    frame = pd.DataFrame(rows)
    for name in ("n_seeds", "n_points", "trainable_params", "n_runs", "n_failed"):
        if name in frame:
            frame[name] = frame[name].astype("Int64")
    return frame


def means_frame(results: Mapping[str, Any]) -> Any:
    """means.csv: one row per mean with its value, the best-of-test counterpart and its definition."""
    import pandas as pd

    labels = results["labels"]
    bot = results.get("best_of_test") or {}
    ds = results["datasets"]
    rows = []
    for g in GROUPS:
        members = [n for n, d in ds.items() if d["group"] == g]
        rows.append({"mean": f"group: {g}", "group": g, "n_tasks": len(members), "value": results["groups"][g],
                     "best_of_test_selected_on_test": (bot.get("groups") or {}).get(g),
                     "definition": labels["groups"]})
    vtab = [n for n, d in ds.items() if d["group"] in GROUPS]
    for key in ("mean_of_groups", "mean_of_tasks"):
        rows.append({"mean": key, "group": None, "n_tasks": len(vtab), "value": results[key],
                     "best_of_test_selected_on_test": bot.get(key), "definition": labels[key]})
    if "mean_fgvc" in results:
        fg = [n for n, d in ds.items() if d["group"] not in GROUPS and d.get("benchmark") == "fgvc"]
        rows.append({"mean": "mean_fgvc", "group": None, "n_tasks": len(fg), "value": results["mean_fgvc"],
                     "best_of_test_selected_on_test": bot.get("mean_fgvc"), "definition": labels["mean_fgvc"]})
    for row in rows:  # before pandas turns None into NaN
        # "absent", not "n/a": pandas.read_csv would read "n/a" as a missing value
        row["status"] = "ok" if row["value"] is not None else ("absent" if row["n_tasks"] == 0 else "incomplete")
    frame = pd.DataFrame(rows)
    frame["n_tasks"] = frame["n_tasks"].astype("Int64")
    return frame


# ----------------------------------------------------------------------------- the paper table


def _table_columns(results: Mapping[str, Any], bench: str) -> list[tuple[str, list[str]]]:
    """[(group title, [task names])] for the wide table of ``bench`` (vtab: all 19 tasks even if absent)."""
    vtab, fgvc = _dataset_orders()
    ds = results["datasets"]
    if bench == "vtab1k":
        groups = {g: [n for n in vtab if _vtab_group(n) == g] for g in GROUPS}
        return [(g, names) for g, names in groups.items()]
    if bench == "fgvc":
        return [("FGVC", [n for n in fgvc if n in ds] + [n for n in ds if n not in fgvc])]
    return [(g, [n for n, d in ds.items() if d["group"] == g]) for g in GROUPS if any(
        d["group"] == g for d in ds.values())]


def _layout_groups(bench: str) -> dict[str, list[str]]:
    """{group: every task of that group} for a fixed paper layout (VTAB-1k: 19 tasks in three groups; FGVC:
    the 5 tasks); empty for the other layouts, whose columns are the sweep's own tasks."""
    vtab, fgvc = _dataset_orders()
    if bench == "vtab1k":
        return {g: [n for n in vtab if _vtab_group(n) == g] for g in GROUPS}
    if bench == "fgvc":
        return {"FGVC": list(fgvc)}
    return {}


def _vtab_group(name: str) -> str | None:
    from synqt.data import registry

    info = registry.lookup(name)
    return info.group if info is not None else None


def _title(name: str) -> str:
    """The paper tables' column title (CIFAR-100, sNORB-Elev): configs/datasets.yaml through the registry."""
    from synqt.data import registry

    return registry.title(name)


def table_rows(results: Mapping[str, Any], method: str, bench: str) -> list[tuple[str, list[str]]]:
    """(row label, cells) for the final-accuracy row and, where any exists, the best-of-test row.

    Cells are one decimal (paper style); an absent task is ``–``; a cell whose hyperparameters were chosen
    among several grid points by test accuracy carries ``†``.
    """
    ds = results["datasets"]
    cols = _table_columns(results, bench)
    bot = results.get("best_of_test") or {}

    def cell(value: float | None, mark: bool = False) -> str:
        return "–" if value is None else f"{value:.1f}" + (CHOSEN_ON_TEST_MARK if mark else "")

    def full(key: str, names: Iterable[str]) -> bool:
        """Every task of a layout group has a number in this row (a mean over fewer is left empty)."""
        return all(n in ds and ds[n].get(key) is not None for n in names)

    rows = []
    final = [cell(ds[n]["accuracy"], ds[n]["selection"] == "test") if n in ds else "–"
             for _, names in cols for n in names]
    best = [cell(ds[n]["best_of_test"]) if n in ds else "–" for _, names in cols for n in names]
    if bench == "fgvc":
        layout = _layout_groups(bench)["FGVC"]
        final.append(cell(results.get("mean_fgvc") if full("accuracy", layout) else None))
        best.append(cell(bot.get("mean_fgvc") if full("best_of_test", layout) else None))
    else:
        layout = _layout_groups(bench)
        for key, row, gmeans, mean in (
                ("accuracy", final, results["groups"], results["mean_of_groups"]),
                ("best_of_test", best, bot.get("groups") or {}, bot.get("mean_of_groups"))):
            ok = {g: full(key, layout.get(g, names)) for g, names in cols}
            row += [cell(gmeans.get(g) if ok[g] else None) for g, _ in cols]
            row.append(cell(mean if all(ok.values()) else None))
    rows.append((method, final))
    if any(d["best_of_test"] is not None for d in ds.values()):
        rows.append(("best of test (selected on test)", best))
    return rows


def _header(results: Mapping[str, Any], bench: str) -> tuple[list[tuple[str, list[str]]], list[str]]:
    cols = _table_columns(results, bench)
    tail = ["Mean"] if bench == "fgvc" else [g for g, _ in cols] + ["Mean"]
    return cols, tail


def _caption(results: Mapping[str, Any], bench: str) -> str:
    protocol = results.get("protocol") or "unknown"
    acc = results["labels"]["accuracy"]
    parts = [f"{BENCHMARK_TITLES[bench]}, protocol {protocol}: top-1 test accuracy (%) — {acc}."]
    if bench == "fgvc":
        parts.append("Mean: plain mean of the FGVC tasks.")
    else:
        parts.append("Group columns: mean of the group's tasks. " + MEAN_LABEL + ".")
    if any(d["best_of_test"] is not None for d in results["datasets"].values()):
        parts.append("Best of test: " + BEST_OF_TEST_LABEL + ".")
    if any(d["selection"] == "test" for d in results["datasets"].values()):
        parts.append(f"{CHOSEN_ON_TEST_MARK}: hyperparameters chosen among several grid points by mean test "
                     "accuracy (chosen on test).")
    parts.append("–: no ok run; every mean containing it is left empty.")
    return " ".join(parts)


def paper_table_markdown(results: Mapping[str, Any], method: str = "SynQT (this sweep)",
                         bench: str | None = None) -> str:
    bench = bench or benchmark_of(results["datasets"], {n: d["group"] for n, d in results["datasets"].items()})
    if bench == "mixed":
        return "\n".join(paper_table_markdown(_subset(results, b), method, b) for b in _split_benchmarks(results))
    cols, tail = _header(results, bench)
    groups_line = "; ".join(f"{g}: {', '.join(_title(n) for n in names)}" for g, names in cols)
    header = ["Method"] + [_title(n) for _, names in cols for n in names] + tail
    lines = [f"### {BENCHMARK_TITLES[bench]}", "", f"Columns by group — {groups_line}.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for label, cells in table_rows(results, method, bench):
        lines.append("| " + " | ".join([label, *cells]) + " |")
    lines += ["", _caption(results, bench), ""]
    return "\n".join(lines)


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def latex_escape(text: str) -> str:
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
    return out.replace(CHOSEN_ON_TEST_MARK, r"$^\dagger$").replace("–", "--").replace("—", "---").replace("±", r"$\pm$")


def paper_table_latex(results: Mapping[str, Any], method: str = "SynQT (this sweep)",
                      bench: str | None = None) -> str:
    """A booktabs ``table*`` (needs ``\\usepackage{booktabs,graphicx}``): group header with cmidrules,
    rotated task names, one row per method."""
    bench = bench or benchmark_of(results["datasets"], {n: d["group"] for n, d in results["datasets"].items()})
    if bench == "mixed":
        return "\n".join(paper_table_latex(_subset(results, b), method, b) for b in _split_benchmarks(results))
    cols, tail = _header(results, bench)
    n_tasks = sum(len(names) for _, names in cols)
    spec = "l" + "".join("c" * len(names) for _, names in cols) + "|" + "c" * len(tail)
    lines = [r"\begin{table*}[t]", r"\centering", r"\setlength{\tabcolsep}{3pt}",
             rf"\caption{{{latex_escape(_caption(results, bench))}}}",
             r"\resizebox{\textwidth}{!}{%", rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
    group_cells, rules, start = [], [], 2
    for g, names in cols:
        group_cells.append(rf"\multicolumn{{{len(names)}}}{{c}}{{{latex_escape(g)}}}")
        rules.append(rf"\cmidrule(lr){{{start}-{start + len(names) - 1}}}")
        start += len(names)
    lines.append(" & ".join(["", *group_cells, rf"\multicolumn{{{len(tail)}}}{{c}}{{}}"]) + r" \\")
    lines.append(" ".join(rules))
    heads = [rf"\rotatebox{{90}}{{{latex_escape(_title(n))}}}" for _, names in cols for n in names]
    heads += [rf"\rotatebox{{90}}{{{latex_escape(t)}}}" for t in tail]
    lines.append(" & ".join(["Method", *heads]) + r" \\")
    lines.append(r"\midrule")
    for label, cells in table_rows(results, method, bench):
        assert len(cells) == n_tasks + len(tail)
        lines.append(" & ".join([latex_escape(label), *(latex_escape(c) for c in cells)]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table*}", ""]
    return "\n".join(lines)


def _split_benchmarks(results: Mapping[str, Any]) -> list[str]:
    _, fgvc = _dataset_orders()
    ds = results["datasets"]
    out = []
    if any(d["group"] in GROUPS for d in ds.values()):
        vt = [n for n, d in ds.items() if d["group"] in GROUPS]
        out.append(benchmark_of(vt, {n: ds[n]["group"] for n in vt}))
    if any(n in fgvc for n in ds):
        out.append("fgvc")
    return out


def _subset(results: Mapping[str, Any], bench: str) -> dict[str, Any]:
    _, fgvc = _dataset_orders()
    keep = {n: d for n, d in results["datasets"].items()
            if (n in fgvc) == (bench == "fgvc") and ((d["group"] in GROUPS) or bench == "fgvc")}
    return {**results, "datasets": keep}


# ----------------------------------------------------------------------------- results.md


def _incomplete_note(results: Mapping[str, Any], members: Iterable[str]) -> str:
    members = set(members)
    parts: dict[str, list[str]] = {}
    for item in results["incomplete"]:
        if item["dataset"] in members:
            parts.setdefault(item["status"], []).append(item["dataset"])
    for item in results.get("configurations", []):  # one task, different trials: never averaged together
        if members & set(item["rows"]):
            parts.setdefault("several configurations", []).append(
                f"{item['dataset']} (differ in {', '.join(item['differ_in'])})")
    return "incomplete (" + "; ".join(f"{s}: {', '.join(n)}" for s, n in parts.items()) + ")"


def _group_cell(d: Mapping[str, Any]) -> str:
    """The table's group column: the VTAB group, FGVC, or other (a dataset the registry does not know)."""
    if d["group"]:
        return str(d["group"])
    return "FGVC" if d.get("benchmark") == "fgvc" else "other"


def _acc_cell(d: Mapping[str, Any]) -> str:
    if d["status"] != "ok":
        return d["status"]
    text = fmt(d["accuracy"])
    if d["std"] is not None:
        text += f" ± {fmt(d['std'])}"
    if d["selection"] == "test":
        text += " (chosen on test)"
    return text


def _mean_rows(results: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """(name, value, best of test, how) for every mean, with incomplete / n/a spelled out."""
    ds = results["datasets"]
    labels = results["labels"]
    bot = results.get("best_of_test") or {}
    vtab = [n for n, d in ds.items() if d["group"] in GROUPS]
    # A VTAB-1k sweep is held to the 19-task layout: a group lacking one of its tasks has no group mean
    # (as in the paper table), even when the folder had no plan naming the tasks.
    layout = (_layout_groups("vtab1k")
              if vtab and benchmark_of(vtab, {n: ds[n]["group"] for n in vtab}) == "vtab1k" else {})
    absent = {g: [n for n in layout.get(g, []) if n not in ds] for g in GROUPS}
    rows = []
    for g in GROUPS:
        members = [n for n, d in ds.items() if d["group"] == g]
        if absent[g]:
            value = f"incomplete (missing: {', '.join(absent[g])})"
            if results["groups"][g] is None and members:
                value += "; " + _incomplete_note(results, members)
        elif not members:
            value = f"n/a (no {g} task in this sweep)"
        elif results["groups"][g] is None:
            value = _incomplete_note(results, members)
        else:
            value = fmt(results["groups"][g])
        best = (bot.get("groups") or {}).get(g)
        rows.append((f"{g} (group mean)", value, fmt(None if absent[g] else best),
                     f"mean of the {len(members)} {g} task accuracies"))
    vtab_incomplete = (any(i["dataset"] in vtab for i in results["incomplete"])
                       or any(set(c["rows"]) & set(vtab) for c in results.get("configurations", [])))
    all_absent = [n for g in GROUPS for n in absent[g]]
    for key, name in (("mean_of_groups", "Mean of groups"), ("mean_of_tasks", "Mean of tasks")):
        value = results[key]
        best = bot.get(key)
        if key == "mean_of_groups" and any(absent.values()):
            text = f"incomplete (missing: {', '.join(all_absent)})"
            if vtab_incomplete:
                text += "; " + _incomplete_note(results, vtab)
            best = None
        elif value is not None:
            text = fmt(value)
            if key == "mean_of_tasks":
                of = f" of {sum(len(v) for v in layout.values())} VTAB-1k" if layout else ""
                text += f" (over {len(vtab)}{of} task{'s' if len(vtab) + len(of) != 1 else ''})"
        elif not vtab:
            text = "n/a (no VTAB task in this sweep)"
        else:
            notes = [_incomplete_note(results, vtab)] if vtab_incomplete else []
            absent = [g for g in GROUPS if not any(d["group"] == g for d in ds.values())]
            if key == "mean_of_groups" and absent:
                notes.append(f"n/a (no {', '.join(absent)} task in this sweep)")
            text = "; ".join(notes)
        rows.append((name, text, fmt(best), labels[key]))
    if "mean_fgvc" in results:
        fg = [n for n, d in ds.items() if d["group"] not in GROUPS and d.get("benchmark") == "fgvc"]
        value = results["mean_fgvc"]
        fg_absent = [n for n in _layout_groups("fgvc")["FGVC"] if n not in ds] if fg and all(
            n in _dataset_orders()[1] for n in fg) else []
        if fg_absent:
            text = f"incomplete (missing: {', '.join(fg_absent)})"
        else:
            text = fmt(value) if value is not None else _incomplete_note(results, fg)
        rows.append(("FGVC mean", text, fmt(None if fg_absent else bot.get("mean_fgvc")), labels["mean_fgvc"]))
    return rows


def format_report(results: Mapping[str, Any], runs: Sequence[Mapping[str, Any]] | None = None,
                  out_dir: str | Path | None = None) -> str:
    """results.md: title by benchmark, constant settings once, per-task table (only what varies), means
    with their definitions, the paper table, abbreviations, failures and files (relative to ``out_dir``)."""
    ds = results["datasets"]
    out = Path(out_dir) if out_dir is not None else None

    def rel(path: str | Path | None) -> str:  # relative to the report's folder; as given without one
        return relpath(path, out) if out is not None else (str(path) if path else "–")
    bench = benchmark_of(ds, {n: d["group"] for n, d in ds.items()})
    protocol = results.get("protocol")
    show_best = any(d["best_of_test"] is not None for d in ds.values())
    show_val = any(d["val_acc"] is not None for d in ds.values())
    chosen = [d for d in ds.values() if d.get("hparams") is not None]
    constant, varying = constant_settings([{"hparams": d["hparams"]} for d in chosen]) if chosen else ({}, [])

    lines = [f"# {BENCHMARK_TITLES[bench]} results (protocol: {protocol or 'unknown'})", ""]
    lines.append(f"- accuracy: {results['labels']['accuracy']}.")
    if show_best:
        lines.append(f"- best of test: {BEST_OF_TEST_LABEL}.")
    lines.append(f"- selection: {results['labels']['selection']}.")
    setup = setup_lines(runs or [])
    if setup:
        lines += ["", "## Setup (from the runs' metrics.json; values separated by | differ between runs)", "",
                  *setup]
    if constant:
        lines += ["", "## Settings shared by every task", "",
                  ", ".join(f"`{k}` = {_num(v)}" for k, v in constant.items()) + "."]
    lines += ["", "## Per task", ""]
    header = ["task", "group", "test acc (%)"]
    if show_best:
        header.append("best of test (%, selected on test)")
    if show_val:
        header.append("val200 (%)")
    header += ["selection"]
    if varying:
        header.append("hyperparameters (" + ", ".join(short_name(k) for k in varying) + ")")
    header += ["trainable params", "peak mem (MiB)", "seeds", "failed runs"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for name, d in ds.items():
        row = [name, _group_cell(d), _acc_cell(d)]
        if show_best:
            row.append(fmt(d["best_of_test"]))
        if show_val:
            row.append(fmt(d["val_acc"]))
        row.append(f"test ({d['n_points']} points)" if d["selection"] == "test" else (d["selection"] or "–"))
        if varying:
            row.append(compact(d["hparams"], varying))
        row += [
            f"{d['trainable_params']:,}" if isinstance(d["trainable_params"], int) else "–",
            fmt(d["peak_memory_bytes"] / 2**20, 0) if isinstance(d["peak_memory_bytes"], (int, float)) else "–",
            ", ".join(str(s) for s in d["seeds"]) or "–",
            str(d.get("n_failed", 0)),
        ]
        lines.append("| " + " | ".join(row) + " |")

    lines += ["", "## Means", "", "| mean | value (%) | best of test (%, selected on test) | how it is computed |",
              "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {e} |" for a, b, c, e in _mean_rows(results)]
    if any(d["selection"] == "test" for d in ds.values()):
        lines += ["", "chosen on test: the hyperparameter point of these tasks was picked by its mean test "
                  "accuracy among the points of the grid; the number is optimistic."]

    lines += ["", "## Paper table", "", paper_table_markdown(results)]

    lines += ["", "## Abbreviations", ""]
    used = [k for k in [*varying, *constant] if k in ABBREVIATIONS]
    lines += [f"- {ABBREVIATIONS[k][0]}: `{k}`, {ABBREVIATIONS[k][1]}" for k in used]
    lines += [
        "- best of test: the highest of a run's periodic test evaluations (selected on test)",
        "- val200: accuracy on the 200 validation images after training on train800",
        "- Mean of groups / Mean of tasks: see Means; peak mem: peak memory of the run (MiB, see runs.csv for "
        "its kind)",
        f"- {CHOSEN_ON_TEST_MARK} (paper table): chosen on test",
    ]

    failed_runs = [(n, f) for n, d in ds.items() if d["status"] == "ok" for f in d.get("failed_runs", [])]
    if failed_runs:
        lines += ["", "## Failed runs of tasks that also have ok runs", ""]
        lines += [f"- {n}: {f['run_name']} (stage {f['stage']}, seed {f['seed']}): {f['error']}"
                  f" ({rel(Path(f['path']).parent) if f.get('path') else '–'})" for n, f in failed_runs]
    if results.get("configurations"):
        lines += ["", "## Tasks with runs of several configurations (one row each, never averaged together)", ""]
        lines += [f"- {c['dataset']}: runs differ in {', '.join(c['differ_in'])} (keys that can change the result, "
                  f"not a grid point or a seed): rows {'; '.join(c['rows'])}. Every mean over this task is left "
                  "empty; aggregate the configurations apart for their means" for c in results["configurations"]]
    if results["incomplete"]:
        lines += ["", "## Incomplete (no ok final run)", ""]
        lines += [f"- {i['dataset']} ({_group_cell(ds[i['dataset']])}): {i['status']}: {i['error']}"
                  for i in results["incomplete"]]
    acc = results.get("runs") or {}
    if acc.get("broken") or acc.get("superseded"):
        lines += ["", "## Run directories not counted", ""]
        lines += [f"- broken: {rel(b['path'])}: {b['error']}" for b in acc.get("broken", [])]
        lines += [f"- duplicate: {rel(d['path'])} is the same trial as {rel(d['counted'])}, "
                  "which finished later and counts" for d in acc.get("superseded", [])]
    files = results.get("files")
    if files:
        lines += ["", "## Files", ""]
        lines += [f"- {k}: [{rel(v)}]({rel(v)})" for k, v in files.items()]
        plots = [k for k in files if k.endswith(".png")]
        if plots:
            lines += [""] + [f"![{k}]({rel(files[k])})" for k in plots]
    return "\n".join(lines) + "\n"


def summary_text(results: Mapping[str, Any]) -> str:
    """What ``synqt aggregate`` prints: the paper table, the means (incomplete ones spelled out) and
    the tasks without an ok final run."""
    lines = [paper_table_markdown(results), "| mean | value (%) | best of test (%, selected on test) |",
             "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c, _ in _mean_rows(results)]
    if results["incomplete"]:
        lines += ["", "incomplete (no ok final run):"]
        lines += [f"  {i['dataset']}: {i['status']}: {i['error']}" for i in results["incomplete"]]
    if results.get("configurations"):
        lines += ["", "tasks with runs of several configurations (one row each; means over them left empty):"]
        lines += [f"  {c['dataset']}: differ in {', '.join(c['differ_in'])}: {'; '.join(c['rows'])}"
                  for c in results["configurations"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- writing


def write_tables(results: Mapping[str, Any], runs: Sequence[Mapping[str, Any]], out_dir: str | Path) -> dict[str, str]:
    """runs.csv, results.csv, means.csv, table.md, table.tex into ``out_dir``; returns name -> path."""
    from synqt.storage import atomic_write_text

    out = Path(out_dir)
    written = {}
    frames = {"runs.csv": runs_frame(runs, results, out), "results.csv": tasks_frame(results),
              "means.csv": means_frame(results)}
    for name, frame in frames.items():
        atomic_write_text(out / name, frame.to_csv(index=False, lineterminator="\n"))
        written[name] = str((out / name).resolve())
    atomic_write_text(out / "table.md", paper_table_markdown(results))
    atomic_write_text(out / "table.tex", paper_table_latex(results))
    written["table.md"] = str((out / "table.md").resolve())
    written["table.tex"] = str((out / "table.tex").resolve())
    return written
