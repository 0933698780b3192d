"""Sample store: record shards (data file + uint64 offsets index) published by a manifest written last.

Layout of a store directory:
  shard-00000.data   records back to back
  shard-00000.index  uint64 little-endian offsets, records + 1 entries (offsets[i]..offsets[i+1] is record i)
  manifest.json      kind, dtype, seq_len, and per shard: records, data_bytes, CRC-32 of data and index

Two kinds: "tokens" (fixed-size records of `seq_len` elements of `dtype`, e.g. packed int32 token sequences;
batches come back as one [batch, seq_len] array read with scatter `os.preadv` straight into it) and "bytes"
(variable-size records, batches come back as a list of bytes). A store without a manifest is incomplete and
never opens; a manifest whose shard sizes disagree with the files names the torn shard.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from seekax.ir.validate import canonical_dtype, check_choice, check_int, fail
from seekax.storage.atomic import (TMP_MARK, StorageFullError, atomic_write_json, close_quietly, crc32, ensure_dir,
                                   file_crc32, fsync_dir, full_error, is_full_error, read_json, remove_tmp_files,
                                   tmp_name)

FORMAT = "seekax.sample_store"
VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("tokens", "bytes")
DTYPES = ("int32", "uint32", "int16", "uint16", "uint8", "int8", "int64", "float32", "bfloat16", "float16")
IOV_MAX = 1024  # Linux limit on buffers per preadv call
_SHARD_RE = re.compile(r"^shard-(\d{5})\.(data|index)$")


class IncompleteStoreError(ValueError):
    """The directory holds no manifest: a writer did not finish (or it is not a store)."""


class CorruptStoreError(ValueError):
    """A published shard does not match its manifest entry (torn file, flipped byte)."""


@dataclass(frozen=True, kw_only=True)
class ShardInfo:
    name: str
    records: int
    data_bytes: int
    data_crc32: int
    index_crc32: int


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


class SampleStoreWriter:
    """Writes a store atomically: shards are sealed (fsync + rename) as they fill, the manifest comes last.

    Use as a context manager; an exception inside aborts (temp files removed, no manifest written).
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
        self.shard_bytes = check_int("shard_bytes", shard_bytes, min_value=1)
        self.metadata = dict(metadata or {})
        self.path = ensure_dir("path", path)
        manifest = self.path / MANIFEST
        if manifest.exists():
            if not overwrite:
                raise fail("path", str(self.path), "a directory without a published store (pass overwrite=True)")
            manifest.unlink()  # unpublish first: from here on readers see an incomplete store
            fsync_dir(self.path)
        for p in self.path.iterdir():
            if _SHARD_RE.match(p.name) or TMP_MARK in p.name:
                p.unlink()
        self._shards: list[ShardInfo] = []
        self._open = None  # (data file, data tmp path, offsets list, running crc)
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
                self._ensure_open()
                room = per_shard - (len(self._open[2]) - 1)
                chunk = arr[start:start + room]
                self._append(memoryview(chunk.reshape(-1).view(np.uint8)), [self.record_bytes] * len(chunk))
                start += len(chunk)
                if len(self._open[2]) - 1 >= per_shard:
                    self._seal()
        else:
            if not isinstance(records, (bytes, bytearray, memoryview)):
                raise fail("record", type(records).__name__, "a bytes-like record for kind='bytes'")
            self._ensure_open()
            self._append(memoryview(records).cast("B"), [memoryview(records).nbytes])
            if self._open[2][-1] >= self.shard_bytes:
                self._seal()

    def write_many(self, records: Iterable) -> None:
        for r in records:
            self.write(r)

    def _ensure_open(self) -> None:
        if self._closed:
            raise fail("writer", "closed", "an open writer")
        if self._open is None:
            final = self.path / f"{shard_name(len(self._shards))}.data"
            tmp = tmp_name(final)
            self._open = [open(tmp, "wb", buffering=1 << 20), tmp, [0], 0]

    def _append(self, data: memoryview, sizes: Sequence[int]) -> None:
        f, tmp, offsets, running = self._open
        try:
            f.write(data)
        except OSError as e:
            self._fail(e, tmp)
        self._open[3] = crc32(data, running)
        last = offsets[-1]
        for s in sizes:
            last += s
            offsets.append(last)

    def _seal(self) -> None:
        """fsync the open shard's data, write its index, rename both into place (data first, index second)."""
        f, tmp, offsets, data_crc = self._open
        name = shard_name(len(self._shards))
        index = np.asarray(offsets, dtype="<u8").tobytes()
        index_tmp = tmp_name(self.path / f"{name}.index")
        try:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            with open(index_tmp, "wb") as g:
                g.write(index)
                g.flush()
                os.fsync(g.fileno())
            os.replace(tmp, self.path / f"{name}.data")
            os.replace(index_tmp, self.path / f"{name}.index")
        except OSError as e:
            index_tmp.unlink(missing_ok=True)
            self._fail(e, tmp)
        self._shards.append(ShardInfo(name=name, records=len(offsets) - 1, data_bytes=offsets[-1],
                                      data_crc32=data_crc, index_crc32=crc32(index)))
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
        if self._open is not None and len(self._open[2]) > 1:
            self._seal()
        elif self._open is not None:
            self._open[0].close()
            self._open[1].unlink(missing_ok=True)
            self._open = None
        fsync_dir(self.path)
        manifest = {
            "format": FORMAT, "version": VERSION, "kind": self.kind, "dtype": self.dtype, "seq_len": self.seq_len,
            "num_records": sum(s.records for s in self._shards), "shards": [asdict(s) for s in self._shards],
            "metadata": self.metadata,
        }
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
            close_quietly(self._open[0])
            self._open[1].unlink(missing_ok=True)
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


