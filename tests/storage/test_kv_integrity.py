"""KV page store integrity: a full disk mid-log loses no acknowledged page; flipped bits in the slot file, the
log, a tensorstore value or a tensorstore name are misses, never wrong pages; token ids outside int32 refused."""

import json
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

from seekax.storage.kv_log import REC
from seekax.storage.kv_slots import LOG
from seekax.storage.kv_store import KVPageStore

PT, D = 16, 8


def _pages(seed, n, shape=(PT, D)):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(ml_dtypes.bfloat16)


def _eq(a, b):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))


# Tiny pages (4 x 4 uint8 = 16 B) keep the slot file (400 x 16 B) below the file size limit while the log
# (48 B per page) grows past it: every put writes 3 records (144 B), the 49th one only partly fits.
FULL_CHILD = textwrap.dedent("""
    import json, resource, signal, sys
    import numpy as np
    from seekax.storage.atomic import StorageFullError
    from seekax.storage.kv_store import KVPageStore
    path, limit = sys.argv[1], int(sys.argv[2])
    kv = KVPageStore(path, page_shape=(4, 4), dtype="uint8", capacity_pages=400)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    acked, full = [], []
    for i in range(110):
        pages = np.random.default_rng(i).integers(0, 256, size=(3, 4, 4), dtype=np.uint8)
        try:
            kv.put_pages(np.arange(i * 1000, i * 1000 + 12), pages)
            acked.append(i)
        except StorageFullError as e:
            full.append(i)
            msg = str(e)
        if i == 70:  # space is freed
            resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    kv.close()
    print(json.dumps({"acked": acked, "full": full, "msg": msg}))
""")


def test_full_disk_mid_log_keeps_every_acknowledged_page(tmp_path):
    path = tmp_path / "kv"
    r = subprocess.run([sys.executable, "-c", FULL_CHILD, str(path), "7000"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["full"] and out["full"][0] == 48 and max(out["full"]) <= 70, out["full"]  # full until space freed
    assert "no space left" in out["msg"]
    assert max(out["acked"]) == 109  # working again once space was freed
    assert os.path.getsize(path / LOG) % REC == 0  # cut back to whole records
    with KVPageStore(path, page_shape=(4, 4), dtype="uint8", capacity_pages=400) as kv:
        assert kv.stats()["recovered"]["torn_log_bytes"] == 0
        lost = []
        for i in out["acked"]:
            n, got = kv.match_prefix(np.arange(i * 1000, i * 1000 + 12))
            want = np.random.default_rng(i).integers(0, 256, size=(3, 4, 4), dtype=np.uint8)
            if n != 12 or not np.array_equal(got, want):
                lost.append(i)
        assert lost == []
        for i in out["full"]:  # never acknowledged, never published
            assert kv.match_prefix(np.arange(i * 1000, i * 1000 + 12))[0] == 0


def _flip(path, offset, bit):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_flipped_bit_inside_the_log_skips_one_record(tmp_path, rng):
    path = tmp_path / "kv"
    prompts = [rng.integers(0, 50000, size=2 * PT) for _ in range(4)]
    with KVPageStore(path, page_shape=(PT, D), capacity_pages=32) as kv:
        for i, p in enumerate(prompts):
            kv.put_pages(p, _pages(i, 2))
    _flip(path / LOG, 2 * REC + 30, 5)  # record 2: prompt 1's first page
    with KVPageStore(path, page_shape=(PT, D), capacity_pages=32) as kv:
        rec = kv.stats()["recovered"]
        assert rec["bad_log_records"] == 1 and rec["torn_log_bytes"] == 0
        assert kv.match_prefix(prompts[1])[0] == 0  # its chain starts with the lost record
        for i in (0, 2, 3):  # records after the flipped one still count
            n, got = kv.match_prefix(prompts[i])
            assert n == 2 * PT
            _eq(got, _pages(i, 2))
        kv.put_pages(prompts[1], _pages(1, 2))  # and the store takes writes again
    with KVPageStore(path, page_shape=(PT, D), capacity_pages=32) as kv:
        _eq(kv.match_prefix(prompts[1])[1], _pages(1, 2))


@pytest.mark.parametrize("where", ["value", "name"])
def test_tensorstore_flipped_bit_is_a_miss(tmp_path, rng, where):
    url = f"file://{tmp_path}/ts/"
    a, b = rng.integers(0, 50000, size=2 * PT), rng.integers(0, 50000, size=2 * PT)
    with KVPageStore(url, page_shape=(PT, D), capacity_pages=8) as kv:
        kv.put_pages(a, _pages(0, 2))
        kv.put_pages(b, _pages(1, 2))
    files = sorted((tmp_path / "ts" / "v2").iterdir())  # generation order: a0, a1, b0, b1
    assert len(files) == 4
    if where == "value":
        _flip(files[2], 100, 3)
    else:  # the key in b's first page's name now names a's first page
        gen, key, crc = files[2].name.split("-")
        a_key = files[0].name.split("-")[1]
        files[2].rename(files[2].with_name(f"{gen}-{a_key}-{crc}"))
        files[0].unlink()
    with KVPageStore(url, page_shape=(PT, D), capacity_pages=8) as kv:
        n, got = kv.match_prefix(b)
        assert n == 0
        n, got = kv.match_prefix(a)
        if where == "value":
            assert n == 2 * PT
            _eq(got, _pages(0, 2))
        else:  # the name claims a's first page with a matching checksum, the value inside is b's: refused
            assert n == 0
        assert kv.stats()["corrupt_pages"] == 1


def test_token_ids_outside_int32_refused(tmp_path):
    with KVPageStore(tmp_path / "kv", page_shape=(PT, D), capacity_pages=8) as kv:
        base = np.arange(2 * PT, dtype=np.int64)
        kv.put_pages(base, _pages(0, 2))
        wraps = base.copy()
        wraps[3] += 1 << 32  # the same int32 bits: without the check it would match base's pages
        for bad in (wraps, np.asarray([0] * (PT - 1) + [2**31]), np.asarray([-(2**31) - 1] * PT)):
            with pytest.raises(ValueError, match="token_ids=.*within int32"):
                kv.match_prefix(bad)
            with pytest.raises(ValueError, match="token_ids=.*within int32"):
                kv.put_pages(bad, _pages(1, 1))
        assert kv.match_prefix(np.asarray([2**31 - 1] * PT))[0] == 0  # the edges are fine
        assert kv.stats()["puts"] == 2
