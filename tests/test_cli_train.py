"""`synqt train` from the command line (issue 3): any dataset folder trains, help texts, bad overrides."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from engine_helpers import (  # noqa: F401 - _one_thread_no_progress is an autouse fixture
    TASK,
    TASK_CLASSES,
    TINY_KW,
    _one_thread_no_progress,
    env_one_thread,
    read_json,
    write_tiny_assets,
)

from launcher.cli import main
from synqt.config import dataset_config_path, load_config

NEW_NAME = "my_own_dataset"  # a folder name without a shipped config


@pytest.fixture(scope="module")
def own_dataset(tmp_path_factory):
    """(data_root, backbone checkpoint) with the tiny data under a name no config knows."""
    root = tmp_path_factory.mktemp("cli_assets")
    data_root, ckpt = write_tiny_assets(root)
    own_root = root / "own"
    shutil.copytree(data_root / TASK, own_root / NEW_NAME)
    return own_root, ckpt


def test_train_runs_a_dataset_folder_without_a_shipped_config(own_dataset, tmp_path, capsys):
    data_root, ckpt = own_dataset
    assert dataset_config_path(NEW_NAME) is None
    run = tmp_path / "run"
    code = main([
        "train", "--dataset", NEW_NAME, "--data-root", str(data_root), "--checkpoint", str(ckpt), "--out", str(run),
        "backbone=vit_tiny_patch16_224", *[f"backbone_kwargs.{k}={v}" for k, v in TINY_KW.items()], "epochs=2",
        "warmup_epochs=1", "batch_size=16", "eval_every=1", f"cache_dir={tmp_path / 'cache'}", "device=cpu",
    ])
    assert code == 0, capsys.readouterr().err
    metrics = read_json(run / "metrics.json")
    assert metrics["status"] == "ok" and metrics["dataset"] == NEW_NAME
    assert [h["epoch"] for h in metrics["eval_history"]] == [1, 2]
    # the class count came from the lists (the config leaves it null) and sized the classifier
    saved = load_config([run / "config.yaml"], base=False)
    assert saved.num_classes is None and saved.epochs == 2 and saved.backbone_kwargs == TINY_KW
    assert saved.checkpoint == str(ckpt)
    assert read_json(run / "trainable.json")["num_classes"] == TASK_CLASSES


HELP_COMMANDS = [[], ["train"], ["eval"], ["sweep"], ["aggregate"], ["status"], ["demo"], ["bench"], ["data"],
                 ["data", "check"], ["data", "synthetic"], ["slurm"], ["slurm", "array"], ["slurm", "task"]]


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "synqt")
def test_every_help_text_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "examples" in capsys.readouterr().out.lower(), f"`synqt {' '.join(command)} --help` shows no examples"


def test_unknown_override_key_exits_2_and_names_it(own_dataset, tmp_path, capsys):
    data_root, _ = own_dataset
    code = main(["train", "--dataset", NEW_NAME, "--data-root", str(data_root), "--out", str(tmp_path / "r"),
                 "epochz=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert "epochz" in err and "unknown key" in err and "epochs" in err  # the suggestion
    assert not (tmp_path / "r").exists()


def test_mistyped_override_value_exits_2_and_names_key_and_value(own_dataset, tmp_path, capsys):
    data_root, _ = own_dataset
    code = main(["train", "--dataset", NEW_NAME, "--data-root", str(data_root), "--out", str(tmp_path / "r"),
                 "batch_size=lots"])
    err = capsys.readouterr().err
    assert code == 2 and "batch_size" in err and "lots" in err


def test_console_script_exit_status_for_a_bad_override(own_dataset, tmp_path):
    """The real process: `python -m launcher.cli train ... epochz=3` exits with status 2."""
    data_root, _ = own_dataset
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "train", "--dataset", NEW_NAME, "--data-root", str(data_root),
         "--out", str(tmp_path / "r"), "epochz=3"],
        capture_output=True, text=True, env=env_one_thread(), timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "epochz" in proc.stderr


def test_synqt_train_killed_with_sigkill_resumes_to_the_uninterrupted_result(own_dataset, tmp_path):
    """A real `synqt train` process is SIGKILLed after its epoch-2 checkpoint; `--resume` finishes it equal."""
    import os
    import signal
    import time

    from engine_helpers import comparable, max_weight_diff

    data_root, ckpt = own_dataset
    args = ["--dataset", NEW_NAME, "--data-root", str(data_root), "--checkpoint", str(ckpt),
            "backbone=vit_tiny_patch16_224", *[f"backbone_kwargs.{k}={v}" for k, v in TINY_KW.items()],
            "epochs=25", "warmup_epochs=2", "batch_size=16", "eval_every=10", f"cache_dir={tmp_path / 'cache'}",
            "device=cpu"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "train", *args, "--out", str(killed)],
                            env=env_one_thread(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if read_json(killed / "progress.json")["epoch"] >= 2:
                    break
            except (FileNotFoundError, ValueError, KeyError):
                pass
            time.sleep(0.02)
        assert proc.poll() is None, f"the trial ended before it could be killed: {proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert (killed / "resume.pt").is_file() and not (killed / "metrics.json").exists()

    assert main(["train", *args, "--out", str(killed), "--resume"]) == 0
    straight = tmp_path / "straight"
    assert main(["train", *args, "--out", str(straight)]) == 0
    assert comparable(read_json(killed / "metrics.json")) == comparable(read_json(straight / "metrics.json"))
    assert max_weight_diff(killed, straight) <= 1e-6
