"""Writes a sample store atomically: shards are sealed (fsync + rename) as they fill, the manifest comes last.

A shard is sealed as: fsync the data, write and fsync the index and the checksum table, rename the three from
their temp names (data first). The manifest is written last, atomically, after a directory fsync; a directory
without one reads as incomplete. Overwriting deletes the old manifest first, so a crash mid-rewrite never leaves
a store that looks whole and mixes old and new shards.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

import numpy as np

from seekax.ir.validate import canonical_dtype, check_choice, check_int, fail
from seekax.storage.atomic import (TMP_MARK, StorageFullError, atomic_write_json, close_quietly, crc32, ensure_dir,
                                   fsync_dir, full_error, is_full_error, read_json, remove_tmp_files, tmp_name)
from seekax.storage.sample_format import (DTYPES, FORMAT, KINDS, MANIFEST, SHARD_RE, VERSION, ShardInfo,
                                          group_records, manifest_crc, shard_name)


class _OpenShard:
    """The shard being filled: its temp data file, offsets, whole-file CRC and the checksum table so far."""

    def __init__(self, path: Path, group: int):
        self.tmp = tmp_name(path)
        self.file = open(self.tmp, "wb", buffering=1 << 20)
        self.offsets = [0]
        self.data_crc = 0
        self.record_crcs: list[int] = []
        self.group, self.group_crcs, self.group_fill, self.group_crc = group, [], 0, 0

    @property
    def records(self) -> int:
        return len(self.offsets) - 1

    def checksum(self, data: memoryview, sizes: list[int]) -> None:
        """Extend the whole-file CRC, the per-record CRCs and (fixed-size records) the per-group CRCs."""
        self.data_crc = crc32(data, self.data_crc)
        pos = 0
        for s in sizes:
            rec = data[pos:pos + s]
            self.record_crcs.append(crc32(rec))
            if self.group:
                self.group_crc = crc32(rec, self.group_crc)
                self.group_fill += 1
                if self.group_fill == self.group:
                    self.group_crcs.append(self.group_crc)
                    self.group_fill, self.group_crc = 0, 0
            pos += s
            self.offsets.append(self.offsets[-1] + s)

    def table(self) -> bytes:
        groups = self.group_crcs + ([self.group_crc] if self.group_fill else [])
        return np.asarray(self.record_crcs + groups, dtype="<u4").tobytes()


def check_target(path: str | os.PathLike, overwrite: bool) -> Path:
    """Store directory `path`, created and writable; a ValueError when it holds a published store and not
    `overwrite`. Callers with long work ahead (data preparation) call it first, to fail before that work."""
    path = ensure_dir("path", path)
    if (path / MANIFEST).exists() and not overwrite:
        raise fail("path", str(path), "a directory without a published store (pass overwrite=True)")
    return path


class SampleStoreWriter:
    """Use as a context manager; an exception inside aborts (temp files removed, no manifest written).

    `write(records)`: tokens kind: an array [n, seq_len] (or [seq_len]) of exactly `dtype`;
    bytes kind: one bytes-like record. `write_many(iterable)` for many bytes records.
    """

    def __init__(self, path: str | os.PathLike, *, kind: str = "tokens", seq_len: int | None = None,
                 dtype: str = "int32", shard_bytes: int = 256 << 20, overwrite: bool = False,
                 metadata: dict | None = None):
        self.kind = check_choice("kind", kind, KINDS)
        if kind == "tokens":
            self.seq_len = check_int("seq_len", seq_len, min_value=1)
            self.dtype = canonical_dtype("dtype", dtype, DTYPES)
            self.record_bytes = self.seq_len * np.dtype(self.dtype).itemsize
        else:
            if seq_len is not None:
                raise fail("seq_len", seq_len, "None for kind='bytes' (records have any size)")
            self.seq_len, self.dtype, self.record_bytes = None, "uint8", None
        self.group = group_records(self.kind, self.record_bytes)
        self.shard_bytes = check_int("shard_bytes", shard_bytes, min_value=1)
        self.metadata = dict(metadata or {})
        self.path = check_target(path, overwrite)
        manifest = self.path / MANIFEST
        if manifest.exists():
            manifest.unlink()  # unpublish first: from here on readers see an incomplete store
            fsync_dir(self.path)
        for p in self.path.iterdir():
            if SHARD_RE.match(p.name) or TMP_MARK in p.name:
                p.unlink()
        self._shards: list[ShardInfo] = []
        self._open: _OpenShard | None = None
        self._closed = False

    # -- writing -------------------------------------------------------------------------------------------
    def write(self, records) -> None:
        if self.kind == "tokens":
            arr = np.asarray(records)
            if arr.ndim == 1:
                arr = arr[None]
            if arr.ndim != 2 or arr.shape[1] != self.seq_len:
                raise fail("records.shape", tuple(arr.shape), f"(n, {self.seq_len}) for seq_len={self.seq_len}")
            if np.dtype(arr.dtype).name != self.dtype:
                raise fail("records.dtype", np.dtype(arr.dtype).name, f"{self.dtype} (the store's dtype)")
            arr = np.ascontiguousarray(arr)
            per_shard = max(1, self.shard_bytes // self.record_bytes)
            start = 0
            while start < len(arr):
                shard = self._ensure_open()
                chunk = arr[start:start + per_shard - shard.records]
                self._append(memoryview(chunk.reshape(-1).view(np.uint8)), [self.record_bytes] * len(chunk))
                start += len(chunk)
                if shard.records >= per_shard:
                    self._seal()
        else:
            if not isinstance(records, (bytes, bytearray, memoryview)):
                raise fail("record", type(records).__name__, "a bytes-like record for kind='bytes'")
            shard = self._ensure_open()
            data = memoryview(records).cast("B")
            self._append(data, [data.nbytes])
            if shard.offsets[-1] >= self.shard_bytes:
                self._seal()

    def write_many(self, records: Iterable) -> None:
        for r in records:
            self.write(r)

    def _ensure_open(self) -> _OpenShard:
        if self._closed:
            raise fail("writer", "closed", "an open writer")
        if self._open is None:
            self._open = _OpenShard(self.path / f"{shard_name(len(self._shards))}.data", self.group)
        return self._open

    def _append(self, data: memoryview, sizes: list[int]) -> None:
        shard = self._open
        try:
            shard.file.write(data)
        except OSError as e:
            self._fail(e, shard.tmp)
        shard.checksum(data, sizes)

    def _seal(self) -> None:
        """fsync the open shard's data, write its index and checksum table, rename all three into place."""
        shard, name = self._open, shard_name(len(self._shards))
        index = np.asarray(shard.offsets, dtype="<u8").tobytes()
        table = shard.table()
        tmps = {suffix: tmp_name(self.path / f"{name}.{suffix}") for suffix in ("index", "crc")}
        try:
            shard.file.flush()
            os.fsync(shard.file.fileno())
            shard.file.close()
            for suffix, payload in (("index", index), ("crc", table)):
                with open(tmps[suffix], "wb") as g:
                    g.write(payload)
                    g.flush()
                    os.fsync(g.fileno())
            os.replace(shard.tmp, self.path / f"{name}.data")
            for suffix in ("index", "crc"):
                os.replace(tmps[suffix], self.path / f"{name}.{suffix}")
        except OSError as e:
            for t in tmps.values():
                t.unlink(missing_ok=True)
            self._fail(e, shard.tmp)
        self._shards.append(ShardInfo(name=name, records=shard.records, data_bytes=shard.offsets[-1],
                                      data_crc32=shard.data_crc, index_crc32=crc32(index), crc_crc32=crc32(table)))
        self._open = None

    def _fail(self, e: OSError, tmp: Path):
        self.abort()
        if is_full_error(e):
            raise full_error(tmp, e) from e
        raise e

    # -- finishing -----------------------------------------------------------------------------------------
    def close(self) -> dict:
        """Seal the last shard, fsync the directory, then publish the manifest. Returns the manifest."""
        if self._closed:
            raise fail("writer", "closed", "an open writer")
        if self._open is not None and self._open.records:
            self._seal()
        elif self._open is not None:
            self._open.file.close()
            self._open.tmp.unlink(missing_ok=True)
            self._open = None
        fsync_dir(self.path)
        manifest = {
            "format": FORMAT, "version": VERSION, "kind": self.kind, "dtype": self.dtype, "seq_len": self.seq_len,
            "group_records": self.group, "checksum": "crc32",
            "num_records": sum(s.records for s in self._shards), "shards": [asdict(s) for s in self._shards],
            "metadata": self.metadata,
        }
        manifest["crc32"] = manifest_crc(manifest)
        try:
            atomic_write_json(self.path / MANIFEST, manifest)
        except StorageFullError:
            self._closed = True
            raise
        self._closed = True
        return manifest

    def abort(self) -> None:
        """Drop everything written so far; the directory reads as incomplete."""
        if self._open is not None:
            close_quietly(self._open.file)
            self._open.tmp.unlink(missing_ok=True)
            self._open = None
        remove_tmp_files(self.path)
        self._closed = True

    def __enter__(self) -> "SampleStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:
            self.abort()


def write_token_store(path: str | os.PathLike, sequences: np.ndarray, **kwargs) -> dict:
    """One-call writer for a [n, seq_len] token array. Returns the manifest."""
    sequences = np.asarray(sequences)
    if sequences.ndim != 2:
        raise fail("sequences.shape", tuple(sequences.shape), "(n, seq_len)")
    kwargs.setdefault("dtype", np.dtype(sequences.dtype).name)
    with SampleStoreWriter(path, kind="tokens", seq_len=sequences.shape[1], **kwargs) as w:
        w.write(sequences)
    return read_json(Path(path) / MANIFEST)
