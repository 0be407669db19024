"""Split leaks in `synqt data check` and the sweep pre-flight: duplicates within a split, test images in a
training split, val200 images in train800 — by file (every spelling of one path) and by decoded pixels.

Every dataset here is built by the test from tiny random images, so each expected count is the number of
entries the test wrote twice, not a number read from the code under test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launcher.run import commands
from synqt.errors import DataError

REPO = Path(__file__).resolve().parent.parent
CI = REPO / "configs" / "sweeps" / "ci.yaml"
# where each layout's listed paths are relative to, inside the dataset folder
BASE = {"vtab_json": "images", "vtab_txt": ".", "fgvc_json": "images"}


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The pixel-hash cache of each test in its own folder (a cache hit never hides what a test wrote)."""
    monkeypatch.setenv("SYNQT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _pixels(i: int, size: int = 12) -> np.ndarray:
    return np.random.default_rng(1000 + i).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _save(path: Path, pixels: np.ndarray, fmt: str = "PNG", **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt, **kw)


def make_dataset(root: Path, name: str, layout: str, lists: dict[str, list[str]], n_images: int = 30,
                 size: int = 12) -> Path:
    """``n_images`` distinct random images ``img/NNN.png`` and the list files ``lists`` (list -> listed paths,
    labels 0/1 alternating) in ``layout``: vtab_json / fgvc_json paths relative to images/, vtab_txt to the
    dataset folder."""
    layout = layout.split("-")[0]
    ds = root / name
    base = ds / BASE[layout]
    for i in range(n_images):
        _save(base / f"img/{i:03d}.png", _pixels(i, size))
    for list_name, paths in lists.items():
        labelled = [(p, k % 2) for k, p in enumerate(paths)]
        if layout == "vtab_json":
            text = json.dumps([{p: lab} for p, lab in labelled])
        elif layout == "vtab_txt":
            text = "".join(f"{p} {lab}\n" for p, lab in labelled)
        else:
            assert len({p for p, _ in labelled}) == len(labelled), "a JSON object cannot hold a key twice"
            text = json.dumps(dict(labelled))
        ext = ".txt" if layout == "vtab_txt" else ".json"
        (ds / f"{list_name}{ext}").write_text(text)
    return ds


def imgs(idx, prefix: str = "img/") -> list[str]:
    return [f"{prefix}{i:03d}.png" for i in idx]


def noah(prefix: str = "img/") -> dict[str, list[str]]:
    """NOAH-style lists: train800val200 = train800 + val200 (by design: never a leak), test disjoint."""
    t, v = imgs(range(0, 12), prefix), imgs(range(12, 16), prefix)
    return {"train800": t, "val200": v, "train800val200": t + v, "test": imgs(range(16, 26), prefix)}


LAYOUTS = ["vtab_json", "vtab_txt", "vtab_txt-derived", "fgvc_json"]


def clean_lists(layout: str) -> dict[str, list[str]]:
    """Disjoint splits in ``layout``; ``vtab_txt-derived``: train800.txt + val200.txt, train800val200 derived."""
    if layout == "vtab_txt-derived":
        return {k: v for k, v in noah().items() if k != "train800val200"}
    if layout == "vtab_json":  # only train800val200 + test: train800 / val200 derived (first 80 % / rest)
        return {"train800val200": imgs(range(0, 15)), "test": imgs(range(15, 25))}
    if layout == "fgvc_json":
        return {"train": imgs(range(0, 12)), "val": imgs(range(12, 16)), "test": imgs(range(16, 26))}
    return noah("img/")


def check(root: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`synqt data check ROOT ARGS` through the CLI: (exit code, printed report)."""
    from launcher.cli import main

    code = main(["data", "check", str(root), *args])
    return code, capsys.readouterr().out


def leak_count(out: str, pattern: str) -> int:
    """The count of the LEAK line matching ``pattern`` (a regex after the number)."""
    m = re.search(r"(?:LEAK|PROBLEM) (\d+) " + pattern, out)
    assert m, f"no LEAK line matching {pattern!r} in:\n{out}"
    return int(m.group(1))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_clean_dataset_is_all_ok_and_train800val200_overlap_is_by_design(tmp_path, capsys, layout):
    make_dataset(tmp_path, "clean", layout, clean_lists(layout))
    code, out = check(tmp_path, "clean", "--strict", capsys=capsys)
    assert code == 0, out
    assert "LEAK" not in out and "PROBLEM" not in out and out.rstrip().endswith("all OK")
    # vtab_json with all four lists (train800val200 = train800 + val200 listed again): still clean
    if layout == "vtab_json":
        make_dataset(tmp_path, "four", layout, noah())
        code, out = check(tmp_path, "four", "--strict", capsys=capsys)
        assert code == 0 and out.rstrip().endswith("all OK"), out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_test_image_also_in_train800val200(tmp_path, capsys, layout):
    # the 10 test images are the first 10 training images (train800val200 holds train800 + val200)
    lists = clean_lists(layout)
    test = imgs(range(0, 10))
    lists["test"] = test
    make_dataset(tmp_path, "leaky", layout, lists)
    code, out = check(tmp_path, "leaky", capsys=capsys)
    assert code == 0, out  # a warning without --strict
    assert leak_count(out, r"test images also in [\w /]*train") == len(test)
    assert "all OK" not in out and "split leak(s) found" in out
    assert re.search(r"e\.g\. (images/)?img/000\.png \(test\.(json entry|txt line) 1, train", out), out
    code, out = check(tmp_path, "leaky", "--strict", capsys=capsys)
    assert code == 2 and leak_count(out, r"test images also in") == len(test)
    assert "problem(s) found" in out


# one image named twice in a list, under every spelling of its path the lists can hold
SPELLINGS = {
    "same": lambda ds, layout, rel: rel,
    "dot": lambda ds, layout, rel: "./" + rel,
    "dotdot": lambda ds, layout, rel: rel.replace("img/", "img/../img/"),
    "absolute": lambda ds, layout, rel: str((ds / BASE[layout] / rel).absolute()),
    "symlink": lambda ds, layout, rel: rel.replace("img/", "link/"),
    "backslash": lambda ds, layout, rel: rel.replace("/", "\\"),  # a list written on Windows
}


# fgvc_json lists are JSON objects: one key cannot appear twice (json keeps the last), only other spellings can
@pytest.mark.parametrize(("layout", "spelling"), [(lay, sp) for lay in ("vtab_json", "vtab_txt", "fgvc_json")
                                                  for sp in SPELLINGS if (lay, sp) != ("fgvc_json", "same")])
def test_one_image_named_twice_in_a_list(tmp_path, capsys, layout, spelling):
    ds = tmp_path / "twice"
    (ds / BASE[layout]).mkdir(parents=True)
    os.symlink("img", ds / BASE[layout] / "link")  # link/NNN.png is img/NNN.png
    lists = clean_lists(layout)
    test = list(lists["test"])
    lists["test"] = [*test, SPELLINGS[spelling](ds, layout, test[3])]  # test[3] listed a second time
    make_dataset(tmp_path, "twice", layout, lists)
    for flags in ((), ("--paths-only",)):  # the same file: found without decoding too
        code, out = check(tmp_path, "twice", *flags, capsys=capsys)
        assert code == 0, out
        assert leak_count(out, r"image listed more than once in test") == 1
        assert "test images also" not in out and "also in train800" not in out


@pytest.mark.parametrize("layout", ["vtab_json", "vtab_txt", "fgvc_json"])
def test_val200_sharing_an_image_with_train800(tmp_path, capsys, layout):
    if layout == "vtab_json":
        # only train800val200 (10 entries): train800 = the first 8 (80 %), val200 = the last 2, derived;
        # entry 10 names the file of entry 3
        lists = {"train800val200": [*imgs(range(0, 9)), "img/002.png"], "test": imgs(range(20, 25))}
        expect_val = "val200"
    elif layout == "vtab_txt":
        t, v = imgs(range(0, 8)), [*imgs(range(8, 10)), "img/005.png"]
        lists = {"train800": t, "val200": v, "train800val200": t + v, "test": imgs(range(20, 25))}
        expect_val = "val200"
    else:
        lists = {"train": imgs(range(0, 8)), "val": [*imgs(range(8, 10)), "img/005.png"],
                 "test": imgs(range(20, 25))}
        expect_val = "val"
    make_dataset(tmp_path, "valleak", layout, lists)
    code, out = check(tmp_path, "valleak", capsys=capsys)
    assert code == 0, out
    assert leak_count(out, rf"{expect_val} image also in train") == 1
    assert "test image" not in out  # test is clean
    code, out = check(tmp_path, "valleak", "--strict", capsys=capsys)
    assert code == 2, out


def test_renamed_and_losslessly_reencoded_copies_found_by_pixels(tmp_path, capsys, own_cache):
    lists = noah()
    make_dataset(tmp_path, "copies", "vtab_txt", lists)
    code, out = check(tmp_path, "copies", capsys=capsys)
    assert code == 0 and out.rstrip().endswith("all OK"), out  # clean; every hash is now in the cache
    ds = tmp_path / "copies"
    # three test images replaced by copies of training images under their own (test) names:
    # the same bytes, a PNG re-saved at another compression level, and a BMP
    copies = [(16, 2, "PNG", {}), (17, 7, "PNG", {"compress_level": 0}), (18, 13, "BMP", {})]
    for test_i, train_i, fmt, kw in copies:
        _save(ds / f"img/{test_i:03d}.png", _pixels(train_i), fmt, **kw)
    assert (ds / "img/017.png").read_bytes() != (ds / "img/007.png").read_bytes()
    # a hard link under a test name
    os.remove(ds / "img/020.png")
    os.link(ds / "img/004.png", ds / "img/020.png")
    # a grayscale image saved as L and as RGB is one image to the loader (convert("RGB"))
    gray = np.random.default_rng(7).integers(0, 256, (12, 12), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(ds / "img/019.png")
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(ds / "img/011.png")
    code, out = check(tmp_path, "copies", capsys=capsys)
    assert code == 0, out
    assert leak_count(out, r"test images also in") == len(copies) + 2, out  # a stale cached hash would miss them
    assert "found by pixels only" in out
    # by path alone the copies are different files
    code, out = check(tmp_path, "copies", "--paths-only", capsys=capsys)
    assert code == 0 and out.rstrip().endswith("all OK"), out
    # a lossy re-encode changes the pixels: not found (documented in docs/data.md)
    lossy = tmp_path / "lossy"
    make_dataset(tmp_path, "lossy", "vtab_txt", {**lists, "test": ["img/lossy.jpg"]})
    _save(lossy / "img/lossy.jpg", _pixels(3), "JPEG", quality=95)
    assert check(tmp_path, "lossy", "--strict", capsys=capsys)[0] == 0


def test_undecodable_image_is_a_problem_when_pixels_are_compared(tmp_path, capsys):
    make_dataset(tmp_path, "bad", "vtab_txt", noah())
    (tmp_path / "bad" / "img" / "020.png").write_bytes(b"garbage")
    code, out = check(tmp_path, "bad", capsys=capsys)
    assert code == 2 and "unreadable" in out and "020.png" in out
    assert check(tmp_path, "bad", "--paths-only", capsys=capsys)[0] == 0  # nothing decoded


# ---------------------------------------------------------------------------------------------- sweep pre-flight


def _two_leaky_datasets(root: Path) -> dict[str, int]:
    """Two vtab_json datasets: 'leaka' with 3 test images in train800val200, 'leakb' with one list entry twice;
    returns the count each warning must give."""
    make_dataset(root, "leaka", "vtab_json", {"train800val200": imgs(range(0, 15)),
                                              "test": [*imgs(range(20, 25)), *imgs(range(0, 3))]})
    make_dataset(root, "leakb", "vtab_json", {"train800val200": imgs(range(0, 15)),
                                              "test": [*imgs(range(20, 25)), "img/021.png"]})
    return {"leaka": 3, "leakb": 1}


def _sweep_args(tmp_path: Path, data: Path) -> list[str]:
    return [f"storage_path={tmp_path / 'runs'}", f"data_root={data}", "datasets=[leaka,leakb]", "grid={}",
            "seeds=[42]", "demo_assets=false", "checkpoint=random"]


def _synqt(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=300)


def _warnings(stderr: str, counts: dict[str, int]) -> None:
    """One warning per dataset, each with the count the dataset was built with."""
    warnings = [line for line in stderr.splitlines() if "split leak in dataset" in line]
    assert len(warnings) == len(counts), stderr[-3000:]
    for name, n in counts.items():
        (line,) = [w for w in warnings if f"'{name}'" in w]
        what = "test images also in" if name == "leaka" else "image listed more than once in test"
        assert re.search(rf"\b{n} {what}", line), line


def test_sweep_preflight_warns_once_per_dataset(tmp_path):
    data = tmp_path / "data"
    counts = _two_leaky_datasets(data)
    args, env = _sweep_args(tmp_path, data), {"SYNQT_CACHE_DIR": str(tmp_path / "cache")}
    # `synqt slurm array --print` runs the sweep pre-flight, warns and goes on to print the sbatch lines
    out = _synqt("slurm", "array", str(CI), *args, "--print", env=env)
    assert out.returncode == 0 and "sbatch" in out.stdout, out.stderr[-3000:]
    _warnings(out.stderr, counts)
    # `synqt sweep`: the same warnings, before it refuses to overwrite an existing sweep folder (which it checks
    # after the pre-flight; a leak alone never refuses without strict)
    (tmp_path / "runs" / "ci").mkdir(parents=True)
    (tmp_path / "runs" / "ci" / "plan.json").write_text("{}")
    out = _synqt("sweep", str(CI), *args, env=env)
    assert out.returncode == 2 and "--resume" in out.stderr, out.stderr[-3000:]
    _warnings(out.stderr, counts)
    assert out.stderr.index("split leak in dataset") < out.stderr.index("already exists")


def test_strict_refuses_the_sweep_before_ray(tmp_path):
    import ray

    data = tmp_path / "data"
    _two_leaky_datasets(data)
    args = _sweep_args(tmp_path, data)
    with pytest.raises(DataError, match=r"strict: split leaks.*'leaka'.*3 test images.*'leakb'"):
        commands.run_sweep_command(str(CI), [*args, "strict=true"])
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()
    # the CLI flag: exit 2, no traceback, nothing written; the same for `synqt slurm array --print`
    for cmd in (["sweep", str(CI), *args, "--strict"], ["slurm", "array", str(CI), *args, "--print", "--strict"]):
        out = _synqt(*cmd, env={"SYNQT_CACHE_DIR": str(tmp_path / "cache")})
        assert out.returncode == 2, out.stderr[-2000:]
        assert "split leaks" in out.stderr and "leaka" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()
