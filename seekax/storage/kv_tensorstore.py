"""KV page backend on tensorstore's kvstore drivers ("memory://", "file:///dir/", and object stores such as
"gs://bucket/prefix/" or "s3://..." where tensorstore has the driver and credentials).

One value per page, named `v2/<generation:016x>-<key hex>-<crc32:08x>`: a listing alone rebuilds the index and
the LRU order, and each write is whole-or-absent (the drivers write atomically per key), so no log is needed.
A value is the page bytes, then the page's 16-byte key and a CRC-32 of both: a value read under a name whose
key was altered (a flipped bit in a listing or a file name) carries another key and is refused, as is a value
whose bytes fail the checksum. Reads and writes of a batch are issued together and awaited together.

Processes: one writer, any number of `readonly` readers, which see the pages listed when they opened and after
each `refresh()` (a listing); a page deleted since reads as missing (a miss).
"""

from __future__ import annotations

import json
import struct

import numpy as np
import tensorstore as ts

from seekax.ir.validate import fail
from seekax.storage.atomic import StorageFullError, crc32

META = "meta.json"
PREFIX = "v2/"
TRAILER = 20  # 16-byte key + CRC-32 of page and key


def _value(page, key: bytes) -> bytes:
    body = bytes(page) + key
    return body + struct.pack("<I", crc32(body))


def _parse(name: str) -> tuple[int, bytes, int] | None:
    try:
        gen_hex, key_hex, crc_hex = name[len(PREFIX):].split("-")
        return int(gen_hex, 16), bytes.fromhex(key_hex), int(crc_hex, 16)
    except ValueError:
        return None  # not ours (or a name whose bytes were damaged)


class TensorStoreBackend:
    def __init__(self, url: str, *, meta: dict, page_bytes: int, readonly: bool = False):
        if not url.endswith("/"):
            url += "/"
        try:
            self.kv = ts.KvStore.open(url).result()
        except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError/OSError variants by driver
            raise fail("path", url, f"a tensorstore kvstore URL such as memory:// or file:///dir/ ({e})") from None
        self.page_bytes, self.readonly = page_bytes, readonly
        got = self.kv.read(META).result()
        if got.state == "value":
            have = json.loads(got.value)
            if have != meta:
                raise fail("page_shape/dtype/capacity_pages", meta, f"the values this store was created with {have}")
        elif readonly:
            raise fail("path", url, "an existing KV store to open readonly (no meta.json)")
        else:
            self.kv.write(META, json.dumps(meta).encode()).result()
        self._name: dict[bytes, str] = {}
        self._gen = 0

    def _list(self) -> list[tuple[int, bytes, int, str]]:
        out = []
        for raw in self.kv.list(ts.KvStore.KeyRange(PREFIX, PREFIX[:-1] + "0")).result():
            name = raw.decode(errors="replace")
            parsed = _parse(name)
            if parsed is not None and len(parsed[1]) == 16:
                out.append((*parsed, name))
        return sorted(out)

    def load(self) -> tuple[list[tuple[bytes, int]], dict]:
        entries = self._list()
        self._name = {key: name for _, key, _, name in entries}
        self._gen = max([self._gen] + [g for g, _, _, _ in entries])
        return [(k, c) for _, k, c, _ in entries], {"pages_listed": len(entries)}

    def refresh(self) -> list[tuple[bytes, int | None]]:
        """A new listing, as (key, crc or None when gone) changes against the last one."""
        before = dict(self._name)
        entries = self._list()
        self._name = {key: name for _, key, _, name in entries}
        gone = [(k, None) for k in before if k not in self._name]
        return gone + [(k, c) for _, k, c, name in entries if before.get(k) != name]

    def put(self, keys: list[bytes], data: list, crcs: list[int], evicted: list[bytes]) -> None:
        futures = [self.kv.delete_range(ts.KvStore.KeyRange(self._name[k], self._name[k] + "\0")) for k in evicted]
        for k in evicted:
            del self._name[k]
        names = []
        for k, d, c in zip(keys, data, crcs):
            self._gen += 1
            name = f"{PREFIX}{self._gen:016x}-{k.hex()}-{c:08x}"
            names.append(name)
            futures.append(self.kv.write(name, _value(d, k)))
        try:
            for f in futures:
                f.result()
        except Exception as e:  # noqa: BLE001
            text = str(e).lower()
            if "space" in text or "too large" in text:
                raise StorageFullError(28, f"no space left writing KV pages: {e}") from e
            raise
        self._name.update(zip(keys, names))

    def get(self, keys: list[bytes], out) -> set[int]:
        """Read the pages of `keys` into rows of `out`; returns the positions that are missing, short, carry
        another key or fail the value checksum (misses)."""
        futures = [self.kv.read(self._name[k]) for k in keys]
        bad = set()
        for i, (k, f) in enumerate(zip(keys, futures)):
            r = f.result()
            v = r.value if r.state == "value" else b""
            if (len(v) != self.page_bytes + TRAILER or v[self.page_bytes:-4] != k
                    or crc32(memoryview(v)[:-4]) != struct.unpack("<I", v[-4:])[0]):
                bad.add(i)
            else:
                out[i] = np.frombuffer(v, dtype=np.uint8, count=self.page_bytes)
        return bad

    def drop(self, keys: list[bytes]) -> None:
        futures = []
        for k in keys:
            name = self._name.pop(k, None)
            if name is not None and not self.readonly:
                futures.append(self.kv.delete_range(ts.KvStore.KeyRange(name, name + "\0")))
        for f in futures:
            f.result()

    def close(self) -> None:
        pass
