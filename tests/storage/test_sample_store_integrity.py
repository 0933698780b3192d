"""Every read checks what it returns: a flipped bit in a shard's data, index or checksum table raises
`CorruptStoreError` naming the shard (and record), on every read path, never wrong values."""

import numpy as np
import pytest

from seekax.storage.sample_store import CorruptStoreError, SampleStore, SampleStoreWriter, write_token_store


def _flip(path, offset, bit=0):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def _tokens(tmp_path, rng, seq_len=64, n=600, dtype=np.int32):
    seqs = rng.integers(0, 50000, size=(n, seq_len)).astype(dtype)
    write_token_store(tmp_path / "s", seqs, shard_bytes=seqs[0].nbytes * 250)  # 3 shards of 250, 250, 100
    return seqs


@pytest.mark.parametrize("seq_len", [64, 4096])  # 256 B records (groups of 256) and 16 KiB ones (groups of 4)
def test_flipped_data_bit_fails_every_read_path(tmp_path, rng, seq_len):
    seqs = _tokens(tmp_path, rng, seq_len=seq_len)
    rb = seqs[0].nbytes
    victim = 250 + 137  # shard 1, local record 137
    _flip(tmp_path / "s" / "shard-00001.data", 137 * rb + int(rng.integers(rb)), int(rng.integers(8)))
    with SampleStore(tmp_path / "s") as store:
        reads = [
            np.arange(victim - 10, victim + 40),  # contiguous: whole groups and partial ends
            np.arange(250, 500),  # the whole shard (its last group included)
            np.asarray([victim]),  # one record
            rng.permutation(np.concatenate([[victim], rng.integers(0, 600, size=50)])),  # scattered + repeats
            np.asarray([victim, victim, 3]),
        ]
        for idx in reads:
            with pytest.raises(CorruptStoreError, match=f"shard-00001: record 137 \\(store record {victim}\\)"):
                store.read(idx)
        with pytest.raises(CorruptStoreError, match="record 137"):
            store[victim]
        # records around it are still served, and right
        ok = np.concatenate([np.arange(0, victim), np.arange(victim + 1, 600)])
        np.testing.assert_array_equal(store.read(ok), seqs[ok])
        np.testing.assert_array_equal(store.read(np.arange(0, 250)), seqs[:250])


def test_flipped_bit_in_checksum_table_is_named(tmp_path, rng):
    seqs = _tokens(tmp_path, rng)
    _flip(tmp_path / "s" / "shard-00002.crc", 12, 3)
    with SampleStore(tmp_path / "s") as store:
        np.testing.assert_array_equal(store.read(np.arange(0, 500)), seqs[:500])  # other shards unaffected
        with pytest.raises(CorruptStoreError, match="shard-00002: crc file checksum"):
            store.read([510])
        assert any("shard-00002: crc checksum" in p for p in store.verify())


@pytest.mark.parametrize("where", ["data", "index"])
def test_bytes_store_flipped_bit(tmp_path, rng, where):
    records = [rng.bytes(int(rng.integers(0, 3000))) for _ in range(200)]
    with SampleStoreWriter(tmp_path / "b", kind="bytes", shard_bytes=100_000) as w:
        w.write_many(records)
    path = tmp_path / "b" / f"shard-00000.{where}"
    if where == "data":
        victim = next(i for i in range(50, 200) if records[i])
        offset = sum(len(r) for r in records[:victim]) + len(records[victim]) // 2
    else:
        victim, offset = 60, 8 * 60 + 1  # offset of record 60: shifts records 59 and 60
    _flip(path, offset, 2)
    with SampleStore(tmp_path / "b") as store:
        with pytest.raises(CorruptStoreError, match="shard-00000"):
            store.read([victim])
        with pytest.raises(CorruptStoreError, match="shard-00000"):
            store.read(list(range(0, 120)))
        if where == "data":  # a record elsewhere in the shard is still served
            assert store.read([victim + 1, 0]) == [records[victim + 1], records[0]]


def test_verify_reads_off_skips_the_check(tmp_path, rng):
    seqs = _tokens(tmp_path, rng)
    _flip(tmp_path / "s" / "shard-00000.data", 5 * seqs[0].nbytes, 1)
    with SampleStore(tmp_path / "s", verify_reads=False) as store:
        got = store.read([5, 6])
        assert not np.array_equal(got[0], seqs[5]) and np.array_equal(got[1], seqs[6])
    with pytest.raises(ValueError, match="verify_reads="):
        SampleStore(tmp_path / "s", verify_reads=1)


def test_version_1_store_needs_verify_reads_off(tmp_path, rng):
    import json

    seqs = _tokens(tmp_path, rng)
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    m["version"] = 1
    for s in m["shards"]:
        del s["crc_crc32"]
    del m["group_records"]
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    for p in (tmp_path / "s").glob("*.crc"):
        p.unlink()
    with pytest.raises(ValueError, match="verify_reads=True.*version-1"):
        SampleStore(tmp_path / "s")
    with SampleStore(tmp_path / "s", verify_reads=False) as store:
        np.testing.assert_array_equal(store.read(np.arange(600)), seqs)
