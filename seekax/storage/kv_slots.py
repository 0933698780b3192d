"""Default KV page backend: a preallocated slot file + an append-only index log (local disk or a POSIX mount).

Files in the directory:
  kv.meta.json  page shape, dtype, capacity (a reopen with other values is refused)
  kv.slots      capacity x page_bytes, preallocated (posix_fallocate: a full disk fails at creation, not later)
  kv.log        48-byte records: magic, op (put/drop), generation, slot, page CRC-32, 16-byte key, record CRC-32

Publish order of a put: page bytes into free slots -> fdatasync(slots) -> log records -> fsync(log). A crash
before the log write leaves the slots unreferenced (free again on reopen); a crash mid-record leaves a torn tail
that fails its record CRC and is truncated on reopen; a slot overwritten before its new record landed still
carries the old record, whose page CRC then fails on read (served as a miss). On replay the highest generation
owns a slot. The log is compacted (rewritten atomically) when it grows past 4x capacity records.
"""

from __future__ import annotations

import os
import struct

from seekax.ir.validate import fail
from seekax.storage.atomic import (atomic_open, atomic_write_json, crc32, ensure_dir, full_error, is_full_error,
                                   read_json)

META, SLOTS, LOG = "kv.meta.json", "kv.slots", "kv.log"
MAGIC = b"KVP1"
PUT, DROP = 1, 2
_BODY = struct.Struct("<4sB3xQII16s")  # magic, op, generation, slot, page crc, key: 40 bytes
_REC = 48  # body + record crc (4) + pad (4)
IOV_MAX = 1024


def _record(op: int, gen: int, slot: int, page_crc: int, key: bytes) -> bytes:
    body = _BODY.pack(MAGIC, op, gen, slot, page_crc, key)
    return body + struct.pack("<II", crc32(body), 0)


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
    def __init__(self, path: str, *, meta: dict, page_bytes: int):
        self.path = ensure_dir("path", path)
        self.page_bytes, self.capacity = page_bytes, meta["capacity_pages"]
        meta_path = self.path / META
        if meta_path.exists():
            have = read_json(meta_path, "kv meta")
            if have != meta:
                raise fail("page_shape/dtype/capacity_pages", meta, f"the values this store was created with {have}")
        slots_path = self.path / SLOTS
        self._slots_fd = os.open(slots_path, os.O_RDWR | os.O_CREAT, 0o644)
        size = self.capacity * page_bytes
        if os.fstat(self._slots_fd).st_size < size:
            try:
                os.posix_fallocate(self._slots_fd, 0, size)
            except OSError as e:
                os.close(self._slots_fd)
                if is_full_error(e):
                    raise full_error(slots_path, e) from e
                raise
            os.fsync(self._slots_fd)
        if not meta_path.exists():
            atomic_write_json(meta_path, meta)  # last: a store exists once its slots do
        self._log_path = self.path / LOG
        self._log = open(self._log_path, "ab", buffering=0)
        self._live: dict[bytes, tuple[int, int, int]] = {}  # key -> (slot, generation, page crc)
        self._gen = 0

    def load(self) -> tuple[list[tuple[bytes, int]], dict]:
        """Replay the log: live (key, page crc) oldest generation first; truncates a torn tail."""
        raw = self._log_path.read_bytes()
        owner: dict[int, tuple[int, bytes, int]] = {}  # slot -> (gen, key, crc)
        where: dict[bytes, int] = {}  # key -> slot
        good = 0
        while good + _REC <= len(raw):
            body = raw[good:good + _BODY.size]
            (rec_crc,) = struct.unpack_from("<I", raw, good + _BODY.size)
            magic, op, gen, slot, page_crc, key = _BODY.unpack(body)
            if magic != MAGIC or crc32(body) != rec_crc or slot >= self.capacity:
                break
            self._gen = max(self._gen, gen)
            if op == PUT:
                old = owner.get(slot)
                if old is not None and where.get(old[1]) == slot:
                    where.pop(old[1])
                if key in where and where[key] != slot:
                    owner.pop(where[key], None)
                owner[slot] = (gen, key, page_crc)
                where[key] = slot
            elif op == DROP and where.get(key) == slot:
                where.pop(key)
                owner.pop(slot, None)
            good += _REC
        torn = len(raw) - good
        if torn:
            self._log.truncate(good)
            os.fsync(self._log.fileno())
        live = sorted(owner.items(), key=lambda kv: kv[1][0])
        self._live = {key: (slot, gen, crc) for slot, (gen, key, crc) in live}
        self._free = sorted(set(range(self.capacity)) - set(where.values()), reverse=True)
        if len(raw) // _REC > 4 * self.capacity + 64:
            self._compact()
        return [(key, crc) for _, (_, key, crc) in live], {"log_records": good // _REC, "torn_log_bytes": torn,
                                                           "free_slots": len(self._free)}

    def _compact(self) -> None:
        """Rewrite the log as one put record per live page (generation order kept), atomically."""
        self._log.close()
        with atomic_open(self._log_path, "wb") as f:
            for key, (slot, gen, crc) in sorted(self._live.items(), key=lambda kv: kv[1][1]):
                f.write(_record(PUT, gen, slot, crc, key))
        self._log = open(self._log_path, "ab", buffering=0)

    def put(self, keys: list[bytes], data: list, crcs: list[int], evicted: list[bytes]) -> None:
        for k in evicted:
            self._free.append(self._live.pop(k)[0])
        self._free.sort(reverse=True)  # lowest slots first: fresh stores fill consecutively
        slots = [self._free.pop() for _ in keys]
        try:
            for first, pos in _runs(slots):  # 1. page bytes
                bufs = [data[p] for p in pos]
                n = os.pwritev(self._slots_fd, bufs, first * self.page_bytes)
                if n != len(bufs) * self.page_bytes:
                    raise OSError(28, "short write to kv.slots")
            os.fdatasync(self._slots_fd)  # 2. durable before anything points at them
            recs = []
            for k, s, c in zip(keys, slots, crcs):
                self._gen += 1
                recs.append(_record(PUT, self._gen, s, c, k))
            self._log.write(b"".join(recs))  # 3. publish
            os.fsync(self._log.fileno())
        except OSError as e:
            self._free.extend(slots)
            if is_full_error(e):
                raise full_error(self.path, e) from e
            raise
        gen0 = self._gen - len(keys)
        for i, (k, s, c) in enumerate(zip(keys, slots, crcs)):
            self._live[k] = (s, gen0 + i + 1, c)
        if os.fstat(self._log.fileno()).st_size // _REC > 4 * self.capacity + 64:
            self._compact()

    def get(self, keys: list[bytes], out) -> None:
        """Read the pages of `keys` into rows of `out` [n, page_bytes] uint8 (sorted, coalesced preadv)."""
        slots = [self._live[k][0] for k in keys]
        for first, pos in _runs(slots):
            bufs = [out[p] for p in pos]
            n = os.preadv(self._slots_fd, bufs, first * self.page_bytes)
            if n != len(bufs) * self.page_bytes:
                raise OSError(5, f"short read from {SLOTS} ({n} bytes)")

    def drop(self, keys: list[bytes]) -> None:
        recs = []
        for k in keys:
            entry = self._live.pop(k, None)
            if entry is not None:
                s = entry[0]
                self._gen += 1
                recs.append(_record(DROP, self._gen, s, 0, k))
                self._free.append(s)
        if recs:
            self._log.write(b"".join(recs))
            os.fsync(self._log.fileno())

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            os.close(self._slots_fd)
            self._log = None
