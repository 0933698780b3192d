"""Crash-safe file primitives shared by every store: write to a temp name, fsync, rename, fsync the directory.

A reader that opens a published name always sees a whole file; a crash leaves at most a `*.tmp-*` file that no
reader looks at. Checksums are CRC-32 (zlib's polynomial; enough to catch torn writes and flipped bytes, not a
cryptographic guarantee), computed by ISA-L (`isal`, 30-47 GB/s on this project's 2-core CI machine) and by the
standard library's zlib (~3 GB/s, the same values) where isal is not installed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
import zlib
from pathlib import Path
from typing import Any, Iterator

from seekax.ir.validate import fail

try:  # ISA-L's CRC-32 equals zlib's, ~15x faster: checksums decide how fast a KV prefix can be served
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # e.g. the GPU image, which has no isal: same values, slower
    _crc32 = zlib.crc32

TMP_MARK = ".tmp-"
CHUNK = 8 << 20


class StorageFullError(OSError):
    """The disk (or a file size limit) ran out while writing; nothing was published."""


def crc32(data, value: int = 0) -> int:
    """Running CRC-32 of bytes-like `data` (pass the previous value to continue)."""
    return _crc32(data, value) & 0xFFFFFFFF


def file_crc32(path: str | os.PathLike, length: int | None = None) -> int:
    """CRC-32 of a file's first `length` bytes (all of it when None), read in 8 MiB chunks."""
    value = 0
    with open(path, "rb", buffering=0) as f:
        remaining = length
        while remaining is None or remaining > 0:
            n = CHUNK if remaining is None else min(CHUNK, remaining)
            block = f.read(n)
            if not block:
                break
            value = crc32(block, value)
            if remaining is not None:
                remaining -= len(block)
    return value


def close_quietly(f) -> None:
    """Close a file whose buffered data is being thrown away (a flush error on close is expected then)."""
    try:
        f.close()
    except OSError:
        pass


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename/create inside directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")


def is_full_error(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def full_error(path: str | os.PathLike, e: OSError) -> StorageFullError:
    return StorageFullError(e.errno, f"no space left while writing {str(path)!r} ({os.strerror(e.errno)}); "
                                     "nothing was published, free space and rerun")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file next to `path`; on clean exit fsync it and rename it over `path` (then fsync the dir).

    On any exception the temp file is removed and `path` is untouched. ENOSPC/EFBIG become StorageFullError.
    """
    path = Path(path)
    tmp = tmp_name(path)
    f = open(tmp, mode)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        close_quietly(f)
        tmp.unlink(missing_ok=True)
        if is_full_error(e):
            raise full_error(path, e) from e
        raise
    except BaseException:
        close_quietly(f)
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike, name: str = "path") -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise fail(name, str(path), "an existing file") from None
    except json.JSONDecodeError as e:
        raise fail(name, str(path), f"valid JSON ({e})") from None


def ensure_dir(name: str, path: str | os.PathLike) -> Path:
    """Create directory `path` (and parents); a clear ValueError if it exists as a file or this user may not
    create or write it (every caller writes into it: failing here beats a traceback after the work)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise fail(name, str(path), "a directory path (it is an existing file)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise fail(name, str(path), f"a directory this user may create ({os.strerror(e.errno).lower()}: "
                                    f"{e.filename})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise fail(name, str(path), "a directory this user may write (permission denied)")
    return path


def remove_tmp_files(directory: str | os.PathLike) -> int:
    """Delete leftovers of interrupted atomic writes in `directory`; returns how many were removed."""
    n = 0
    for p in Path(directory).glob(f"*{TMP_MARK}*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n
