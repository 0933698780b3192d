"""The JAX data ecosystem reads seekax stores: grain takes a SampleStore as its RandomAccessDataSource (threads,
and pickled into worker processes); ArrayRecord files round-trip both ways and grain reads the exported ones."""

import pickle

import grain
import numpy as np
import pytest

from seekax.storage.arrayrecord import export_array_record, import_array_record
from seekax.storage.sample_store import SampleStore, SampleStoreWriter, write_token_store


def _store(tmp_path, rng, n=500, seq_len=24):
    seqs = rng.integers(0, 129280, size=(n, seq_len)).astype(np.int32)
    write_token_store(tmp_path / "s", seqs, shard_bytes=seq_len * 4 * 128,
                      metadata={"tokenizer": {"kind": "hf", "sha256": "ab" * 32, "eos_id": 1, "name": "t.json"}})
    return seqs


def test_grain_reads_a_sample_store(tmp_path, rng):
    seqs = _store(tmp_path, rng)
    with SampleStore(tmp_path / "s") as store:
        assert isinstance(store, grain.sources.RandomAccessDataSource)
        np.testing.assert_array_equal(store[7], seqs[7])
        with pytest.raises(IndexError, match="record_key=500"):
            store[500]
        ds = grain.MapDataset.source(store).shuffle(seed=3).batch(32, drop_remainder=True)
        batches = list(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
        assert len(batches) == 500 // 32 and batches[0].shape == (32, 24)
        order = np.asarray(grain.MapDataset.range(500).shuffle(seed=3))[:32 * len(batches)]
        np.testing.assert_array_equal(np.concatenate(batches), seqs[order])
        # grain's DataLoader (the sampler + operations API MaxText's pipeline builds on)
        loader = grain.DataLoader(data_source=store, sampler=grain.samplers.IndexSampler(
            num_records=len(store), shuffle=False, num_epochs=1, seed=0), operations=[grain.transforms.Batch(50)],
            worker_count=0)
        np.testing.assert_array_equal(np.concatenate(list(loader)), seqs)
        # pickled into a worker process: reopens its files and still checks every read
        clone = pickle.loads(pickle.dumps(store))
        np.testing.assert_array_equal(clone._getitems([3, 499, 3]), seqs[[3, 499, 3]])
        assert clone.verify_reads and repr(clone).startswith("SampleStore(")


def test_array_record_round_trip_tokens(tmp_path, rng):
    seqs = _store(tmp_path, rng)
    files = export_array_record(tmp_path / "s", tmp_path / "out.array_record", num_shards=3)
    assert len(files) == 3
    src = grain.sources.ArrayRecordDataSource(files)  # grain reads the export directly
    assert len(src) == 500
    np.testing.assert_array_equal(np.frombuffer(src[250], dtype=np.int32), seqs[250])
    m = import_array_record(str(tmp_path / "out.array_record-*"), tmp_path / "back")
    assert m["kind"] == "tokens" and m["seq_len"] == 24 and m["dtype"] == "int32"
    assert m["metadata"]["tokenizer"]["sha256"] == "ab" * 32  # the tokenizer identity travels along
    with SampleStore(tmp_path / "back", verify=True) as back:
        np.testing.assert_array_equal(back.read(np.arange(500)), seqs)
    with pytest.raises(ValueError, match="out=.*overwrite=True"):
        export_array_record(tmp_path / "s", tmp_path / "out.array_record", num_shards=3)
    # without the sidecar: as bytes by default, as tokens when told the shape
    (tmp_path / "out.array_record.seekax.json").unlink()
    m = import_array_record(files, tmp_path / "raw")
    assert m["kind"] == "bytes" and SampleStore(tmp_path / "raw")[9] == seqs[9].tobytes()
    with pytest.raises(ValueError, match="src=.*record 0 .*96 bytes"):
        import_array_record(files, tmp_path / "bad", kind="tokens", dtype="int32", seq_len=25)
    with pytest.raises(ValueError, match="src="):
        import_array_record(tmp_path / "nothing-*.array_record", tmp_path / "none")


def test_array_record_round_trip_bytes(tmp_path, rng):
    records = [rng.bytes(int(rng.integers(0, 2000))) for _ in range(300)]
    with SampleStoreWriter(tmp_path / "b", kind="bytes", shard_bytes=50_000) as w:
        w.write_many(records)
    (f,) = export_array_record(tmp_path / "b", tmp_path / "b.array_record")
    assert list(grain.sources.ArrayRecordDataSource([f])) == records
    import_array_record(f, tmp_path / "back")
    with SampleStore(tmp_path / "back") as back:
        assert back.read(np.arange(300)) == records
