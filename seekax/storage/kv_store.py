"""KV-cache page store: MLA latent KV pages keyed by a chained prefix hash, so a new request reuses stored prefixes.

A page holds `page_shape[0]` tokens (64 by default) of latent KV (576 = 512 latent + 64 rope dims, bf16).
Page i of a token sequence is keyed by h_i = blake2b(h_{i-1} || tokens of page i), h_{-1} = blake2b(namespace,
page shape, dtype): equal keys mean equal whole prefixes, so `match_prefix` walks pages until the first miss.

Backends (chosen by `path`): a local path -> `kv_slots.SlotFileBackend` (a preallocated slot file + append-only
index log with checksums and generation numbers; crash-safe publish order), a URL such as "memory://" or
"file:///dir/" -> `kv_tensorstore.TensorStoreBackend` (tensorstore kvstore drivers, object-storage-like).
The store keeps the index and LRU order in memory and evicts least recently used pages when full; a prefix is
read in concurrent chunks, each checksummed by the thread that read it (a miss, never bad data, on a mismatch).
Arrays in, arrays out (numpy).

Concurrency. Threads: any number share one store; its calls are serialised by a lock (the reads inside one
call still run on IO_THREADS threads). Processes: one writer per store (the slot backend takes an exclusive
lock; a second writer is refused) and any number of `readonly=True` readers, which never write. A slot-backend
reader follows the writer's log before every match; a tensorstore-backend reader sees the pages listed when it
opened and after each `refresh()`. A page that vanishes between a reader's look at the index and its read
(evicted and overwritten by the writer) fails its checksum: a miss for every request that needs it, never an
exception and never wrong bytes.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from seekax.ir.validate import canonical_dtype, check_choice, check_int, fail
from seekax.storage.atomic import crc32

DTYPES = ("bfloat16", "float16", "float32", "float8_e4m3fn", "uint8", "int8")
HASH_BYTES = 16
READ_CHUNK = 4  # fewest pages per read (288 KiB at the default page)
IO_THREADS = 8  # chunk reads in flight per match_prefixes call (a lone 32-page prefix: 8 reads of 4 pages)
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


def chain_hashes(token_ids, page_tokens: int, *, root: bytes) -> list[bytes]:
    """Chained keys of the full pages of `token_ids` [n]: key i covers tokens [0, (i+1) * page_tokens)."""
    tokens = np.asarray(token_ids)
    if tokens.ndim != 1 or (tokens.size and not np.issubdtype(tokens.dtype, np.integer)):
        raise fail("token_ids", f"array{tokens.shape} of {tokens.dtype}", "a 1-D sequence of integer token ids")
    if tokens.size and (tokens.min() < INT32_MIN or tokens.max() > INT32_MAX):
        bad = tokens[(tokens < INT32_MIN) | (tokens > INT32_MAX)][0]
        raise fail("token_ids", f"an id {int(bad)}", f"token ids within int32 [{INT32_MIN}, {INT32_MAX}] (pages are "
                   "keyed by int32 ids; a larger id would wrap around and match another prefix)")
    tokens = tokens.astype("<i4")
    keys, prev = [], root
    for i in range(len(tokens) // page_tokens):
        prev = hashlib.blake2b(prev + tokens[i * page_tokens:(i + 1) * page_tokens].tobytes(),
                               digest_size=HASH_BYTES).digest()
        keys.append(prev)
    return keys


@dataclass
class KVStats:
    hits: int = 0  # pages served by match_prefix
    misses: int = 0  # full pages asked for and not served
    puts: int = 0  # pages written
    evictions: int = 0
    corrupt_pages: int = 0  # pages whose checksum failed on read (dropped, served as misses)
    recovered: dict = field(default_factory=dict)  # what the backend found/repaired when opening


class KVPageStore:
    """`KVPageStore(path, page_shape=(64, 576), dtype="bfloat16", capacity_pages=N, namespace="", readonly=False)`.

    `put_pages(token_ids, pages) -> n_new`: pages [n, *page_shape] of the first n full pages of token_ids.
    `match_prefix(token_ids) -> (num_tokens_matched, pages [m, *page_shape])`: the longest stored prefix.
    `match_prefixes([token_ids, ...])`: the same for a batch of requests, all their reads in flight at once.
    `refresh()`: a reader takes in what the writer published since (automatic before every match on the slot
    backend). Token ids must lie within int32.
    """

    def __init__(self, path: str | os.PathLike, *, page_shape: Sequence[int] = (64, 576), dtype="bfloat16",
                 capacity_pages: int, namespace: str = "", backend: str = "auto", readonly: bool = False):
        page_shape = tuple(page_shape)
        if not page_shape or not all(isinstance(d, (int, np.integer)) and d > 0 for d in page_shape):
            raise fail("page_shape", page_shape, "a tuple of positive ints, tokens first, e.g. (64, 576)")
        self.page_shape = tuple(int(d) for d in page_shape)
        self.page_tokens = self.page_shape[0]
        self.dtype = np.dtype(canonical_dtype("dtype", dtype, DTYPES))
        self.capacity = check_int("capacity_pages", capacity_pages, min_value=1)
        self.page_bytes = int(np.prod(self.page_shape)) * self.dtype.itemsize
        self.namespace = str(namespace)
        if not isinstance(readonly, bool):
            raise fail("readonly", readonly, "True or False")
        self.readonly = readonly
        self.root = hashlib.blake2b(repr((self.namespace, self.page_shape, self.dtype.name)).encode(),
                                    digest_size=HASH_BYTES).digest()
        backend = check_choice("backend", backend, ("auto", "slots", "tensorstore"))
        path = os.fspath(path)
        if backend == "auto":
            backend = "tensorstore" if "://" in path else "slots"
        meta = {"page_shape": list(self.page_shape), "dtype": self.dtype.name, "capacity_pages": self.capacity}
        if backend == "slots":
            from seekax.storage.kv_slots import SlotFileBackend as Backend
        else:
            from seekax.storage.kv_tensorstore import TensorStoreBackend as Backend
        self._backend = Backend(path, meta=meta, page_bytes=self.page_bytes, readonly=readonly)
        self.backend = backend
        self._auto_refresh = readonly and backend == "slots"  # following the log is one stat when idle
        self._stats = KVStats()
        self._mutex = threading.RLock()
        try:
            entries, recovered = self._backend.load()  # [(key, crc)] oldest first
        except BaseException:
            self._backend.close()
            raise
        self._stats.recovered = recovered
        self._lru: OrderedDict[bytes, int] = OrderedDict(entries)  # key -> crc32 of the page
        self._pool: ThreadPoolExecutor | None = None

    # -- API -------------------------------------------------------------------------------------------------
    def put_pages(self, token_ids, pages: np.ndarray) -> int:
        """Store the pages not stored yet; returns how many were new. Existing ones become most recent.

        Returns only once the new pages are durable; a full disk raises `StorageFullError` with nothing of this
        call published (pages it would have evicted may be gone), and the store keeps working."""
        if self.readonly:
            raise fail("put_pages", "on a readonly store", "a store opened with readonly=False (the one writer)")
        keys = chain_hashes(token_ids, self.page_tokens, root=self.root)
        pages = np.asarray(pages)
        if pages.ndim != 1 + len(self.page_shape) or tuple(pages.shape[1:]) != self.page_shape:
            raise fail("pages.shape", tuple(pages.shape), f"(n, {', '.join(map(str, self.page_shape))})")
        if pages.dtype != self.dtype:
            raise fail("pages.dtype", pages.dtype.name, f"{self.dtype.name} (the store's dtype)")
        if len(pages) > len(keys):
            raise fail("pages", f"{len(pages)} pages", f"at most the {len(keys)} full pages of token_ids")
        with self._mutex:
            new = [i for i in range(len(pages)) if keys[i] not in self._lru]
            if len(new) > self.capacity:
                raise fail("pages", f"{len(new)} new pages", f"at most capacity_pages={self.capacity}")
            # evict least recently used pages, never one of this prefix (that would cut the chain it is building)
            excess = len(self._lru) + len(new) - self.capacity
            keep = set(keys[:len(pages)])
            evicted = [k for k in self._lru if k not in keep][:max(0, excess)]
            if len(evicted) < excess:
                raise fail("pages", f"{len(pages)} pages", f"a prefix that fits capacity_pages={self.capacity}")
            for k in keys[:len(pages)]:
                if k in self._lru:
                    self._lru.move_to_end(k)
            if not new:
                return 0
            for k in evicted:
                del self._lru[k]
            data = [np.ascontiguousarray(pages[i]).reshape(-1).view(np.uint8) for i in new]
            crcs = [crc32(d) for d in data]
            self._stats.evictions += len(evicted)
            self._backend.put([keys[i] for i in new], data, crcs, evicted)
            for i, c in zip(new, crcs):
                self._lru[keys[i]] = c
            self._stats.puts += len(new)
            return len(new)

    def match_prefix(self, token_ids) -> tuple[int, np.ndarray]:
        """Longest stored prefix of `token_ids`: (tokens matched, pages [m, *page_shape]); checksums verified."""
        return self.match_prefixes([token_ids])[0]

    def match_prefixes(self, requests: Sequence) -> list[tuple[int, np.ndarray]]:
        """`match_prefix` for a batch of requests (a list of token-id sequences), with all their pages in flight
        at once: one request's 2.25 MiB is too little queue depth to keep a disk busy, a batch of admitted
        requests is not. Same results, stats and LRU updates as calling `match_prefix` on each in order."""
        if isinstance(requests, np.ndarray) and requests.ndim == 1:
            raise fail("requests", f"array{requests.shape}", "a list of token-id sequences (use match_prefix "
                       "for one)")
        keys_per = [chain_hashes(t, self.page_tokens, root=self.root) for t in requests]
        with self._mutex:
            if self._auto_refresh:
                self._apply(self._backend.refresh())
            matched = []
            for keys in keys_per:
                m = 0
                while m < len(keys) and keys[m] in self._lru:
                    m += 1
                matched.append(m)
            # One allocation for the whole batch (views per request): a single large buffer is recycled by
            # malloc, many fresh ones cost a page fault per 4 KiB on first touch.
            flat = np.empty((sum(matched), *self.page_shape), dtype=self.dtype)
            outs = np.split(flat, np.cumsum(matched)[:-1]) if matched else []
            bad = self._read_verified([(k[:m], o.view(np.uint8).reshape(m, self.page_bytes))
                                       for k, m, o in zip(keys_per, matched, outs)])
            # A page that failed in any request is gone for all of them (with its successors in that request):
            # each request keeps only the prefix before its first gone page.
            gone = {k for keys, m, b in zip(keys_per, matched, bad) if b < m for k in keys[b:m]}
            self._stats.corrupt_pages += len({keys[b] for keys, m, b in zip(keys_per, matched, bad) if b < m})
            if gone:
                self._drop(list(gone))
            results = []
            for keys, m, out in zip(keys_per, matched, outs):
                if gone:
                    m = next((i for i in range(m) if keys[i] in gone), m)
                    out = out[:m]
                for k in keys[:m]:
                    self._lru.move_to_end(k)
                self._stats.hits += m
                self._stats.misses += len(keys) - m
                results.append((m * self.page_tokens, out))
            return results

    def refresh(self) -> int:
        """Take in what the writer published since this store last looked (a reader in another process);
        returns how many pages changed. The writer itself: 0."""
        with self._mutex:
            changes = self._backend.refresh()
            self._apply(changes)
            return len(changes)

    def _apply(self, changes: list[tuple[bytes, int | None]]) -> None:
        for key, crc in changes:
            if crc is None:
                self._lru.pop(key, None)
            else:
                self._lru[key] = crc
                self._lru.move_to_end(key)

    def _read_verified(self, jobs: list[tuple[list[bytes], np.ndarray]]) -> list[int]:
        """Read each job's pages into its `flat` [m, page_bytes] on IO_THREADS threads, each chunk checksummed
        by the thread that read it (preadv and the CRC-32 release the GIL). Returns per job the first bad page
        (m if none)."""
        crcs = [[self._lru[k] for k in keys] for keys, _ in jobs]

        def chunk(task: tuple[int, int]) -> tuple[int, int]:
            j, lo = task
            keys, flat = jobs[j]
            hi = min(len(keys), lo + per)
            unreadable = self._backend.get(keys[lo:hi], flat[lo:hi])
            for i in range(lo, hi):
                if i - lo in unreadable or crc32(flat[i]) != crcs[j][i]:
                    return j, i
            return j, len(keys)
        # Chunks big enough that IO_THREADS of them cover the whole call: every byte is in flight at once (one
        # 2.25 MiB prefix: 8 reads of 4 pages; a batch: whole prefixes), never smaller than READ_CHUNK pages.
        total = sum(len(keys) for keys, _ in jobs)
        per = max(READ_CHUNK, -(-total // IO_THREADS))
        tasks = [(j, lo) for j, (keys, _) in enumerate(jobs) for lo in range(0, len(keys), per)]
        if len(tasks) > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="kv-read")
        done = list(self._pool.map(chunk, tasks)) if len(tasks) > 1 else [chunk(t) for t in tasks]
        bad = [len(keys) for keys, _ in jobs]
        for j, i in done:
            bad[j] = min(bad[j], i)
        return bad

    def _drop(self, keys: list[bytes]) -> None:
        present = [k for k in keys if k in self._lru]
        for k in present:
            del self._lru[k]
        self._backend.drop(present)

    def __len__(self) -> int:
        with self._mutex:
            return len(self._lru)

    def __contains__(self, key: bytes) -> bool:
        with self._mutex:
            return key in self._lru

    def stats(self) -> dict:
        with self._mutex:
            s = self._stats
            return {"hits": s.hits, "misses": s.misses, "puts": s.puts, "evictions": s.evictions,
                    "corrupt_pages": s.corrupt_pages, "pages": len(self._lru), "capacity_pages": self.capacity,
                    "backend": self.backend, "readonly": self.readonly, "recovered": dict(s.recovered)}

    def close(self) -> None:
        with self._mutex:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
            self._backend.close()

    def __enter__(self) -> "KVPageStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
