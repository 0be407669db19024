"""Figures of an aggregated sweep (matplotlib, Agg; each saved as PNG at 300 dpi and as PDF).

- ``results.{png,pdf}``: per-task test accuracy. Every seed of the chosen point is a dot, the mean a
  short bar with its value, ± sample std only where there are two or more seeds; the other grid points
  are grey crosses; best of test (selected on test) is a hollow diamond; tasks chosen on test carry "†"
  in their label. Group means and the overall means follow on the right.
- ``curves.{png,pdf}``: learning curves per task: accuracy of the periodic evaluations against the epoch,
  mean ± std over the seeds of the chosen point.
- ``cost.{png,pdf}``: every ok final run's test accuracy against its trainable parameters and its peak
  memory (what was measured in the axis label: the process's peak RSS on CPU); both axes start at zero.

Inputs: the results dict of ``launcher.results.aggregate.build_results`` and the parsed metrics.json files.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from launcher.results.report import CHOSEN_ON_TEST_MARK, GROUPS
from synqt.run.rundir import point_key as hparams_key

GROUP_COLOURS = {"Natural": "#2e8b57", "Specialized": "#e08a1e", "Structured": "#3a6fb0", None: "#7f5aa2"}
DPI = 300


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colour(group: str | None) -> str:
    return GROUP_COLOURS.get(group, GROUP_COLOURS[None])


def _final_ok(runs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in runs if r.get("stage") in ("final", None) and r.get("status") == "ok"
            and isinstance(r.get("test_acc"), (int, float))]


def _chosen_runs(name: str, d: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    if d.get("hparams") is None:
        return []
    key = hparams_key(d["hparams"])
    chosen = [r for r in _final_ok(runs) if r["dataset"] == name and hparams_key(r.get("hparams")) == key]
    seeds = set(d.get("seeds") or [])
    return [r for r in chosen if not seeds or r.get("seed") in seeds]


def accuracy_figure(results: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> Any:
    """Per-task accuracy (see the module docstring)."""
    from matplotlib.lines import Line2D

    ds = results["datasets"]
    names = list(ds)
    bot = results.get("best_of_test") or {}
    extra = [(f"{g} mean", results["groups"][g], (bot.get("groups") or {}).get(g), g)
             for g in GROUPS if any(d["group"] == g for d in ds.values())]
    if any(d["group"] in GROUPS for d in ds.values()):
        extra.append(("Mean of groups", results["mean_of_groups"], bot.get("mean_of_groups"), None))
        extra.append(("Mean of tasks", results["mean_of_tasks"], bot.get("mean_of_tasks"), None))
    if "mean_fgvc" in results:
        extra.append(("FGVC mean", results["mean_fgvc"], bot.get("mean_fgvc"), None))

    n = len(names) + len(extra) + 1
    fig = _figure(max(6.5, 0.55 * n + 1.8), 4.8)
    ax = fig.add_subplot(1, 1, 1)
    all_vals: list[float] = []
    for x, name in enumerate(names):
        d = ds[name]
        colour = _colour(d["group"])
        if d["status"] != "ok":
            ax.text(x, 0.5, d["status"], rotation=90, ha="center", va="bottom", fontsize=8, color="#b00020",
                    transform=ax.get_xaxis_transform())
            continue
        chosen_key = hparams_key(d["hparams"])
        others: dict[str, list[float]] = {}
        for r in _final_ok(runs):
            if r["dataset"] == name and hparams_key(r.get("hparams")) != chosen_key:
                others.setdefault(hparams_key(r.get("hparams")), []).append(float(r["test_acc"]))
        for accs in others.values():
            ax.plot([x + 0.22], [statistics.fmean(accs)], marker="x", color="#9a9a9a", ms=5, ls="none")
            all_vals.append(statistics.fmean(accs))
        seeds = [float(r["test_acc"]) for r in _chosen_runs(name, d, runs)]
        offsets = [0.0] if len(seeds) == 1 else [(-0.12 + 0.24 * i / (len(seeds) - 1)) for i in range(len(seeds))]
        ax.plot([x + o for o in offsets], seeds, marker="o", ls="none", color=colour, ms=4.5, alpha=0.85,
                markeredgecolor="black", markeredgewidth=0.4)
        ax.hlines(d["accuracy"], x - 0.2, x + 0.2, color=colour, lw=2.2)
        if d["std"] is not None:
            ax.errorbar([x], [d["accuracy"]], yerr=[d["std"]], color="black", capsize=3, lw=0.8)
        if d["best_of_test"] is not None:  # left of the seeds, so an equal value does not hide them
            ax.plot([x - 0.22], [d["best_of_test"]], marker="D", mfc="none", mec="black", ms=5, ls="none")
            all_vals.append(d["best_of_test"])
        all_vals += seeds + [d["accuracy"]]
        top = max([d["accuracy"] + (d["std"] or 0.0), *seeds, d["best_of_test"] or 0.0])
        ax.annotate(f"{d['accuracy']:.1f}", (x, top), xytext=(0, 4), textcoords="offset points", ha="center",
                    va="bottom", fontsize=7)
    ex = [len(names) + 1 + i for i in range(len(extra))]
    for x, (_, value, best, group) in zip(ex, extra, strict=True):
        if value is None:
            ax.text(x, 0.5, "incomplete", rotation=90, ha="center", va="bottom", fontsize=8, color="#b00020",
                    transform=ax.get_xaxis_transform())
            continue
        ax.bar(x, value, width=0.6, color=_colour(group) if group else "#555555", alpha=0.35, edgecolor="black",
               lw=0.5)
        if best is not None:
            ax.plot([x], [best], marker="D", mfc="none", mec="black", ms=5, ls="none")
        ax.annotate(f"{value:.1f}", (x, max(value, best or 0.0)), xytext=(0, 4), textcoords="offset points",
                    ha="center", va="bottom", fontsize=7)
        all_vals.append(value)
    labels = [n + (f" {CHOSEN_ON_TEST_MARK}" if ds[n]["selection"] == "test" else "") for n in names]
    ax.set_xticks(list(range(len(names))) + ex)
    ax.set_xticklabels(labels + [e[0] for e in extra], rotation=55, ha="right", fontsize=8)
    ax.set_ylim(0.0, 104.0)  # from 0: the mean bars on the right must not exaggerate differences
    ax.set_ylabel("test accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    protocol = results.get("protocol") or "unknown"
    ax.set_title(f"Test accuracy per task (protocol {protocol})", fontsize=10)
    handles = [Line2D([], [], marker="o", ls="none", color="#777777", mec="black", mew=0.4, label="one seed"),
               Line2D([], [], color="#777777", lw=2.2, label="mean (± std if ≥ 2 seeds)")]
    if any(d["best_of_test"] is not None for d in ds.values()):
        handles.append(Line2D([], [], marker="D", ls="none", mfc="none", mec="black",
                              label="best of test (selected on test)"))
    if any(d["n_points"] > 1 for d in ds.values()):
        handles.append(Line2D([], [], marker="x", ls="none", color="#9a9a9a", label="other grid points (mean)"))
    if any(d["selection"] == "test" for d in ds.values()):
        handles.append(Line2D([], [], ls="none", label=f"{CHOSEN_ON_TEST_MARK} point chosen on test"))
    for g in GROUPS:
        if any(d["group"] == g for d in ds.values()):
            handles.append(Line2D([], [], marker="s", ls="none", color=_colour(g), label=g))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return fig


def _mean_curve(histories: Sequence[Sequence[Mapping[str, Any]]]) -> tuple[list[int], Any, Any]:
    """(epochs, mean, sample std — 0 where one run) over runs' eval histories, per epoch."""
    import numpy as np

    by_epoch: dict[int, list[float]] = {}
    for hist in histories:
        for h in hist:
            by_epoch.setdefault(int(h["epoch"]), []).append(float(h["acc"]))
    epochs = sorted(by_epoch)
    mean = np.array([statistics.fmean(by_epoch[e]) for e in epochs])
    std = np.array([statistics.stdev(by_epoch[e]) if len(by_epoch[e]) > 1 else 0.0 for e in epochs])
    return epochs, mean, std


