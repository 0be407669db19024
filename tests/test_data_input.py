"""Issue 12 kinds 1 and 2: list files as editors write them, and every image mode by its value range.

Every expected value here comes from bytes and arrays the test writes itself: the file that
exists on disk, the uint16 value put into a PNG and its 8-bit equivalent round(v * 255 / 65535).
"""

from __future__ import annotations

import codecs
import io
import json
import struct
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synqt.data.images import decode_image, load_images
from synqt.data.listfiles import show_path
from synqt.data.splits import detect_layout, read_split, validate_dataset
from synqt.errors import DataError


def check_main(root: Path, names: list[str], decode: bool = False) -> int:
    """`synqt data check` as the CLI runs it: the report printed, its exit code returned (0 ok, 2 bad input)."""
    from launcher.cli import main

    return main(["data", "check", str(root), *names, *(["--decode"] if decode else [])])


BICUBIC = Image.Resampling.BICUBIC
NEAREST = Image.Resampling.NEAREST
NAMES = ["c0/a.png", "c1/b.png", "c0/c.png"]
LABELS = [0, 1, 0]


def _dataset(root: Path, names=NAMES, name: str = "toy") -> Path:
    ds = root / name
    for i, rel in enumerate(names):
        (ds / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)).save(ds / rel)
    return ds


def _txt_lines(names=NAMES, labels=LABELS, sep: str = " ", end: str = "\n") -> str:
    return "".join(f"{n}{sep}{lab}{end}" for n, lab in zip(names, labels, strict=True))


def _expected(ds: Path, names=NAMES) -> list[Path]:
    return [(ds / n).absolute() for n in names]


# ---------------------------------------------------------------------------------------------- kind 1


ENCODINGS = {
    "utf8": lambda t: t.encode("utf-8"),
    "utf8_bom": lambda t: codecs.BOM_UTF8 + t.encode("utf-8"),
    "utf16le_bom": lambda t: codecs.BOM_UTF16_LE + t.encode("utf-16-le"),  # Notepad "Unicode", PowerShell >
    "utf16be_bom": lambda t: codecs.BOM_UTF16_BE + t.encode("utf-16-be"),
    "utf16le_no_bom": lambda t: t.encode("utf-16-le"),
    "utf32le_bom": lambda t: codecs.BOM_UTF32_LE + t.encode("utf-32-le"),
}


@pytest.mark.parametrize("enc", list(ENCODINGS))
def test_txt_list_in_every_common_encoding_reads_right(tmp_path: Path, enc: str) -> None:
    ds = _dataset(tmp_path)
    (ds / "test.txt").write_bytes(ENCODINGS[enc](_txt_lines(end="\r\n")))
    assert validate_dataset(tmp_path, "toy", ["test"], None) == {"test": 3}
    sl = read_split(tmp_path, "toy", "test")
    assert sl.paths == _expected(ds) and sl.labels == LABELS


@pytest.mark.parametrize("enc", ["utf8_bom", "utf16le_bom"])
def test_json_lists_with_bom_read_right_and_layout_detected(tmp_path: Path, enc: str) -> None:
    ds = _dataset(tmp_path / "v", [f"images/{n}" for n in NAMES])
    entries = [{n: lab} for n, lab in zip(NAMES, LABELS, strict=True)]
    (ds / "test.json").write_bytes(ENCODINGS[enc](json.dumps(entries)))
    assert detect_layout(ds) == "vtab_json"  # a BOM before '[' must not make it look like fgvc_json
    sl = read_split(tmp_path / "v", "toy", "test")
    assert sl.paths == _expected(ds / "images") and sl.labels == LABELS

    ds = _dataset(tmp_path / "f", [f"images/{n}" for n in NAMES])
    for s in ("train", "val", "test"):
        mapping = {n: 10 + lab for n, lab in zip(NAMES, LABELS, strict=True)}
        (ds / f"{s}.json").write_bytes(ENCODINGS[enc](json.dumps(mapping)))
    sl = read_split(tmp_path / "f", "toy", "test")
    assert sl.paths == _expected(ds / "images") and sl.labels == LABELS


@pytest.mark.parametrize(
    ("sep", "end"),
    [(" ", "\r\n"), (" ", "\r"), ("\t", "\n"), ("\u00a0", "\n"), (" ", " \t \n"), ("  \t", "\t\r\n")],
    ids=["crlf", "cr_only", "tab", "nbsp_separator", "trailing_blanks", "tabs_and_crlf"],
)
def test_line_ends_and_separators(tmp_path: Path, sep: str, end: str) -> None:
    ds = _dataset(tmp_path)
    (ds / "test.txt").write_bytes(_txt_lines(sep=sep, end=end).encode())
    sl = read_split(tmp_path, "toy", "test")
    assert sl.paths == _expected(ds) and sl.labels == LABELS


