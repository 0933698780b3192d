"""Sample store: round trips, coalesced batch reads, checksums, torn/incomplete stores, bad input."""


import numpy as np
import pytest

from seekax.storage.order import BatchPlan, epoch_order
from seekax.storage.sample_store import (MANIFEST, CorruptStoreError, IncompleteStoreError, SampleStore,
                                         SampleStoreWriter, write_token_store)


@pytest.mark.parametrize("dtype", ["int32", "bfloat16", "uint8"])
def test_token_round_trip_random_batches(tmp_path, rng, dtype):
    seqs = rng.integers(0, 100, size=(1000, 37)).astype(dtype)
    # small shards: records straddle several shards, runs must break at shard edges
    m = write_token_store(tmp_path / "s", seqs, shard_bytes=37 * seqs.itemsize * 90)
    assert m["num_records"] == 1000 and len(m["shards"]) == 12
    with SampleStore(tmp_path / "s", verify=True) as store:
        for _ in range(5):
            idx = rng.integers(0, 1000, size=int(rng.integers(1, 300)))  # repeats included
            got = store.read(idx)
            np.testing.assert_array_equal(got.view(np.uint8), seqs[idx].view(np.uint8))
        out = np.full((3, 37), 7, dtype=dtype)  # poisoned output buffer
        store.read_into([999, 0, 500], out)
        np.testing.assert_array_equal(out.view(np.uint8), seqs[[999, 0, 500]].view(np.uint8))
        assert store.read([]).shape == (0, 37)


def test_contiguous_runs_single_read_and_shard_edges(tmp_path, rng):
    """Consecutive ascending ranges take the one-preadv fast path inside a shard and the planned path across a
    shard edge; both fill every row of a poisoned buffer with the right record."""
    seqs = rng.integers(-2**31, 2**31 - 1, size=(300, 12), dtype=np.int64).astype(np.int32)
    write_token_store(tmp_path / "s", seqs, shard_bytes=12 * 4 * 100)  # 100 records per shard
    with SampleStore(tmp_path / "s") as store:
        assert store._contiguous(np.arange(10, 60)) == (0, 10)
        assert store._contiguous(np.arange(150, 200)) == (1, 50)
        assert store._contiguous(np.arange(90, 110)) is None  # crosses a shard edge
        assert store._contiguous(np.asarray([5, 6, 8])) is None and store._contiguous(np.asarray([6, 5])) is None
        for start, n in [(0, 1), (0, 100), (99, 2), (95, 30), (100, 100), (250, 50), (int(rng.integers(0, 200)), 64)]:
            idx = np.arange(start, start + n)
            out = np.full((n, 12), -7, dtype=np.int32)
            store.read_into(idx, out)
            np.testing.assert_array_equal(out, seqs[idx])
            store.advise(idx)  # a hint only: must accept the same ranges


def test_bytes_round_trip(tmp_path, rng):
    records = [rng.bytes(int(rng.integers(0, 5000))) for _ in range(300)]
    with SampleStoreWriter(tmp_path / "b", kind="bytes", shard_bytes=100_000) as w:
        w.write_many(records)
    with SampleStore(tmp_path / "b") as store:
        assert len(store) == 300 and len(store.shards) > 1
        idx = rng.permutation(300)[:120]
        assert store.read(idx) == [records[i] for i in idx]
        assert store.verify() == []


def test_gap_coalescing_matches_plain_reads(tmp_path, rng):
    seqs = rng.integers(-2**31, 2**31 - 1, size=(512, 16), dtype=np.int64).astype(np.int32)
    write_token_store(tmp_path / "s", seqs)
    for gap in (0, 64, 1 << 20):
        with SampleStore(tmp_path / "s", max_gap_bytes=gap) as store:
            idx = np.sort(rng.choice(512, size=100, replace=False))[::-1]
            np.testing.assert_array_equal(store.read(idx), seqs[idx])


def test_flipped_byte_detected(tmp_path, rng):
    write_token_store(tmp_path / "s", rng.integers(0, 50, size=(200, 8)).astype(np.int32), shard_bytes=2000)
    path = tmp_path / "s" / "shard-00001.data"
    data = bytearray(path.read_bytes())
    data[int(rng.integers(len(data)))] ^= 0x10
    path.write_bytes(bytes(data))
    store = SampleStore(tmp_path / "s")
    problems = store.verify()
    assert len(problems) == 1 and "shard-00001" in problems[0] and "data checksum" in problems[0]
    with pytest.raises(CorruptStoreError, match="shard-00001"):
        SampleStore(tmp_path / "s", verify=True)


