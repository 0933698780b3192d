"""Loader: batches match the plan, resume == uninterrupted, per-process shards, sharded jax.Arrays on 8 devices."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from seekax.storage.loader import Loader, LoaderConfig
from seekax.storage.order import epoch_order
from seekax.storage.sample_store import write_token_store


@pytest.fixture
def store(tmp_path, rng):
    seqs = rng.integers(0, 2**31 - 1, size=(1003, 24)).astype(np.int32)
    write_token_store(tmp_path / "s", seqs, shard_bytes=24 * 4 * 128)
    return tmp_path / "s", seqs


@pytest.mark.parametrize("shuffle", ["random", "block", "sequential"])
def test_batches_follow_epoch_order(store, shuffle):
    path, seqs = store
    cfg = LoaderConfig(global_batch_size=100, seed=5, shuffle=shuffle, block_records=16, num_epochs=2)
    loader = Loader(path, cfg, sharding=None)
    batches = list(loader)
    assert len(batches) == 20 == 2 * loader.batches_per_epoch
    for epoch in range(2):
        order = epoch_order(1003, seed=5, epoch=epoch, mode=shuffle, block_records=16)
        got = np.concatenate(batches[epoch * 10:(epoch + 1) * 10])
        np.testing.assert_array_equal(got, seqs[order[:1000]])


def test_resume_is_byte_exact(store):
    path, _ = store
    cfg = LoaderConfig(global_batch_size=64, seed=11, shuffle="block", num_epochs=3)
    reference = [b.tobytes() for b in Loader(path, cfg)]
    a = Loader(path, cfg)
    first = [next(a).tobytes() for _ in range(23)]  # crosses an epoch boundary (15 batches per epoch)
    state = a.get_state()
    assert state["step"] == 23
    b = Loader(path, cfg)  # a fresh process would build a fresh loader
    b.set_state(state)
    assert first + [x.tobytes() for x in b] == reference


@pytest.mark.parametrize("readahead", [None, 0, 1, 5])
def test_readahead_hints_every_later_batch_once(store, readahead):
    """The loader hints each batch after the first exactly once, `readahead` ahead (None: a 16 MiB window), also
    after a resume, and never past the last batch."""
    path, _ = store
    cfg = LoaderConfig(global_batch_size=50, seed=2, shuffle="block", num_epochs=2, num_threads=1, prefetch=0,
                       readahead=readahead)
    loader = Loader(path, cfg)
    hinted = []
    loader.store._advise_valid = lambda idx: hinted.append(np.asarray(idx).copy())
    batches = list(loader)
    want = [] if readahead == 0 else [loader.plan.batch_indices(s) for s in range(1, len(batches))]
    assert len(hinted) == len(want)
    for h, w in zip(hinted, want):
        np.testing.assert_array_equal(h, w)
    if readahead is None:
        assert loader.readahead == (16 << 20) // (50 * 24 * 4)
    resumed = Loader(path, cfg)
    resumed.set_state({**loader.get_state(), "step": 7})
    hinted.clear()
    resumed.store._advise_valid = lambda idx: hinted.append(np.asarray(idx).copy())
    next(resumed)
    assert len(hinted) == (0 if readahead == 0 else min(resumed.readahead, len(batches) - 8))


def test_state_mismatch_is_clear_error(store):
    path, _ = store
    state = Loader(path, LoaderConfig(global_batch_size=64, seed=1)).get_state()
    other = Loader(path, LoaderConfig(global_batch_size=64, seed=2))
    with pytest.raises(ValueError, match="state.order"):
        other.set_state(state)
    with pytest.raises(ValueError, match="state="):
        other.set_state({"next_index": 3})


def test_process_shards_partition_the_global_batch(store):
    path, _ = store
    full = Loader(path, LoaderConfig(global_batch_size=96, seed=3, num_epochs=1))
    parts = [Loader(path, LoaderConfig(global_batch_size=96, seed=3, num_epochs=1, process_index=p, process_count=4))
             for p in range(4)]
    for _ in range(5):
        want = next(full)
        got = [next(x) for x in parts]
        assert all(g.shape == (24, 24) for g in got)
        np.testing.assert_array_equal(np.concatenate(got), want)


def test_sharded_over_8_devices(store):
    path, _ = store
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    cfg = LoaderConfig(global_batch_size=64, seed=9, num_epochs=1)
    plain = Loader(path, cfg)
    loader = Loader(path, cfg, sharding=sharding)
    for _ in range(3):
        want = next(plain)
        arr = next(loader)
        assert isinstance(arr, jax.Array) and arr.shape == (64, 24) and arr.sharding == sharding
        assert len(arr.addressable_shards) == 8
        for shard in arr.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])


def test_bad_config(store, tmp_path):
    path, _ = store
    with pytest.raises(ValueError, match="process_index"):
        LoaderConfig(global_batch_size=8, process_index=1)
    with pytest.raises(ValueError, match="global_batch_size"):
        LoaderConfig(global_batch_size=9, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="global_batch_size"):
        Loader(path, LoaderConfig(global_batch_size=5000))
    with pytest.raises(ValueError, match="shuffle|mode"):
        Loader(path, LoaderConfig(global_batch_size=8, shuffle="perfect"))
