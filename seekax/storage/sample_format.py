"""The sample store's on-disk format: names, manifest fields, the per-record checksum table, typed errors.

Layout of a store directory (format version 2):
  shard-00000.data   records back to back
  shard-00000.index  uint64 little-endian offsets, records + 1 entries (offsets[i]..offsets[i+1] is record i)
  shard-00000.crc    uint32 little-endian CRC-32 per record, then (tokens kind) one per group of
                     `group_records` consecutive records, so a long contiguous read is checked in few calls
  manifest.json      kind, dtype, seq_len, group_records, and per shard: records, data_bytes, and the CRC-32
                     of the data, index and checksum files; its own CRC-32 (`crc32`, over the rest) last

Every read checks the records it returns against the table (a record, or a whole group inside a contiguous
read): a flipped bit comes back as `CorruptStoreError`, never as wrong values. The table itself is checked
against the manifest when a shard is first touched. Checksums are CRC-32 by ISA-L (see `atomic.py`): the
same bit-flip and burst guarantees as CRC-32C at these lengths, and already a dependency.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from seekax.storage.atomic import crc32

FORMAT = "seekax.sample_store"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 has no checksum table: readable only with verify_reads=False
MANIFEST = "manifest.json"
KINDS = ("tokens", "bytes")
DTYPES = ("int32", "uint32", "int16", "uint16", "uint8", "int8", "int64", "float32", "bfloat16", "float16")
GROUP_BYTES = 64 << 10  # a checksum group covers about this many bytes of fixed-size records
SHARD_RE = re.compile(r"^shard-(\d{5})\.(data|index|crc)$")


class IncompleteStoreError(ValueError):
    """The directory holds no manifest: a writer did not finish (or it is not a store)."""


class CorruptStoreError(ValueError):
    """Stored bytes do not match their checksum or the manifest (torn file, flipped bit)."""


@dataclass(frozen=True, kw_only=True)
class ShardInfo:
    name: str
    records: int
    data_bytes: int
    data_crc32: int
    index_crc32: int
    crc_crc32: int | None = None  # None in version 1 stores (no checksum table)


def manifest_crc(manifest: dict) -> int:
    """CRC-32 of a manifest's canonical JSON without its own `crc32` field."""
    body = {k: v for k, v in manifest.items() if k != "crc32"}
    return crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def group_records(kind: str, record_bytes: int | None) -> int:
    """Records per checksum group: fixed-size records grouped to about GROUP_BYTES; 0 (no groups) for bytes."""
    if kind != "tokens":
        return 0
    return max(1, GROUP_BYTES // record_bytes)


def table_entries(records: int, group: int) -> int:
    """uint32 entries in a shard's checksum table: one per record plus one per (possibly partial) group."""
    return records + (-(-records // group) if group else 0)
