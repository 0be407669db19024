"""List files as editors and tools write them: encodings, invisible characters, Windows paths.

A dataset's list files (``train800.txt``, ``test.json`` ...) are written by many tools: Notepad
(UTF-8 with a byte-order mark, or "Unicode" = UTF-16 LE with a BOM), PowerShell's ``>`` (UTF-16 LE
with a BOM), Excel and old editors (cp1252 / Latin-1 bytes), copy-paste from web pages
(no-break spaces, zero-width spaces), macOS (file names in decomposed Unicode, NFD).

``read_list_text`` decodes every one of these to the text the author meant, or raises a
``DataError`` that names the file, the encoding found and the byte at fault. ``resolve_listed``
maps one listed relative path to the file on disk, trying the few spellings such tools produce
(backslashes, invisible characters removed, NFC/NFD, the raw bytes of a Latin-1 list) only
when the path as written does not exist. ``show_path`` prints a path so that invisible
characters can be seen.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from synqt.errors import DataError

log = logging.getLogger(__name__)

# Characters that render as nothing (or as a plain space) and never belong in a listed path.
INVISIBLE = {
    "\ufeff": "BYTE ORDER MARK",
    "\u200b": "ZERO WIDTH SPACE",
    "\u200c": "ZERO WIDTH NON-JOINER",
    "\u200d": "ZERO WIDTH JOINER",
    "\u2060": "WORD JOINER",
    "\u00ad": "SOFT HYPHEN",
    "\u00a0": "NO-BREAK SPACE",
    "\u202f": "NARROW NO-BREAK SPACE",
    "\u200e": "LEFT-TO-RIGHT MARK",
    "\u200f": "RIGHT-TO-LEFT MARK",
}
_BOMS = (  # longest first: the UTF-32 LE BOM starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32 LE with BOM"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32 BE with BOM"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8 with BOM"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16 LE with BOM"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16 BE with BOM"),
)


@dataclass
class ListText:
    """The decoded text of a list file and the encoding it was read with."""

    path: Path
    text: str
    encoding: str  # "UTF-8", "UTF-8 with BOM", "UTF-16 LE with BOM", "cp1252 (not UTF-8)" ...
    raw: bytes = field(repr=False, default=b"")


def _line_col(data: bytes, offset: int) -> tuple[int, int]:
    line = data.count(b"\n", 0, offset) + 1
    return line, offset - (data.rfind(b"\n", 0, offset) + 1) + 1


def _utf16_without_bom(data: bytes) -> str | None:
    """'utf-16-le'/'utf-16-be' when ``data`` is ASCII-range text written as UTF-16 without a BOM."""
    if len(data) < 2 or len(data) % 2:
        return None
    even, odd = data[0::2], data[1::2]
    if odd.count(0) == len(odd) and even.count(0) == 0:
        return "utf-16-le"
    if even.count(0) == len(even) and odd.count(0) == 0:
        return "utf-16-be"
    return None


def decode_list_bytes(data: bytes, path: Path) -> ListText:
    """Decode list-file bytes: BOM-marked UTF-8/16/32, BOM-less UTF-16, UTF-8, else cp1252.

    Raises DataError for NUL bytes in a file that is not UTF-16/32 (a file cut off and padded
    with zeros, or a binary file), naming the line and column of the first one.
    """
    for bom, codec, name in _BOMS:
        if data.startswith(bom):
            try:
                return ListText(path, data[len(bom):].decode(codec), name, data)
            except UnicodeDecodeError as e:
                raise DataError(
                    f"list file {path}: starts with a {name} byte-order mark but byte {e.start + len(bom)} "
                    f"is not valid {codec} ({e.reason}); save it as UTF-8"
                ) from None
    if b"\0" in data:
        codec = _utf16_without_bom(data)
        if codec is not None:
            return ListText(path, data.decode(codec), f"{codec.upper()} without BOM", data)
        off = data.index(b"\0")
        line, col = _line_col(data, off)
        raise DataError(
            f"list file {path}: NUL byte (\\x00) at line {line}, column {col} (byte offset {off}): the file is "
            "binary, cut off and zero-padded, or in an encoding other than UTF-8/UTF-16; expected a text list"
        )
    try:
        return ListText(path, data.decode("utf-8"), "UTF-8", data)
    except UnicodeDecodeError as e:
        first_bad = e.start
    # Not UTF-8: Windows editors and Excel write cp1252 (a superset of Latin-1's printable range);
    # the five bytes cp1252 leaves undefined are read as Latin-1.
    text = _cp1252(data)
    line, col = _line_col(data, first_bad)
    where = f"byte 0x{data[first_bad]:02x} at line {line}, column {col}"
    return ListText(path, text, f"cp1252 (not UTF-8: {where})", data)


def _cp1252(data: bytes) -> str:
    # cp1252 leaves 0x81, 0x8D, 0x8F, 0x90, 0x9D undefined: Latin-1 (the same code point) for those.
    text = data.decode("cp1252", errors="surrogateescape")
    return re.sub("[\udc80-\udcff]", lambda m: chr(ord(m.group()) - 0xDC00), text)


def read_list_text(path: Path) -> ListText:
    """Read and decode one list file (see ``decode_list_bytes``); a non-UTF-8 list is logged once."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read list file {path}: {e}") from e
    out = decode_list_bytes(data, Path(path))
    if out.encoding not in ("UTF-8", "UTF-8 with BOM"):
        log.info("list file %s read as %s", path, out.encoding)
    return out


