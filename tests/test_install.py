"""The package installs like a package: a wheel built from the tree, installed into a fresh virtual
environment (not editable, no checkout on the path), runs from an empty folder outside the checkout.

The venv sees the system's site-packages (torch, Ray, ... are not downloaded again) and the wheel is
installed with ``--no-deps``; the test checks that ``synqt`` and ``launcher`` are imported from the
venv's copy, never from this checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _copy_tree(dest: Path) -> Path:
    """Copy the files git tracks or would track (symbolic links kept as links) into ``dest``.

    Building from a copy keeps setuptools' build/ and *.egg-info out of the checkout and proves the
    wheel needs nothing git ignores.
    """
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True)
    for rel in filter(None, out.stdout.decode().split("\0")):
        src = REPO / rel
        if not src.exists() and not src.is_symlink():  # deleted but not yet committed
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            target.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, target)
    return dest


DROP_ENV = ("PYTHONPATH", "SYNQT_CONFIG_DIR", "VIRTUAL_ENV", "SYNQT_CACHE_DIR")


def _env(venv: Path, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["SYNQT_DEMO_DIR"] = str(cache)  # where synqt demo finds its assets
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_wheel_installs_and_runs_the_demo_outside_the_checkout(tmp_path, demo_assets):
    data_root, ckpt = demo_assets
    src = _copy_tree(tmp_path / "src")
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(dist), str(src)], check=True, cwd=tmp_path)
    (wheel,) = dist.glob("synqt_launcher-*.whl")

    # The wheel carries the configs and the sbatch scripts as package data, byte for byte.
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for inner, outer in (("synqt/configs/base.yaml", "configs/base.yaml"),
                             ("synqt/configs/sweeps/vtab1k.yaml", "configs/sweeps/vtab1k.yaml"),
                             ("synqt/configs/vtab/cifar.yaml", "configs/vtab/cifar.yaml"),
                             ("launcher/sbatch/vtab.sh", "slurm/vtab.sh")):
            assert inner in names, f"{inner} missing from {wheel.name}"
            assert zf.read(inner) == (REPO / outer).read_bytes()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall",
                    str(wheel)], check=True)

    # The demo assets (synthetic data + pre-trained tiny backbone) come from the test cache, as the demo
    # would build them on first use.
    cache = tmp_path / "cache"
    cache.mkdir()
    for p in (Path(ckpt), Path(ckpt).with_suffix(".json")):
        if p.exists():
            shutil.copy2(p, cache / p.name)
    (cache / Path(data_root).name).symlink_to(data_root)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _env(venv, cache)

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True, timeout=900)
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    where = run(str(py), "-c", "import synqt, launcher, synqt.config as c; "
                "print(synqt.__file__); print(launcher.__file__); print(c.config_dir())").stdout.split()
    site = run(str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    for path in where:
        assert Path(path).resolve().is_relative_to(Path(site).resolve()), (path, site)
        assert not Path(path).resolve().is_relative_to(REPO.resolve()), path

    synqt = str(venv / "bin" / "synqt")
    version = run(synqt, "--version").stdout.strip()
    assert version == "synqt 0.1.0", version  # no git commit: the wheel is not a checkout

    # A shipped sweep by its short name, and the sbatch template written where the user chooses.
    dry = run(synqt, "sweep", "vtab1k", "--dry-run").stdout
    assert "stage final: 19 trial(s)" in dry and "configs/sweeps/vtab1k.yaml" in dry
    assert str(Path(site).resolve()) in dry or site in dry
    run(synqt, "slurm", "script", "my_job.sh")
    assert (work / "my_job.sh").read_bytes() == (REPO / "slurm" / "vtab.sh").read_bytes()
    assert os.access(work / "my_job.sh", os.X_OK)

    # A CI-sized demo: the demo command (its sweep, Ray, workers) with one task, one point, one epoch.
    out = work / "demo-out"
    run(synqt, "demo", "--out", str(out), "datasets=[syn_colour_shape]", "grid.lr=[3e-3]", "epochs=1",
        "warmup_epochs=0", "eval_every=1", "max_concurrent=1")
    sweep = out / "demo"
    results = json.loads((sweep / "results.json").read_text())
    assert results["datasets"]["syn_colour_shape"]["status"] == "ok"
    (metrics_path,) = (sweep / "runs").glob("*/metrics.json")
    metrics = json.loads(metrics_path.read_text())
    assert metrics["status"] == "ok"
    assert metrics["versions"]["synqt"] == "0.1.0" and metrics["versions"]["git_commit"] is None
    n_train = len(json.loads((Path(data_root) / "syn_colour_shape" / "train800val200.json").read_text()))
    assert metrics["provenance"]["train_data"]["image_formats"] == {"PNG": n_train}
    for name in ("runs.csv", "results.csv", "table.md", "table.tex"):
        assert (sweep / name).is_file(), name
    assert not list(work.glob("synqt-demo*")) and not (work / "configs").exists()
