"""Data preparation on DuckDB: partition ops against a Python reference, determinism, rerunnability, export."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seekax.storage import tokens
from seekax.storage.prep import Session
from seekax.storage.sample_store import SampleStore


def _corpus(tmp_path, rng, files=3, rows=200):
    """Parquet files of (id, url, text); urls repeat across files so dedupe has work to do."""
    out, all_rows, next_id = [], [], 0
    for f in range(files):
        ids = np.arange(next_id, next_id + rows)
        next_id += rows
        urls = [f"u{int(u)}" for u in rng.integers(0, 250, size=rows)]
        texts = [f"doc {i} é " + "x" * int(rng.integers(0, 40)) for i in ids]
        pq.write_table(pa.table({"id": ids, "url": urls, "text": texts}), tmp_path / f"in-{f}.parquet")
        out.append(str(tmp_path / f"in-{f}.parquet"))
        all_rows += list(zip(ids.tolist(), urls, texts))
    return out, all_rows


def _rows(df):
    t = df.to_arrow()
    return list(zip(t["id"].to_pylist(), t["url"].to_pylist(), t["text"].to_pylist()))


def test_dedupe_after_hash_repartition_matches_reference(tmp_path, rng):
    files, rows = _corpus(tmp_path, rng)
    with Session(tmp_path / "work", executor="inline") as s:
        df = s.read_parquet(str(tmp_path / "in-*.parquet")).repartition(4, hash_by="url").dedupe("url")
        got = _rows(df)
        first = {}
        for r in rows:  # reference: the first occurrence of each url in file order
            first.setdefault(r[1], r)
        assert sorted(got) == sorted(first.values())
        # every url lives in exactly one partition
        parts = [pq.read_table(f[0])["url"].to_pylist() for f in df.compute()]
        assert sum(len(set(p)) for p in parts) == len(first)


def test_shuffle_sort_sql_deterministic_and_rerunnable(tmp_path, rng):
    files, rows = _corpus(tmp_path, rng)

    def pipeline(s):
        df = s.read_parquet(files).repartition(2)
        df = df.partial_sql("SELECT id, url, text, {partition} AS part FROM {0} WHERE id % 3 <> 0")
        return df.shuffle(seed=7)

    with Session(tmp_path / "w1", executor="inline") as s1, Session(tmp_path / "w2", executor="inline") as s2:
        a, b = pipeline(s1), pipeline(s2)
        ta, tb = a.to_arrow(), b.to_arrow()
        assert ta.equals(tb)
        assert sorted(ta["id"].to_pylist()) == [r[0] for r in rows if r[0] % 3]
        assert ta["id"].to_pylist() != sorted(ta["id"].to_pylist())  # actually shuffled
        assert set(ta["part"].to_pylist()) == {0, 1}
        other = s1.read_parquet(files).repartition(2).partial_sql(
            "SELECT id, url, text, {partition} AS part FROM {0} WHERE id % 3 <> 0").shuffle(seed=8).to_arrow()
        assert other["id"].to_pylist() != ta["id"].to_pylist()
        srt = s1.read_parquet(files, num_partitions=1).sort("url", "id").to_arrow()
        assert list(zip(srt["url"].to_pylist(), srt["id"].to_pylist())) == sorted((r[1], r[0]) for r in rows)
        # rerun: every partition is found finished; drop one marker and only that partition recomputes
        s1.last_run = {"tasks": 0, "skipped": 0}
        a.compute()
        assert s1.last_run["tasks"] == s1.last_run["skipped"] == 2 + 3 + 2  # shuffle + split + sql
        marker = tmp_path / "w1" / a.node.id / "part-00001.done"
        marker.unlink()
        s1.last_run = {"tasks": 0, "skipped": 0}
        assert a.to_arrow().equals(ta)
        assert s1.last_run == {"tasks": 7, "skipped": 6}


def test_process_pool_export_to_sample_store(tmp_path, rng):
    files, rows = _corpus(tmp_path, rng, files=2, rows=100)
    with Session(tmp_path / "work", executor="process", num_workers=2) as s:
        df = s.read_parquet(files).repartition(3, hash_by="id")
        out = df.write_parquet(tmp_path / "out")
        assert len(out) == 3
        assert sorted(pa.concat_tables([pq.read_table(f) for f in out])["id"].to_pylist()) == list(range(200))
        m = df.to_sample_store(tmp_path / "store", text_column="text", seq_len=64)
    assert m["metadata"]["docs"] == 200
    with SampleStore(tmp_path / "store", verify=True) as store:
        toks = store.read(np.arange(len(store)))
    # reference: each partition packs its documents in order; the stream starts with partition 0's first doc
    part0 = pq.read_table(out[0])["text"].to_pylist()
    want = np.concatenate([np.concatenate([tokens.encode(t), [tokens.EOS]]) for t in part0])
    n = min(len(want), toks.shape[1] * 2)
    np.testing.assert_array_equal(toks.reshape(-1)[:n], want[:n])
    assert tokens.decode(tokens.encode("héllo")) == "héllo"
    assert toks.dtype == np.int32 and toks.max() <= tokens.EOS


def test_bad_input(tmp_path, rng):
    files, _ = _corpus(tmp_path, rng, files=1, rows=10)
    pq.write_table(pa.table({"id": np.arange(3.0), "url": ["a"] * 3, "text": ["t"] * 3}), tmp_path / "in-9.parquet")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="work_dir=.*existing file"):
        Session(f)
    with pytest.raises(ValueError, match="executor='ray'.*pip install ray"):
        Session(tmp_path / "w", executor="ray")
    s = Session(tmp_path / "w", executor="inline")
    with pytest.raises(ValueError, match="paths=.*in-9.parquet.*same schema"):
        s.read_parquet(str(tmp_path / "in-*.parquet"))
    with pytest.raises(ValueError, match="paths="):
        s.read_parquet(str(tmp_path / "nothing-*.parquet"))
    df = s.read_parquet(files)
    with pytest.raises(ValueError, match="hash_by='nope'.*among"):
        df.repartition(2, hash_by="nope")
    with pytest.raises(ValueError, match="columns='nope'"):
        df.dedupe("nope")
    with pytest.raises(ValueError, match="columns='nope'"):
        df.sort("id", "nope")
    with pytest.raises(ValueError, match="query=.*valid SQL"):
        df.partial_sql("SELECT nope FROM {0}")
    with pytest.raises(ValueError, match="query=.*\\{0\\}"):
        df.partial_sql("SELECT 1")
    with pytest.raises(ValueError, match="text_column='id'.*VARCHAR"):
        df.to_sample_store(tmp_path / "st", text_column="id", seq_len=8)
    with pytest.raises(ValueError, match="text_column='body'"):
        df.to_sample_store(tmp_path / "st", text_column="body", seq_len=8)


def test_an_unguarded_script_gets_told_about_the_main_guard(tmp_path):
    """executor="process" spawns workers that import the main module: a script without the __main__ guard has
    them run it again (and die making their own pools); the Session says so instead of a bare BrokenProcessPool."""
    import subprocess
    import sys

    for i in range(2):
        pq.write_table(pa.table({"k": list(range(40)), "text": ["x"] * 40}), tmp_path / f"in-{i}.parquet")
    (tmp_path / "script.py").write_text(
        "from seekax.storage.prep import Session\n"
        "with Session('work', num_workers=2) as s:\n"
        "    s.read_parquet('in-*.parquet').repartition(2, hash_by='k').compute()\n")
    run = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert 'if __name__ == "__main__":' in run.stderr and "RuntimeError" in run.stderr
