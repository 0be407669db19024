"""Resuming with a changed configuration, and weights used on data they do not fit (issue 14 item 1,
issue 12 item 6): a resume continues exactly the same run or stops naming each changed key; weights are
refused on data with another class count or image size, and warned about on a differently named folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from engine_helpers import (  # noqa: F401 - _one_thread_no_progress is an autouse fixture
    TASK,
    TASK_CLASSES,
    Interrupt,
    _one_thread_no_progress,
    comparable,
    interrupt_after,
    read_json,
    tiny_cfg,
    tiny_overrides,
    write_tiny_assets,
)

from launcher.cli import main
from synqt.storage import sha256_file
from synqt.training import run_trial


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("resume_assets")
    data_root, ckpt = write_tiny_assets(root)
    return data_root, ckpt, root / "cache"


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """A finished 3-epoch run made through the command line: (run_dir, metrics)."""
    data_root, ckpt, cache = assets
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--dataset", TASK, "--data-root", str(data_root), "--out", str(run),
                 *tiny_overrides(data_root, ckpt, cache)]) == 0
    return run, read_json(run / "metrics.json")


def _train_args(assets, run: Path, *extra: str) -> list[str]:
    data_root, ckpt, cache = assets
    return ["train", "--dataset", TASK, "--data-root", str(data_root), "--out", str(run),
            *tiny_overrides(data_root, ckpt, cache), *extra]


def _interrupted(assets, run: Path) -> dict[str, str]:
    """Start the tiny run and kill it after epoch 1; return the sha256 of every file it left."""
    data_root, ckpt, cache = assets
    with pytest.raises(Interrupt):
        run_trial(tiny_cfg(data_root, ckpt, cache), run, report=interrupt_after(1))
    assert (run / "resume.pt").is_file()
    return {p.name: sha256_file(p) for p in run.iterdir() if p.is_file()}


@pytest.mark.parametrize(("override", "shown"), [("lr=0.05", "lr: 0.001 -> 0.05"),
                                                 ("token_nums=4", "token_nums: 1 -> 4"),
                                                 ("epochs=5", "epochs: 3 -> 5")])
def test_resume_with_a_changed_key_stops_and_names_it(assets, tmp_path, capsys, override, shown):
    run = tmp_path / "run"
    before = _interrupted(assets, run)
    code = main(_train_args(assets, run, override, "--resume"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert shown in err and "Traceback" not in err
    # nothing of the interrupted run was touched: it can still be resumed unchanged
    assert {p.name: sha256_file(p) for p in run.iterdir() if p.is_file()} == before


def test_result_neutral_keys_may_change_on_resume(assets, finished, tmp_path):
    run = tmp_path / "run"
    _interrupted(assets, run)
    assert main(_train_args(assets, run, "log_every=3", "eval_batch_size=8", "--resume")) == 0
    _, uninterrupted = finished
    assert comparable(read_json(run / "metrics.json")) == comparable(uninterrupted)


def test_resume_of_a_finished_run_with_more_epochs_is_refused(assets, finished, capsys):
    run, metrics = finished
    before = sha256_file(run / "metrics.json")
    code = main(_train_args(assets, run, "epochs=4", "--resume"))
    err = capsys.readouterr().err
    assert code == 2 and "epochs: 3 -> 4" in err
    assert sha256_file(run / "metrics.json") == before


def test_resume_of_a_finished_run_unchanged_says_so(assets, finished, capsys):
    run, metrics = finished
    assert main(_train_args(assets, run, "--resume")) == 0
    out = capsys.readouterr()
    assert "already finished" in out.out + out.err and str(run) in out.out + out.err


def test_resume_checkpoint_on_data_with_another_class_count_is_refused(assets, tmp_path, capsys,
                                                                       write_vtab_json):
    """The config is unchanged (num_classes: null), but the data folder now holds 3 classes."""
    data_root, ckpt, cache = assets
    own = tmp_path / "data"
    shutil.copytree(data_root / TASK, own / TASK)
    run = tmp_path / "run"
    with pytest.raises(Interrupt):
        run_trial(tiny_cfg(own, ckpt, cache), run, report=interrupt_after(1))
    shutil.rmtree(own / TASK)
    rng = np.random.default_rng(0)
    labels = [i % 3 for i in range(64)]
    write_vtab_json(own, TASK, [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in labels], labels,
                    splits={"train800val200": range(48), "test": range(48, 64)})
    code = main(["train", "--dataset", TASK, "--data-root", str(own), "--out", str(run),
                 *tiny_overrides(own, ckpt, cache), "--resume"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "resume.pt" in err and f"{TASK_CLASSES} classes" in err and "has 3" in err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------------------------- synqt eval


def _eval_args(assets, weights: Path, root: Path, name: str, out: Path) -> list[str]:
    _, ckpt, cache = assets
    return ["eval", "--weights", str(weights), "--dataset", name, "--data-root", str(root), "--split", "test",
            "--out", str(out), *tiny_overrides(root, ckpt, cache)]


@pytest.mark.parametrize("classes", [2, 8])
def test_eval_of_weights_on_data_with_another_class_count_is_refused(assets, finished, tmp_path, capsys,
                                                                     write_vtab_json, classes):
    run, _ = finished
    rng = np.random.default_rng(1)
    labels = [i % classes for i in range(16)]
    write_vtab_json(tmp_path / "d", "other", [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in labels],
                    labels, splits={"test": range(16)})
    out = tmp_path / "e.json"
    code = main(_eval_args(assets, run / "trainable.safetensors", tmp_path / "d", "other", out))
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{TASK_CLASSES} classes" in err and f"has {classes}" in err and "trainable.safetensors" in err
    assert not out.exists()


def test_eval_with_another_image_size_is_refused(assets, finished, tmp_path, capsys):
    run, _ = finished
    data_root, _, _ = assets
    code = main([*_eval_args(assets, run / "trainable.safetensors", data_root, TASK, tmp_path / "e.json"),
                 "image_size=32"])
    err = capsys.readouterr().err
    assert code == 2 and "image size 16" in err and "32" in err


def test_eval_on_a_renamed_folder_warns_and_records_it(assets, finished, tmp_path, capsys):
    run, metrics = finished
    data_root, _, _ = assets
    shutil.copytree(data_root / TASK, tmp_path / "d" / "renamed")
    out = tmp_path / "e.json"
    assert main(_eval_args(assets, run / "trainable.safetensors", tmp_path / "d", "renamed", out)) == 0
    result = read_json(out)
    assert result["test_acc"] == pytest.approx(metrics["test_acc"], abs=1e-9)  # the same images
    assert any(TASK in w and "renamed" in w for w in result["warnings"])


def test_resume_on_other_backbone_weights_at_the_same_path_is_refused(assets, tmp_path, capsys):
    """The config names the same checkpoint file, but its bytes changed (a re-download, another model)."""
    import timm
    import torch
    from engine_helpers import TINY_BACKBONE, TINY_KW
    from safetensors.torch import save_file

    data_root, ckpt, cache = assets
    mine = tmp_path / "backbone.safetensors"
    shutil.copy(ckpt, mine)
    run = tmp_path / "run"
    with pytest.raises(Interrupt):
        run_trial(tiny_cfg(data_root, mine, cache), run, report=interrupt_after(1))
    torch.manual_seed(999)
    other = timm.create_model(TINY_BACKBONE, pretrained=False, num_classes=0, **TINY_KW)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(mine))
    code = main(["train", "--dataset", TASK, "--data-root", str(data_root), "--out", str(run),
                 *tiny_overrides(data_root, mine, cache), "--resume"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "resume.pt" in err and "checkpoint_sha256" in err and sha256_file(mine)[:12] in err