class SampleStore:
    """Reads a published store. `read(indices)` serves a whole batch with sorted, coalesced reads.

    Opening checks the manifest and every shard's file sizes (cheap); `verify()` recomputes the checksums.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = False, max_gap_bytes: int = 16 << 10):
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise fail("path", str(path), "a sample store directory (it is a file)")
        if not path.is_dir():
            raise fail("path", str(path), "an existing sample store directory")
        if not (path / MANIFEST).exists():
            found = sorted(p.name for p in path.iterdir() if _SHARD_RE.match(p.name) or TMP_MARK in p.name)
            raise IncompleteStoreError(f"path={str(path)!r}: no {MANIFEST}, the store is incomplete (a writer did "
                                       f"not finish); unpublished files: {found}")
        m = read_json(path / MANIFEST, "manifest")
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise fail("manifest", f"{m.get('format')} v{m.get('version')}", f"{FORMAT} v{VERSION}")
        self.path, self.manifest = path, m
        self.kind, self.dtype, self.seq_len = m["kind"], np.dtype(m["dtype"]), m["seq_len"]
        self.max_gap_bytes = check_int("max_gap_bytes", max_gap_bytes)
        self.shards = [ShardInfo(**s) for s in m["shards"]]
        self.record_bytes = self.seq_len * self.dtype.itemsize if self.kind == "tokens" else None
        self._fds: list[int] = []
        self._offsets: list[np.ndarray] = []
        for s in self.shards:
            data, index = path / f"{s.name}.data", path / f"{s.name}.index"
            for p, want in ((data, s.data_bytes), (index, 8 * (s.records + 1))):
                size = p.stat().st_size if p.exists() else None
                if size != want:
                    self.close()
                    raise CorruptStoreError(f"shard {s.name}: {p.name} has {size} bytes, manifest says {want} "
                                            "(torn or missing shard)")
            self._offsets.append(np.fromfile(index, dtype="<u8").astype(np.int64))
            self._fds.append(os.open(data, os.O_RDONLY))
        counts = np.asarray([s.records for s in self.shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_records = int(self._starts[-1])
        if verify:
            problems = self.verify()
            if problems:
                self.close()
                raise CorruptStoreError("; ".join(problems))

    def __len__(self) -> int:
        return self.num_records

    def verify(self) -> list[str]:
        """Recompute every shard's checksums; returns one line per problem (empty list: the store is whole)."""
        return [p for i in range(len(self.shards)) for p in self.verify_shard(i)]

    def verify_shard(self, i: int) -> list[str]:
        """Checksum problems of shard `i` (its data and index files)."""
        s = self.shards[i]
        problems = []
        for suffix, want in (("data", s.data_crc32), ("index", s.index_crc32)):
            got = file_crc32(self.path / f"{s.name}.{suffix}")
            if got != want:
                problems.append(f"shard {s.name}: {suffix} checksum {got:08x} != manifest {want:08x}")
        return problems

    def _check_indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise fail("indices", f"array{idx.shape} of {idx.dtype}", "a 1-D sequence of integer record indices")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_records):
            bad = int(idx[(idx < 0) | (idx >= self.num_records)][0])
            raise fail("indices", bad, f"record indices in [0, {self.num_records})")
        return idx

    def _plan(self, idx: np.ndarray) -> tuple[list[int], list[int], list[int], list[int]]:
        """Sorted reads grouped into coalesced runs: (shard, local index, batch position) per sorted record, as
        lists, and run boundaries. A run stays in one shard, skips gaps of at most `max_gap_bytes` (read and
        thrown away) and holds at most IOV_MAX / 2 records (one preadv call each)."""
        order = np.argsort(idx, kind="stable")
        s = idx[order]
        if len(self.shards) == 1:
            shard, local = np.zeros_like(s), s
        else:
            shard = np.searchsorted(self._starts, s, side="right") - 1
            local = s - self._starts[shard]
        if self.record_bytes is not None:
            begin = local * self.record_bytes
            end = begin + self.record_bytes
        else:
            begin, end = np.empty_like(local), np.empty_like(local)
            for sh in np.unique(shard):
                m = shard == sh
                begin[m] = self._offsets[sh][local[m]]
                end[m] = self._offsets[sh][local[m] + 1]
        cut = (shard[1:] != shard[:-1]) | (begin[1:] - end[:-1] > self.max_gap_bytes)
        bounds = np.concatenate([[0], np.flatnonzero(cut) + 1, [len(s)]]).tolist()
        step = IOV_MAX // 2
        if len(bounds) > 1 and max(b - a for a, b in zip(bounds, bounds[1:])) > step:
            bounds = sorted({x for a, b in zip(bounds, bounds[1:]) for x in range(a, b, step)} | {len(s)})
        return shard.tolist(), local.tolist(), order.tolist(), bounds

    def read(self, indices) -> np.ndarray | list[bytes]:
        """Records at `indices` (any order, repeats allowed). tokens: [n, seq_len] array; bytes: list of bytes."""
        idx = self._check_indices(indices)
        if self.kind == "tokens":
            out = np.empty((len(idx), self.seq_len), dtype=self.dtype)
            self._read_fixed(idx, out)
            return out
        out: list = [None] * len(idx)
        if not len(idx):
            return out
        sh, lo, po, bounds = self._plan(idx)
        for a, b in zip(bounds, bounds[1:]):
            offs = self._offsets[sh[a]]
            base = int(offs[lo[a]])
            buf = os.pread(self._fds[sh[a]], int(offs[lo[b - 1] + 1]) - base, base)
            for li, p in zip(lo[a:b], po[a:b]):
                out[p] = buf[int(offs[li]) - base:int(offs[li + 1]) - base]
        return out

    def advise(self, indices) -> None:
        """Hint the kernel to start reading these records now (posix_fadvise WILLNEED per coalesced run), so
        the reads of later batches overlap the current one: queue depth without extra threads."""
        idx = self._check_indices(indices)
        if not len(idx):
            return
        run = self._contiguous(idx) if self.record_bytes is not None else None
        if run is not None:
            os.posix_fadvise(self._fds[run[0]], run[1] * self.record_bytes, len(idx) * self.record_bytes,
                             os.POSIX_FADV_WILLNEED)
            return
        sh, lo, _, bounds = self._plan(idx)
        for a, b in zip(bounds, bounds[1:]):
            offs = self._offsets[sh[a]]
            start = int(offs[lo[a]])
            os.posix_fadvise(self._fds[sh[a]], start, int(offs[lo[b - 1] + 1]) - start, os.POSIX_FADV_WILLNEED)

    def read_into(self, indices, out: np.ndarray) -> None:
        """tokens kind: scatter-read records at `indices` into rows of `out` [n, seq_len] (no extra copy)."""
        if self.kind != "tokens":
            raise fail("kind", self.kind, "'tokens' for read_into")
        idx = self._check_indices(indices)
        if out.shape != (len(idx), self.seq_len) or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise fail("out", f"{out.dtype}{out.shape}", f"a C-contiguous {self.dtype}({len(idx)}, {self.seq_len})")
        self._read_fixed(idx, out)

    def _contiguous(self, idx: np.ndarray) -> tuple[int, int] | None:
        """(shard, first local index) when `idx` is an ascending run of consecutive records inside one shard (what
        block-shuffle and sequential batches are): one read, no sort, no plan. None otherwise."""
        first, n = int(idx[0]), len(idx)
        if int(idx[-1]) != first + n - 1 or (n > 2 and not (np.diff(idx) == 1).all()):
            return None
        shard = int(np.searchsorted(self._starts, first, side="right")) - 1
        if first + n > self._starts[shard + 1]:
            return None
        return shard, first - int(self._starts[shard])

    def _read_fixed(self, idx: np.ndarray, out: np.ndarray) -> None:
        if not len(idx):
            return
        rb = self.record_bytes
        mv = memoryview(out.reshape(-1).view(np.uint8))
        run = self._contiguous(idx)
        if run is not None:
            shard, local = run
            got = os.preadv(self._fds[shard], [mv], local * rb)
            if got != len(mv):
                raise CorruptStoreError(f"shard {self.shards[shard].name}: short read ({got} of {len(mv)} bytes)")
            return
        sh, lo, po, bounds = self._plan(idx)
        for a, b in zip(bounds, bounds[1:]):
            fd = self._fds[sh[a]]
            if b - a == 1:  # the common case for random access: one record, one buffer
                p = po[a]
                got, expect = os.preadv(fd, [mv[p * rb:(p + 1) * rb]], lo[a] * rb), rb
            else:
                bufs, prev, repeats = [], None, False
                for li, p in zip(lo[a:b], po[a:b]):
                    if li == prev:  # repeated index: copied below
                        repeats = True
                        continue
                    if prev is not None and li > prev + 1:
                        bufs.append(bytearray((li - prev - 1) * rb))
                    bufs.append(mv[p * rb:(p + 1) * rb])
                    prev = li
                expect = (lo[b - 1] - lo[a] + 1) * rb
                got = os.preadv(fd, bufs, lo[a] * rb)
                if repeats:
                    first: dict[int, int] = {}
                    for li, p in zip(lo[a:b], po[a:b]):
                        if li in first:
                            out[p] = out[first[li]]
                        else:
                            first[li] = p
            if got != expect:
                raise CorruptStoreError(f"shard {self.shards[sh[a]].name}: short read ({got} of {expect} bytes)")

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> "SampleStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def summary(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "dtype": self.dtype.name, "seq_len": self.seq_len,
                "num_records": self.num_records, "num_shards": len(self.shards),
                "data_bytes": sum(s.data_bytes for s in self.shards), "metadata": self.manifest.get("metadata", {})}
