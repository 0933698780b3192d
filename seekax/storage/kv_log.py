"""The KV slot store's index log: fixed 48-byte records, each with its own CRC-32, appended and fsynced.

Record: magic, op (put/drop), generation, slot, page CRC-32, 16-byte key, record CRC-32, pad. Three rules keep
it whole-or-absent per record:
  * an append is checked for its full length; a short or failed write (a full disk, a file size limit) or a
    failed fsync cuts the log back to the last whole record and raises `StorageFullError` before the caller
    acknowledges anything, so later appends never land after a torn record;
  * on replay a bad record followed by good ones (a flipped bit) is skipped and counted, never followed;
  * bad records and partial bytes at the end (a crash mid-append) are the torn tail: the writer truncates it,
    a reader stops before it and looks again later (it may be an append in progress).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from seekax.storage.atomic import crc32, full_error, is_full_error

MAGIC = b"KVP1"
PUT, DROP = 1, 2
BODY = struct.Struct("<4sB3xQII16s")  # magic, op, generation, slot, page crc, key: 40 bytes
REC = 48  # body + record crc (4) + pad (4)


def record(op: int, gen: int, slot: int, page_crc: int, key: bytes) -> bytes:
    body = BODY.pack(MAGIC, op, gen, slot, page_crc, key)
    return body + struct.pack("<II", crc32(body), 0)


@dataclass(frozen=True)
class Entry:
    op: int
    gen: int
    slot: int
    page_crc: int
    key: bytes


def parse(raw: bytes, capacity: int) -> tuple[list[Entry], int, int]:
    """Good records of `raw` (a log read from a record boundary), in order. Returns (entries, consumed bytes: up
    to the end of the last good record, bad records skipped before it)."""
    entries, consumed, skipped, bad_run = [], 0, 0, 0
    for pos in range(0, len(raw) - REC + 1, REC):
        body = raw[pos:pos + BODY.size]
        (rec_crc,) = struct.unpack_from("<I", raw, pos + BODY.size)
        magic, op, gen, slot, page_crc, key = BODY.unpack(body)
        if magic != MAGIC or crc32(body) != rec_crc or slot >= capacity or op not in (PUT, DROP):
            bad_run += 1
            continue
        skipped += bad_run
        bad_run = 0
        entries.append(Entry(op, gen, slot, page_crc, key))
        consumed = pos + REC
    return entries, consumed, skipped


class LogWriter:
    """Appends whole records to the log at `path` (opened O_APPEND), or raises with the log unchanged."""

    def __init__(self, path: Path, size: int):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.size = size  # bytes of whole records: where a failed append is cut back to

    def append(self, data: bytes) -> None:
        view, done = memoryview(data), 0
        try:
            while done < len(data):
                n = os.write(self.fd, view[done:])
                if n <= 0:  # a write that makes no progress: the disk is full
                    raise OSError(28, os.strerror(28))
                done += n
            os.fsync(self.fd)
        except OSError as e:
            os.ftruncate(self.fd, self.size)  # drop the partial record: the log ends on a whole one again
            os.fsync(self.fd)
            if is_full_error(e):
                raise full_error(self.path, e) from e
            raise
        self.size += len(data)

    def close(self) -> None:
        os.close(self.fd)
