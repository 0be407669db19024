"""Shared use of one node and one storage path by several Unix users (issue 14 item 4).

The second and third users are real Unix accounts (``useradd``); a forked copy of this test process
drops to their uid/gids with setgroups/setgid/setuid (what ``setpriv``/``runuser`` do), so every open,
mkdir and chmod below is checked by the kernel against that user. (``runuser python ...`` itself cannot
work here: the interpreter lives under root's mode-700 home.)
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from engine_helpers import (  # noqa: F401 - _one_thread_no_progress is an autouse fixture
    TASK,
    _one_thread_no_progress,
    tiny_cfg,
    write_tiny_assets,
)

LAB_GROUP = "synqt-lab"
USERS = ("synqt-labmate", "synqt-labmate2")


@pytest.fixture(scope="module")
def lab_users() -> tuple[str, str]:
    """Two real accounts in a common group (created once; left on the machine for later runs)."""
    if os.geteuid() != 0:
        pytest.fail("these tests create Unix users and need root (CI runs as root)")
    try:
        grp.getgrnam(LAB_GROUP)
    except KeyError:
        subprocess.run(["groupadd", LAB_GROUP], check=True)
    for user in USERS:
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "-G", LAB_GROUP, user],
                           check=True)
    return USERS


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder every user can enter (pytest's own tmp folders are mode 700)."""
    path = Path(tempfile.mkdtemp(prefix="synqt-shared-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    before = os.umask(0o022)
    os.umask(before)
    yield lambda mask: os.umask(mask)
    os.umask(before)


def as_user(user: str, fn: Callable[..., Any], *args: Any, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``fn(*args)`` in a forked child as ``user``; returns {"ok", "value" | "error", "log"}."""
    pw = pwd.getpwnam(user)
    from PIL import Image

    Image.init()  # the child cannot import PIL's plugins from root's home once it is another user
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        records: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
        logging.getLogger().addHandler(handler)
        try:
            os.setgroups(os.getgrouplist(user, pw.pw_gid))
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            os.environ.update(env or {})
            out = {"ok": True, "value": fn(*args), "log": records}
        except BaseException:  # noqa: BLE001 - everything goes back to the parent
            out = {"ok": False, "error": traceback.format_exc(), "log": records}
        os.write(write, json.dumps(out, default=str).encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 1 << 16):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))


def _load(data_root: str, split: str, cache_dir: str | None) -> dict[str, Any]:
    """In the child: decode a split through the cache; the array's checksum and where it came from."""
    from synqt.data.images import load_images
    from synqt.data.splits import read_split

    images, labels = load_images(read_split(data_root, TASK, split), 16, cache_dir=cache_dir)
    return {"sum": int(np.asarray(images, dtype=np.int64).sum()), "n": int(len(labels)),
            "memmap": isinstance(images, np.memmap), "file": getattr(images, "filename", None)}


def _reference_sum(data_root: Path, split: str) -> int:
    from synqt.data.images import load_images
    from synqt.data.splits import read_split

    images, _ = load_images(read_split(data_root, TASK, split), 16, use_cache=False)
    return int(images.astype(np.int64).sum())


# ------------------------------------------------------------------------------------------------- umask


@pytest.mark.parametrize("mask", [0o002, 0o022, 0o077])
def test_every_file_of_a_run_honours_the_umask(shared_dir, umask, mask):
    from synqt.training import run_trial

    data_root, ckpt = write_tiny_assets(shared_dir)
    umask(mask)
    run = shared_dir / "runs" / "r"
    cache = shared_dir / "cache"
    metrics = run_trial(tiny_cfg(data_root, ckpt, cache, epochs=1, eval_every=1), run)
    assert metrics["status"] == "ok"
    want = 0o666 & ~mask
    files = [p for p in [*run.iterdir(), *cache.iterdir()] if p.is_file()]
    assert {p.name for p in files} >= {"metrics.json", "config.yaml", "trainable.safetensors", "trainable.json"}
    wrong = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files if stat.S_IMODE(p.stat().st_mode) != want}
    assert not wrong, f"expected {oct(want)} under umask {oct(mask)}"


def test_a_labmate_reads_a_run_on_a_shared_storage_path(shared_dir, lab_users):
    from synqt.training import run_trial

    data_root, ckpt = write_tiny_assets(shared_dir)
    run = shared_dir / "runs" / "r"
    metrics = run_trial(tiny_cfg(data_root, ckpt, shared_dir / "cache", epochs=1, eval_every=1), run)
    got = as_user(lab_users[0], lambda: json.loads((run / "metrics.json").read_text())["test_acc"])
    assert got["ok"], got.get("error")
    assert got["value"] == metrics["test_acc"]


# ------------------------------------------------------------------------------------------------- caches


def test_default_cache_is_per_user(shared_dir, lab_users, monkeypatch):
    """Today's default, <tmp>/synqt-cache, is made 755 by the first user: the second got PermissionError."""
    data_root, _ = write_tiny_assets(shared_dir)
    monkeypatch.delenv("SYNQT_CACHE_DIR", raising=False)
    monkeypatch.delenv("SLURM_TMPDIR", raising=False)
    node_tmp = shared_dir / "tmp"
    node_tmp.mkdir()
    node_tmp.chmod(0o1777)  # like /tmp
    monkeypatch.setattr(tempfile, "tempdir", str(node_tmp))  # the node's temp folder, for both users
    mine = _load(str(data_root), "test", None)
    theirs = as_user(lab_users[0], _load, str(data_root), "test", None)
    assert theirs["ok"], theirs.get("error")
    expected = _reference_sum(data_root, "test")
    assert mine["sum"] == theirs["value"]["sum"] == expected
    assert mine["memmap"] and theirs["value"]["memmap"]  # both really cached
    mine_dir, their_dir = Path(mine["file"]).parent, Path(theirs["value"]["file"]).parent
    assert mine_dir != their_dir
    assert their_dir.stat().st_uid == pwd.getpwnam(lab_users[0]).pw_uid


@pytest.mark.parametrize("file_mode", [0o644, 0o600])
def test_a_cache_owned_by_someone_else_is_a_warning_not_a_traceback(shared_dir, lab_users, file_mode):
    data_root, _ = write_tiny_assets(shared_dir)
    cache = shared_dir / "rootcache"
    _load(str(data_root), "test", str(cache))  # root's cache, folder 755
    for p in cache.iterdir():
        p.chmod(file_mode)
    for split in ("test", "train800val200"):  # one entry exists (maybe unreadable), one must be built
        got = as_user(lab_users[0], _load, str(data_root), split, str(cache))
        assert got["ok"], got.get("error")
        assert got["value"]["sum"] == _reference_sum(data_root, split)
        if file_mode == 0o600 or split == "train800val200":
            assert any(str(cache) in line and "cache" in line for line in got["log"]), got["log"]


def test_group_shared_cache_by_option(shared_dir, lab_users):
    """An admin-made group folder (setgid, 2775) with SYNQT_CACHE_SHARED=1: each labmate builds entries
    the other reuses, and nobody's files block anybody."""
    data_root, _ = write_tiny_assets(shared_dir)
    cache = shared_dir / "groupcache"
    cache.mkdir()
    os.chown(cache, -1, grp.getgrnam(LAB_GROUP).gr_gid)
    cache.chmod(0o2775)
    env = {"SYNQT_CACHE_SHARED": "1"}
    first = as_user(lab_users[0], _load, str(data_root), "test", str(cache), env=env)
    second = as_user(lab_users[1], _load, str(data_root), "train800val200", str(cache), env=env)
    again = as_user(lab_users[1], _load, str(data_root), "test", str(cache), env=env)
    for got in (first, second, again):
        assert got["ok"], got.get("error")
        assert got["value"]["memmap"] and not any("without the cache" in line for line in got["log"]), got["log"]
    assert again["value"]["file"] == first["value"]["file"]  # labmate 2 reused labmate 1's entry
    owners = {pwd.getpwuid(p.stat().st_uid).pw_name for p in cache.iterdir() if p.suffix == ".npy"}
    assert owners == set(lab_users)
    for p in cache.iterdir():
        assert p.stat().st_gid == grp.getgrnam(LAB_GROUP).gr_gid
        assert stat.S_IMODE(p.stat().st_mode) & 0o060 == 0o060, (p.name, oct(p.stat().st_mode))
