"""Data layouts, splits, transform, decoded-image cache and `synqt data check` on tiny real images."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synqt.data.images import BUILD_LOG_NAME, cache_paths, default_cache_dir, load_images, to_tensor_batch
from synqt.data.splits import (
    SplitList,
    dataset_num_classes,
    detect_layout,
    read_split,
    validate_dataset,
)
from synqt.errors import DataError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
NUM_CLASSES = 3
# split -> indices into the image pool; every class appears in train800 and in test
SPLIT_IDX = {
    "train800": list(range(0, 12)),
    "val200": list(range(12, 18)),
    "test": list(range(18, 27)),
}
SPLIT_IDX["train800val200"] = SPLIT_IDX["train800"] + SPLIT_IDX["val200"]


def _check(root, names=(), layout: str = "auto", decode: bool = False) -> int:
    """`synqt data check` through the CLI: the report printed, the exit code returned (0 ok, 2 bad input)."""
    from launcher.cli import main

    return main(["data", "check", str(root), *names, "--layout", layout, *(["--decode"] if decode else [])])


def _image_pool(n: int = 27) -> list[tuple[str, bytes, int]]:
    """(relative path, encoded bytes, label): PNG and JPEG, RGB, grayscale L and RGBA, 16-40 px."""
    rng = np.random.default_rng(0)
    pool = []
    for i in range(n):
        w, h = int(rng.integers(16, 41)), int(rng.integers(16, 41))
        if i == 3:
            im = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L")
        elif i == 6:
            im = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), mode="RGBA")
        else:
            im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")
        fmt, ext = ("JPEG", "jpg") if i % 4 == 1 else ("PNG", "png")
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        pool.append((f"c{i % NUM_CLASSES}/img_{i:03d}.{ext}", buf.getvalue(), i % NUM_CLASSES))
    return pool


POOL = _image_pool()


def _write_images(folder: Path, pool=POOL) -> None:
    for rel, data, _ in pool:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


def write_vtab_json(root: Path, name: str = "toy", splits=tuple(SPLIT_IDX)) -> Path:
    ds = root / name
    _write_images(ds / "images")
    for s in splits:
        entries = [{POOL[i][0]: POOL[i][2]} for i in SPLIT_IDX[s]]
        (ds / f"{s}.json").write_text(json.dumps(entries))
    return ds


def write_vtab_txt(root: Path, name: str = "toy") -> Path:
    ds = root / name
    _write_images(ds / "images")
    for s, idx in SPLIT_IDX.items():
        (ds / f"{s}.txt").write_text("".join(f"images/{POOL[i][0]} {POOL[i][2]}\n" for i in idx))
    return ds


def write_fgvc_json(root: Path, name: str = "toy", image_dir: str = "images") -> Path:
    ds = root / name
    _write_images(ds / image_dir if image_dir != "." else ds)
    # raw class ids are sparse and not 0-based; ascending order maps them back to 0..2
    raw = {0: 7, 1: 11, 2: 30}
    for fg, s in (("train", "train800"), ("val", "val200"), ("test", "test")):
        (ds / f"{fg}.json").write_text(json.dumps({POOL[i][0]: raw[POOL[i][2]] for i in SPLIT_IDX[s]}))
    return ds


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# ----------------------------------------------------------------------------------------------
# Layouts


def test_three_layouts_read_identical_arrays(tmp_path: Path, cache: Path) -> None:
    roots = {lay: tmp_path / lay for lay in ("vtab_json", "vtab_txt", "fgvc_json")}
    write_vtab_json(roots["vtab_json"])
    write_vtab_txt(roots["vtab_txt"])
    write_fgvc_json(roots["fgvc_json"])
    for lay, root in roots.items():
        assert detect_layout(root / "toy") == lay
        assert dataset_num_classes(root, "toy") == NUM_CLASSES
    for split, idx in SPLIT_IDX.items():
        expected_labels = [POOL[i][2] for i in idx]
        arrays = {}
        for lay, root in roots.items():
            sl = read_split(root, "toy", split)
            assert sl.layout == lay and not sl.derived
            assert sl.labels == expected_labels
            assert [p.name for p in sl.paths] == [Path(POOL[i][0]).name for i in idx]
            x, y = load_images(sl, 24, cache_dir=cache, use_cache=False)
            assert x.dtype == np.uint8 and x.shape == (len(idx), 24, 24, 3)
            assert y.dtype == np.int64 and y.tolist() == expected_labels
            arrays[lay] = x
        np.testing.assert_array_equal(arrays["vtab_json"], arrays["vtab_txt"])
        np.testing.assert_array_equal(arrays["vtab_json"], arrays["fgvc_json"])
    # fgvc train800val200 is train + val, listing both files
    sl = read_split(roots["fgvc_json"], "toy", "train800val200")
    assert [f.name for f in sl.list_files] == ["train.json", "val.json"]


def test_forced_layout_and_grayscale_rgba_become_rgb(tmp_path: Path) -> None:
    write_vtab_json(tmp_path)
    sl = read_split(tmp_path, "toy", "train800", layout="vtab_json")
    x, _ = load_images(sl, 20, use_cache=False)
    gray = x[3]  # the "L" image: three equal channels after convert("RGB")
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    expected = np.asarray(Image.open(sl.paths[6]).convert("RGB").resize((20, 20), Image.BICUBIC))
    np.testing.assert_array_equal(x[6], expected)  # RGBA: alpha dropped, as the official loader does
    with pytest.raises(DataError, match="vtab_txt"):
        read_split(tmp_path, "toy", "train800", layout="vtab_txt")
    with pytest.raises(DataError, match="unknown layout 'csv'"):
        read_split(tmp_path, "toy", "train800", layout="csv")


@pytest.mark.parametrize("image_dir", ["Images", "."])
def test_fgvc_image_folder_candidates(tmp_path: Path, image_dir: str) -> None:
    ds = write_fgvc_json(tmp_path, "stanford_x", image_dir=image_dir)
    sl = read_split(tmp_path, "stanford_x", "test")
    base = ds / image_dir if image_dir != "." else ds
    assert sl.paths[0] == base / POOL[SPLIT_IDX["test"][0]][0]
    assert all(p.is_file() for p in sl.paths)
    assert validate_dataset(tmp_path, "stanford_x", ["train800", "val200", "test"], 3) == {
        "train800": 12,
        "val200": 6,
        "test": 9,
    }


@pytest.mark.parametrize("interp", ["bicubic", "bilinear", "nearest", "lanczos"])
def test_interpolation_is_the_named_pil_filter(tmp_path: Path, interp: str) -> None:
    write_vtab_json(tmp_path)
    sl = read_split(tmp_path, "toy", "val200")
    x, _ = load_images(sl, 17, interpolation=interp, use_cache=False)
    flt = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
    flt["lanczos"] = Image.LANCZOS
    for i, p in enumerate(sl.paths):
        ref = np.asarray(Image.open(p).convert("RGB").resize((17, 17), flt[interp]))
        np.testing.assert_array_equal(x[i], ref)


def test_derived_train800_val200(tmp_path: Path) -> None:
    ds = tmp_path / "toy"
    _write_images(ds / "images", POOL[:4])
    entries = [{POOL[i % 4][0]: i % 7} for i in range(1000)]
    (ds / "train800val200.json").write_text(json.dumps(entries))
    (ds / "test.json").write_text(json.dumps(entries[:10]))
    full = read_split(tmp_path, "toy", "train800val200")
    tr = read_split(tmp_path, "toy", "train800")
    va = read_split(tmp_path, "toy", "val200")
    assert not full.derived and tr.derived and va.derived
    assert len(tr) == 800 and len(va) == 200
    assert tr.labels == [i % 7 for i in range(800)]
    assert va.labels == [i % 7 for i in range(800, 1000)]
    assert tr.paths + va.paths == full.paths
    assert tr.list_files == va.list_files == [ds / "train800val200.json"]
    assert len({tr.list_hash, va.list_hash, full.list_hash}) == 3
    assert validate_dataset(tmp_path, "toy", ["train800", "val200"], 7) == {"train800": 800, "val200": 200}
    out = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(out):
        assert _check(tmp_path, ["toy"]) == 0
    assert "derived from train800val200.json" in out.getvalue()


# ----------------------------------------------------------------------------------------------
# Cache


def _build_lines(cache: Path) -> list[str]:
    log = cache / BUILD_LOG_NAME
    return log.read_text().splitlines() if log.exists() else []


def test_cached_equals_uncached_and_is_reused(tmp_path: Path, cache: Path) -> None:
    write_vtab_txt(tmp_path)
    sl = read_split(tmp_path, "toy", "train800val200")
    plain, y0 = load_images(sl, 24, use_cache=False)
    cached, y1 = load_images(sl, 24, cache_dir=cache)
    assert isinstance(cached, np.memmap)
    np.testing.assert_array_equal(plain, cached)
    np.testing.assert_array_equal(y0, y1)
    again, _ = load_images(sl, 24, cache_dir=cache)
    np.testing.assert_array_equal(plain, again)
    assert len(_build_lines(cache)) == 1
    files = cache_paths(sl, 24, "bicubic", cache)
    assert files["images"].is_file() and files["labels"].is_file()
    assert not list(cache.glob("*.tmp"))


def test_changed_list_or_size_gets_new_cache_file(tmp_path: Path, cache: Path) -> None:
    ds = write_vtab_json(tmp_path)
    sl = read_split(tmp_path, "toy", "test")
    load_images(sl, 16, cache_dir=cache)
    load_images(sl, 20, cache_dir=cache)
    f16 = cache_paths(sl, 16, "bicubic", cache)["images"]
    f20 = cache_paths(sl, 20, "bicubic", cache)["images"]
    assert f16 != f20 and f16.is_file() and f20.is_file()
    assert cache_paths(sl, 16, "bilinear", cache)["images"] != f16
    entries = json.loads((ds / "test.json").read_text())
    ((k, v),) = entries[0].items()
    entries[0] = {k: (v + 1) % NUM_CLASSES}
    (ds / "test.json").write_text(json.dumps(entries))
    sl2 = read_split(tmp_path, "toy", "test")
    assert sl2.list_hash != sl.list_hash
    _, y2 = load_images(sl2, 16, cache_dir=cache)
    assert cache_paths(sl2, 16, "bicubic", cache)["images"] != f16
    assert y2[0] == (v + 1) % NUM_CLASSES
    assert len(_build_lines(cache)) == 3
    # the same lists under another data root never share a cache entry
    other = tmp_path / "copy"
    shutil.copytree(tmp_path / "toy", other / "toy")
    assert (
        cache_paths(read_split(other, "toy", "test"), 16, "bicubic", cache)["images"]
        != cache_paths(sl2, 16, "bicubic", cache)["images"]
    )


def _worker(root: str, cache: str, barrier, queue) -> None:
    sl = read_split(root, "toy", "train800val200")
    barrier.wait()
    x, y = load_images(sl, 32, cache_dir=cache)
    queue.put((np.asarray(x).tobytes(), y.tolist()))


def test_concurrent_build_happens_once(tmp_path: Path, cache: Path) -> None:
    write_vtab_json(tmp_path)
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), str(cache), barrier, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(_build_lines(cache)) == 1
    assert len({r[0] for r in results}) == 1
    sl = read_split(tmp_path, "toy", "train800val200")
    plain, _ = load_images(sl, 32, use_cache=False)
    assert results[0][0] == plain.tobytes()
    assert all(r[1] == sl.labels for r in results)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SYNQT_CACHE_DIR", raising=False)
    monkeypatch.delenv("SLURM_TMPDIR", raising=False)
    import pwd
    import tempfile

    # per user: a folder the first user makes is not writable by the next (issue 14)
    assert default_cache_dir() == Path(tempfile.gettempdir()) / f"synqt-cache-{pwd.getpwuid(os.getuid()).pw_name}"
    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path / "slurm"))
    assert default_cache_dir() == tmp_path / "slurm" / "synqt-cache"
    monkeypatch.setenv("SYNQT_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


# ----------------------------------------------------------------------------------------------
# Transform


def test_to_tensor_batch_matches_torchvision(tmp_path: Path, cache: Path) -> None:
    import torch
    from torchvision import transforms as T

    write_vtab_json(tmp_path)
    sl = read_split(tmp_path, "toy", "test")
    x, _ = load_images(sl, 28, cache_dir=cache)  # memmap input, read-only
    batch = to_tensor_batch(x, MEAN, STD)
    assert batch.dtype == torch.float32 and batch.shape == (len(sl), 3, 28, 28)
    tf = T.Compose(
        [
            T.Resize((28, 28), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )
    ref = torch.stack([tf(Image.open(p).convert("RGB")) for p in sl.paths])
    assert torch.equal(batch, ref)
    with pytest.raises(DataError, match="shape"):
        to_tensor_batch(np.zeros((2, 3, 8, 8), np.uint8), MEAN, STD)


# ----------------------------------------------------------------------------------------------
# Errors


def test_missing_root_dataset_and_list(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data root .*nowhere"):
        read_split(tmp_path / "nowhere", "toy", "test")
    ds = write_vtab_json(tmp_path, "toy")
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="missing_ds.*toy") as e:
        validate_dataset(tmp_path, "missing_ds", ["test"], None)
    assert "other" in str(e.value)
    (ds / "test.json").unlink()
    with pytest.raises(DataError, match="test.json not found"):
        read_split(tmp_path, "toy", "test")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        read_split(tmp_path, "toy", "dev")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="cannot tell the layout"):
        detect_layout(empty)


def test_malformed_entries_name_file_and_line(tmp_path: Path) -> None:
    ds = write_vtab_txt(tmp_path)
    lines = (ds / "train800.txt").read_text().splitlines()
    lines[2] = "images/c2/img_002.png two"
    (ds / "train800.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train800.txt line 3"):
        read_split(tmp_path, "toy", "train800")

    ds = write_vtab_json(tmp_path / "j")
    (ds / "val200.json").write_text(json.dumps([{POOL[0][0]: 0}, {"a.png": 1, "b.png": 2}]))
    with pytest.raises(DataError, match=r"val200.json entry 2"):
        read_split(tmp_path / "j", "toy", "val200")
    (ds / "val200.json").write_text('[\n{"a.png": 0},\n{"b.png": 1\n]')
    with pytest.raises(DataError, match=r"val200.json line \d+: malformed JSON"):
        read_split(tmp_path / "j", "toy", "val200")
    (ds / "val200.json").write_text(json.dumps([{"a.png": "cat"}]))
    with pytest.raises(DataError, match=r"val200.json entry 1.*'cat'"):
        read_split(tmp_path / "j", "toy", "val200")

    ds = write_fgvc_json(tmp_path / "f")
    (ds / "val.json").write_text(json.dumps([1, 2]))
    with pytest.raises(DataError, match=r"val.json: expected a JSON object"):
        read_split(tmp_path / "f", "toy", "val200")


def test_validate_labels_classes_and_missing_images(tmp_path: Path) -> None:
    ds = write_vtab_json(tmp_path)
    splits = ["train800", "val200", "test"]
    assert validate_dataset(tmp_path, "toy", splits, 3) == {"train800": 12, "val200": 6, "test": 9}
    assert validate_dataset(tmp_path, "toy", splits, None)["test"] == 9
    with pytest.raises(DataError, match=r"train800.json .*label 2 outside \[0, 2\)"):
        validate_dataset(tmp_path, "toy", splits, 2)
    with pytest.raises(DataError, match=r"num_classes=5 .*disagrees.* 3 classes"):
        validate_dataset(tmp_path, "toy", splits, 5)
    entries = json.loads((ds / "test.json").read_text())
    entries[1] = {"c0/ghost.png": 0}
    (ds / "test.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"missing.*ghost.png \(test.json entry 2\)"):
        validate_dataset(tmp_path, "toy", splits, 3)
    entries[1] = {POOL[0][0]: -1}
    (ds / "test.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"test.json entry 2\): label -1 outside"):
        validate_dataset(tmp_path, "toy", ["test"], 3)


def test_undecodable_image_names_file(tmp_path: Path, cache: Path) -> None:
    ds = write_vtab_json(tmp_path)
    bad = ds / "images" / POOL[SPLIT_IDX["test"][2]][0]
    bad.write_bytes(b"this is not a png")
    sl = read_split(tmp_path, "toy", "test")
    with pytest.raises(DataError, match=f"cannot decode image {bad}"):
        load_images(sl, 16, use_cache=False)
    with pytest.raises(DataError, match=f"cannot decode image {bad}"):
        load_images(sl, 16, cache_dir=cache)
    assert not cache_paths(sl, 16, "bicubic", cache)["images"].exists()
    assert not list(cache.glob("*.tmp"))
    with pytest.raises(DataError, match="interpolation 'cubic'"):
        load_images(sl, 16, interpolation="cubic", use_cache=False)


def test_splitlist_fields(tmp_path: Path) -> None:
    write_vtab_txt(tmp_path)
    sl = read_split(tmp_path, "toy", "test")
    assert isinstance(sl, SplitList)
    assert (sl.dataset, sl.split, sl.layout, sl.derived) == ("toy", "test", "vtab_txt", False)
    assert sl.list_files == [tmp_path.absolute() / "toy" / "test.txt"]
    assert len(sl.list_hash) == 64 and all(p.is_absolute() for p in sl.paths)


# ----------------------------------------------------------------------------------------------
# synqt data check


def test_check_main_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    cfgs = tmp_path / "configs"
    (cfgs / "vtab").mkdir(parents=True)
    monkeypatch.setenv("SYNQT_CONFIG_DIR", str(cfgs))
    root = tmp_path / "data"
    write_vtab_json(root, "toyj")
    write_vtab_txt(root, "toyt")
    write_fgvc_json(root, "toyf")
    (root / "notes").mkdir()  # a folder without lists is skipped when no names are given
    assert _check(root, [], decode=True) == 0
    out = capsys.readouterr().out
    assert "toyj [vtab_json]" in out and "toyt [vtab_txt]" in out and "toyf [fgvc_json]" in out
    assert "notes: skipped" in out and "all OK" in out

    assert _check(root, ["nope"]) == 2
    assert "nope" in capsys.readouterr().out

    # label outside the shipped config's class count
    (cfgs / "vtab" / "toyj.yaml").write_text("num_classes: 2\n")
    assert _check(root, ["toyj"]) == 2
    out = capsys.readouterr().out
    assert "label 2 outside [0, 2)" in out and "disagrees" in out

    # missing file
    missing = root / "toyt" / "images" / POOL[0][0]
    missing.unlink()
    assert _check(root, ["toyt"]) == 2
    out = capsys.readouterr().out
    assert "missing file" in out and str(missing) in out

    # undecodable file: found whenever images are decoded (the split-leak pixel hash, on by default, or
    # --decode), not with --paths-only alone
    bad = root / "toyf" / "images" / POOL[SPLIT_IDX["test"][0]][0]
    bad.write_bytes(b"garbage")
    assert _check(root, ["toyf", "--paths-only"]) == 0
    capsys.readouterr()
    assert _check(root, ["toyf"]) == 2
    out = capsys.readouterr().out
    assert "unreadable" in out and str(bad) in out
    assert _check(root, ["toyf"], decode=True) == 2
    out = capsys.readouterr().out
    assert "unreadable" in out and str(bad) in out
    assert _check(tmp_path / "absent", []) == 2