def show_path(p: str | Path) -> str:
    """``p`` with every invisible or non-printing character written as an escape (``\\ufeff``).

    Ordinary non-ASCII letters (é, ü, 中) stay as they are; a NUL, a BOM, a zero-width or
    no-break space, a control character or an undecodable byte (a surrogate escape) does not.
    """
    out = []
    for ch in str(p):
        cat = unicodedata.category(ch)
        if ch in INVISIBLE or cat in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") or (cat == "Zs" and ch != " "):
            code = ord(ch)
            if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8 in a file name (surrogateescape)
                out.append(f"\\x{code - 0xDC00:02x}")
            else:
                out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    shown = "".join(out)
    if shown != str(p):
        found = sorted({_char_name(ch) for ch in str(p) if ch not in shown})
        return f"{shown!s} [contains invisible characters: {', '.join(found)}]"
    return shown


def _char_name(ch: str) -> str:
    if 0xDC80 <= ord(ch) <= 0xDCFF:
        return f"non-UTF-8 byte 0x{ord(ch) - 0xDC00:02x}"
    return INVISIBLE.get(ch) or unicodedata.name(ch, f"U+{ord(ch):04X}")


def _candidates(rel: str) -> list[str]:
    """Other spellings of ``rel`` that tools produce, in the order they are tried."""
    out: list[str] = []

    def add(s: str) -> None:
        if s and s != rel and s not in out:
            out.append(s)

    base = rel.replace("\\", "/")
    add(base)
    cleaned = "".join(ch for ch in base if ch not in INVISIBLE or ch in ("\u00a0", "\u202f"))
    cleaned = cleaned.replace("\u00a0", " ").replace("\u202f", " ").strip()
    add(cleaned)
    for form in ("NFC", "NFD"):
        add(unicodedata.normalize(form, cleaned))
    # A file whose name on disk is Latin-1/cp1252 bytes (unzipped from Windows): Python sees those
    # bytes as surrogate escapes; the list (UTF-8 or cp1252) names the same letters.
    for codec in ("cp1252", "latin-1"):
        try:
            add(cleaned.encode(codec).decode("utf-8", "surrogateescape"))
            break
        except UnicodeEncodeError:
            continue
    return out


def needs_resolution(rel: str) -> bool:
    """Only entries with a backslash or a non-ASCII character can have another spelling on disk."""
    return "\\" in rel or not rel.isascii()


def same_file(path: str | Path) -> str:
    """One spelling per file, to tell whether two listed entries name the same file: ``os.path.realpath``.

    Applied to what ``resolve_listed`` returned: ``./a.png`` and ``a.png``, ``x/../a.png``, an absolute path
    into the dataset folder and a symbolic link to the file all give the same string (also for a missing file).
    """
    return os.path.realpath(path)


def resolve_listed(base: Path, rel: str) -> tuple[Path, str | None]:
    """The file ``base/rel`` as written, else the first existing other spelling; and a note on the change.

    Returns ``(path, note)``: ``note`` is None when ``rel`` is used as written (also when no
    spelling exists: the caller reports the path as missing with ``show_path``).
    """
    literal = base / rel
    if not needs_resolution(rel) or literal.exists():
        return literal, None
    for cand in _candidates(rel):
        p = base / cand
        if p.exists():
            return p, f"{show_path(rel)} found as {show_path(cand)}"
    return literal, None
