"""One trial end to end (issue 3): outputs, TensorBoard, checkpoints, protocols, learning, resume,
precision, gradient accumulation and bad input, on a tiny ViT on CPU."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import socket
from pathlib import Path

import pytest
import torch
from engine_helpers import (  # noqa: F401 - _one_thread_no_progress is an autouse fixture
    N_TEST,
    N_TRAIN,
    N_VAL,
    TASK,
    TASK_CLASSES,
    TINY_BACKBONE,
    TINY_KW,
    Interrupt,
    _one_thread_no_progress,
    comparable,
    event_accumulator,
    file_kinds,
    interrupt_after,
    max_weight_diff,
    quiet_single_thread,
    read_json,
    scalar_steps,
    tiny_cfg,
    tiny_overrides,
    trainable_tensors,
    write_tiny_assets,
)

from synqt.config import config_dir, load_config
from synqt.errors import ConfigError, DataError
from synqt.storage import sha256_file
from synqt.training import evaluate_checkpoint, run_trial

# spelled out from docs/DESIGN.md (not imported from the engine), so a dropped key is caught
CONTRACT_KEYS = ("dataset", "group", "protocol", "stage", "seed", "hparams", "val_acc", "test_acc", "best_of_test",
                 "trainable_params", "peak_memory_bytes", "images_per_s", "wall_time_s", "versions", "provenance",
                 "status", "error")
STEPS_PER_EPOCH = math.ceil((N_TRAIN + N_VAL) / 16)  # train800val200, batch 16


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("engine_assets")
    data_root, ckpt = write_tiny_assets(root)
    return data_root, ckpt, root / "cache"


@pytest.fixture(scope="module")
def paper_run(assets, tmp_path_factory):
    """Paper protocol, 3 epochs, test every 2 epochs and at the end: (cfg, run_dir, metrics)."""
    data_root, ckpt, cache = assets
    run_dir = tmp_path_factory.mktemp("paper") / "paper_run"
    cfg = tiny_cfg(data_root, ckpt, cache)
    with quiet_single_thread():
        metrics = run_trial(cfg, run_dir, resume=False)
    return cfg, run_dir, metrics


def _no_successful_run(run_dir: Path) -> None:
    """A run refused before training leaves neither an ok metrics.json nor a checkpoint."""
    metrics = run_dir / "metrics.json"
    assert not metrics.exists() or read_json(metrics)["status"] != "ok"
    assert not (run_dir / "trainable.safetensors").exists()


def _copy_dataset(assets, dest: Path) -> Path:
    """A private copy of the tiny dataset (to damage) under ``dest``; returns the dataset folder."""
    data_root, _, _ = assets
    shutil.copytree(data_root / TASK, dest / TASK)
    return dest / TASK


# ------------------------------------------------------------------------------------------------------- outputs


def test_run_writes_every_output_with_the_metrics_contract(paper_run, assets):
    cfg, run_dir, metrics = paper_run
    _, ckpt, _ = assets
    assert metrics["status"] == "ok", metrics["error"]
    assert file_kinds(run_dir) == {"config.yaml", "metrics.json", "events.out.tfevents.*", "trainable.safetensors",
                                   "trainable.json"}
    assert not list(run_dir.glob(".*.tmp")), "a temporary file was left behind"

    on_disk = read_json(run_dir / "metrics.json")
    assert on_disk == json.loads(json.dumps(metrics))
    missing = [k for k in CONTRACT_KEYS if k not in on_disk]
    assert not missing, f"metrics.json lacks {missing}"
    assert on_disk["error"] is None
    assert (on_disk["dataset"], on_disk["group"], on_disk["protocol"], on_disk["stage"], on_disk["seed"]) == (
        TASK, None, "paper", "final", 7)
    assert on_disk["val_acc"] is None  # the paper protocol never scores val200
    assert 0.0 <= on_disk["test_acc"] <= 100.0 and on_disk["best_of_test"] is not None
    hp = on_disk["hparams"]
    assert {k: hp[k] for k in ("lr", "weight_decay", "token_nums", "feat_scale", "attn_scale", "ffn_scale")} == {
        "lr": 1e-3, "weight_decay": 1e-2, "token_nums": 1, "feat_scale": 1.0, "attn_scale": 1.0, "ffn_scale": 1.0}
    from synqt.model.stream import expected_trainable

    assert on_disk["trainable_params"] == expected_trainable(TINY_KW["embed_dim"], TINY_KW["depth"], 1, TASK_CLASSES)
    assert isinstance(on_disk["peak_memory_bytes"], int) and on_disk["peak_memory_bytes"] > 0
    assert on_disk["images_per_s"] > 0 and on_disk["wall_time_s"] > 0
    assert {"python", "synqt", "torch", "timm", "accelerate", "pillow", "ray", "git_commit", "git_dirty"} <= set(
        on_disk["versions"])
    prov = on_disk["provenance"]
    assert prov["backbone_checkpoint_sha256"] == sha256_file(ckpt)
    want = f"{Path(ckpt).absolute()} (sha256 {hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()})"
    assert prov["backbone_weights"] == want
    assert prov["train_split"] == "train800val200" and prov["eval_split"] == "test"
    assert len(prov["train_list_sha256"]) == 64 and prov["train_list_sha256"] != prov["eval_list_sha256"]
    # the data's layout and image format per split (the test data are PNG files in the vtab_json layout)
    for key, split in (("train_data", "train800val200"), ("eval_data", "test")):
        n_listed = len(json.loads((Path(cfg.data_root) / cfg.dataset / f"{split}.json").read_text()))
        assert prov[key] == {"split": split, "layout": "vtab_json", "images": n_listed,
                             "image_formats": {"PNG": n_listed}, "data_root": prov[key]["data_root"], "note": None}

    # the resolved config loads back strictly and is the config that ran
    assert load_config([run_dir / "config.yaml"], base=False) == cfg
    header = read_json(run_dir / "trainable.json")
    assert header["num_classes"] == TASK_CLASSES and header["backbone"]["checkpoint_sha256"] == sha256_file(ckpt)


def test_tensorboard_scalars_and_hparams_read_back(paper_run):
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    from synqt.training.schedule import lr_at

    cfg, run_dir, metrics = paper_run
    acc = event_accumulator(run_dir)
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/epoch", "eval/test_acc", "perf/images_per_s",
            "perf/process_peak_cpu_rss_mib"} <= scalars
    total = STEPS_PER_EPOCH * cfg.epochs
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, total + 1))  # log_every=1: one point per optimizer step
    assert all(math.isfinite(e.value) for e in loss)
    # the logged lr of optimizer step s (1-based) is the recipe's lr_at(s - 1); step 0 has lr 0
    lrs = [e.value for e in acc.Scalars("train/lr")]
    want = [lr_at(s, STEPS_PER_EPOCH, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, base_lr=cfg.lr,
                  min_lr=cfg.min_lr) for s in range(total)]
    assert lrs == pytest.approx(want, rel=1e-5, abs=1e-9) and lrs[0] == 0.0
    # one x-axis for every scalar: the optimizer step; evaluation after epoch E sits at step E * steps/epoch
    evals = acc.Scalars("eval/test_acc")
    assert [(e.step, round(e.value, 3)) for e in evals] == [(h["epoch"] * STEPS_PER_EPOCH, round(h["acc"], 3))
                                                           for h in metrics["eval_history"]]
    assert [(e.step, e.value) for e in acc.Scalars("train/epoch")] == [
        (STEPS_PER_EPOCH * k, float(k)) for k in (1, 2, 3)]
    assert [e.step for e in acc.Scalars("perf/images_per_s")] == [STEPS_PER_EPOCH * k for k in (1, 2, 3)]
    # memory in MiB, named by kind: this process's peak resident set (a tiny CPU run: tens to thousands of MiB)
    assert all(10 < e.value < 100_000 for e in acc.Scalars("perf/process_peak_cpu_rss_mib"))
    assert acc.Scalars("final/peak_memory_mib")[-1].value == pytest.approx(metrics["peak_memory_bytes"] / 2**20)

    # an HParams session (hparams + end status), never a per-run experiment (it would hide the sweep's domains)
    content = acc.PluginTagToContent("hparams")
    assert set(content) == {"_hparams_/session_start_info", "_hparams_/session_end_info"}
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["lr"].number_value == pytest.approx(1e-3)
    assert hp["token_nums"].number_value == 1 and hp["dataset"].string_value == TASK
    assert hp["seed"].number_value == cfg.seed and hp["protocol"].string_value == "paper"
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"])
    assert end.session_end_info.status == api_pb2.STATUS_SUCCESS
    # the final numbers at the run's last optimizer step
    assert [(e.step, e.value) for e in acc.Scalars("final/test_acc")] == [
        (total, pytest.approx(metrics["test_acc"], abs=1e-4))]
    assert acc.Scalars("final/best_of_test")[-1].value == pytest.approx(metrics["best_of_test"], abs=1e-4)
    assert acc.Scalars("final/trainable_params")[-1].value == metrics["trainable_params"]


def test_trainable_checkpoint_reproduces_the_reported_accuracy(paper_run, assets, tmp_path):
    import numpy as np

    from synqt import build_model, load_trainable
    from synqt.data.images import load_images, to_tensor_batch
    from synqt.data.splits import read_split

    cfg, run_dir, metrics = paper_run
    data_root, ckpt, cache = assets
    model = build_model(TINY_BACKBONE, TASK_CLASSES, checkpoint=str(ckpt), **TINY_KW)
    load_trainable(model, run_dir / "trainable.safetensors")
    saved = trainable_tensors(run_dir)
    for name, tensor in model.branch.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    model.eval()
    images, labels = load_images(read_split(data_root, TASK, "test"), 16, cache_dir=cache)
    with torch.no_grad():
        preds = model(to_tensor_batch(np.asarray(images), cfg.mean, cfg.std)).argmax(-1).numpy()
    assert 100.0 * float((preds == labels).mean()) == pytest.approx(metrics["test_acc"], abs=1e-9)

    result = evaluate_checkpoint(cfg, run_dir / "trainable.safetensors", split="test", out=tmp_path / "e.json")
    assert result["test_acc"] == pytest.approx(metrics["test_acc"], abs=1e-9) and result["images"] == N_TEST
    assert read_json(tmp_path / "e.json")["test_acc"] == result["test_acc"]


def test_synqt_eval_cli_prints_and_writes_the_reported_accuracy(paper_run, assets, tmp_path, capsys):
    from launcher.cli import main

    _, run_dir, metrics = paper_run
    data_root, ckpt, cache = assets
    out = tmp_path / "eval.json"
    code = main(["eval", "--weights", str(run_dir / "trainable.safetensors"), "--dataset", TASK, "--data-root",
                 str(data_root), "--split", "test", "--out", str(out), *tiny_overrides(data_root, ckpt, cache)])
    assert code == 0
    assert f"{metrics['test_acc']:.2f}%" in capsys.readouterr().out
    assert read_json(out)["test_acc"] == pytest.approx(metrics["test_acc"], abs=1e-9)


def test_synqt_eval_of_a_run_s_weights_needs_no_other_argument(paper_run, tmp_path, capsys):
    """The run's own config.yaml (beside the weights) gives backbone, checkpoint, data, recipe and split."""
    from launcher.cli import main

    _, run_dir, metrics = paper_run
    out = tmp_path / "eval.json"
    assert main(["eval", "--weights", str(run_dir / "trainable.safetensors"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"config from the run: {run_dir / 'config.yaml'}" in printed
    assert f"{TASK} test: {metrics['test_acc']:.2f}% ({N_TEST} images)" in printed
    assert read_json(out)["test_acc"] == pytest.approx(metrics["test_acc"], abs=1e-9)


# ----------------------------------------------------------------------------------------------------- protocols


def test_paper_protocol_scores_test_every_n_epochs_and_reports_best_of_test(paper_run):
    _, _, metrics = paper_run
    history = metrics["eval_history"]
    assert [(h["epoch"], h["split"]) for h in history] == [(2, "test"), (3, "test")]
    assert metrics["best_of_test"] == max(h["acc"] for h in history)
    assert metrics["test_acc"] == history[-1]["acc"]
    for h in history:  # an accuracy over the 32 test images, in percent
        assert h["acc"] * N_TEST / 100 == pytest.approx(round(h["acc"] * N_TEST / 100))


def test_vtab_search_trains_on_train800_and_scores_val200(assets, tmp_path):
    data_root, ckpt, cache = assets
    cfg = tiny_cfg(data_root, ckpt, cache, protocol="vtab", stage="search", epochs=2, eval_every=10)
    metrics = run_trial(cfg, tmp_path / "search")
    assert metrics["status"] == "ok", metrics["error"]
    assert metrics["stage"] == "search" and metrics["test_acc"] is None and metrics["best_of_test"] is None
    assert [(h["epoch"], h["split"]) for h in metrics["eval_history"]] == [(2, "val200")]
    assert metrics["val_acc"] == metrics["eval_history"][-1]["acc"]
    assert metrics["val_acc"] * N_VAL / 100 == pytest.approx(round(metrics["val_acc"] * N_VAL / 100))
    assert (metrics["provenance"]["train_split"], metrics["provenance"]["eval_split"]) == ("train800", "val200")
    # 48 train800 images in batches of 16: 3 optimizer steps per epoch
    assert scalar_steps(tmp_path / "search", "train/lr") == list(range(1, 3 * 2 + 1))
    assert scalar_steps(tmp_path / "search", "eval/val200_acc") == [2 * 3]  # after epoch 2 = optimizer step 6


def test_vtab_final_trains_on_train800val200_and_scores_test_once(assets, tmp_path):
    data_root, ckpt, cache = assets
    cfg = tiny_cfg(data_root, ckpt, cache, protocol="vtab", stage="final", epochs=2, eval_every=1)
    metrics = run_trial(cfg, tmp_path / "final")
    assert metrics["status"] == "ok", metrics["error"]
    assert metrics["stage"] == "final" and metrics["val_acc"] is None and metrics["best_of_test"] is None
    assert [(h["epoch"], h["split"]) for h in metrics["eval_history"]] == [(2, "test")]  # once, despite eval_every=1
    assert metrics["test_acc"] == metrics["eval_history"][0]["acc"]
    assert scalar_steps(tmp_path / "final", "train/lr") == list(range(1, STEPS_PER_EPOCH * 2 + 1))


# ------------------------------------------------------------------------------------------------------ learning

LEARN_TASK = "syn_colour_shape"  # 9 classes: shape x colour, with distractor dots


@pytest.fixture(scope="module")
def demo_backbone():
    """The cached pre-trained demo backbone (built once per machine by synqt.tools.pretrain)."""
    from synqt.tools.pretrain import ensure_demo_assets

    with quiet_single_thread():
        _, ckpt = ensure_demo_assets()
    return ckpt


def test_short_run_on_a_synthetic_task_learns_well_above_chance(demo_backbone, tmp_path):
    """10 epochs over 200 images with the pre-trained demo backbone: val200 accuracy > 2x chance."""
    from synqt.data.synthetic import DEMO_TASKS, write_benchmark

    classes = DEMO_TASKS[LEARN_TASK][1]
    root = write_benchmark(tmp_path / "data", tasks=[LEARN_TASK], n_train=200, n_val=100, n_test=20)
    cfg = load_config([config_dir() / "demo.yaml"], [
        f"dataset={LEARN_TASK}", f"data_root={root}", f"checkpoint={demo_backbone}", f"cache_dir={tmp_path / 'c'}",
        "protocol=vtab", "stage=search", "epochs=10", "warmup_epochs=1", "lr=1e-2", "device=cpu"])
    metrics = run_trial(cfg, tmp_path / "learn")
    chance = 100.0 / classes
    assert metrics["status"] == "ok", metrics["error"]
    meta = Path(demo_backbone).with_suffix(".json")
    pretrained = read_json(meta) if meta.is_file() else {}
    assert metrics["val_acc"] > 2 * chance, (
        f"val200 accuracy {metrics['val_acc']}% vs chance {chance:.1f}%; demo backbone {demo_backbone} was "
        f"pre-trained for {pretrained.get('steps')} steps to source accuracy {pretrained.get('source_acc')}%")


# -------------------------------------------------------------------------------------------------------- resume


def test_interrupted_run_resumes_to_the_same_result(paper_run, tmp_path):
    cfg, run_a, metrics_a = paper_run
    run_b = tmp_path / "b"
    with pytest.raises(Interrupt):
        run_trial(cfg, run_b, report=interrupt_after(2))
    assert (run_b / "resume.pt").is_file()
    assert read_json(run_b / "progress.json")["epoch"] == 2
    assert read_json(run_b / "metrics.json")["status"] == "failed"  # never a stale "ok"

    metrics_b = run_trial(cfg, run_b, resume=True)
    assert comparable(metrics_b) == comparable(metrics_a)
    # provenance says where each finished and that b continued from its epoch-2 checkpoint
    assert metrics_a["provenance"]["resumed_after_epoch"] is None
    assert metrics_b["provenance"]["resumed_after_epoch"] == 2
    assert metrics_b["provenance"]["host"] == metrics_a["provenance"]["host"] == socket.gethostname()
    assert max_weight_diff(run_a, run_b) <= 1e-6
    assert not (run_b / "resume.pt").exists() and not (run_b / "progress.json").exists()
    # the resumed process trained epoch 3 only: every optimizer step logged exactly once over both processes
    assert sorted(scalar_steps(run_b, "train/lr")) == list(range(1, STEPS_PER_EPOCH * 3 + 1))


def test_cli_train_resume_continues_an_interrupted_run(paper_run, assets, tmp_path):
    from launcher.cli import main

    cfg, run_a, metrics_a = paper_run
    data_root, ckpt, cache = assets
    args = ["--dataset", TASK, "--data-root", str(data_root), *tiny_overrides(data_root, ckpt, cache)]
    cli_cfg = load_config([], [f"dataset={TASK}", f"data_root={data_root}", *tiny_overrides(data_root, ckpt, cache)])
    assert cli_cfg == cfg  # the command line below resolves to the config of the uninterrupted run
    run_c = tmp_path / "c"
    with pytest.raises(Interrupt):
        run_trial(cli_cfg, run_c, report=interrupt_after(2))
    assert main(["train", *args, "--out", str(run_c), "--resume"]) == 0
    metrics_c = read_json(run_c / "metrics.json")
    assert comparable(metrics_c) == comparable(json.loads(json.dumps(metrics_a)))
    assert max_weight_diff(run_a, run_c) <= 1e-6


# ----------------------------------------------------------------------------------------- precision and accum


def test_bf16_runs_on_cpu_with_finite_metrics(assets, tmp_path, monkeypatch):
    data_root, ckpt, cache = assets
    monkeypatch.setenv("SYNQT_ALLOW_SLOW_BF16", "1")  # the bf16 math, also on CPUs without native bf16
    metrics = run_trial(tiny_cfg(data_root, ckpt, cache, precision="bf16", epochs=1), tmp_path / "bf16")
    assert metrics["status"] == "ok", metrics["error"]
    assert metrics["hparams"]["precision"] == "bf16"
    assert math.isfinite(metrics["test_acc"])
    losses = [e.value for e in event_accumulator(tmp_path / "bf16").Scalars("train/loss")]
    assert losses and all(math.isfinite(v) for v in losses)


def test_fp16_on_cpu_is_refused_before_training(assets, tmp_path):
    data_root, ckpt, cache = assets
    with pytest.raises(ConfigError, match="fp16") as err:
        run_trial(tiny_cfg(data_root, ckpt, cache, precision="fp16"), tmp_path / "fp16")
    assert "GPU" in str(err.value)
    assert not (tmp_path / "fp16").exists() or not any((tmp_path / "fp16").iterdir())


def test_gradient_accumulation_matches_one_big_batch(assets, tmp_path):
    """With every random op off, grad_accum_steps only changes how a batch is split, not the update."""
    data_root, ckpt, cache = assets
    # batch 20 over 64 images: 3 full batches and a last partial batch of 4; the branch's dropout and drop
    # path off through their config keys
    common = dict(batch_size=20, epochs=2, drop_path_rate=0.0, backbone_drop_path=False, lr=1e-2,
                  branch_dropout=0.0, branch_attn_dropout=0.0, head_drop_path=0.0, kv_cache="off")
    one = run_trial(tiny_cfg(data_root, ckpt, cache, grad_accum_steps=1, **common), tmp_path / "accum1")
    four = run_trial(tiny_cfg(data_root, ckpt, cache, grad_accum_steps=4, **common), tmp_path / "accum4")
    assert one["status"] == four["status"] == "ok"
    steps = math.ceil((N_TRAIN + N_VAL) / 20) * 2
    assert scalar_steps(tmp_path / "accum4", "train/lr") == list(range(1, steps + 1))
    loss1 = [e.value for e in event_accumulator(tmp_path / "accum1").Scalars("train/loss")]
    loss4 = [e.value for e in event_accumulator(tmp_path / "accum4").Scalars("train/loss")]
    assert loss4 == pytest.approx(loss1, rel=1e-4)
    assert max_weight_diff(tmp_path / "accum1", tmp_path / "accum4") <= 1e-4


# ------------------------------------------------------------------------------------------------------ bad input


def test_missing_data_root_is_refused(assets, tmp_path):
    _, ckpt, cache = assets
    missing = tmp_path / "no_such_root"
    with pytest.raises(DataError, match="no_such_root"):
        run_trial(tiny_cfg(missing, ckpt, cache), tmp_path / "run")
    _no_successful_run(tmp_path / "run")


def test_missing_dataset_lists_the_existing_folders(assets, tmp_path):
    data_root, ckpt, cache = assets
    cfg = tiny_cfg(data_root, ckpt, cache, dataset="no_such_dataset")
    with pytest.raises(DataError, match="no_such_dataset") as err:
        run_trial(cfg, tmp_path / "run")
    assert TASK in str(err.value)  # the folders that do exist
    _no_successful_run(tmp_path / "run")


def test_missing_list_file_is_named(assets, tmp_path):
    ds = _copy_dataset(assets, tmp_path / "data")
    (ds / "test.json").unlink()
    _, ckpt, _ = assets
    with pytest.raises(DataError, match="test.json"):
        run_trial(tiny_cfg(tmp_path / "data", ckpt, tmp_path / "cache"), tmp_path / "run")
    _no_successful_run(tmp_path / "run")


def test_undecodable_image_is_named_before_training(assets, tmp_path):
    ds = _copy_dataset(assets, tmp_path / "data")
    bad = sorted((ds / "images" / "test").glob("*.png"))[3]
    bad.write_bytes(b"this is not a png")
    _, ckpt, _ = assets
    with pytest.raises(DataError, match="cannot decode") as err:
        run_trial(tiny_cfg(tmp_path / "data", ckpt, tmp_path / "cache"), tmp_path / "run")
    assert str(bad) in str(err.value)
    _no_successful_run(tmp_path / "run")
    assert not list((tmp_path / "run").glob("events.out.tfevents.*"))  # training never started


def test_label_outside_the_class_range_is_named(assets, tmp_path):
    ds = _copy_dataset(assets, tmp_path / "data")
    entries = read_json(ds / "test.json")
    ((rel, _),) = entries[4].items()
    entries[4] = {rel: TASK_CLASSES}  # one past the last class
    (ds / "test.json").write_text(json.dumps(entries))
    _, ckpt, _ = assets
    cfg = tiny_cfg(tmp_path / "data", ckpt, tmp_path / "cache", num_classes=TASK_CLASSES)
    with pytest.raises(DataError, match=f"label {TASK_CLASSES} outside \\[0, {TASK_CLASSES}\\)") as err:
        run_trial(cfg, tmp_path / "run")
    assert "test.json" in str(err.value)
    _no_successful_run(tmp_path / "run")


@pytest.mark.parametrize("num_classes", [3, TASK_CLASSES + 2])
def test_class_count_disagreeing_with_the_data_is_refused(assets, tmp_path, num_classes):
    data_root, ckpt, cache = assets
    with pytest.raises(DataError, match=f"num_classes={num_classes}"):
        run_trial(tiny_cfg(data_root, ckpt, cache, num_classes=num_classes), tmp_path / "run")
    _no_successful_run(tmp_path / "run")


def test_non_finite_loss_fails_the_run_with_the_reason(assets, tmp_path):
    data_root, ckpt, cache = assets
    metrics = run_trial(tiny_cfg(data_root, ckpt, cache, lr=1e38, min_lr=0.0), tmp_path / "nan")
    assert metrics["status"] == "failed"
    assert "non-finite training loss" in metrics["error"]
    assert metrics["test_acc"] is None and metrics["best_of_test"] is None
    on_disk = read_json(tmp_path / "nan" / "metrics.json")
    assert on_disk["status"] == "failed" and on_disk["error"] == metrics["error"]
    assert all(k in on_disk for k in CONTRACT_KEYS)
    assert not (tmp_path / "nan" / "trainable.safetensors").exists()
