"""A real tokenizer.json (Hugging Face `tokenizers`, built here: no download) packs text into int32 records;
ids above 65535 survive (a 130,000-id vocabulary, more than DeepSeek-V3's 129,280); the store records the
tokenizer's identity and a loader given another tokenizer refuses."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from seekax.storage.loader import Loader, LoaderConfig
from seekax.storage.prep import Session
from seekax.storage.sample_store import SampleStore
from seekax.storage.tokenizer import HFTokenizer, load_tokenizer

WORDS = "the expert routes each token to a latent cache page while the pipeline schedules a batch".split()


def _corpus(rng, n):
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 30)))) + "." for _ in range(n)]


def _bpe(tmp_path, rng) -> str:
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_corpus(rng, 300), trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"]))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def _big_wordlevel(tmp_path) -> str:
    """130,000 ids: the corpus words get ids above 65535, so a 16-bit store would lose them."""
    names = ["<unk>", "</s>"] + [f"w{i}" for i in range(2, 130_000)]
    for j, w in enumerate([*sorted(set(WORDS)), "."]):
        names[129_000 + j] = w
    tok = tokenizers.Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "big" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return str(path)


def _prepare(tmp_path, texts, tokenizer, seq_len=32, name="store"):
    raw = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"text": texts}), raw)
    with Session(tmp_path / f"work-{name}", executor="inline") as s:
        return s.read_parquet(str(raw)).to_sample_store(tmp_path / name, text_column="text", seq_len=seq_len,
                                                        tokenizer=tokenizer)


def test_bpe_tokenizer_json_packs_text(tmp_path, rng):
    path = _bpe(tmp_path, rng)
    texts = _corpus(rng, 40)
    m = _prepare(tmp_path, texts, path)
    ident = m["metadata"]["tokenizer"]
    tok = tokenizers.Tokenizer.from_file(path)
    assert ident["kind"] == "hf" and ident["vocab_size"] == tok.get_vocab_size() and ident["eos_id"] == 1
    assert ident["sha256"] == HFTokenizer(path).sha256
    with SampleStore(tmp_path / "store") as store:
        stream = store.read(np.arange(len(store))).reshape(-1)
    docs = np.split(stream, np.flatnonzero(stream == 1) + 1)[:-1]  # documents end at EOS (id 1)
    assert len(docs) >= 30
    for doc, text in zip(docs, texts):  # the documents' ids, in order, and they decode back to the text
        assert doc[:-1].tolist() == tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(doc[:-1].tolist()).replace(" ", "") == text.replace(" ", "")


def test_vocabulary_over_129k_ids_packs_into_int32(tmp_path, rng):
    path = _big_wordlevel(tmp_path)
    texts = _corpus(rng, 30)
    m = _prepare(tmp_path, texts, path, seq_len=16)
    assert m["dtype"] == "int32" and m["metadata"]["tokenizer"]["vocab_size"] == 130_000
    with SampleStore(tmp_path / "store") as store:
        stream = store.read(np.arange(len(store))).reshape(-1)
    ids = {w: 129_000 + j for j, w in enumerate([*sorted(set(WORDS)), "."])}
    want = np.concatenate([np.r_[[ids[w] for w in t[:-1].split()], ids["."], 1] for t in texts])
    np.testing.assert_array_equal(stream, want[:len(stream)])
    assert stream.max() > 65535


def test_loader_refuses_another_tokenizer(tmp_path, rng):
    bpe, big = _bpe(tmp_path, rng), _big_wordlevel(tmp_path)
    _prepare(tmp_path, _corpus(rng, 200), bpe, seq_len=16)
    cfg = LoaderConfig(global_batch_size=4, process_index=0, process_count=1)
    assert next(Loader(tmp_path / "store", cfg, tokenizer=bpe)).shape == (4, 16)
    with pytest.raises(ValueError, match="tokenizer=.tokenizer.json .*packed with: tokenizer.json"):
        Loader(tmp_path / "store", cfg, tokenizer=big)
    with pytest.raises(ValueError, match="tokenizer=.seekax-bytes"):
        Loader(tmp_path / "store", cfg, tokenizer="bytes")
    _prepare(tmp_path, _corpus(rng, 200), None, seq_len=16, name="bytes")  # the default: the byte tokenizer
    assert json.loads((tmp_path / "bytes" / "manifest.json").read_text())["metadata"]["tokenizer"]["kind"] == "bytes"
    Loader(tmp_path / "bytes", cfg, tokenizer="bytes")
    with pytest.raises(ValueError, match="tokenizer="):
        Loader(tmp_path / "bytes", cfg, tokenizer=bpe)


def test_bad_tokenizer_input(tmp_path, rng):
    with pytest.raises(ValueError, match="tokenizer=.*existing tokenizer.json"):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer=.*Hugging Face tokenizer.json"):
        load_tokenizer(str(tmp_path / "junk.json"))
    with pytest.raises(ValueError, match="eos_token=.<eot>"):
        HFTokenizer(_bpe(tmp_path, rng), eos_token="<eot>")
