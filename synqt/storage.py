"""Storage: atomic file writes, the writability check, the "write failed" error, the broken-file rule.

Every file a run leaves behind is written to a temporary name in the same folder, flushed to the
disk (``fsync``) and renamed into place (``os.replace``), so a run killed at any moment, or a disk
that fills up mid-write, never leaves a half-written metrics.json or checkpoint in place of a good
one. The file gets the mode an ordinary ``open()`` would give it, ``0o666`` minus the process umask
(``mkstemp`` alone makes every file 600, so labmates could not read runs on a shared storage path).

Three storage rules live here and nowhere else (docs/storage.md):

- ``check_writable(folder, key)``: every folder a command will write is checked before data, backbone
  or cluster are touched; a folder that refuses a new file raises ``NotWritable`` naming the key or
  option that chose it, the folder and the reason (exit 2). A folder that does not exist yet is not
  created: its nearest existing parent is checked instead.
- ``WriteFailed``: a write that fails mid-run (disk full, read-only remount, I/O error) names the file,
  the free space left there and the key that chose the folder (recorded by ``check_writable``).
- ``set_aside(path, reason)``: a broken file the project reads back (a cut ``resume.pt``, a garbage
  ``progress.json`` ...) is renamed to ``<name>.broken-<UTC time>`` beside itself, never deleted, and
  named once in the log; the caller then goes on as if the file were absent (restart from epoch 0,
  rebuild a cache, rewrite a plan).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from synqt.errors import SynQTError

log = logging.getLogger("synqt.storage")


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only on non-Linux systems)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """What ``open(path, "w")`` would create: 0o666 minus the umask."""
    return 0o666 & ~current_umask()


# ------------------------------------------------------------------------------------------- storage errors


class StorageError(SynQTError):
    """A folder or file of the storage refuses what the command needs."""


class NotWritable(StorageError):
    """A folder a command will write refuses a new file; raised before anything starts (exit 2)."""


class WriteFailed(StorageError, OSError):
    """A write failed mid-run (disk full, read-only file system, I/O error).

    An ``OSError`` too (``errno`` and ``filename`` kept), so code that falls back on an unusable cache
    (``except OSError``) still does. The message names the file, the free space where it was written
    and the key or option that chose the folder.
    """

    def __init__(self, path: str | Path, err: BaseException) -> None:
        path = Path(path)
        code = getattr(err, "errno", None) or _errno_in(err)
        reason = (os.strerror(code) if code else None) or str(err)
        key = folder_key(path)
        message = (f"could not write {path}: {reason} ({free_space_text(path.parent)})"
                   + (f"; the folder was chosen by {key}" if key else ""))
        OSError.__init__(self, code or errno.EIO, message)
        self.path, self.key, self.reason, self.message = path, key, reason, message

    def __str__(self) -> str:
        return self.message


# folder (absolute) -> the config key or command-line option that chose it (filled by check_writable)
_FOLDER_KEYS: dict[Path, str] = {}

_STORAGE_ERRNOS = {errno.ENOSPC: "No space left on device", errno.EROFS: "Read-only file system",
                   errno.EIO: "Input/output error", errno.EDQUOT: "Disk quota exceeded"}


def _errno_in(err: BaseException) -> int | None:
    """The errno of a storage error hidden in a library's own exception (its cause, or its message)."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno:
            return cur.errno
        text = str(cur)
        for code, words in _STORAGE_ERRNOS.items():
            if words in text or f"os error {code})" in text:
                return code
        cur = cur.__cause__ or cur.__context__
    return None


def as_write_failed(err: BaseException, where: str | Path) -> WriteFailed | None:
    """``err`` as a ``WriteFailed`` when it is a storage failure (disk full, read-only, I/O error, quota) raised
    by a writer that is not ours (e.g. TensorBoard's event file); ``where``: the file, or the folder written."""
    if isinstance(err, WriteFailed):
        return err
    code = getattr(err, "errno", None) if isinstance(err, OSError) else _errno_in(err)
    if code not in _STORAGE_ERRNOS:
        return None
    return WriteFailed(getattr(err, "filename", None) or where, err)


def folder_key(path: str | Path) -> str | None:
    """The key or option that chose the folder ``path`` is in (nearest folder seen by ``check_writable``)."""
    p = Path(path).absolute()
    for folder in (p, *p.parents):
        if folder in _FOLDER_KEYS:
            return _FOLDER_KEYS[folder]
    return None


