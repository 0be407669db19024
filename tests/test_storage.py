"""Storage faults never cost work or truth (issue 19, kinds 3-5).

- Storage that refuses writes: every folder a command writes is checked before data, backbone or
  cluster (a real read-only bind mount; a real full tmpfs); a write that fails mid-run names the file,
  the free space and the key, marks the run failed, and never replaces a good file with a half-written one.
- Broken intermediate files: each file read back from a run or sweep folder, truncated / garbage / empty,
  is named and moved aside (``<name>.broken-<time>``), and the run goes on (a sweep always finishes).
- Curves after a resume: a trial killed mid-epoch and resumed has exactly one point per step per tag
  (TensorBoard's own EventAccumulator), the steps computed from the epoch and batch counts.

Mounts need root (CI runs as root); elsewhere those tests skip, saying so.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_helpers import (  # noqa: F401 - _one_thread_no_progress is an autouse fixture
    N_TRAIN,
    N_VAL,
    TASK,
    _one_thread_no_progress,
    comparable,
    event_accumulator,
    interrupt_after,
    quiet_single_thread,
    read_json,
    tiny_cfg,
    tiny_overrides,
    tiny_sweep_overrides,
    write_tiny_assets,
)

from synqt.training import run_trial

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="mounting a read-only bind mount or a small tmpfs needs root "
                                                 "(CI runs as root)")
STEPS_PER_EPOCH = math.ceil((N_TRAIN + N_VAL) / 16)  # paper protocol trains on train800val200, batch 16


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("storage_assets")
    data_root, ckpt = write_tiny_assets(root)
    return data_root, ckpt, root / "cache"


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """The uninterrupted 3-epoch run: (cfg, run_dir, metrics)."""
    data_root, ckpt, cache = assets
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    cfg = tiny_cfg(data_root, ckpt, cache)
    with quiet_single_thread():
        metrics = run_trial(cfg, run_dir, resume=False)
    return cfg, run_dir, metrics


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A real read-only file system: a bind mount of a writable folder, remounted ro."""
    if not ROOT:
        pytest.skip("a read-only bind mount needs root (CI runs as root)")
    src, mnt = tmp_path / "ro_src", tmp_path / "ro"
    (src / "existing").mkdir(parents=True)
    mnt.mkdir()
    _mount("--bind", str(src), str(mnt))
    try:
        _mount("-o", "remount,ro,bind", str(mnt))
        yield mnt
    finally:
        _umount(mnt)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs (a disk that fills up)."""
    if not ROOT:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    _mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt))
    try:
        yield mnt
    finally:
        _umount(mnt)


def _fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` until about ``leave`` bytes are free (tmpfs counts whole 4 KiB pages)."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    filler.write_bytes(b"\0" * max(0, free - leave))
    return filler


def _synqt(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SYNQT_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x13\x37 not the file \xff" * 40,
                      "empty": b""}[how])


DAMAGE = ("truncated", "garbage", "empty")


def _set_aside(folder: Path, name: str) -> list[Path]:
    return sorted(folder.glob(f"{name}.broken-*"))


# ============================================================================================ kind 5: curves


def _steps(run_dir: Path) -> dict[str, list[int]]:
    acc = event_accumulator(run_dir)
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_trial_killed_mid_epoch_and_resumed_logs_each_step_once(reference, tmp_path):
    """Killed at step 6 (mid-epoch 2) after the epoch-1 checkpoint, resumed: steps 5-6 were logged by both
    processes; the reader must see one point per step for every tag, HParams session included."""
    from synqt.run import progress

    cfg, _, ref_metrics = reference
    run = tmp_path / "run"

    def kill_at_step_6(event) -> None:
        if isinstance(event, progress.Step) and event.step == STEPS_PER_EPOCH + 2:
            raise KeyboardInterrupt("simulated kill mid-epoch 2")

    with progress.listening(kill_at_step_6), pytest.raises(KeyboardInterrupt):
        run_trial(cfg, run, resume=True)
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    metrics = run_trial(cfg, run, resume=True)
    assert metrics["provenance"]["resumed_after_epoch"] == 1
    assert comparable(metrics) == comparable(ref_metrics)

    total = cfg.epochs * STEPS_PER_EPOCH  # 3 epochs x 4 steps
    epoch_ends = [e * STEPS_PER_EPOCH for e in range(1, cfg.epochs + 1)]
    evals = [e * STEPS_PER_EPOCH for e in range(1, cfg.epochs + 1) if e % cfg.eval_every == 0 or e == cfg.epochs]
    steps = _steps(run)
    assert steps["train/loss"] == steps["train/lr"] == list(range(1, total + 1))  # log_every=1
    assert steps["train/epoch"] == steps["perf/images_per_s"] == epoch_ends
    assert steps["eval/test_acc"] == evals
    for tag, got in steps.items():
        assert len(got) == len(set(got)), f"{tag}: {got}"
    acc = event_accumulator(run)
    session = [t for t in acc.Tags()["tensors"] if t.endswith("session_start_info")]
    assert session and all(len(acc.Tensors(t)) == 1 for t in session)


# ========================================================================================= kind 4: broken files


@pytest.fixture(scope="module")
def interrupted(reference, tmp_path_factory):
    """A run stopped after its epoch-2 checkpoint (resume.pt, progress.json, failed metrics.json), kept pristine."""
    cfg, _, _ = reference
    run = tmp_path_factory.mktemp("interrupted") / "run"
    with quiet_single_thread(), pytest.raises(RuntimeError):
        run_trial(cfg, run, report=interrupt_after(2))
    assert (run / "resume.pt").is_file()
    return run


@pytest.mark.parametrize("how", DAMAGE)
def test_train_resume_with_a_broken_resume_pt_names_it_and_restarts_from_epoch_0(reference, interrupted, assets,
                                                                                   tmp_path, how, caplog):
    """`synqt train --resume` on a resume.pt cut in half / garbage / empty: today a raw PytorchStreamReader
    error on every retry; now the file is named, moved aside, and the run trains from epoch 0 to the
    uninterrupted result."""
    from launcher.cli import main

    cfg, ref_dir, ref_metrics = reference
    data_root, ckpt, cache = assets
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    _damage(run / "resume.pt", how)
    code = main(["train", "--dataset", TASK, "--data-root", str(data_root), *tiny_overrides(data_root, ckpt, cache),
                 "--out", str(run), "--resume"])
    assert code == 0
    moved = _set_aside(run, "resume.pt")
    assert len(moved) == 1 and not (run / "resume.pt").exists()
    said = [r.getMessage() for r in caplog.records if "resume.pt" in r.getMessage() and "broken" in r.getMessage()]
    assert len(said) == 1 and "restarts from epoch 0" in said[0] and str(run / "resume.pt") in said[0], said
    metrics = read_json(run / "metrics.json")
    assert metrics["provenance"]["resumed_after_epoch"] is None
    assert comparable(metrics) == comparable(json.loads(json.dumps(ref_metrics)))


def test_a_broken_evaluation_snapshot_sets_the_resume_state_aside(reference, interrupted, tmp_path, caplog):
    """Deferred evaluation: resume.pt lists the epoch-2 weight snapshot to score at the end; a cut snapshot
    makes that resume state unusable, so both are moved aside and the run restarts from epoch 0."""
    cfg, _, ref_metrics = reference
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    snap = run / "eval_snapshots" / "epoch00002.safetensors"
    _damage(snap, "truncated")
    metrics = run_trial(cfg, run, resume=True)
    assert len(_set_aside(snap.parent, snap.name)) == 1 and len(_set_aside(run, "resume.pt")) == 1
    assert metrics["provenance"]["resumed_after_epoch"] is None
    assert comparable(metrics) == comparable(ref_metrics)


@pytest.mark.parametrize("name", ["metrics.json", "progress.json", "config.yaml"])
def test_a_broken_run_state_file_is_set_aside_and_the_run_resumes(reference, interrupted, tmp_path, name, caplog):
    """A cut metrics.json / progress.json / config.yaml beside a good resume.pt: named once, moved aside, and
    the run continues from its epoch-2 checkpoint to the uninterrupted result."""
    cfg, _, ref_metrics = reference
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    _damage(run / name, "truncated")
    metrics = run_trial(cfg, run, resume=True)
    assert len(_set_aside(run, name)) == 1
    assert [r for r in caplog.records if name in r.getMessage() and "broken" in r.getMessage()]
    assert metrics["provenance"]["resumed_after_epoch"] == 2
    assert comparable(metrics) == comparable(ref_metrics)
    assert (run / "config.yaml").is_file()


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("name", ["metrics.json", "progress.json"])
def test_run_state_json_readers_name_each_damage(tmp_path, name, how):
    from synqt.run import rundir

    run = tmp_path / "run"
    run.mkdir()
    (run / name).write_text(json.dumps({"dataset": TASK, "status": "ok", "epoch": 1, "epochs": 3}) + "\n")
    _damage(run / name, how)
    rec = rundir.read_run(run)  # readers name it, never move it
    assert rec.error and str(run / name) in rec.error
    assert rec.state == ("broken" if name == "metrics.json" else "running")
    assert (run / name).exists()
    moved = rundir.set_aside_broken_state(run)  # a trainer about to run it: the rule
    assert [p.name.split(".broken-")[0] for p in moved] == [name] and not (run / name).exists()


@pytest.mark.parametrize("how", DAMAGE)
def test_config_yaml_reader_sets_a_damaged_one_aside(reference, tmp_path, how):
    from synqt.config import save_config
    from synqt.weights.compat import saved_config

    cfg, _, _ = reference
    run = tmp_path / "run"
    save_config(cfg, run / "config.yaml")
    assert saved_config(run)["epochs"] == cfg.epochs
    _damage(run / "config.yaml", how)
    assert saved_config(run) is None  # not half a config that reads as "every other key changed"
    assert len(_set_aside(run, "config.yaml")) == 1


@pytest.mark.parametrize("how", DAMAGE)
def test_deepspeed_checkpoint_check_names_each_damage(tmp_path, how):
    import torch

    from synqt.training.deepspeed import ds_checkpoint_problem

    ckpt = tmp_path / "ds_checkpoint"
    (ckpt / "epoch0001").mkdir(parents=True)
    (ckpt / "latest").write_text("epoch0001")
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"w": torch.arange(1000.0)}, ckpt / "epoch0001" / name)
    assert ds_checkpoint_problem(ckpt) is None
    _damage(ckpt / "epoch0001" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", how)
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in ds_checkpoint_problem(ckpt)
    (ckpt / "latest").write_text("")
    assert "latest" in ds_checkpoint_problem(ckpt)


@pytest.mark.parametrize("how", DAMAGE)
def test_a_broken_plan_json_is_set_aside_and_rewritten(assets, tmp_path, how, caplog):
    from launcher.plan.planfile import set_aside_broken_plan, write_plan
    from launcher.plan.schema import load_sweep
    from launcher.plan.trials import plan_trials
    from synqt.run import rundir

    data_root, ckpt, _ = assets
    sweep = load_sweep("configs/sweeps/ci.yaml", tiny_sweep_overrides(data_root, ckpt, tmp_path / "s"))
    write_plan(sweep, plan_trials(sweep), False)
    _damage(sweep.sweep_dir / "plan.json", how)
    assert set_aside_broken_plan(sweep)
    assert len(_set_aside(sweep.sweep_dir, "plan.json")) == 1 and not (sweep.sweep_dir / "plan.json").exists()
    assert any("plan.json" in r.getMessage() and "written again" in r.getMessage() for r in caplog.records)
    assert rundir.read_plan(sweep.sweep_dir) is None


@pytest.mark.parametrize("how", DAMAGE)
def test_a_broken_decoded_image_cache_entry_is_set_aside_and_rebuilt(assets, tmp_path, how):
    from synqt.data.images import cache_paths, load_images
    from synqt.data.splits import read_split

    data_root, _, _ = assets
    split = read_split(data_root, TASK, "test")
    cache = tmp_path / "cache"
    good, labels = load_images(split, 16, cache_dir=cache)
    good = good.copy()
    files = cache_paths(split, 16, "bicubic", cache)
    _damage(files["images"], how)
    images, labels2 = load_images(split, 16, cache_dir=cache)
    assert (images == good).all() and (labels2 == labels).all()
    assert len(_set_aside(cache, files["images"].name)) == 1


def test_a_sweep_with_a_broken_resume_pt_finishes(assets, tmp_path, caplog):
    """A sweep's unfinished run holds a cut resume.pt (a partial copy) and a cut progress.json: `synqt sweep
    --resume` used to fail it on every retry (exit 3); now each is named once, moved aside, the run trains
    from epoch 0 and the sweep finishes (exit 0)."""
    from launcher.cli import main

    data_root, ckpt, _ = assets
    storage = tmp_path / "storage"
    args = ["sweep", "configs/sweeps/ci.yaml", *tiny_sweep_overrides(data_root, ckpt, storage), "grid.lr=[1.0e-3]",
            "--sequential", "-q"]
    assert main(args) == 0
    (run,) = [d for d in storage.glob("*/runs/*") if d.is_dir()]
    # make it an unfinished run with a damaged epoch checkpoint, as a storage fault mid-sweep leaves it
    (run / "metrics.json").unlink()
    (run / "resume.pt").write_bytes((run / "trainable.safetensors").read_bytes()[:3000])
    (run / "progress.json").write_text('{"epoch": 1, "epo')
    caplog.clear()
    assert main([*args, "--resume"]) == 0
    assert read_json(run / "metrics.json")["status"] == "ok"
    assert len(_set_aside(run, "resume.pt")) == 1 and len(_set_aside(run, "progress.json")) == 1
    said = [r.getMessage() for r in caplog.records if f"{run / 'resume.pt'} is broken" in r.getMessage()]
    assert len(said) == 1, said


# ======================================================================================= kind 3: refused writes


@needs_root
def test_train_out_on_a_read_only_mount_is_refused_before_data(read_only_dir, assets, capsys):
    """The data root does not exist: the storage refusal must come first (today: data loaded, then Errno 30)."""
    from launcher.cli import main

    _, ckpt, cache = assets
    out = read_only_dir / "existing" / "run"
    code = main(["train", "--dataset", TASK, "--data-root", str(read_only_dir / "no-such-data"),
                 *tiny_overrides(Path("/nowhere"), ckpt, cache), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--out" in err and str(out) in err and "Read-only file system" in err
    assert "Traceback" not in err and not out.exists()


@needs_root
def test_sweep_storage_path_on_a_read_only_mount_is_refused_before_data(read_only_dir, assets, capsys):
    from launcher.cli import main

    _, ckpt, _ = assets
    code = main(["sweep", "configs/sweeps/ci.yaml",
                 *tiny_sweep_overrides(read_only_dir / "no-such-data", ckpt, read_only_dir / "runs"), "--sequential"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "storage_path" in err and str(read_only_dir) in err and "Read-only file system" in err


@needs_root
@pytest.mark.parametrize("command", ["aggregate", "eval", "compare", "bench", "data synthetic", "slurm script",
                                     "demo", "slurm task"])
def test_every_output_option_on_a_read_only_mount_is_refused(read_only_dir, assets, reference, command, capsys):
    """Each command that writes files: exit 2 naming its option or key, the folder and the reason, before it
    reads data or builds anything."""
    from launcher.cli import main

    data_root, ckpt, _ = assets
    _, ref_dir, _ = reference
    ro = read_only_dir / "existing"
    argv, key = {
        "aggregate": (["aggregate", str(ref_dir.parent), "--out", str(ro / "report")], "--out"),
        "eval": (["eval", "--weights", str(ref_dir / "trainable.safetensors"), "--out", str(ro)], "--out"),
        "compare": (["compare", str(ref_dir.parent), str(ref_dir.parent), "--out", str(ro / "cmp")], "--out"),
        "bench": (["bench", "--json", str(ro / "bench.json"), "--steps", "1"], "--json"),
        "data synthetic": (["data", "synthetic", str(ro / "synthetic")], "root"),
        "slurm script": (["slurm", "script", str(ro)], "destination"),
        "demo": (["demo", "--out", str(ro / "demo")], "--out"),
        "slurm task": (["slurm", "task", "configs/sweeps/ci.yaml", "0",
                        *tiny_sweep_overrides(data_root, ckpt, ro / "runs")], "storage_path"),
    }[command]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert key in err and str(ro) in err and "Read-only file system" in err, err
    assert list(ro.iterdir()) == []


@needs_root
def test_a_full_disk_keeps_the_good_file_and_names_file_space_and_key(small_disk):
    from synqt.storage import WriteFailed, atomic_write_bytes, atomic_write_json, check_writable

    run = small_disk / "run"
    check_writable(run, "--out")
    atomic_write_json(run / "metrics.json", {"status": "ok", "val_acc": 91.5})
    good = (run / "metrics.json").read_bytes()
    _fill(small_disk, 8192)
    with pytest.raises(WriteFailed) as info:
        atomic_write_bytes(run / "metrics.json", b"x" * 100_000)
    text = str(info.value)
    assert str(run / "metrics.json") in text and "No space left on device" in text and "free" in text
    assert "--out" in text and info.value.errno == 28
    assert (run / "metrics.json").read_bytes() == good  # never half a file in place of a good one
    assert [p.name for p in run.iterdir()] == ["metrics.json"]  # no temporary file left behind


@needs_root
def test_train_on_a_disk_that_fills_mid_run_names_the_file_and_marks_the_run_failed(small_disk, assets, reference):
    """resume.pt (the largest write) does not fit, a small metrics.json still does: exit 3, one error line
    naming resume.pt, the free space and --out, no chained tracebacks, metrics.json says failed and why."""
    cfg, ref_dir, _ = reference
    data_root, ckpt, cache = assets
    out = small_disk / "run"
    need = len((ref_dir / "trainable.safetensors").read_bytes())  # the branch; resume.pt adds 2 optimizer moments
    _fill(small_disk, 3 * need // 2)
    proc = _synqt("train", "--dataset", TASK, "--data-root", str(data_root), *tiny_overrides(data_root, ckpt, cache),
                  "--out", str(out), cwd=Path.cwd())
    assert proc.returncode == 3, proc.stderr[-3000:]
    err = proc.stderr
    assert "Traceback" not in err and "No space left on device" in err
    line = next(ln for ln in err.splitlines() if "error:" in ln)
    assert str(out / "resume.pt") in line and "free" in line and "--out" in line, line
    metrics = read_json(out / "metrics.json")
    assert metrics["status"] == "failed" and "resume.pt" in metrics["error"]
    assert not list(out.glob(".*.tmp"))
