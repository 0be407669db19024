"""Aggregation of metrics.json files into the VTAB-1k table (launcher/results/aggregate.py).

Every expected number is recomputed here from the values the test wrote, independently of the
module's own arithmetic.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from launcher.results.aggregate import aggregate, choose_point, format_table, load_runs
from synqt.errors import SynQTError

METRIC_KEYS = (
    "dataset", "group", "protocol", "stage", "seed", "hparams", "val_acc", "test_acc", "best_of_test",
    "trainable_params", "peak_memory_bytes", "images_per_s", "wall_time_s", "versions", "provenance",
    "status", "error", "run_name", "epochs_done", "eval_history",
)  # fmt: skip

HP = {"token_nums": 4, "feat_scale": 0.1, "attn_scale": 1.0, "ffn_scale": 0.1, "lr": 1e-3,
      "weight_decay": 1e-2}


def write_metrics(root: Path, run_name: str, **fields) -> Path:
    """A metrics.json with every documented key (null unless given), as the engine writes it."""
    metrics = dict.fromkeys(METRIC_KEYS)
    metrics.update(
        protocol="paper", stage="final", seed=42, hparams=dict(HP), status="ok", run_name=run_name,
        trainable_params=123_456, peak_memory_bytes=512 * 2**20, wall_time_s=10.0, epochs_done=5,
        eval_history=[], versions={}, provenance={},
    )  # fmt: skip
    metrics.update(fields)
    path = root / run_name / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics))
    return path


def _runs(root: Path, dataset: str, group: str | None, accs: list[float], tag: str = "",
          **extra) -> list[float]:
    """One ok final run per accuracy, seeds 1, 2, ...; best_of_test is test_acc + 1."""
    for seed, acc in enumerate(accs, start=1):
        write_metrics(root, f"{dataset}_{tag}s{seed}", dataset=dataset, group=group, seed=seed,
                      test_acc=acc, best_of_test=acc + 1.0, **extra)
    return accs


@pytest.fixture()
def paper_sweep(tmp_path: Path) -> tuple[Path, dict]:
    """Partly finished paper-protocol sweep: missing, failed, partly failed, grid and FGVC tasks."""
    sweep = tmp_path / "sweep"
    runs = sweep / "runs"
    acc = {}
    acc["cifar"] = _runs(runs, "cifar", "Natural", [70.0, 72.5])
    # caltech101: paper grid of 2 points, 2 seeds each; the lr=5e-4 point has the higher mean test accuracy.
    grid_lo = _runs(runs, "caltech101", "Natural", [80.0, 82.0], tag="lr1e-3_")
    grid_hi = _runs(runs, "caltech101", "Natural", [84.0, 83.0], tag="lr5e-4_", hparams={**HP, "lr": 5e-4})
    acc["caltech101"] = grid_hi
    acc["eurosat"] = _runs(runs, "eurosat", "Specialized", [90.0, 91.0])
    acc["patch_camelyon"] = _runs(runs, "patch_camelyon", "Specialized", [75.0, 78.0])
    write_metrics(runs, "patch_camelyon_s9", dataset="patch_camelyon", group="Specialized", seed=9,
                  status="failed", error="CUDA out of memory")
    acc["dmlab"] = _runs(runs, "dmlab", "Structured", [50.0, 53.0])
    write_metrics(runs, "kitti_s1", dataset="kitti", group="Structured", seed=1, status="failed",
                  error="DataError: kitti/test.json missing")
    write_metrics(runs, "kitti_s2", dataset="kitti", group="Structured", seed=2, status="failed",
                  error="DataError: kitti/test.json missing")
    acc["cub"] = _runs(runs, "cub", None, [88.0])
    datasets = ["cifar", "caltech101", "dtd", "eurosat", "patch_camelyon", "dmlab", "kitti", "cub"]
    (sweep / "plan.json").write_text(json.dumps({"name": "t", "protocol": "paper", "datasets": datasets,
                                                 "trials": [], "stage2_pending": 0}))
    return sweep, {"acc": acc, "grid_lo": grid_lo, "grid_hi": grid_hi}


def test_paper_sweep_with_missing_failed_grid_and_fgvc(paper_sweep, tmp_path):
    sweep, exp = paper_sweep
    out = tmp_path / "report"
    res = aggregate(sweep, out_dir=out)
    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk) == {"datasets", "groups", "mean_of_groups", "mean_of_tasks", "protocol", "incomplete",
                            "labels", "expected_datasets", "mean_fgvc", "runs", "best_of_test", "configurations"}
    assert on_disk == {k: v for k, v in res.items() if k != "files"}
    ds = on_disk["datasets"]

    for name in ("cifar", "eurosat", "patch_camelyon", "dmlab"):
        accs = exp["acc"][name]
        assert ds[name]["accuracy"] == pytest.approx(sum(accs) / len(accs))
        # sample std (n - 1), not population std
        m = sum(accs) / len(accs)
        assert ds[name]["std"] == pytest.approx((sum((a - m) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5)
        assert ds[name]["seeds"] == [1, 2]
        assert ds[name]["selection"] == "fixed"
        assert ds[name]["best_of_test"] == pytest.approx(m + 1.0)
        assert ds[name]["status"] == "ok"
    assert ds["cifar"]["std"] == pytest.approx(statistics.stdev([70.0, 72.5]))

    # grid: the higher-mean point wins and is labelled as chosen on test
    assert ds["caltech101"]["selection"] == "test"
    assert ds["caltech101"]["accuracy"] == pytest.approx(83.5)
    assert ds["caltech101"]["hparams"]["lr"] == pytest.approx(5e-4)
    assert ds["caltech101"]["n_runs"] == 2

    # partly failed dataset: ok mean unaffected, failure counted
    assert ds["patch_camelyon"]["n_failed"] == 1
    # single seed: no std; FGVC outside VTAB means
    assert ds["cub"]["std"] is None and ds["cub"]["group"] is None
    assert on_disk["mean_fgvc"] == pytest.approx(88.0)

    # missing (dtd, group from its shipped config) and failed (kitti) make their means null
    assert ds["dtd"]["status"] == "missing" and ds["dtd"]["group"] == "Natural"
    assert ds["kitti"]["status"] == "failed"
    inc = {i["dataset"]: i for i in on_disk["incomplete"]}
    assert set(inc) == {"dtd", "kitti"}
    assert inc["kitti"]["status"] == "failed" and "test.json missing" in inc["kitti"]["error"]
    assert on_disk["groups"]["Natural"] is None
    assert on_disk["groups"]["Structured"] is None
    assert on_disk["groups"]["Specialized"] == pytest.approx((90.5 + 76.5) / 2)
    assert on_disk["mean_of_groups"] is None
    assert on_disk["mean_of_tasks"] is None
    assert on_disk["protocol"] == "paper"
    assert on_disk["expected_datasets"][0] == "cifar" and "dtd" in on_disk["expected_datasets"]

    md = (out / "results.md").read_text()
    assert "incomplete (missing: dtd)" in md
    assert "incomplete (failed: kitti)" in md
    assert "selected on test" in md and "chosen on test" in md
    assert "mean of the three group means" in md and "plain mean of the" in md
    assert "CUDA out of memory" in md  # the failed run of a dataset with ok runs is listed
    assert md == format_table(res, load_runs(sweep)[1], out)
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "results.csv").open()))
    by_name = {r["dataset"]: r for r in rows}
    assert float(by_name["eurosat"]["accuracy"]) == pytest.approx(90.5)
    assert by_name["caltech101"]["chosen_on_test"] == "True"
    assert "best_of_test_selected_on_test" in rows[0]
    means = {r["mean"]: r for r in csv.DictReader((out / "means.csv").open())}
    assert means["mean_of_groups"]["status"] == "incomplete"
    # nothing written into the sweep directory when --out is given
    assert not (sweep / "results.json").exists()


def _vtab_complete(root: Path) -> dict[str, list[float]]:
    """A complete vtab-protocol sweep of 5 tasks (hand-run layout, nested dirs, no plan.json)."""
    accs = {
        "cifar": [60.0, 64.0], "dtd": [70.0, 71.0],
        "eurosat": [95.0, 96.0],
        "dmlab": [40.0, 44.0], "kitti": [80.0, 81.0],
    }  # fmt: skip
    groups = {"cifar": "Natural", "dtd": "Natural", "eurosat": "Specialized", "dmlab": "Structured",
              "kitti": "Structured"}
    for name, values in accs.items():
        # search stage: two points on val200; the lr=2e-3 point wins and is retrained in the final stage
        for lr, val in ((1e-3, 50.0), (2e-3, 55.0)):
            for seed in (1, 2):
                write_metrics(root / "search" / name, f"lr{lr}_s{seed}", dataset=name, group=groups[name],
                              protocol="vtab", stage="search", seed=seed, hparams={**HP, "lr": lr},
                              val_acc=val + seed, test_acc=None)
        for seed, acc in zip((1, 2), values, strict=True):
            write_metrics(root / "final" / name, f"s{seed}", dataset=name, group=groups[name],
                          protocol="vtab", stage="final", seed=seed, hparams={**HP, "lr": 2e-3}, test_acc=acc)
    # Ray's own folder must never be read
    write_metrics(root / "_ray" / "trial_0", "x", dataset="bogus", test_acc=1.0)
    return accs


def test_vtab_complete_means_labels_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accs = _vtab_complete(tmp_path)
    res = aggregate(tmp_path)
    assert (tmp_path / "results.json").is_file() and (tmp_path / "results.csv").is_file()
    ds = res["datasets"]
    assert "bogus" not in ds
    assert list(ds) == ["cifar", "dtd", "eurosat", "dmlab", "kitti"]  # VTAB order
    task_mean = {n: sum(v) / len(v) for n, v in accs.items()}
    nat = (task_mean["cifar"] + task_mean["dtd"]) / 2
    spe = task_mean["eurosat"]
    stru = (task_mean["dmlab"] + task_mean["kitti"]) / 2
    assert res["groups"] == pytest.approx({"Natural": nat, "Specialized": spe, "Structured": stru})
    assert res["mean_of_groups"] == pytest.approx((nat + spe + stru) / 3)
    assert res["mean_of_tasks"] == pytest.approx(sum(task_mean.values()) / 5)
    assert res["mean_of_groups"] != pytest.approx(res["mean_of_tasks"])  # the two means are not the same
    assert res["incomplete"] == [] and res["protocol"] == "vtab"
    assert "mean_fgvc" not in res
    for name in accs:
        assert ds[name]["selection"] == "val200"
        assert ds[name]["val_acc"] == pytest.approx(55.0 + 1.5)  # search val200 of the retrained point
        assert ds[name]["best_of_test"] is None
    assert res["labels"]["mean_of_tasks"] == "plain mean of the 5 VTAB tasks in this sweep"
    assert "VTAB 'Mean'" in res["labels"]["mean_of_groups"]

    tb = tmp_path / "_sweep_summary"
    assert not (tmp_path / "tensorboard").exists()
    events = sorted(tb.glob("events.out.tfevents.*"))
    assert len(events) == 2  # the HParams experiment + the table and chart
    ea = EventAccumulator(str(tb), size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    ea.Reload()
    assert ea.Tags()["scalars"] == []  # no one-point scalars: the per-task numbers are the HParams rows
    text_tag = next(t for t in ea.Tags()["tensors"] if t.startswith("sweep/results"))
    text = ea.Tensors(text_tag)[0].tensor_proto.string_val[0].decode()
    assert "mean of the three group means" in text and "| cifar |" in text
    assert ea.Images("sweep/chart")[0].width > 100
    # the one experiment: every dataset and seed the runs recorded, final/* metrics as columns
    from tensorboard.plugins.hparams import plugin_data_pb2

    exp = plugin_data_pb2.HParamsPluginData.FromString(
        ea.PluginTagToContent("hparams")["_hparams_/experiment"]).experiment
    infos = {h.name: h for h in exp.hparam_infos}
    assert [v.string_value for v in infos["dataset"].domain_discrete.values] == sorted(accs)
    assert infos["dataset"].differs and infos["stage"].differs  # search and final runs
    assert {m.name.tag for m in exp.metric_infos} == {"final/test_acc", "final/val_acc", "final/trainable_params",
                                                      "final/peak_memory_mib", "final/wall_time_min"}

    # re-aggregating replaces the TensorBoard run instead of stacking a second one
    aggregate(tmp_path)
    assert len(list(tb.glob("events.out.tfevents.*"))) == 2


def test_tie_break_is_deterministic():
    def runs(*accs):
        return [{"test_acc": a, "seed": i, "_path": str(i)} for i, a in enumerate(accs)]

    # equal means: lower std wins
    assert choose_point({'{"lr": 1}': runs(70, 80), '{"lr": 2}': runs(74, 76)}) == '{"lr": 2}'
    # equal mean and std: lexicographically smallest JSON wins, whatever the order given
    pts = {'{"lr": 2}': runs(74, 76), '{"lr": 1}': runs(76, 74)}
    assert choose_point(pts) == '{"lr": 1}'
    assert choose_point(dict(reversed(list(pts.items())))) == '{"lr": 1}'
    # a higher mean beats everything
    assert choose_point({'{"a": 0}': runs(75, 75), '{"z": 9}': runs(70, 81)}) == '{"z": 9}'


def test_no_metrics_and_no_plan_is_an_error(tmp_path):
    with pytest.raises(SynQTError, match="no metrics.json"):
        aggregate(tmp_path)
    with pytest.raises(SynQTError, match="does not exist"):
        aggregate(tmp_path / "nope")


def test_search_only_dataset_is_missing_and_cli_prints_table(tmp_path, capsys):
    from launcher.cli import main

    write_metrics(tmp_path, "a", dataset="svhn", group="Natural", protocol="vtab", stage="search",
                  val_acc=50.0, test_acc=None)
    write_metrics(tmp_path, "b", dataset="cifar", group="Natural", protocol="vtab", stage="final",
                  test_acc=60.0)
    assert main(["aggregate", str(tmp_path)]) == 3  # the table is printed; a task is missing
    printed = capsys.readouterr().out
    assert "incomplete (missing: svhn)" in printed
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["datasets"]["svhn"]["status"] == "missing"
    assert "search stage only" in res["datasets"]["svhn"]["error"]
    assert res["datasets"]["cifar"]["selection"] == "fixed"  # no search runs for it: nothing chosen on val
    assert res["groups"]["Natural"] is None and res["groups"]["Specialized"] is None