def _existing(folder: Path) -> Path:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def free_space_text(folder: str | Path) -> str:
    """"N free of M on FOLDER" (``shutil.disk_usage`` of the nearest existing folder), or why unknown."""
    probe = _existing(Path(folder).absolute())
    try:
        usage = shutil.disk_usage(probe)
    except OSError as err:
        return f"free space of {probe} unknown: {err.strerror or err}"
    return f"{human_bytes(usage.free)} free of {human_bytes(usage.total)} on {probe}"


def human_bytes(n: float) -> str:
    """A byte count for people: "512 B", "3.2 MiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def check_writable(folder: str | Path, key: str) -> Path:
    """Refuse (``NotWritable``) unless ``folder`` takes a new file; returns the folder, made absolute.

    ``key``: the config key or command-line option that chose the folder (``storage_path``, ``--out``,
    ``cache_dir``), named in the refusal and in any later ``WriteFailed`` under it. A folder that does not
    exist yet is not created (a refused command leaves nothing behind): its nearest existing parent must
    take a new file. The probe is a real write (a temporary file, 1 byte, removed at once), so a
    read-only mount, a full disk, missing permissions or a quota all refuse here.
    """
    folder = Path(folder).expanduser().absolute()
    probe = _existing(folder)
    where = folder if probe == folder else f"{folder} (its nearest existing parent {probe})"
    if not probe.is_dir():
        raise NotWritable(f"{key}: cannot write to {where}: {probe} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".synqt-write-check.", dir=probe)
        try:
            os.write(fd, b"\0")
            os.fsync(fd)
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    except OSError as err:
        reason = err.strerror or str(err)
        raise NotWritable(f"{key}: cannot write to {where}: {reason} ({free_space_text(probe)}); "
                          f"choose a writable folder for {key}") from None
    _FOLDER_KEYS[folder] = key
    return folder


# ------------------------------------------------------------------------------------------- atomic writes


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (best effort: some file systems refuse fsync on a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None], mode: int | None = None) -> Path:
    """Call ``write(tmp_path)``, flush it to disk, then rename the temporary file onto ``path``.

    The temporary file sits in the same folder (the rename is atomic there); an existing ``path`` is
    replaced only by a complete file. ``mode``: the file's permission bits; default ``default_file_mode()``
    (honours the umask). A storage failure (disk full, read-only, I/O error) raises ``WriteFailed``
    naming the file, the free space and the key that chose the folder; the temporary file is removed.
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        write(tmp_path)
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on the disk before the name points at it
        finally:
            os.close(fd)
        os.chmod(tmp_path, default_file_mode() if mode is None else mode)
        os.replace(tmp_path, path)
        tmp_path = None
        _fsync_dir(path.parent)
    except WriteFailed:
        raise
    except Exception as err:
        if isinstance(err, OSError) or _errno_in(err) in _STORAGE_ERRNOS:
            raise WriteFailed(path, err) from err
        raise
    finally:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
    return path


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data), mode=mode)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_torch(path: str | Path, obj: Any) -> Path:
    """``torch.save(obj)`` atomically. Serialised in memory first: torch's own file writer turns a full disk
    into "unexpected pos" errors that name nothing, a plain write names ENOSPC."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_write_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file written atomically (serialised in memory, then one plain write)."""
    from safetensors.torch import save

    return atomic_write_bytes(path, save(tensors, metadata=metadata))


# ------------------------------------------------------------------------------------------ broken files

BROKEN_MARK = ".broken-"


def set_aside(path: str | Path, reason: str, then: str) -> Path | None:
    """The broken-file rule: move ``path`` (a file or folder) to ``<name>.broken-<UTC time>`` beside it and say
    so once (WARNING: the file, why it is broken, where it went, ``then``: what happens now). Returns the new
    path, or None when it could not be moved (the warning says so; the caller goes on without the file)."""
    path = Path(path)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S")
    dest = path.with_name(f"{path.name}{BROKEN_MARK}{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}{BROKEN_MARK}{stamp}.{n}")
    try:
        os.replace(path, dest)
    except FileNotFoundError:
        return None
    except OSError as err:
        log.warning("%s is broken (%s) and could not be moved aside (%s); %s", path, reason,
                    err.strerror or err, then)
        return None
    log.warning("%s is broken (%s): moved aside to %s; %s", path, reason, dest.name, then)
    return dest


def read_json_file(path: str | Path) -> Any:
    """Parsed JSON of ``path``; ``ValueError`` naming the file and what it holds when it is empty, cut or not
    JSON (``FileNotFoundError`` when absent)."""
    path = Path(path)
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"{path} is empty ({len(data)} bytes)")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path} is not valid JSON ({len(data)} bytes: {err})") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