def test_data_check_names_the_encoding_it_read(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("SYNQT_CONFIG_DIR", str(tmp_path / "no-configs"))
    ds = _dataset(tmp_path / "data")
    (ds / "test.txt").write_bytes(ENCODINGS["utf16le_bom"](_txt_lines()))
    (ds / "train800.txt").write_bytes(_txt_lines(["c0/a.png"], [0]).encode("cp1252") + "c1/é.png 1\n".encode("cp1252"))
    Image.new("RGB", (4, 4)).save(ds / "c1" / "é.png")
    assert check_main(tmp_path / "data", ["toy"]) == 0
    out = capsys.readouterr().out
    assert "list test.txt: read as UTF-16 LE with BOM" in out
    assert "list train800.txt: read as cp1252 (not UTF-8: byte 0xe9 at line 2, column 4)" in out


def test_backslash_paths_from_windows(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    (ds / "test.txt").write_text(_txt_lines([n.replace("/", "\\") for n in NAMES]))
    sl = read_split(tmp_path, "toy", "test")
    assert sl.paths == _expected(ds) and len(sl.notes) == 3
    ds = _dataset(tmp_path / "j", [f"images/{n}" for n in NAMES])
    entries = [{n.replace("/", "\\"): lab} for n, lab in zip(NAMES, LABELS, strict=True)]
    (ds / "test.json").write_text(json.dumps(entries))
    assert read_split(tmp_path / "j", "toy", "test").paths == _expected(ds / "images")


def test_invisible_characters_in_paths_are_removed_when_the_file_exists(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    # a zero-width space pasted from a web page, a BOM in the middle (two lists concatenated), a soft hyphen
    names = ["c0/a\u200b.png", "\ufeffc1/b.png", "c0/c\u00ad.png"]
    (ds / "test.txt").write_text(_txt_lines(names, ["0", "1\u200b", "0"]))
    sl = read_split(tmp_path, "toy", "test")
    assert sl.paths == _expected(ds) and sl.labels == LABELS
    assert "ZERO WIDTH SPACE" in sl.notes[0] and "\\u200b" in sl.notes[0]


def test_cp1252_list_and_nfd_names(tmp_path: Path) -> None:
    names = ["c0/café.png", "c1/Zürich.png", "c0/naïve.png"]
    ds = _dataset(tmp_path, names)
    # Excel / old Windows editors: cp1252 bytes (é = 0xE9), file names on disk in UTF-8
    (ds / "test.txt").write_bytes(_txt_lines(names).encode("cp1252"))
    sl = read_split(tmp_path, "toy", "test")
    assert sl.paths == _expected(ds, names) and sl.labels == LABELS

    # macOS: names on disk in NFD, the list in NFC
    nfd = [unicodedata.normalize("NFD", n) for n in names]
    ds2 = _dataset(tmp_path / "mac", nfd)
    (ds2 / "test.txt").write_text(_txt_lines([unicodedata.normalize("NFC", n) for n in names]))
    assert read_split(tmp_path / "mac", "toy", "test").paths == _expected(ds2, nfd)

    # a zip from Windows: names on disk are Latin-1 bytes, the list is UTF-8
    ds3 = tmp_path / "zip" / "toy"
    raw = [n.encode("latin-1") for n in names]
    for i, r in enumerate(raw):
        p = Path(bytes(ds3).decode() + "/" + r.decode("utf-8", "surrogateescape"))
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 6, 3), i, np.uint8)).save(p, format="PNG")
    (ds3 / "test.txt").write_text(_txt_lines(names))
    got = read_split(tmp_path / "zip", "toy", "test").paths
    assert [bytes(p) for p in got] == [bytes(ds3.absolute()) + b"/" + r for r in raw]


