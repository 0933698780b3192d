"""Demo data: a generated corpus (nothing downloads) prepared with seekax's storage runtime.

raw parquet shards -> `storage.prep.Session` (DuckDB per partition: dedupe, deterministic shuffle) ->
a token sample store of packed rows of seq_len + 1 token ids of the model's tokenizer (inputs + shifted targets).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy")
ITEMS = ("apples", "pears", "books", "coins", "stones", "shells", "cards", "keys")
VERBS = ("gives", "sends", "sells", "lends", "shows", "throws")
PLACES = ("the park", "the market", "the river", "the library", "the harbour", "the hill")


def make_corpus(num_docs: int, seed: int = 0) -> list[str]:
    """Short templated stories: learnable structure (names, counts, agreement) for a tiny model."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(num_docs):
        lines = []
        for _ in range(int(rng.integers(2, 5))):
            a, b = rng.choice(NAMES, 2, replace=False)
            n = int(rng.integers(1, 10))
            item = ITEMS[int(rng.integers(len(ITEMS)))]
            verb = VERBS[int(rng.integers(len(VERBS)))]
            place = PLACES[int(rng.integers(len(PLACES)))]
            lines.append(f"{a} {verb} {n} {item} to {b} at {place}.")
        docs.append(f"story {i}: " + " ".join(lines))
    return docs


def write_raw(raw_dir: Path, docs: list[str], num_files: int = 4) -> list[str]:
    """The 'raw' input: parquet files with columns (doc_id, text), as a crawler would leave them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(num_files):
        ids = list(range(f, len(docs), num_files))
        texts = [docs[i] for i in ids]
        ids_dup = ids + ids[:3]                      # a few duplicates for dedupe to remove
        texts_dup = texts + texts[:3]
        path = raw_dir / f"raw-{f:03d}.parquet"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            pq.write_table(pa.table({"doc_id": ids_dup, "text": texts_dup}), tmp)
            tmp.replace(path)
        paths.append(str(path))
    return paths


def prepare(data_dir: Path, *, num_docs: int, seq_len: int, tokenizer: str | Path, seed: int = 0,
            num_workers: int = 2) -> dict:
    """Generate, dedupe, shuffle and tokenise (with the model's tokenizer.json) into `data_dir/store`: rows of
    seq_len + 1 token ids, documents separated by the tokenizer's EOS. Rerunnable: finished partitions are
    reused, and so is a store packed with the same tokenizer and row length; any other store is rebuilt.
    Returns the store manifest."""
    import shutil

    from seekax.storage.atomic import read_json
    from seekax.storage.prep import Session
    from seekax.storage.tokenizer import load_tokenizer, same_tokenizer

    store = data_dir / "store"
    if (store / "manifest.json").exists():
        m = read_json(store / "manifest.json")
        have = m.get("metadata", {}).get("tokenizer") or {}
        if (m.get("version", 0) >= 2 and m.get("seq_len") == seq_len + 1
                and same_tokenizer(have, load_tokenizer(str(Path(tokenizer).absolute())).identity())):
            return m
        shutil.rmtree(store)
    paths = write_raw(data_dir / "raw", make_corpus(num_docs, seed))
    sess = Session(data_dir / "work", num_workers=num_workers, executor="inline" if num_workers == 1 else "process")
    try:
        df = sess.read_parquet(paths).repartition(4, hash_by="doc_id").dedupe("doc_id").shuffle(seed=seed)
        return df.to_sample_store(store, text_column="text", seq_len=seq_len + 1, tokenizer=tokenizer)
    finally:
        sess.close()
