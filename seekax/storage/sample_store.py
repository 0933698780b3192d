"""Sample store reader: record shards published by a manifest (format in `sample_format.py`), read in batches.

Two kinds: "tokens" (fixed-size records of `seq_len` elements of `dtype`, e.g. packed int32 token sequences;
batches come back as one [batch, seq_len] array read with scatter `os.preadv` straight into it) and "bytes"
(variable-size records, batches come back as a list of bytes). A store without a manifest is incomplete and
never opens; a manifest whose shard sizes disagree with the files names the torn shard.

Every read checks what it returns against the per-record checksum table (`verify_reads=True`, the default): a
record, or a whole group of records inside one contiguous read. A mismatch raises `CorruptStoreError` naming
the shard and record; wrong values never come back. `verify_reads=False` skips the checks for callers that
check elsewhere. A store is also a grain `RandomAccessDataSource` (`len(store)`, `store[i]`, batched
`_getitems`), picklable for grain's worker processes (each reopens the files).

Thread-safe for reads (grain's threads share one store): `preadv` has no file position, and the per-shard
tables load once under a lock.
"""

from __future__ import annotations

import operator
import os
import threading
from pathlib import Path

import numpy as np

from seekax.ir.validate import check_int, fail
from seekax.storage.atomic import TMP_MARK, crc32, file_crc32, read_json
from seekax.storage.sample_format import (FORMAT, MANIFEST, READABLE_VERSIONS, SHARD_RE, CorruptStoreError,
                                          IncompleteStoreError, ShardInfo, manifest_crc, table_entries)
from seekax.storage.sample_writer import SampleStoreWriter, write_token_store

__all__ = ["MANIFEST", "CorruptStoreError", "IncompleteStoreError", "SampleStore", "SampleStoreWriter",
           "write_token_store"]

IOV_MAX = 1024  # Linux limit on buffers per preadv call