def test_nul_bytes_are_refused_naming_line_and_column(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    data = _txt_lines().encode()
    (ds / "test.txt").write_bytes(data + b"\0" * 16)  # a file cut off and zero-padded
    with pytest.raises(DataError, match=r"test.txt: NUL byte .* line 4, column 1"):
        read_split(tmp_path, "toy", "test")


def test_missing_path_is_printed_with_invisible_characters_shown(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("SYNQT_CONFIG_DIR", str(tmp_path / "no-configs"))
    ds = _dataset(tmp_path / "data")
    (ds / "test.txt").write_text(_txt_lines(["c0/a.png", "c1/ghost\u200b.png", "c0/c.png"]))
    with pytest.raises(DataError) as e:
        validate_dataset(tmp_path / "data", "toy", ["test"], None)
    assert "ghost\\u200b.png" in str(e.value) and "ZERO WIDTH SPACE" in str(e.value)
    assert check_main(tmp_path / "data", ["toy"]) == 2
    out = capsys.readouterr().out
    assert "missing file" in out and "ghost\\u200b.png" in out and "\u200b" not in out


def test_show_path_leaves_letters_alone() -> None:
    assert show_path("/d/café/中.png") == "/d/café/中.png"
    assert show_path("/d/a\x00b\u00a0.png").startswith("/d/a\\x00b\\xa0.png [contains invisible")
    assert "non-UTF-8 byte 0xe9" in show_path("/d/caf\udce9.png")


# ---------------------------------------------------------------------------------------------- kind 2


def _png16(arr: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written byte by byte (colour type 0 gray, 2 RGB, 4 gray+alpha, 6 RGBA)."""
    h, w = arr.shape[:2]

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    rows = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _decode(tmp_path: Path, data: bytes, name: str = "x.png") -> np.ndarray:
    p = tmp_path / name
    p.write_bytes(data)
    return decode_image(p, 4, NEAREST)


def _saved(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def test_16bit_gray_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 3000, 20000], [40000, 50000, 65535, 128]] * 2, dtype=np.uint16)
    out = _decode(tmp_path, _png16(values, 0))
    want = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(out[..., 0], want) and np.array_equal(out[..., 1], want)


def test_two_class_dark_bright_16bit_task_decodes_to_distinguishable_images(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    ds = tmp_path / "data" / "toy16"
    lines = []
    for i in range(8):
        label = i % 2
        lo, hi = (500, 6000) if label == 0 else (45000, 65000)  # dark vs bright, both above 255
        arr = rng.integers(lo, hi, (16, 16), dtype=np.uint16)
        (ds / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(ds / f"c{label}" / f"{i}.png")
        lines.append(f"c{label}/{i}.png {label}\n")
    (ds / "test.txt").write_text("".join(lines))
    x, y = load_images(read_split(tmp_path / "data", "toy16", "test"), 8, use_cache=False)
    means = x.reshape(len(x), -1).mean(axis=1)
    assert means[y == 0].max() < 25 and means[y == 1].min() > 170
    assert (x == 255).mean() < 0.05  # clipping made 99.6 % of these pixels white
    assert check_main(tmp_path / "data", ["toy16"], decode=True) == 0
    out = capsys.readouterr().out
    assert "modes: I;16 8" in out and "CONVERTED 8 image(s) of mode I;16" in out


def test_48_and_64_bit_png_and_16bit_gray_alpha(tmp_path: Path) -> None:
    rgb = np.zeros((2, 2, 3), np.uint16)
    rgb[...] = (0x1234, 0x8000, 0xFFFF)
    assert _decode(tmp_path, _png16(rgb, 2))[0, 0].tolist() == [0x12, 0x80, 0xFF]
    rgba = np.zeros((2, 2, 4), np.uint16)
    rgba[...] = (0x1234, 0x8000, 0xFFFF, 0x0100)
    assert _decode(tmp_path, _png16(rgba, 6))[0, 0].tolist() == [0x12, 0x80, 0xFF]  # alpha dropped
    la = np.zeros((2, 2, 2), np.uint16)
    la[...] = (0xA000, 0xFFFF)
    assert _decode(tmp_path, _png16(la, 4))[0, 0].tolist() == [0xA0] * 3


EIGHT_BIT = [  # (mode, fill value, file format, expected RGB) -- expected values written by hand
    ("1", 1, "PNG", [255, 255, 255]),
    ("L", 77, "PNG", [77, 77, 77]),
    ("LA", (77, 10), "PNG", [77, 77, 77]),
    ("RGBA", (10, 20, 30, 0), "PNG", [10, 20, 30]),
    ("CMYK", (0, 255, 255, 0), "JPEG", [255, 0, 0]),
    ("CMYK", (0, 255, 255, 0), "TIFF", [255, 0, 0]),
    ("YCbCr", (76, 85, 255), "TIFF", [254, 0, 0]),
    ("LAB", (255, 128, 128), "TIFF", [254, 255, 254]),
]


@pytest.mark.parametrize(("mode", "fill", "fmt", "want"), EIGHT_BIT, ids=[f"{m}-{f}" for m, _, f, _ in EIGHT_BIT])
def test_eight_bit_modes(tmp_path: Path, mode: str, fill, fmt: str, want: list[int]) -> None:
    out = _decode(tmp_path, _saved(Image.new(mode, (4, 4), fill), fmt), f"x.{fmt.lower()}")
    assert np.abs(out[0, 0].astype(int) - want).max() <= 2


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    assert _decode(tmp_path, _saved(im, "PNG"))[0, 0].tolist() == [200, 100, 50]
    im.info["transparency"] = 1
    with_t = _saved(im, "PNG")
    assert Image.open(io.BytesIO(with_t)).info.get("transparency") == 1
    assert _decode(tmp_path, with_t)[0, 0].tolist() == [200, 100, 50]


def test_hsv_in_memory_converts_by_colour_space() -> None:
    from synqt.data.imagemodes import to_rgb

    assert to_rgb(Image.new("HSV", (1, 1), (0, 255, 255)), "x").getpixel((0, 0)) == (255, 0, 0)


def test_integer_and_float_images_by_range_or_refused(tmp_path: Path) -> None:
    # 16-bit TIFF, big-endian
    out = _decode(tmp_path, _saved(Image.new("I;16B", (4, 4), 40000), "TIFF"), "b.tif")
    assert out[0, 0].tolist() == [round(40000 * 255 / 65535)] * 3
    # 12-bit PGM: Pillow scales maxval 4095 to 16 bits; 2048/4095 of full range
    pgm = b"P5\n2 2\n4095\n" + np.array([2048] * 4, dtype=">u2").tobytes()
    assert _decode(tmp_path, pgm, "g.pgm")[0, 0].tolist() == [round(2048 / 4095 * 255)] * 3
    # 32-bit integer TIFF: range unknown -> refused, naming file and mode
    p = tmp_path / "i32.tif"
    p.write_bytes(_saved(Image.new("I", (4, 4), 70000), "TIFF"))
    with pytest.raises(DataError, match=r"i32.tif: mode I \(32-bit integer, TIFF\) with values in \[70000, 70000\]"):
        decode_image(p, 4, NEAREST)
    # float in [0, 1]
    assert _decode(tmp_path, _saved(Image.new("F", (4, 4), 0.5), "TIFF"), "f.tif")[0, 0].tolist() == [128] * 3
    p = tmp_path / "f2.tif"
    p.write_bytes(_saved(Image.new("F", (4, 4), 300.0), "TIFF"))
    with pytest.raises(DataError, match=r"f2.tif: mode F .*\[300, 300\]; expected values in \[0, 1\]"):
        decode_image(p, 4, NEAREST)


def test_data_check_counts_modes_and_reports_refused(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("SYNQT_CONFIG_DIR", str(tmp_path / "no-configs"))
    ds = tmp_path / "data" / "mix"
    ds.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(ds / "a.png")
    Image.new("L", (4, 4)).save(ds / "b.png")
    Image.new("L", (4, 4)).save(ds / "c.png")
    (ds / "d.png").write_bytes(_png16(np.full((4, 4), 30000, np.uint16), 0))
    Image.new("F", (4, 4), 5.0).save(ds / "e.tif")
    (ds / "test.txt").write_text("a.png 0\nb.png 1\nc.png 0\nd.png 1\ne.tif 0\n")
    assert check_main(tmp_path / "data", ["mix"], decode=True) == 2
    out = capsys.readouterr().out
    assert "modes: I;16 1" in out and "L 2" in out and "RGB 1" in out
    assert "CONVERTED 1 image(s) of mode I;16" in out and "d.png" in out
    assert "unreadable" in out and "e.tif" in out and "mode F" in out


# ---------------------------------------------------------------------------------------------- handled before


def test_split_missing_a_class_keeps_the_class_count(tmp_path: Path) -> None:
    ds = _dataset(tmp_path, [f"c{i}/{i}.png" for i in range(4)])
    (ds / "train800.txt").write_text(_txt_lines([f"c{i}/{i}.png" for i in range(4)], [0, 1, 2, 3]))
    (ds / "test.txt").write_text(_txt_lines(["c0/0.png", "c3/3.png"], [0, 3]))  # classes 1, 2 absent
    assert validate_dataset(tmp_path, "toy", ["train800", "test"], 4) == {"train800": 4, "test": 2}
    assert read_split(tmp_path, "toy", "test").labels == [0, 3]
    from synqt.data.splits import dataset_num_classes

    assert dataset_num_classes(tmp_path, "toy") == 4



def test_truncated_jpeg_is_a_clean_error(tmp_path: Path) -> None:
    data = _saved(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    p = tmp_path / "t.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"cannot decode image {p}"):
        decode_image(p, 8, BICUBIC)


def test_dataset_name_with_an_invisible_character_is_shown(tmp_path: Path) -> None:
    _dataset(tmp_path, name="cifar")
    shown = r"cifar\\u200b \[contains invisible characters: ZERO WIDTH SPACE\] does not exist"
    with pytest.raises(DataError, match=r"dataset folder .*" + shown + r".*: cifar"):
        read_split(tmp_path, "cifar\u200b", "test")
