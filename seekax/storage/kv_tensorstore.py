"""KV page backend on tensorstore's kvstore drivers ("memory://", "file:///dir/", and object stores such as
"gs://bucket/prefix/" or "s3://..." where tensorstore has the driver and credentials).

One value per page, named `p/<generation:016x>-<key hex>-<crc32:08x>`: a listing alone rebuilds the index and
the LRU order, and each write is whole-or-absent (the drivers write atomically per key), so no log is needed.
Reads and writes of a batch are issued together and awaited together (the drivers overlap them).
"""

from __future__ import annotations

import json

import numpy as np
import tensorstore as ts

from seekax.ir.validate import fail
from seekax.storage.atomic import StorageFullError

META = "meta.json"


class TensorStoreBackend:
    def __init__(self, url: str, *, meta: dict, page_bytes: int):
        if not url.endswith("/"):
            url += "/"
        try:
            self.kv = ts.KvStore.open(url).result()
        except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError/OSError variants by driver
            raise fail("path", url, f"a tensorstore kvstore URL such as memory:// or file:///dir/ ({e})") from None
        self.page_bytes = page_bytes
        got = self.kv.read(META).result()
        if got.state == "value":
            have = json.loads(got.value)
            if have != meta:
                raise fail("page_shape/dtype/capacity_pages", meta, f"the values this store was created with {have}")
        else:
            self.kv.write(META, json.dumps(meta).encode()).result()
        self._name: dict[bytes, str] = {}
        self._gen = 0

    def load(self) -> tuple[list[tuple[bytes, int]], dict]:
        entries = []
        for raw in sorted(self.kv.list(ts.KvStore.KeyRange("p/", "p0")).result()):
            name = raw.decode()
            try:
                gen_hex, key_hex, crc_hex = name[2:].split("-")
                gen, key, crc = int(gen_hex, 16), bytes.fromhex(key_hex), int(crc_hex, 16)
            except ValueError:
                continue  # not ours
            self._gen = max(self._gen, gen)
            self._name[key] = name
            entries.append((gen, key, crc))
        entries.sort()
        return [(k, c) for _, k, c in entries], {"pages_listed": len(entries)}

    def put(self, keys: list[bytes], data: list, crcs: list[int], evicted: list[bytes]) -> None:
        futures = [self.kv.delete_range(ts.KvStore.KeyRange(self._name[k], self._name[k] + "\0")) for k in evicted]
        for k in evicted:
            del self._name[k]
        names = []
        for k, d, c in zip(keys, data, crcs):
            self._gen += 1
            name = f"p/{self._gen:016x}-{k.hex()}-{c:08x}"
            names.append(name)
            futures.append(self.kv.write(name, bytes(d)))
        try:
            for f in futures:
                f.result()
        except Exception as e:  # noqa: BLE001
            if "space" in str(e).lower():
                raise StorageFullError(28, f"no space left writing KV pages: {e}") from e
            raise
        self._name.update(zip(keys, names))

    def get(self, keys: list[bytes], out) -> None:
        futures = [self.kv.read(self._name[k]) for k in keys]
        for i, f in enumerate(futures):
            r = f.result()
            if r.state != "value" or len(r.value) != self.page_bytes:
                out[i] = 0  # missing or short value: fails the page checksum, served as a miss
            else:
                out[i] = np.frombuffer(r.value, dtype=np.uint8)

    def drop(self, keys: list[bytes]) -> None:
        futures = []
        for k in keys:
            name = self._name.pop(k, None)
            if name is not None:
                futures.append(self.kv.delete_range(ts.KvStore.KeyRange(name, name + "\0")))
        for f in futures:
            f.result()

    def close(self) -> None:
        pass
