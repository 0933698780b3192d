"""KV page store: prefix reuse, LRU, persistence, crash between data and index writes, torn log, checksums."""

import os
import signal
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

from seekax.storage.kv_slots import LOG
from seekax.storage.kv_store import KVPageStore, chain_hashes

PT, D = 16, 8  # small pages keep the tests fast; the default is (64, 576) bf16


def _pages(rng, n):
    return rng.standard_normal((n, PT, D)).astype(ml_dtypes.bfloat16)


def _open(path, cap=32, **kw):
    return KVPageStore(path, page_shape=(PT, D), dtype="bfloat16", capacity_pages=cap, **kw)


def _eq(a, b):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))


@pytest.fixture(params=["slots", "memory", "file"])
def store_path(request, tmp_path):
    return {"slots": str(tmp_path / "kv"), "memory": "memory://", "file": f"file://{tmp_path}/tskv/"}[request.param]


def test_prefix_reuse_round_trip(store_path, rng):
    tokens = rng.integers(0, 50000, size=5 * PT + 7)
    pages = _pages(rng, 5)
    with _open(store_path) as kv:
        assert kv.put_pages(tokens, pages) == 5
        assert kv.put_pages(tokens, pages[:3]) == 0  # already there
        n, got = kv.match_prefix(tokens)
        assert n == 5 * PT
        _eq(got, pages)
        other = np.concatenate([tokens[:3 * PT], tokens[3 * PT:] + 1])  # diverges in page 3
        n, got = kv.match_prefix(other)
        assert n == 3 * PT
        _eq(got, pages[:3])
        # the same page tokens after a different prefix are a different key
        shifted = np.concatenate([tokens[PT:2 * PT], tokens[PT:2 * PT]])
        assert kv.match_prefix(shifted)[0] == 0
        n, got = kv.match_prefix(tokens[:PT - 1])
        assert n == 0 and got.shape == (0, PT, D)
        s = kv.stats()
        assert s["hits"] == 8 and s["misses"] == 2 + 2 and s["puts"] == 5 and s["pages"] == 5


def test_lru_eviction(store_path, rng):
    a, b, c = (rng.integers(0, 1000, size=2 * PT) for _ in range(3))
    with _open(store_path, cap=4) as kv:
        kv.put_pages(a, _pages(rng, 2))
        kv.put_pages(b, _pages(rng, 2))
        assert kv.match_prefix(a)[0] == 2 * PT  # a becomes most recent
        pc = _pages(rng, 2)
        assert kv.put_pages(c, pc) == 2
        assert kv.match_prefix(b)[0] == 0 and kv.match_prefix(a)[0] == 2 * PT
        _eq(kv.match_prefix(c)[1], pc)
        assert kv.stats()["evictions"] == 2
        with pytest.raises(ValueError, match="capacity_pages=4"):
            kv.put_pages(rng.integers(0, 9, size=5 * PT), _pages(rng, 5))
        # extending a stored prefix evicts other pages, never the prefix itself
        ext = np.concatenate([c, rng.integers(0, 1000, size=2 * PT)])
        assert kv.put_pages(ext, _pages(rng, 4)) == 2
        assert kv.match_prefix(ext)[0] == 4 * PT and kv.match_prefix(a)[0] == 0
        with pytest.raises(ValueError, match="fits capacity_pages=4"):
            kv.put_pages(np.concatenate([ext, rng.integers(0, 9, size=PT)]), _pages(rng, 5))


@pytest.mark.parametrize("kind", ["slots", "file"])
def test_reopen_keeps_pages_and_order(tmp_path, rng, kind):
    path = str(tmp_path / "kv") if kind == "slots" else f"file://{tmp_path}/tskv/"
    a, b = rng.integers(0, 1000, size=3 * PT), rng.integers(0, 1000, size=2 * PT)
    pa, pb = _pages(rng, 3), _pages(rng, 2)
    with _open(path, cap=5) as kv:
        kv.put_pages(a, pa)
        kv.put_pages(b, pb)
    with _open(path, cap=5) as kv:
        _eq(kv.match_prefix(a)[1], pa)
    with _open(path, cap=5) as kv:
        assert len(kv) == 5
        kv.put_pages(rng.integers(0, 1000, size=PT), _pages(rng, 1))  # evicts the oldest: a's first page
        assert kv.match_prefix(a)[0] == 0
        _eq(kv.match_prefix(b)[1], pb)
    with _open(path, cap=5) as kv:
        assert len(kv) == 5
        _eq(kv.match_prefix(b)[1], pb)


CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np, ml_dtypes
    from seekax.storage import kv_slots
    from seekax.storage.kv_store import KVPageStore
    path, cap = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    kv = KVPageStore(path, page_shape=(16, 8), dtype="bfloat16", capacity_pages=cap)
    pages = rng.standard_normal((4, 16, 8)).astype(ml_dtypes.bfloat16)
    kv.put_pages(np.arange(32), pages[:2])                     # committed
    real = os.fdatasync
    def crash(fd):
        real(fd)                                               # page data durable ...
        os.kill(os.getpid(), signal.SIGKILL)                   # ... and the index record never written
    kv_slots.os.fdatasync = crash
    kv.put_pages(np.arange(100, 132), pages[2:])
""")


@pytest.mark.parametrize("cap", [4, 2])  # 2: the second put evicts and overwrites the committed pages' slots
def test_crash_between_data_and_index(tmp_path, cap):
    path = str(tmp_path / "kv")
    r = subprocess.run([sys.executable, "-c", CHILD, path, str(cap)], capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    pages = np.random.default_rng(0).standard_normal((4, PT, D)).astype(ml_dtypes.bfloat16)
    with _open(path, cap=cap) as kv:
        assert kv.match_prefix(np.arange(100, 132))[0] == 0  # never published
        n, got = kv.match_prefix(np.arange(32))
        if cap == 4:
            assert n == 32
            _eq(got, pages[:2])
        else:  # slots were overwritten before the crash: checksums catch it, served as a miss
            assert n == 0 and kv.stats()["corrupt_pages"] == 1
        assert kv.put_pages(np.arange(100, 132), pages[2:]) == 2
        _eq(kv.match_prefix(np.arange(100, 132))[1], pages[2:])


def test_torn_log_tail_and_flipped_byte(tmp_path, rng):
    path = tmp_path / "kv"
    tokens, pages = rng.integers(0, 1000, size=4 * PT), _pages(rng, 4)
    with _open(path) as kv:
        kv.put_pages(tokens, pages)
    with open(path / LOG, "ab") as f:
        f.write(b"KVP1\x01" + b"\x00" * 20)  # half a record: a crash mid-append
    with open(path / "kv.slots", "r+b") as f:  # flip a byte of page 2
        f.seek(2 * PT * D * 2 + 5)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    with _open(path) as kv:
        assert kv.stats()["recovered"]["torn_log_bytes"] == 25
        n, got = kv.match_prefix(tokens)
        assert n == 2 * PT and kv.stats()["corrupt_pages"] == 1
        _eq(got, pages[:2])
    assert os.path.getsize(path / LOG) % 48 == 0


def test_match_prefixes_equals_one_by_one(store_path, rng):
    """A batch of requests (longer than one read chunk, a shared prefix, a partial hit, a miss, an empty one)
    gets exactly what match_prefix gives each in turn, with the same stats."""
    base = rng.integers(0, 50000, size=9 * PT)
    other = rng.integers(0, 50000, size=6 * PT + 3)
    pages_base, pages_other = _pages(rng, 9), _pages(rng, 6)
    requests = [base, np.concatenate([base[:5 * PT], rng.integers(0, 50000, size=3 * PT)]), other,
                rng.integers(0, 50000, size=4 * PT), base[:PT - 1], other[:2 * PT]]
    with _open(store_path) as kv:
        kv.put_pages(base, pages_base)
        kv.put_pages(other, pages_other)
        got = kv.match_prefixes(requests)
        stats = kv.stats()
        want = [kv.match_prefix(r) for r in requests]
        assert [n for n, _ in got] == [n for n, _ in want] == [9 * PT, 5 * PT, 6 * PT, 0, 0, 2 * PT]
        for (_, g), (_, w) in zip(got, want):
            _eq(g, w)
        _eq(got[1][1], pages_base[:5])
        _eq(got[2][1], pages_other)
        assert stats["hits"] == 22 and stats["misses"] == (9 + 8 + 6 + 4 + 0 + 2) - 22
        assert kv.match_prefixes([]) == []
        with pytest.raises(ValueError, match="requests=.*list of token-id sequences"):
            kv.match_prefixes(base)


def test_match_prefixes_corrupt_page_cuts_only_its_request(tmp_path, rng):
    path = tmp_path / "kv"
    a, b = rng.integers(0, 50000, size=8 * PT), rng.integers(0, 50000, size=8 * PT)
    pa, pb = _pages(rng, 8), _pages(rng, 8)
    with _open(path) as kv:
        kv.put_pages(a, pa)
        kv.put_pages(b, pb)
    with open(path / "kv.slots", "r+b") as f:  # flip a byte of a's page 6 (slots are filled in order)
        f.seek(6 * PT * D * 2 + 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    with _open(path) as kv:
        (na, ga), (nb, gb) = kv.match_prefixes([a, b])
        assert (na, nb) == (6 * PT, 8 * PT) and kv.stats()["corrupt_pages"] == 1
        _eq(ga, pa[:6])
        _eq(gb, pb)
        assert kv.match_prefix(a)[0] == 6 * PT  # the bad page and its successors were dropped


def test_log_compaction(tmp_path, rng):
    path = tmp_path / "kv"
    with _open(path, cap=2) as kv:
        for _ in range(60):
            kv.put_pages(rng.integers(0, 1000, size=PT), _pages(rng, 1))
        last_tokens, last = rng.integers(0, 1000, size=PT), _pages(rng, 1)
        kv.put_pages(last_tokens, last)
    assert os.path.getsize(path / LOG) // 48 <= 4 * 2 + 64 + 1
    with _open(path, cap=2) as kv:
        assert len(kv) == 2
        _eq(kv.match_prefix(last_tokens)[1], last)


def test_default_mla_page(tmp_path, rng):
    kv = KVPageStore(tmp_path / "kv", capacity_pages=8)
    assert kv.page_shape == (64, 576) and kv.page_bytes == 64 * 576 * 2
    tokens = rng.integers(0, 129280, size=200)
    pages = rng.standard_normal((3, 64, 576)).astype(ml_dtypes.bfloat16)
    assert kv.put_pages(tokens, pages) == 3
    n, got = kv.match_prefix(tokens)
    assert n == 192
    _eq(got, pages)


def test_bad_input(tmp_path, rng):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="path=.*existing file"):
        _open(f)
    kv = _open(tmp_path / "kv")
    with pytest.raises(ValueError, match="pages.dtype=.float32"):
        kv.put_pages(np.arange(PT), np.zeros((1, PT, D), np.float32))
    with pytest.raises(ValueError, match="pages.shape"):
        kv.put_pages(np.arange(PT), np.zeros((1, PT, D + 1), ml_dtypes.bfloat16))
    with pytest.raises(ValueError, match="pages=.*full pages of token_ids"):
        kv.put_pages(np.arange(PT), np.zeros((2, PT, D), ml_dtypes.bfloat16))
    with pytest.raises(ValueError, match="token_ids"):
        kv.match_prefix(np.zeros((2, PT)))
    kv.close()
    with pytest.raises(ValueError, match="page_shape/dtype/capacity_pages"):
        KVPageStore(tmp_path / "kv", page_shape=(PT, D * 2), capacity_pages=32)
    with pytest.raises(ValueError, match="dtype="):
        KVPageStore(tmp_path / "kv2", dtype="complex64", capacity_pages=2)
    with pytest.raises(ValueError, match="page_shape="):
        KVPageStore(tmp_path / "kv2", page_shape=(0, 4), capacity_pages=2)
    assert len(chain_hashes(np.arange(3 * PT + 1), PT, root=b"")) == 3