def curves_figure(results: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> Any:
    """Learning curves of the chosen point per task: accuracy (%) of the periodic evaluations against the
    epoch, mean ± std over seeds (a band only with two or more seeds). Under the vtab protocol the final run
    scores test once, so the search stage's val200 curve of the same point is drawn too (dashed)."""
    ds = {n: d for n, d in results["datasets"].items() if d["status"] == "ok"}
    names = list(ds) or ["(no ok task)"]
    ncols = min(4, len(names))
    nrows = -(-len(names) // ncols)
    fig = _figure(3.0 * ncols + 0.4, 2.4 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names, strict=False):
        d = ds.get(name)
        if d is None:
            ax.text(0.5, 0.5, "no ok task", ha="center", transform=ax.transAxes)
            continue
        colour = _colour(d["group"])
        key = hparams_key(d["hparams"])
        search = [r.get("eval_history") or [] for r in runs
                  if r["dataset"] == name and r.get("stage") == "search" and r.get("status") == "ok"
                  and hparams_key(r.get("hparams")) == key]
        final = [r.get("eval_history") or [] for r in _chosen_runs(name, d, runs)]
        curves = [("final", final, "-")] + ([("search", search, "--")] if search else [])
        for stage, histories, style in curves:
            epochs, mean, std = _mean_curve(histories)
            splits = "/".join(sorted({h.get("split") for hist in histories for h in hist if h.get("split")}))
            ax.plot(epochs, mean, marker="o", ms=3, color=colour, ls=style,
                    label=f"{splits or 'eval'} ({stage}, {len(histories)} seed{'s' if len(histories) != 1 else ''})")
            if len(histories) > 1:
                ax.fill_between(epochs, mean - std, mean + std, color=colour, alpha=0.25 if style == "-" else 0.12,
                                lw=0)
            if epochs:
                ax.annotate(f"{mean[-1]:.1f}", (epochs[-1], mean[-1]), xytext=(-4, -4), textcoords="offset points",
                            ha="right", va="top", fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("epoch", fontsize=7)
        ax.set_ylabel("accuracy (%)", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right", frameon=False)
    fig.suptitle("Learning curves of the reported point (mean ± std over seeds)", fontsize=10)
    return fig


# what metrics.json's peak_memory_kind measured (synqt.training.loop.device_peak_memory), as an axis label
MEMORY_KINDS = {"cpu_max_rss": "peak process RSS (whole trial process)",
                "cuda_max_allocated": "peak CUDA memory allocated by torch"}


def cost_figure(results: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> Any:
    """Test accuracy of every ok final run against trainable parameters and against peak memory."""
    ds = results["datasets"]
    ok = _final_ok(runs)
    fig = _figure(10.0, 4.0)
    ax_p, ax_m = fig.subplots(1, 2)
    kinds = sorted({str(r.get("peak_memory_kind")) for r in ok if r.get("peak_memory_kind")})
    for r in ok:
        d = ds.get(r["dataset"], {})
        colour = _colour(d.get("group", r.get("group")))
        chosen = d.get("hparams") is not None and hparams_key(r.get("hparams")) == hparams_key(d["hparams"])
        style = dict(marker="o" if chosen else "x", ls="none", color=colour, ms=5, alpha=0.8)
        points = []
        if isinstance(r.get("trainable_params"), int):
            points.append((ax_p, r["trainable_params"] / 1e6))
        if isinstance(r.get("peak_memory_bytes"), (int, float)):
            points.append((ax_m, r["peak_memory_bytes"] / 2**20))
        for ax, x in points:
            ax.plot([x], [r["test_acc"]], **style)
            if chosen:
                ax.annotate(r["dataset"], (x, r["test_acc"]), xytext=(4, 2), textcoords="offset points", fontsize=6)
    ax_p.set_xlabel("trainable parameters (millions)")
    ax_m.set_xlabel(f"{' / '.join(MEMORY_KINDS.get(k, k) for k in kinds) or 'peak memory'} (MiB)")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_p, ax_m):
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.margins(x=0.18, y=0.08)  # room for the task labels
        # from zero: runs that differ by 0.3 % in parameters or memory must not look far apart
        right = max((x for line in ax.get_lines() for x in line.get_xdata()), default=0.0)
        ax.set_xlim(0, right * 1.3 if right > 0 else 1.0)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="s", ls="none", color=_colour(g), label=g)
               for g in GROUPS if any(d["group"] == g for d in ds.values())]
    if any(d["group"] not in GROUPS for d in ds.values()):
        handles.append(Line2D([], [], marker="s", ls="none", color=_colour(None), label="FGVC / other"))
    handles += [Line2D([], [], marker="o", ls="none", color="#777777", label="reported point"),
                Line2D([], [], marker="x", ls="none", color="#777777", label="other grid point")]
    fig.legend(handles=handles, fontsize=7, loc="outside lower center", ncol=len(handles), frameon=False)
    fig.suptitle(f"Accuracy against cost, {len(ok)} ok final run(s)", fontsize=10)
    return fig


FIGURES = {"results": accuracy_figure, "curves": curves_figure, "cost": cost_figure}


def write_plots(results: Mapping[str, Any], runs: Sequence[Mapping[str, Any]], out_dir: str | Path) -> dict[str, str]:
    """Every figure as ``<name>.png`` (300 dpi) and ``<name>.pdf``; returns file name -> absolute path."""
    import io

    from synqt.storage import atomic_write_bytes

    out = Path(out_dir)
    written = {}
    for name, make in FIGURES.items():
        fig = make(results, runs)
        for ext, kwargs in (("png", {"dpi": DPI}), ("pdf", {})):
            buf = io.BytesIO()
            fig.savefig(buf, format=ext, **kwargs)
            atomic_write_bytes(out / f"{name}.{ext}", buf.getvalue())
            written[f"{name}.{ext}"] = str((out / f"{name}.{ext}").resolve())
    return written
