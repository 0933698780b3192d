"""Default KV page backend: a preallocated slot file + an append-only index log (local disk or a POSIX mount).

Files in the directory:
  kv.meta.json  page shape, dtype, capacity (a reopen with other values is refused)
  kv.slots      capacity x page_bytes, preallocated (posix_fallocate: a full disk fails at creation, not later)
  kv.log        48-byte records with their own CRC-32 (see `kv_log.py`)
  kv.lock       held (flock) by the one process that writes

Publish order of a put: page bytes into free slots -> fdatasync(slots) -> log records -> fsync(log). A crash
before the log write leaves the slots unreferenced (free again on reopen); a crash mid-record leaves a torn tail
that is truncated on reopen; a slot overwritten before its new record landed still carries the old record, whose
page CRC then fails on read (served as a miss). On replay the highest generation owns a slot. The log is
compacted (rewritten atomically) when it grows past 4x capacity records.

Processes: one writer (an exclusive lock on kv.lock; a second writer is refused) and any number of readers
(`readonly=True`), which never write. A reader follows the log: `refresh()` applies the records appended since
its last look (and reloads whole after a compaction or a truncation). A page the writer evicts and overwrites
after a reader's refresh fails its checksum in that reader: a miss, never wrong bytes.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from seekax.ir.validate import fail
from seekax.storage.atomic import (StorageFullError, atomic_open, atomic_write_json, ensure_dir, full_error,
                                   is_full_error, read_json)
from seekax.storage.kv_log import DROP, PUT, REC, Entry, LogWriter, parse, record

META, SLOTS, LOG, LOCK = "kv.meta.json", "kv.slots", "kv.log", "kv.lock"
IOV_MAX = 1024


def _runs(slots: list[int]) -> list[tuple[int, list[int]]]:
    """Group positions by runs of consecutive slots (sorted): [(first slot, [positions])]."""
    order = sorted(range(len(slots)), key=slots.__getitem__)
    runs: list[tuple[int, list[int]]] = []
    for p in order:
        if runs and slots[p] == runs[-1][0] + len(runs[-1][1]) and len(runs[-1][1]) < IOV_MAX:
            runs[-1][1].append(p)
        else:
            runs.append((slots[p], [p]))
    return runs


class SlotFileBackend:
    def __init__(self, path: str, *, meta: dict, page_bytes: int, readonly: bool = False):
        self.readonly = readonly
        self.page_bytes, self.capacity = page_bytes, meta["capacity_pages"]
        meta_path = (ensure_dir("path", path) if not readonly else _existing_dir(path)) / META
        self.path = meta_path.parent
        if meta_path.exists():
            have = read_json(meta_path, "kv meta")
            if have != meta:
                raise fail("page_shape/dtype/capacity_pages", meta, f"the values this store was created with {have}")
        elif readonly:
            raise fail("path", str(self.path), "an existing KV store to open readonly (no kv.meta.json)")
        self._lock_fd = None if readonly else _lock(self.path)
        slots_path = self.path / SLOTS
        self._slots_fd = os.open(slots_path, os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT, 0o644)
        size = self.capacity * page_bytes
        if not readonly and os.fstat(self._slots_fd).st_size < size:
            try:
                os.posix_fallocate(self._slots_fd, 0, size)
            except OSError as e:
                self.close()
                if is_full_error(e):
                    raise full_error(slots_path, e) from e
                raise
            os.fsync(self._slots_fd)
        if not meta_path.exists():
            atomic_write_json(meta_path, meta)  # last: a store exists once its slots do
        self._log_path = self.path / LOG
        self._writer: LogWriter | None = None
        self._read_fd: int | None = None
        self._live: dict[bytes, tuple[int, int, int]] = {}  # key -> (slot, generation, page crc)
        self._owner: dict[int, bytes] = {}  # slot -> key
        self._gen = 0
        self._consumed, self._tail, self._ino = 0, b"", None

    # -- replay ------------------------------------------------------------------------------------------------
    def _apply(self, e: Entry) -> list[tuple[bytes, int | None]]:
        """Apply one log record to the index; returns the (key, crc or None when gone) changes it makes."""
        self._gen = max(self._gen, e.gen)
        changes: list[tuple[bytes, int | None]] = []
        if e.op == PUT:
            old = self._owner.get(e.slot)
            if old is not None and old != e.key:
                del self._live[old]
                changes.append((old, None))
            if e.key in self._live and self._live[e.key][0] != e.slot:
                self._owner.pop(self._live[e.key][0], None)
            self._live[e.key] = (e.slot, e.gen, e.page_crc)
            self._owner[e.slot] = e.key
            changes.append((e.key, e.page_crc))
        elif e.op == DROP and e.key in self._live and self._live[e.key][0] == e.slot:
            del self._live[e.key]
            del self._owner[e.slot]
            changes.append((e.key, None))
        return changes

    def _read_log(self) -> tuple[bytes, int]:
        if self._read_fd is not None:
            os.close(self._read_fd)
        try:
            self._read_fd = os.open(self._log_path, os.O_RDONLY)
        except FileNotFoundError:  # a reader opened before the writer made the log
            self._read_fd = None
            return b"", 0
        self._ino = os.fstat(self._read_fd).st_ino
        size = os.fstat(self._read_fd).st_size
        return os.pread(self._read_fd, size, 0), size

    def load(self) -> tuple[list[tuple[bytes, int]], dict]:
        """Replay the log: live (key, page crc) oldest generation first. The writer truncates a torn tail."""
        raw, size = self._read_log()
        entries, consumed, skipped = parse(raw, self.capacity)
        self._live, self._owner = {}, {}
        for e in entries:
            self._apply(e)
        self._consumed, self._tail = consumed, raw[consumed - REC:consumed] if consumed else b""
        torn = size - consumed
        if not self.readonly:
            if torn:
                os.truncate(self._log_path, consumed)
            self._writer = LogWriter(self._log_path, consumed)
            os.fsync(self._writer.fd)
            self._free = sorted(set(range(self.capacity)) - set(self._owner), reverse=True)
            if consumed // REC > 4 * self.capacity + 64:
                self._compact()
        live = sorted(self._live.items(), key=lambda kv: kv[1][1])
        return [(key, crc) for key, (_, _, crc) in live], {
            "log_records": consumed // REC, "torn_log_bytes": torn, "bad_log_records": skipped,
            "free_slots": self.capacity - len(self._live)}

    def refresh(self) -> list[tuple[bytes, int | None]]:
        """Reader: apply the log records appended since the last look; returns (key, crc or None) changes in
        order. A log that was replaced (compaction) or cut shorter is reloaded whole. The writer: no-op."""
        if not self.readonly:
            return []
        try:
            st = os.stat(self._log_path)
        except FileNotFoundError:
            return []
        rewritten = (st.st_ino != self._ino or st.st_size < self._consumed
                     or (self._consumed and os.pread(self._read_fd, REC, self._consumed - REC) != self._tail))
        if rewritten:
            before = {k: v[2] for k, v in self._live.items()}
            self.load()
            gone = [(k, None) for k in before if k not in self._live]
            new = sorted((v[1], k, v[2]) for k, v in self._live.items() if before.get(k) != v[2])
            return gone + [(k, crc) for _, k, crc in new]
        if st.st_size - self._consumed < REC:
            return []
        raw = os.pread(self._read_fd, st.st_size - self._consumed, self._consumed)
        entries, used, _ = parse(raw, self.capacity)
        changes = [c for e in entries for c in self._apply(e)]
        if used:
            self._consumed += used
            self._tail = raw[used - REC:used]
        return changes

    def _compact(self) -> None:
        """Rewrite the log as one put record per live page (generation order kept), atomically."""
        self._writer.close()
        live = sorted(self._live.items(), key=lambda kv: kv[1][1])
        with atomic_open(self._log_path, "wb") as f:
            for key, (slot, gen, crc) in live:
                f.write(record(PUT, gen, slot, crc, key))
        self._writer = LogWriter(self._log_path, len(live) * REC)

    # -- writer ------------------------------------------------------------------------------------------------
    def put(self, keys: list[bytes], data: list, crcs: list[int], evicted: list[bytes]) -> None:
        for k in evicted:
            slot = self._live.pop(k)[0]
            del self._owner[slot]
            self._free.append(slot)
        self._free.sort(reverse=True)  # lowest slots first: fresh stores fill consecutively
        slots = [self._free.pop() for _ in keys]
        try:
            for first, pos in _runs(slots):  # 1. page bytes
                bufs = [data[p] for p in pos]
                n = os.pwritev(self._slots_fd, bufs, first * self.page_bytes)
                if n != len(bufs) * self.page_bytes:
                    raise OSError(28, f"short write to {SLOTS} ({n} of {len(bufs) * self.page_bytes} bytes)")
            os.fdatasync(self._slots_fd)  # 2. durable before anything points at them
            recs = [record(PUT, self._gen + 1 + i, s, c, k) for i, (k, s, c) in enumerate(zip(keys, slots, crcs))]
            self._writer.append(b"".join(recs))  # 3. publish (whole records, or nothing and an error)
        except OSError as e:
            self._free.extend(slots)
            if is_full_error(e) and not isinstance(e, StorageFullError):
                raise full_error(self.path, e) from e
            raise
        for i, (k, s, c) in enumerate(zip(keys, slots, crcs)):
            self._live[k] = (s, self._gen + 1 + i, c)
            self._owner[s] = k
        self._gen += len(keys)
        if self._writer.size // REC > 4 * self.capacity + 64:
            self._compact()

    def drop(self, keys: list[bytes]) -> None:
        """Forget pages whose checksum failed; the writer also logs it (a reader keeps it to itself)."""
        recs = []
        for k in keys:
            entry = self._live.pop(k, None)
            if entry is not None:
                s = entry[0]
                del self._owner[s]
                if not self.readonly:
                    self._gen += 1
                    recs.append(record(DROP, self._gen, s, 0, k))
                    self._free.append(s)
        if recs:
            try:
                self._writer.append(b"".join(recs))
            except OSError:  # not logged: on reopen the page fails its checksum again and is dropped then
                pass

    # -- both --------------------------------------------------------------------------------------------------
    def get(self, keys: list[bytes], out) -> set[int]:
        """Read the pages of `keys` into rows of `out` [n, page_bytes] uint8 (sorted, coalesced preadv). Returns
        the positions whose bytes could not be read (none here: the page checksums judge the rest)."""
        slots = [self._live[k][0] for k in keys]
        for first, pos in _runs(slots):
            bufs = [out[p] for p in pos]
            n = os.preadv(self._slots_fd, bufs, first * self.page_bytes)
            if n != len(bufs) * self.page_bytes:
                raise OSError(5, f"short read from {SLOTS} ({n} bytes)")
        return set()

    def close(self) -> None:
        if getattr(self, "_writer", None) is not None:
            self._writer.close()
            self._writer = None
        for name in ("_read_fd", "_slots_fd", "_lock_fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


def _existing_dir(path: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise fail("path", str(p), "an existing KV store directory to open readonly")
    return p


def _lock(directory) -> int:
    """Take the store's writer lock (released when the fd closes, also when the process dies)."""
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise fail("path", str(directory), "a KV store no other process (or open store) is writing: open it "
                                           "with readonly=True to read alongside its writer") from None
    return fd