class SampleStore:
    """Reads a published store. `read(indices)` serves a whole batch with sorted, coalesced reads.

    Opening checks the manifest and every shard's file sizes (cheap); `verify()` recomputes the whole-file
    checksums; every read checks its records unless `verify_reads=False`.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = False, verify_reads: bool = True,
                 max_gap_bytes: int = 16 << 10):
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise fail("path", str(path), "a sample store directory (it is a file)")
        if not path.is_dir():
            raise fail("path", str(path), "an existing sample store directory")
        if not (path / MANIFEST).exists():
            found = sorted(p.name for p in path.iterdir() if SHARD_RE.match(p.name) or TMP_MARK in p.name)
            raise IncompleteStoreError(f"path={str(path)!r}: no {MANIFEST}, the store is incomplete (a writer did "
                                       f"not finish); unpublished files: {found}")
        if not isinstance(verify_reads, bool):
            raise fail("verify_reads", verify_reads, "True or False")
        try:
            m = read_json(path / MANIFEST, "manifest")
        except ValueError as e:
            raise CorruptStoreError(f"path={str(path)!r}: {MANIFEST} is not valid JSON (flipped bit or torn "
                                    f"file): {e}") from None
        if not isinstance(m, dict):
            raise CorruptStoreError(f"path={str(path)!r}: {MANIFEST} holds {type(m).__name__}, not a manifest")
        if m.get("version", 0) >= 2 and m.get("crc32") != manifest_crc(m):
            raise CorruptStoreError(f"path={str(path)!r}: {MANIFEST} fails its own checksum (flipped bit or edited "
                                    "by hand); nothing read from the store")
        if m.get("format") != FORMAT or m.get("version") not in READABLE_VERSIONS:
            raise fail("manifest", f"{m.get('format')} v{m.get('version')}", f"{FORMAT} v{READABLE_VERSIONS}")
        if m["version"] == 1 and verify_reads:
            raise fail("verify_reads", True, f"False for {path} (a version-1 store has no per-record checksums; "
                                             "rewrite it to have every read checked)")
        self.path, self.manifest, self.verify_reads = path, m, verify_reads
        self.kind, self.dtype, self.seq_len = m["kind"], np.dtype(m["dtype"]), m["seq_len"]
        self.max_gap_bytes = check_int("max_gap_bytes", max_gap_bytes)
        self.shards = [ShardInfo(**s) for s in m["shards"]]
        self.record_bytes = self.seq_len * self.dtype.itemsize if self.kind == "tokens" else None
        self.group = int(m.get("group_records", 0))
        self._fds: list[int] = []
        self._tables: list[tuple | None] = [None] * len(self.shards)  # (offsets or None, record crcs, group crcs)
        self._lock = threading.Lock()
        for s in self.shards:
            sizes = [("data", s.data_bytes), ("index", 8 * (s.records + 1))]
            if m["version"] >= 2:
                sizes.append(("crc", 4 * table_entries(s.records, self.group)))
            for suffix, want in sizes:
                p = path / f"{s.name}.{suffix}"
                size = p.stat().st_size if p.exists() else None
                if size != want:
                    self.close()
                    raise CorruptStoreError(f"shard {s.name}: {p.name} has {size} bytes, manifest says {want} "
                                            "(torn or missing shard)")
            self._fds.append(os.open(path / f"{s.name}.data", os.O_RDONLY))
        counts = np.asarray([s.records for s in self.shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_records = int(self._starts[-1])
        if verify:
            problems = self.verify()
            if problems:
                self.close()
                raise CorruptStoreError("; ".join(problems))

    # -- grain RandomAccessDataSource -----------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, record_key) -> np.ndarray | bytes:
        """One record: tokens: [seq_len] array; bytes: bytes."""
        i = operator.index(record_key)
        if not 0 <= i < self.num_records:
            raise IndexError(f"record_key={i}: expected a record index in [0, {self.num_records})")
        return self.read([i])[0]

    def _getitems(self, indices) -> list:
        """grain's batched read: the records at `indices` from one sorted, coalesced `read`."""
        return list(self.read(np.asarray(indices, dtype=np.int64)))

    def __getstate__(self) -> dict:
        return {"path": str(self.path), "verify_reads": self.verify_reads, "max_gap_bytes": self.max_gap_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], verify_reads=state["verify_reads"], max_gap_bytes=state["max_gap_bytes"])

    def __repr__(self) -> str:
        return (f"SampleStore({str(self.path)!r}, kind={self.kind!r}, records={self.num_records}, "
                f"verify_reads={self.verify_reads})")

    # -- checksums ------------------------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Recompute every shard's checksums; returns one line per problem (empty list: the store is whole)."""
        return [p for i in range(len(self.shards)) for p in self.verify_shard(i)]

    def verify_shard(self, i: int) -> list[str]:
        """Checksum problems of shard `i` (its data, index and checksum-table files)."""
        s = self.shards[i]
        problems = []
        files = [("data", s.data_crc32), ("index", s.index_crc32)] + ([("crc", s.crc_crc32)] if s.crc_crc32 is not
                                                                      None else [])
        for suffix, want in files:
            got = file_crc32(self.path / f"{s.name}.{suffix}")
            if got != want:
                problems.append(f"shard {s.name}: {suffix} checksum {got:08x} != manifest {want:08x}")
        return problems

    def _table(self, shard: int) -> tuple:
        """(offsets int64 [records + 1] or None for tokens, record CRCs, group CRCs) of `shard`, loaded on first
        use and checked against the manifest (a flipped bit in an index or table is named, never followed)."""
        t = self._tables[shard]
        if t is not None:
            return t
        with self._lock:
            if self._tables[shard] is None:
                s = self.shards[shard]
                offsets = rec = grp = None
                if self.kind == "bytes":
                    offsets = self._load(s, "index", s.index_crc32, "<u8").astype(np.int64)
                if self.verify_reads:  # uint32 arrays: 4 bytes a record in memory
                    table = self._load(s, "crc", s.crc_crc32, "<u4")
                    rec, grp = table[:s.records], table[s.records:]
                self._tables[shard] = (offsets, rec, grp)
            return self._tables[shard]

    def _load(self, s: ShardInfo, suffix: str, want: int, dtype: str) -> np.ndarray:
        raw = (self.path / f"{s.name}.{suffix}").read_bytes()
        if crc32(raw) != want:
            raise CorruptStoreError(f"shard {s.name}: {suffix} file checksum {crc32(raw):08x} != manifest "
                                    f"{want:08x} (flipped bit or overwritten file); nothing read from it")
        return np.frombuffer(raw, dtype=dtype)

    def _corrupt(self, shard: int, local: int) -> CorruptStoreError:
        s = self.shards[shard]
        return CorruptStoreError(f"shard {s.name}: record {local} (store record {int(self._starts[shard]) + local}) "
                                 "fails its checksum (flipped bit or overwritten data); no value returned")

    def _check_records(self, shard: int, locals_: list[int], rows: list[memoryview]) -> None:
        """Check records `locals_` of `shard` whose bytes are `rows`: one CRC call each, one vectorised compare."""
        if not locals_:
            return
        rec = self._table(shard)[1]
        got = np.fromiter((crc32(r) for r in rows), dtype=np.uint32, count=len(rows))
        bad = np.flatnonzero(got != rec[np.asarray(locals_)])
        if bad.size:
            raise self._corrupt(shard, locals_[int(bad[0])])

    def _check_rows(self, shard: int, local: int, data: memoryview, n: int) -> None:
        """Check `n` consecutive records starting at `local` whose bytes are `data` (a contiguous read): whole
        checksum groups in one CRC call each, the partial groups at either end record by record."""
        grp = self._table(shard)[2]
        rb, g, total = self.record_bytes, self.group, self.shards[shard].records
        end = local + n
        if g and local % g == 0 and (n % g == 0 or end == total):  # whole groups only (block-shuffle batches)
            step, first = g * rb, local // g
            want = grp[first:first + -(-n // g)].tolist()
            for k, w in enumerate(want):
                if crc32(data[k * step:(k + 1) * step]) != w:
                    break
            else:
                return
        g0 = -(-local // g)
        g1 = -(-end // g) if end == total else end // g  # the shard's last group may be partial
        if g1 <= g0:
            g0 = g1 = end // g  # no whole group inside: every record on its own
            singles = list(range(local, end))
        else:
            singles = list(range(local, g0 * g)) + list(range(min(g1 * g, total), end))
        self._check_records(shard, singles, [data[(k - local) * rb:(k - local + 1) * rb] for k in singles])
        if g1 > g0:
            spans = [(gi * g, min((gi + 1) * g, total)) for gi in range(g0, g1)]
            got = np.fromiter((crc32(data[(a - local) * rb:(b - local) * rb]) for a, b in spans), dtype=np.uint32,
                              count=len(spans))
            bad = np.flatnonzero(got != grp[g0:g1])
            if bad.size:  # name the record
                a, b = spans[int(bad[0])]
                self._check_records(shard, list(range(a, b)), [data[(k - local) * rb:(k - local + 1) * rb]
                                                               for k in range(a, b)])
                raise self._corrupt(shard, a)

    # -- reading --------------------------------------------------------------------------------------------
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
                offsets = self._table(int(sh))[0]
                begin[m] = offsets[local[m]]
                end[m] = offsets[local[m] + 1]
        cut = (shard[1:] != shard[:-1]) | (begin[1:] - end[:-1] > self.max_gap_bytes)
        bounds = np.concatenate([[0], np.flatnonzero(cut) + 1, [len(s)]]).tolist()
        step = IOV_MAX // 2
        if len(bounds) > 1 and max(b - a for a, b in zip(bounds, bounds[1:])) > step:
            bounds = sorted({x for a, b in zip(bounds, bounds[1:]) for x in range(a, b, step)} | {len(s)})
        return shard.tolist(), local.tolist(), order.tolist(), bounds

    def read(self, indices) -> np.ndarray | list[bytes]:
        """Records at `indices` (any order, repeats allowed). tokens: [n, seq_len] array; bytes: list of bytes."""
        return self._read_valid(self._check_indices(indices))

    def _read_valid(self, idx: np.ndarray) -> np.ndarray | list[bytes]:
        """`read` of indices already checked (int64, in range): the loader's per-batch path."""
        if self.kind == "tokens":
            out = np.empty((len(idx), self.seq_len), dtype=self.dtype)
            self._read_fixed(idx, out)
            return out
        out: list = [None] * len(idx)
        if not len(idx):
            return out
        sh, lo, po, bounds = self._plan(idx)
        checks: dict[int, tuple[list, list]] = {}  # shard -> (local indices, record bytes): one check per shard
        for a, b in zip(bounds, bounds[1:]):
            offs = self._table(sh[a])[0]
            base = int(offs[lo[a]])
            buf = os.pread(self._fds[sh[a]], int(offs[lo[b - 1] + 1]) - base, base)
            view, spans = memoryview(buf), []
            for li, p in zip(lo[a:b], po[a:b]):
                r0, r1 = int(offs[li]) - base, int(offs[li + 1]) - base
                if r1 > len(buf):
                    raise CorruptStoreError(f"shard {self.shards[sh[a]].name}: short read at record {li}")
                spans.append((r0, r1))
                out[p] = buf[r0:r1]
            if self.verify_reads:
                locs, rows = checks.setdefault(sh[a], ([], []))
                locs += lo[a:b]
                rows += [view[r0:r1] for r0, r1 in spans]
        for shard, (locs, rows) in checks.items():
            self._check_records(shard, locs, rows)
        return out

    def advise(self, indices) -> None:
        """Hint the kernel to start reading these records now (posix_fadvise WILLNEED per coalesced run), so
        the reads of later batches overlap the current one: queue depth without extra threads."""
        self._advise_valid(self._check_indices(indices))

    def _advise_valid(self, idx: np.ndarray) -> None:
        if not len(idx):
            return
        run = self._contiguous(idx) if self.record_bytes is not None else None
        if run is not None:
            os.posix_fadvise(self._fds[run[0]], run[1] * self.record_bytes, len(idx) * self.record_bytes,
                             os.POSIX_FADV_WILLNEED)
            return
        sh, lo, _, bounds = self._plan(idx)
        for a, b in zip(bounds, bounds[1:]):
            rb = self.record_bytes
            offs = self._table(sh[a])[0]
            start = lo[a] * rb if rb else int(offs[lo[a]])
            stop = (lo[b - 1] + 1) * rb if rb else int(offs[lo[b - 1] + 1])
            os.posix_fadvise(self._fds[sh[a]], start, stop - start, os.POSIX_FADV_WILLNEED)

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
            if self.verify_reads:
                self._check_rows(shard, local, mv, len(idx))
            return
        sh, lo, po, bounds = self._plan(idx)
        checks: dict[int, tuple[list, list]] = {}  # shard -> (local indices, rows): one check per shard
        for a, b in zip(bounds, bounds[1:]):
            fd = self._fds[sh[a]]
            if b - a == 1:  # the common case for random access: one record, one buffer
                p = po[a]
                got, expect = os.preadv(fd, [mv[p * rb:(p + 1) * rb]], lo[a] * rb), rb
            else:
                bufs, prev = [], None
                for li, p in zip(lo[a:b], po[a:b]):
                    if li == prev:  # repeated index: copied below
                        continue
                    if prev is not None and li > prev + 1:
                        bufs.append(bytearray((li - prev - 1) * rb))
                    bufs.append(mv[p * rb:(p + 1) * rb])
                    prev = li
                expect = (lo[b - 1] - lo[a] + 1) * rb
                got = os.preadv(fd, bufs, lo[a] * rb)
            if got != expect:
                raise CorruptStoreError(f"shard {self.shards[sh[a]].name}: short read ({got} of {expect} bytes)")
            first: dict[int, int] = {}
            for li, p in zip(lo[a:b], po[a:b]):
                if li in first:  # a repeated index: copied from the row read (and checked) for it
                    out[p] = out[first[li]]
                else:
                    first[li] = p
            if self.verify_reads:
                locs, rows = checks.setdefault(sh[a], ([], []))
                locs += first
                rows += [mv[p * rb:(p + 1) * rb] for p in first.values()]
        for shard, (locs, rows) in checks.items():
            self._check_records(shard, locs, rows)

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
                "data_bytes": sum(s.data_bytes for s in self.shards), "metadata": self.manifest.get("metadata", {}),
                "verify_reads": self.verify_reads}