def test_truncated_shard_named(tmp_path, rng):
    write_token_store(tmp_path / "s", rng.integers(0, 50, size=(200, 8)).astype(np.int32), shard_bytes=2000)
    with open(tmp_path / "s" / "shard-00002.data", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CorruptStoreError, match="shard-00002.*torn"):
        SampleStore(tmp_path / "s")


def test_no_manifest_is_incomplete(tmp_path, rng):
    w = SampleStoreWriter(tmp_path / "s", seq_len=4, shard_bytes=64)
    w.write(np.zeros((10, 4), np.int32))
    with pytest.raises(IncompleteStoreError, match="incomplete.*shard-00000"):
        SampleStore(tmp_path / "s")
    w.close()
    assert len(SampleStore(tmp_path / "s")) == 10


def test_exception_in_writer_aborts(tmp_path):
    with pytest.raises(RuntimeError):
        with SampleStoreWriter(tmp_path / "s", seq_len=4) as w:
            w.write(np.zeros((10, 4), np.int32))
            raise RuntimeError("boom")
    assert not (tmp_path / "s" / MANIFEST).exists()
    assert [p.name for p in (tmp_path / "s").iterdir()] == []


def test_overwrite_requires_flag(tmp_path):
    write_token_store(tmp_path / "s", np.zeros((4, 4), np.int32))
    with pytest.raises(ValueError, match="path=.*overwrite=True"):
        SampleStoreWriter(tmp_path / "s", seq_len=4)
    write_token_store(tmp_path / "s", np.ones((6, 4), np.int32), overwrite=True)
    assert len(SampleStore(tmp_path / "s")) == 6


def test_bad_input(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="path=.*it is an existing file"):
        SampleStoreWriter(f, seq_len=4)
    with pytest.raises(ValueError, match="path=.*it is a file"):
        SampleStore(f)
    with pytest.raises(ValueError, match="path=.*existing"):
        SampleStore(tmp_path / "missing")
    w = SampleStoreWriter(tmp_path / "s", seq_len=4)
    with pytest.raises(ValueError, match="records.dtype=.float32"):
        w.write(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="records.shape"):
        w.write(np.zeros((2, 5), np.int32))
    with pytest.raises(ValueError, match="kind="):
        SampleStoreWriter(tmp_path / "t", kind="parquet")
    with pytest.raises(ValueError, match="dtype="):
        SampleStoreWriter(tmp_path / "t", seq_len=4, dtype="complex64")
    w.write(np.zeros((2, 4), np.int32))
    w.close()
    store = SampleStore(tmp_path / "s")
    with pytest.raises(ValueError, match="indices=2"):
        store.read([0, 2])
    with pytest.raises(ValueError, match="indices=-1"):
        store.read([-1])
    with pytest.raises(ValueError, match="indices="):
        store.read([0.5])


def test_epoch_orders():
    r = epoch_order(1000, seed=3, epoch=1, mode="random")
    assert sorted(r.tolist()) == list(range(1000))
    assert not np.array_equal(r, epoch_order(1000, seed=3, epoch=2, mode="random"))
    np.testing.assert_array_equal(r, epoch_order(1000, seed=3, epoch=1, mode="random"))
    b = epoch_order(1000, seed=3, epoch=0, mode="block", block_records=64)
    assert sorted(b.tolist()) == list(range(1000))
    assert np.count_nonzero(np.diff(b) != 1) <= 1000 // 64 + 1  # long contiguous runs
    plan = BatchPlan(num_records=1000, global_batch_size=96, seed=1, num_epochs=2)
    assert plan.batches_per_epoch == 10 and plan.num_batches == 20
    halves = [plan.batch_indices(3, process_index=p, process_count=2) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), plan.batch_indices(3))
    with pytest.raises(IndexError):
        plan.batch_indices(20)
    with pytest.raises(ValueError, match="global_batch_size"):
        BatchPlan(num_records=10, global_batch_size=11)
    with pytest.raises(ValueError, match="mode"):
        BatchPlan(num_records=10, global_batch_size=1, mode="shuffled")


def test_advise_and_empty_records(tmp_path, rng):
    records = [b"", rng.bytes(10), b"", rng.bytes(70000), b""]
    with SampleStoreWriter(tmp_path / "b", kind="bytes", shard_bytes=1000) as w:
        w.write_many(records)
    with SampleStore(tmp_path / "b", max_gap_bytes=0) as store:
        store.advise([4, 0, 3])  # a hint only: results unchanged
        assert store.read([4, 3, 2, 1, 0, 0]) == [records[i] for i in (4, 3, 2, 1, 0, 0)]
        with pytest.raises(ValueError, match="indices=5"):
            store.advise([5])
