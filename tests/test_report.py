"""The outputs a paper needs (launcher/results/: report.py, plots.py, compare.py) and provenance.

Sweeps are written here as metrics.json files with chosen numbers; every expected value is computed in
the test from those numbers, and every file is read back with its own reader (pandas for CSV, json,
PIL for PNG, pdflatex for the LaTeX table).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from launcher.cli import main
from launcher.results.aggregate import aggregate

REPO = Path(__file__).resolve().parents[1]
VTAB = {  # the 19 VTAB-1k tasks and their groups (spec section 6), in table order
    "cifar": "Natural", "caltech101": "Natural", "dtd": "Natural", "oxford_flowers102": "Natural",
    "oxford_iiit_pet": "Natural", "svhn": "Natural", "sun397": "Natural",
    "patch_camelyon": "Specialized", "eurosat": "Specialized", "resisc45": "Specialized",
    "diabetic_retinopathy": "Specialized",
    "clevr_count": "Structured", "clevr_dist": "Structured", "dmlab": "Structured", "kitti": "Structured",
    "dsprites_loc": "Structured", "dsprites_ori": "Structured", "smallnorb_azi": "Structured",
    "smallnorb_ele": "Structured",
}  # fmt: skip
FGVC = ["cub", "nabirds", "oxford_flowers", "stanford_dogs", "stanford_cars"]
VERSIONS = {"synqt": "0.1.0", "git_commit": "0123abc", "torch": "2.9.0", "timm": "1.0.20", "pillow": "11.3.0",
            "ray": "2.52.1"}
HP = {"token_nums": 4, "feat_scale": 0.1, "attn_scale": 1.0, "ffn_scale": 0.1, "lr": 1e-3, "weight_decay": 1e-2}


def write_run(root: Path, name: str, **fields) -> Path:
    metrics = {
        "dataset": None, "group": None, "protocol": "paper", "stage": "final", "seed": 42, "hparams": dict(HP),
        "val_acc": None, "test_acc": None, "best_of_test": None, "trainable_params": 100_000,
        "peak_memory_bytes": 300 * 2**20, "peak_memory_kind": "cuda_max_allocated", "images_per_s": 250.0,
        "wall_time_s": 60.0, "versions": {}, "provenance": {}, "status": "ok", "error": None,
        "run_name": name, "epochs_done": 10, "eval_history": [],
    }  # fmt: skip
    metrics.update(fields)
    path = root / "runs" / name / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics))
    return path


def history(final: float, best: float) -> list[dict]:
    return [{"epoch": 5, "split": "test", "acc": best}, {"epoch": 10, "split": "test", "acc": final}]


@pytest.fixture()
def grid_sweep(tmp_path: Path) -> tuple[Path, dict]:
    """Two VTAB tasks and one FGVC task; cifar has a 2-point lr grid with 2 seeds; one failed run."""
    sweep = tmp_path / "sweep"
    acc = {("cifar", 1e-3): [70.0, 72.0], ("cifar", 5e-4): [75.0, 76.5], ("dmlab", 1e-3): [40.0],
           ("cub", 1e-3): [85.0, 86.0]}
    groups = {"cifar": "Natural", "dmlab": "Structured", "cub": None}
    params = {"cifar": 150_000, "dmlab": 120_000, "cub": 300_000}
    written = []
    for (ds, lr), values in acc.items():
        for seed, a in zip((42, 44), values, strict=False):
            name = f"{ds}-lr{lr}-s{seed}"
            write_run(sweep, name, dataset=ds, group=groups[ds], seed=seed, hparams={**HP, "lr": lr}, test_acc=a,
                      best_of_test=a + 2.0, eval_history=history(a, a + 2.0), trainable_params=params[ds],
                      peak_memory_bytes=(400 + seed) * 2**20, versions=VERSIONS,
                      provenance={"backbone": "vit_base_patch16_224", "image_size": 224,
                                  "train_data": {"layout": "vtab_txt", "image_formats": {"JPEG": 1000},
                                                 "note": "JPEG copy note"}})
            written.append(name)
    write_run(sweep, "dmlab-lr0.001-s44", dataset="dmlab", group="Structured", seed=44, status="failed",
              error='CUDA out of memory, "tried" to allocate\nsecond line', test_acc=None)
    written.append("dmlab-lr0.001-s44")
    return sweep, {"acc": acc, "written": written, "params": params}


# ----------------------------------------------------------------------------- CSV files


def test_runs_csv_has_one_row_per_run_and_one_column_per_hyperparameter(grid_sweep, tmp_path):
    sweep, exp = grid_sweep
    out = tmp_path / "report"
    aggregate(sweep, out_dir=out)
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs["run_name"]) == sorted(exp["written"])
    for key in HP:
        assert key in runs.columns
    for col in ("dataset", "group", "protocol", "stage", "seed", "val_acc", "test_acc",
                "best_of_test_selected_on_test", "trainable_params", "peak_memory_mib", "images_per_s",
                "wall_time_s", "status"):
        assert col in runs.columns, col
    assert runs["test_acc"].dtype.kind == "f" and runs["seed"].dtype.kind == "i"
    row = runs.set_index("run_name").loc["cifar-lr0.0005-s44"]
    assert row["lr"] == pytest.approx(5e-4) and row["test_acc"] == pytest.approx(76.5)
    assert row["best_of_test_selected_on_test"] == pytest.approx(78.5)
    assert row["peak_memory_mib"] == pytest.approx(444.0) and row["trainable_params"] == 150_000
    assert (out / row["run_dir"]).resolve() == (sweep / "runs" / "cifar-lr0.0005-s44").resolve()
    failed = runs.set_index("run_name").loc["dmlab-lr0.001-s44"]
    assert failed["status"] == "failed" and failed["error"] == 'CUDA out of memory, "tried" to allocate\nsecond line'
    # the point with the higher mean test accuracy (lr 5e-4: 75.75 > 71.0) is the chosen one
    chosen = set(runs.loc[runs["chosen"], "run_name"])
    assert {"cifar-lr0.0005-s42", "cifar-lr0.0005-s44"} <= chosen
    assert not chosen & {"cifar-lr0.001-s42", "cifar-lr0.001-s44", "dmlab-lr0.001-s44"}
    # VTAB order: cifar (Natural) rows first, FGVC last
    assert list(dict.fromkeys(runs["dataset"])) == ["cifar", "dmlab", "cub"]


def test_results_csv_is_tidy_and_means_have_their_own_file(grid_sweep, tmp_path):
    sweep, exp = grid_sweep
    aggregate(sweep, out_dir=tmp_path / "r")
    tasks = pd.read_csv(tmp_path / "r" / "results.csv")
    assert list(tasks["dataset"]) == ["cifar", "dmlab", "cub"]  # one row per task, nothing else
    cifar = tasks.set_index("dataset").loc["cifar"]
    assert cifar["accuracy"] == pytest.approx(statistics.fmean([75.0, 76.5]))
    assert cifar["std"] == pytest.approx(statistics.stdev([75.0, 76.5]))
    assert cifar["hp_lr"] == pytest.approx(5e-4) and bool(cifar["chosen_on_test"]) is True
    assert cifar["best_of_test_selected_on_test"] == pytest.approx(statistics.fmean([77.0, 78.5]))
    assert pd.isna(tasks.set_index("dataset").loc["dmlab", "std"])  # one seed: no std
    means = pd.read_csv(tmp_path / "r" / "means.csv").set_index("mean")
    assert means.loc["group: Natural", "value"] == pytest.approx(75.75)
    assert means.loc["group: Structured", "value"] == pytest.approx(40.0)
    assert means.loc["group: Specialized", "status"] == "absent"
    assert means.loc["mean_of_tasks", "value"] == pytest.approx((75.75 + 40.0) / 2)
    assert means.loc["mean_of_groups", "status"] == "incomplete" and pd.isna(means.loc["mean_of_groups", "value"])
    assert means.loc["mean_fgvc", "value"] == pytest.approx(85.5)
    assert means.loc["mean_fgvc", "best_of_test_selected_on_test"] == pytest.approx(87.5)


def test_results_json_carries_best_of_test_means_labelled_selected_on_test(grid_sweep, tmp_path):
    sweep, _ = grid_sweep
    res = json.loads((lambda: (aggregate(sweep, out_dir=tmp_path / "r"), tmp_path / "r" / "results.json"))()[1]
                     .read_text())
    bot = res["best_of_test"]
    assert "selected on test" in bot["label"]
    assert bot["groups"]["Natural"] == pytest.approx(statistics.fmean([77.0, 78.5]))
    assert bot["groups"]["Structured"] == pytest.approx(42.0)
    assert bot["groups"]["Specialized"] is None and bot["mean_of_groups"] is None
    assert bot["mean_of_tasks"] == pytest.approx((77.75 + 42.0) / 2)
    assert bot["mean_fgvc"] == pytest.approx(87.5)


# ----------------------------------------------------------------------------- paper tables


def _full_vtab(sweep: Path) -> dict[str, float]:
    accs = {name: 50.0 + 2.5 * i + 0.04 for i, name in enumerate(VTAB)}
    for name, a in accs.items():
        write_run(sweep, f"{name}-s42", dataset=name, group=VTAB[name], test_acc=a, best_of_test=a + 1.0)
    (sweep / "plan.json").write_text(json.dumps({"protocol": "paper", "datasets": list(VTAB)}))
    return accs


def _md_table(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows if not set(row) <= set("|-: ")]


def test_vtab_paper_table_markdown_has_19_tasks_group_means_and_mean(tmp_path):
    accs = _full_vtab(tmp_path)
    aggregate(tmp_path)
    text = (tmp_path / "table.md").read_text()
    assert "### VTAB-1k" in text
    header, final, best = _md_table(text)
    assert len(header) == 1 + 19 + 3 + 1
    assert header[1] == "CIFAR-100" and header[19] == "sNORB-Elev" and header[20:] == [
        "Natural", "Specialized", "Structured", "Mean"]
    assert final[1:20] == [f"{accs[n]:.1f}" for n in VTAB]
    group_means = {g: statistics.fmean(a for n, a in accs.items() if VTAB[n] == g)
                   for g in ("Natural", "Specialized", "Structured")}
    assert final[20:23] == [f"{v:.1f}" for v in group_means.values()]
    assert final[23] == f"{statistics.fmean(group_means.values()):.1f}"
    assert best[0] == "best of test (selected on test)"
    assert best[23] == f"{statistics.fmean(group_means.values()) + 1.0:.1f}"


def _tabular_rows(tex: str) -> tuple[int, list[str]]:
    """(columns declared by the tabular spec, body rows) of the first tabular in ``tex``."""
    spec = re.search(r"\\begin\{tabular\}\{([^}]*)\}", tex).group(1)
    body = tex.split(r"\toprule", 1)[1].split(r"\bottomrule", 1)[0]
    rows = [r.strip() for r in body.split(r"\\") if "&" in r]
    return len(spec.replace("|", "")), rows


def _cells(row: str) -> int:
    """Columns a LaTeX table row spans (\\multicolumn{n} counts n)."""
    row = re.sub(r"\\(cmidrule|midrule)(\([^)]*\))?(\{[^}]*\})?", "", row)
    parts = row.split("&")
    return sum(int(m.group(1)) if (m := re.search(r"\\multicolumn\{(\d+)\}", p)) else 1 for p in parts)


def _compile(tex: str, where: Path) -> None:
    exe = shutil.which("pdflatex")
    assert exe, "pdflatex not found: apt-get install texlive-latex-base texlive-latex-recommended (.ci/run does)"
    doc = where / "doc.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage[T1]{fontenc}\n\\usepackage{booktabs,graphicx}\n"
                   "\\begin{document}\n" + tex + "\n\\end{document}\n")
    proc = subprocess.run([exe, "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=where,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (where / "doc.pdf").read_bytes()[:5] == b"%PDF-"
    assert "Overfull" not in proc.stdout and "Undefined control sequence" not in proc.stdout


def test_vtab_latex_table_is_booktabs_with_consistent_columns_and_compiles(tmp_path):
    accs = _full_vtab(tmp_path / "s")
    aggregate(tmp_path / "s")
    tex = (tmp_path / "s" / "table.tex").read_text()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\cmidrule(lr){2-8}", r"\cmidrule(lr){9-12}",
                 r"\cmidrule(lr){13-20}"):
        assert rule in tex, rule
    n_cols, rows = _tabular_rows(tex)
    assert n_cols == 1 + 19 + 4
    for row in rows:
        assert _cells(row) == n_cols, row
    assert f"{accs['cifar']:.1f}" in rows[-2]
    assert "selected on test" in rows[-1]
    _compile(tex, tmp_path)


def test_fgvc_sweep_gets_the_fgvc_table(tmp_path):
    accs = {name: 80.0 + i for i, name in enumerate(FGVC)}
    for name, a in accs.items():
        write_run(tmp_path, name, dataset=name, group=None, test_acc=a, best_of_test=a + 0.5)
    aggregate(tmp_path)
    text = (tmp_path / "table.md").read_text()
    assert "VTAB" not in text and "### FGVC" in text
    header, final, _ = _md_table(text)
    assert header == ["Method", "CUB-200-2011", "NABirds", "Oxford Flowers", "Stanford Dogs", "Stanford Cars",
                      "Mean"]
    assert final[-1] == f"{statistics.fmean(accs.values()):.1f}"
    tex = (tmp_path / "table.tex").read_text()
    n_cols, rows = _tabular_rows(tex)
    assert n_cols == 7 and all(_cells(r) == 7 for r in rows)
    assert (tmp_path / "results.md").read_text().startswith("# FGVC results")
    _compile(tex, tmp_path)



def test_vtab1k_group_means_stay_empty_until_every_task_of_the_group_has_a_number(tmp_path, capsys):
    """A folder without a plan holding one hand-run Natural task (under an alias): no group mean, no Mean."""
    write_run(tmp_path, "pets-s42", dataset="pets", group=None, test_acc=2.7, best_of_test=3.1)
    assert main(["aggregate", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    header, final, best = _md_table((tmp_path / "table.md").read_text())
    assert len(header) == 1 + 19 + 3 + 1 and header[5] == "Pets" and final[5] == "2.7" and best[5] == "3.1"
    assert final[20:] == ["–"] * 4 and best[20:] == ["–"] * 4
    tex_rows = _tabular_rows((tmp_path / "table.tex").read_text())[1]
    assert "2.7" in tex_rows[-2] and tex_rows[-2].count("--") == 18 + 4
    others = [n for n in VTAB if VTAB[n] == "Natural" and n != "oxford_iiit_pet"]
    for text in (printed, (tmp_path / "results.md").read_text()):
        rows = {r[0]: r[1] for r in _md_table(text) if len(r) >= 3}
        assert rows["Natural (group mean)"] == f"incomplete (missing: {', '.join(others)})"
        assert rows["Mean of groups"].startswith("incomplete (missing: cifar,")
        assert rows["Mean of tasks"] == "2.70 (over 1 of 19 VTAB-1k tasks)"
        table = {r[0]: r for r in _md_table(text)}
        assert table["SynQT (this sweep)"][5] == "2.7" and table["SynQT (this sweep)"][20:] == ["–"] * 4
    # complete groups keep their means: Natural done, the others still missing
    for i, name in enumerate(others):
        write_run(tmp_path, f"{name}-s42", dataset=name, group="Natural", test_acc=10.0 * (i + 1), best_of_test=1.0)
    assert main(["aggregate", str(tmp_path)]) == 0
    _, final, best = _md_table((tmp_path / "table.md").read_text())[:3]
    natural = statistics.fmean([2.7] + [10.0 * (i + 1) for i in range(6)])
    assert final[20:] == [f"{natural:.1f}", "–", "–", "–"]
    assert best[20] == f"{statistics.fmean([3.1] + [1.0] * 6):.1f}"


def test_fgvc_mean_stays_empty_until_all_five_tasks_have_a_number(tmp_path):
    write_run(tmp_path, "cub", dataset="cub", group=None, test_acc=81.0)
    write_run(tmp_path, "nabirds", dataset="nabirds", group=None, test_acc=83.0)
    aggregate(tmp_path)
    header, final = _md_table((tmp_path / "table.md").read_text())
    assert header[-1] == "Mean" and final[1:] == ["81.0", "83.0", "–"]
    assert "| FGVC mean | incomplete (missing: oxford_flowers, stanford_dogs, stanford_cars) |" in (
        tmp_path / "results.md").read_text()


def test_results_md_lists_constants_once_defines_abbreviations_and_links_relatively(grid_sweep, tmp_path):
    sweep, _ = grid_sweep
    out = tmp_path / "report"
    res = aggregate(sweep, out_dir=out)
    md = (out / "results.md").read_text()
    assert str(tmp_path) not in md  # no absolute paths
    assert md.count("`token_nums` = 4") == 1 and "hyperparameters (lr)" in md
    assert "- T: `token_nums`" in md and "- lr: `lr`" in md
    for line in ("- backbone: vit_base_patch16_224", "- input size (px): 224", "- data layout: vtab_txt",
                 "- training images, by format: JPEG (1000 images)", "- git commit: 0123abc",
                 "- torch / timm: 2.9.0 / 1.0.20", "- Pillow: 11.3.0", "- Ray: 2.52.1", "- note: JPEG copy note"):
        assert line in md.splitlines(), line
    links = re.findall(r"\]\(([^)]+)\)", md)
    assert "results.png" in links and "runs.csv" in links and "table.tex" in links
    for link in links:
        assert (out / link).exists(), link
    assert set(res["files"]) >= {"runs.csv", "results.csv", "means.csv", "table.md", "table.tex",
                                 "results.png", "results.pdf", "curves.png", "curves.pdf", "cost.png", "cost.pdf"}


# ----------------------------------------------------------------------------- plots


def test_plots_are_300_dpi_png_and_pdf(grid_sweep, tmp_path):
    from PIL import Image

    sweep, _ = grid_sweep
    aggregate(sweep, out_dir=tmp_path / "r")
    for name in ("results", "curves", "cost"):
        with Image.open(tmp_path / "r" / f"{name}.png") as im:
            assert im.format == "PNG"
            assert im.info["dpi"][0] == pytest.approx(300, abs=0.5)
            assert im.size[0] > 1500  # a 300-dpi figure several inches wide
        assert (tmp_path / "r" / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"


def test_accuracy_figure_dots_per_seed_no_error_bar_for_one_seed_labels_and_marks(grid_sweep):
    from matplotlib.container import ErrorbarContainer

    from launcher.results.aggregate import build_results, load_runs
    from launcher.results.plots import accuracy_figure

    sweep, _ = grid_sweep
    res, runs = build_results(sweep), load_runs(sweep)[1]
    ax = accuracy_figure(res, runs).axes[0]
    # error bars only for tasks with two or more seeds of the chosen point: cifar and cub, not dmlab
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2
    # one dot per seed of the chosen point: cifar 75.0 and 76.5 (lr 5e-4), dmlab 40.0
    seed_dots = sorted(y for line in ax.lines if line.get_marker() == "o" for y in line.get_ydata())
    assert seed_dots == sorted([75.0, 76.5, 40.0, 85.0, 86.0])
    texts = {t.get_text() for t in ax.texts}
    assert {f"{statistics.fmean([75.0, 76.5]):.1f}", "40.0", "85.5"} <= texts  # value labels
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert "cifar †" in ticks and "dmlab" in ticks  # cifar chosen on test among 2 grid points
    assert any("chosen on test" in t.get_text() for t in ax.get_legend().get_texts())


def test_learning_curves_are_the_mean_over_seeds_with_a_band(grid_sweep):
    from launcher.results.aggregate import build_results, load_runs
    from launcher.results.plots import curves_figure

    sweep, _ = grid_sweep
    fig = curves_figure(build_results(sweep), load_runs(sweep)[1])
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert set(axes) == {"cifar", "dmlab", "cub"}
    assert axes["cifar"].get_legend().get_texts()[0].get_text() == "test (final, 2 seeds)"
    line = axes["cifar"].lines[0]
    assert list(line.get_xdata()) == [5, 10]
    assert list(line.get_ydata()) == pytest.approx([statistics.fmean([77.0, 78.5]), statistics.fmean([75.0, 76.5])])
    assert len(axes["cifar"].collections) == 1 and len(axes["dmlab"].collections) == 0  # band only with 2 seeds


def test_vtab_curves_show_the_search_val200_curve_beside_the_single_test_point(tmp_path):
    from launcher.results.aggregate import build_results, load_runs
    from launcher.results.plots import curves_figure

    for seed, (v1, v2, t) in {1: (50.0, 60.0, 70.0), 2: (54.0, 64.0, 72.0)}.items():
        write_run(tmp_path, f"search-s{seed}", dataset="dtd", group="Natural", protocol="vtab", stage="search",
                  seed=seed, val_acc=v2, eval_history=[{"epoch": 5, "split": "val200", "acc": v1},
                                                       {"epoch": 10, "split": "val200", "acc": v2}])
        write_run(tmp_path, f"final-s{seed}", dataset="dtd", group="Natural", protocol="vtab", stage="final",
                  seed=seed, test_acc=t, eval_history=[{"epoch": 10, "split": "test", "acc": t}])
    ax = curves_figure(build_results(tmp_path), load_runs(tmp_path)[1]).axes[0]
    final, search = ax.lines
    assert list(final.get_ydata()) == [71.0] and final.get_linestyle() == "-"
    assert list(search.get_ydata()) == [52.0, 62.0] and search.get_linestyle() == "--"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["test (final, 2 seeds)", "val200 (search, 2 seeds)"]


def test_cost_figure_has_every_ok_final_run(grid_sweep):
    from launcher.results.aggregate import build_results, load_runs
    from launcher.results.plots import cost_figure

    sweep, exp = grid_sweep
    fig = cost_figure(build_results(sweep), load_runs(sweep)[1])
    ax_p, ax_m = fig.axes[:2]
    n_ok = sum(len(v) for v in exp["acc"].values())
    xs = sorted(x for line in ax_p.lines for x in line.get_xdata())
    assert len(xs) == n_ok
    assert max(xs) == pytest.approx(exp["params"]["cub"] / 1e6)
    assert "peak CUDA memory allocated by torch" in ax_m.get_xlabel()  # what cuda_max_allocated measured


# ----------------------------------------------------------------------------- compare


def test_compare_two_sweeps_and_a_published_csv(grid_sweep, tmp_path, capsys):
    sweep, _ = grid_sweep
    other = tmp_path / "other"
    for name, a in (("cifar", 78.0), ("dmlab", 45.0), ("cub", 84.0)):
        write_run(other, name, dataset=name, group=VTAB.get(name), test_acc=a)
    published = tmp_path / "published.csv"
    published.write_text("method,dataset,accuracy\npaper,cifar,80.5\npaper,dmlab,50.1\n")
    out = tmp_path / "cmp" / "compare"
    assert main(["compare", f"base={sweep}", f"new={other}", str(published), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    frame = pd.read_csv(out.with_suffix(".csv"))
    tasks = frame[frame["kind"] == "task"].set_index("name")
    base_cifar = statistics.fmean([75.0, 76.5])
    assert tasks.loc["cifar", "base"] == pytest.approx(base_cifar)
    assert tasks.loc["cifar", "diff_new"] == pytest.approx(78.0 - base_cifar)
    assert tasks.loc["cifar", "diff_paper"] == pytest.approx(80.5 - base_cifar)
    assert pd.isna(tasks.loc["cub", "paper"]) and pd.isna(tasks.loc["cub", "diff_paper"])
    means = frame[frame["kind"] == "mean"].set_index("name")
    common = means.loc["Mean of 2 common tasks"]  # cub is missing from the published table
    assert common["new"] == pytest.approx((78.0 + 45.0) / 2)
    assert common["diff_paper"] == pytest.approx((80.5 + 50.1) / 2 - (base_cifar + 40.0) / 2)
    assert f"{78.0 - base_cifar:+.2f}" in printed and "left out: cub" in printed
    assert out.with_suffix(".md").read_text() in printed


def test_compare_reads_a_paper_layout_table_one_source_per_method(grid_sweep, tmp_path, capsys):
    sweep, _ = grid_sweep
    wide = tmp_path / "published.csv"
    wide.write_text("method,CIFAR-100,DMLab,Natural,Mean\nA,80.0,50.0,80.0,65.0\nB,70.0,,70.0,\n")
    assert main(["compare", f"mine={sweep}", str(wide), "--out", str(tmp_path / "c")]) == 0
    frame = pd.read_csv(tmp_path / "c.csv").set_index("name")
    mine_cifar = statistics.fmean([75.0, 76.5])
    assert frame.loc["cifar", "A"] == 80.0 and frame.loc["dmlab", "A"] == 50.0 and pd.isna(frame.loc["dmlab", "B"])
    assert frame.loc["cifar", "diff_B"] == pytest.approx(70.0 - mine_cifar)
    # B has no DMLab, so the common tasks are cifar only; the Natural/Mean columns are not read
    assert frame.loc["Mean of 1 common tasks", "A"] == pytest.approx(80.0)
    bad = tmp_path / "bad_wide.csv"
    bad.write_text("method,CIFAR-100,Foo\nA,1,2\n")
    assert main(["compare", str(sweep), str(bad)]) == 2
    assert "unknown columns: Foo" in capsys.readouterr().err


def test_compare_needs_two_sources_and_a_readable_csv(grid_sweep, tmp_path, capsys):
    sweep, _ = grid_sweep
    assert main(["compare", str(sweep)]) == 2
    assert "at least two sources" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("task,acc\ncifar,1\n")
    assert main(["compare", str(sweep), str(bad)]) == 2
    assert "expected columns 'dataset' and 'accuracy'" in capsys.readouterr().err



# NOAH's VTAB-1k row as its README prints it (ViT-B/16; headings and numbers typed from the NOAH table), and the
# spellings of VPT's table; the task each names (issue 21 item 5).
NOAH_HEADINGS = ["Cifar100", "Caltech101", "DTD", "Flower102", "Pets", "SVHN", "Sun397", "Camelyon", "EuroSAT",
                 "Resisc45", "Retinopathy", "Clevr-Count", "Clevr-Dist", "DMLab", "KITTI-Dist", "dSpr-Loc", "dSpr-Ori",
                 "sNORB-Azim", "sNORB-Ele"]
NOAH_ROW = [69.6, 92.7, 70.2, 99.1, 90.4, 86.1, 53.7, 84.4, 95.4, 83.9, 75.8, 82.8, 68.9, 49.9, 81.7, 81.8, 48.3,
            32.8, 44.2]
VPT_HEADINGS = {"CIFAR-100": "cifar", "Patch Camelyon": "patch_camelyon", "Clevr/count": "clevr_count",
                "Clevr/distance": "clevr_dist", "KITTI/distance": "kitti", "dSprites/location": "dsprites_loc",
                "dSprites/orientation": "dsprites_ori", "SmallNORB/azimuth": "smallnorb_azi",
                "SmallNORB/elevation": "smallnorb_ele", "Flowers102": "oxford_flowers102"}


def test_compare_reads_the_spellings_published_tables_use(grid_sweep, tmp_path, capsys):
    """d5b98fd refused a `Method` header (with a message that did not mention the paper layout) and NOAH's
    `sNORB-Ele`."""
    sweep, _ = grid_sweep
    noah = tmp_path / "noah.csv"
    noah.write_text("Method," + ",".join(NOAH_HEADINGS) + ",Mean,Params (M)\n"
                    "NOAH," + ",".join(map(str, NOAH_ROW)) + ",75.5,0.43\n")
    assert main(["compare", f"mine={sweep}", str(noah), "--out", str(tmp_path / "c")]) == 0, capsys.readouterr().err
    frame = pd.read_csv(tmp_path / "c.csv").set_index("name")
    assert [frame.loc[t, "NOAH"] for t in VTAB] == NOAH_ROW  # VTAB: the 19 tasks in table order
    vpt = tmp_path / "vpt.csv"
    vpt.write_text("method," + ",".join(VPT_HEADINGS) + "\nVPT," + ",".join(str(i) for i in range(len(VPT_HEADINGS)))
                   + "\n")
    assert main(["compare", f"mine={sweep}", str(vpt), "--out", str(tmp_path / "v")]) == 0, capsys.readouterr().err
    frame = pd.read_csv(tmp_path / "v.csv").set_index("name")
    assert {task: frame.loc[task, "VPT"] for task in VPT_HEADINGS.values()} == {
        task: float(i) for i, task in enumerate(VPT_HEADINGS.values())}
    # the long layout in other case, rows in published spellings
    long = tmp_path / "long.csv"
    long.write_text("Method,Dataset,Accuracy\nNOAH,sNORB-Ele,44.2\nNOAH,Cifar100,69.6\n")
    assert main(["compare", f"mine={sweep}", str(long), "--out", str(tmp_path / "l")]) == 0, capsys.readouterr().err
    frame = pd.read_csv(tmp_path / "l.csv").set_index("name")
    assert frame.loc["smallnorb_ele", "NOAH"] == 44.2 and frame.loc["cifar", "NOAH"] == 69.6
    # neither layout: the message says what both look like
    bad = tmp_path / "bad.csv"
    bad.write_text("Model,Acc\nA,1\n")
    assert main(["compare", str(sweep), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "paper layout" in err and "method column and one column per task" in err


def test_every_spelling_names_one_task():
    """A title or alias that two tasks share (after case and punctuation are dropped) would compare the wrong rows."""
    from synqt.data import registry

    seen: dict[str, str] = {}
    for info in registry.datasets():
        for spelling in (info.name, info.title, *info.aliases):
            key = "".join(ch for ch in spelling.lower() if ch.isalnum())
            assert seen.setdefault(key, info.name) == info.name, (spelling, seen[key], info.name)
            assert registry.from_heading(spelling).name == info.name


@pytest.mark.parametrize("text, where", [
    ("dataset,accuracy\ncifar,80.5\nsyn_count,abc\n", "line 3 (dataset syn_count), column 'accuracy'"),
    ("method,CIFAR-100,DMLab\nA,80.0,50.0\nB,70.0,n.a.\n", "line 3 (method B), column 'DMLab'"),
])
def test_compare_refuses_a_published_cell_that_is_not_a_number(grid_sweep, tmp_path, capsys, text, where):
    sweep, _ = grid_sweep
    pub = tmp_path / "pub.csv"
    pub.write_text(text)
    assert main(["compare", f"pub={pub}", f"mine={sweep}"]) == 2
    err = capsys.readouterr().err
    bad = text.splitlines()[2].split(",")[-1]
    assert str(pub) in err and where in err and repr(bad) in err
    # empty cells and dashes stay "missing"
    pub.write_text("dataset,accuracy\ncifar,80.5\ndmlab,\ncub,–\nsyn_count,-\n")
    assert main(["compare", f"pub={pub}", f"mine={sweep}", "--out", str(tmp_path / "c")]) == 0
    frame = pd.read_csv(tmp_path / "c.csv").set_index("name")
    assert frame.loc["cifar", "pub"] == 80.5 and pd.isna(frame.loc["dmlab", "pub"]) and pd.isna(frame.loc["cub", "pub"])


# ----------------------------------------------------------------------------- provenance, version, install paths


def test_split_provenance_names_the_image_format_and_flags_jpeg_vtab(tmp_path, caplog):
    import numpy as np
    from PIL import Image

    from synqt.data.splits import read_split
    from synqt.run.provenance import JPEG_VTAB_NOTE, split_provenance

    rng = np.random.default_rng(0)
    for ext, name in (("png", "png_copy"), ("jpg", "jpeg_copy")):
        folder = tmp_path / name / "images"
        folder.mkdir(parents=True)
        entries = []
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.{ext}")
            entries.append({f"{i}.{ext}": i % 2})
        for split in ("train800val200", "test"):
            (tmp_path / name / f"{split}.json").write_text(json.dumps(entries))
    png = split_provenance(read_split(tmp_path, "png_copy", "test"))
    assert png["image_formats"] == {"PNG": 3} and png["layout"] == "vtab_json" and png["note"] is None
    with caplog.at_level("WARNING", logger="synqt.run.provenance"):
        jpeg = split_provenance(read_split(tmp_path, "jpeg_copy", "train800val200"))
    assert jpeg["image_formats"] == {"JPEG": 3} and jpeg["note"] == JPEG_VTAB_NOTE
    assert "NOAH" in jpeg["note"] and any("jpeg_copy/train800val200" in r.getMessage() for r in caplog.records)


def test_library_versions_include_pillow_ray_and_the_checkout_commit():
    import importlib.metadata

    import PIL

    from synqt.run.provenance import library_versions

    v = library_versions()
    assert v["pillow"] == PIL.__version__
    assert v["ray"] == importlib.metadata.version("ray")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert v["git_commit"] == head and isinstance(v["git_dirty"], bool)


def test_version_flag_prints_version_and_commit(capsys):
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("synqt 0.1.0 (git " + head[:12])


def test_shipped_files_live_in_the_packages_and_the_repo_root_links_to_them():
    assert (REPO / "configs").is_symlink() and (REPO / "slurm").is_symlink()
    assert (REPO / "configs").resolve() == (REPO / "synqt" / "configs").resolve()
    assert (REPO / "slurm").resolve() == (REPO / "launcher" / "sbatch").resolve()
    from launcher.run.slurm import SWEEP_SCRIPT
    from synqt.config import config_dir

    assert config_dir().resolve() == (REPO / "synqt" / "configs").resolve()
    assert SWEEP_SCRIPT.read_bytes() == (REPO / "slurm" / "vtab.sh").read_bytes()


def test_slurm_script_writes_the_template_where_asked(tmp_path, capsys):
    dest = tmp_path / "job.sh"
    assert main(["slurm", "script", str(dest)]) == 0
    assert dest.read_bytes() == (REPO / "slurm" / "vtab.sh").read_bytes() and os.access(dest, os.X_OK)
    assert main(["slurm", "script", str(dest)]) == 2  # never overwritten silently
    assert "exists" in capsys.readouterr().err
    assert main(["slurm", "script", str(tmp_path), "--name", "vtab_array"]) == 0
    assert (tmp_path / "vtab_array.sh").read_bytes() == (REPO / "slurm" / "vtab_array.sh").read_bytes()


def test_a_shipped_sweep_runs_by_short_name(capsys, tmp_path):
    assert main(["sweep", "vtab1k", f"storage_path={tmp_path}", "--dry-run"]) == 0
    by_name = capsys.readouterr().out
    assert main(["sweep", str(REPO / "configs" / "sweeps" / "vtab1k.yaml"),
                 f"storage_path={tmp_path}", "--dry-run"]) == 0
    by_path = capsys.readouterr().out
    assert "stage final: 19 trial(s)" in by_name
    strip = lambda s: s.split("\n", 1)[1]  # the first line names the file
    assert strip(by_name) == strip(by_path)
