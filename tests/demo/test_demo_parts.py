"""The demo's pieces that need no training run: the batch layout across processes, the model directory and
the prompts that share a KV page."""

import json

import numpy as np

from seekax.demo.train import batch_to_microbatches
from seekax.models.train import TrainConfig


def test_batch_layout_is_the_same_for_one_and_two_processes():
    cfg = TrainConfig(microbatches=2, microbatch_size=8, ep=4)
    rows = np.arange(16 * 3).reshape(16, 3)          # global batch, ordered (ep shard, micro-batch, row)
    one = batch_to_microbatches(rows, cfg, 1)        # [M, 8, 3]
    two = np.concatenate([batch_to_microbatches(rows[:8], cfg, 2), batch_to_microbatches(rows[8:], cfg, 2)], 1)
    np.testing.assert_array_equal(one, two)
    # micro-batch m, ep shard e holds global rows e*4 + m*2 + [0, 1]
    np.testing.assert_array_equal(one[1, 2:4, 0], rows[[6, 7], 0])


def test_model_directory_and_prompts(tmp_path):
    """The tiny model is a DeepSeek-V3 Hugging Face directory whose tokenizer was trained on the corpus, and the
    demo's eight prompts share more than one 64-token KV page, then differ."""
    from seekax.demo.data import make_corpus
    from seekax.demo.main import demo_prompts
    from seekax.demo.model import TINY_V3, make_model_dir
    from seekax.models.deepseek_config import load_config
    from seekax.models.tokenizer import Tokenizer

    d = make_model_dir(tmp_path / "m", make_corpus(300), num_layers=4)
    cfg = load_config(d)
    assert cfg.num_layers == 4 and cfg.moe.num_experts == TINY_V3["n_routed_experts"] and not cfg.tie_embeddings
    assert json.loads((d / "config.json").read_text())["model_type"] == "deepseek_v3"
    tok = Tokenizer(d)
    assert 300 < tok.vocab_size <= TINY_V3["vocab_size"]
    ids = [tok.encode(p) for p in demo_prompts(d)]
    assert len(ids) == 8 and len({tuple(i) for i in ids}) == 8
    shared = min(next((k for k, (a, b) in enumerate(zip(ids[0], i)) if a != b), len(i)) for i in ids[1:])
    assert shared > 64
    assert make_model_dir(tmp_path / "m", []) == d                      # an existing directory is reused


def test_prepare_rebuilds_a_store_of_another_tokenizer_or_row_length(tmp_path):
    """A rerun reuses a store packed with the same tokenizer and row length, and rebuilds any other one (a store
    of another tokenizer would be refused by the loader; a version-1 store has no read checks)."""
    from seekax.demo.data import make_corpus, prepare
    from seekax.models.hf_dir import write_tokenizer

    corpus = make_corpus(200)
    write_tokenizer(tmp_path / "a", corpus, 300)
    write_tokenizer(tmp_path / "b", corpus, 400)
    kw = dict(num_docs=200, num_workers=1)
    first = prepare(tmp_path / "d", seq_len=16, tokenizer=tmp_path / "a" / "tokenizer.json", **kw)
    again = prepare(tmp_path / "d", seq_len=16, tokenizer=tmp_path / "a" / "tokenizer.json", **kw)
    assert again == first                                                       # reused as it is
    other = prepare(tmp_path / "d", seq_len=16, tokenizer=tmp_path / "b" / "tokenizer.json", **kw)
    assert other["metadata"]["tokenizer"]["sha256"] != first["metadata"]["tokenizer"]["sha256"]
    longer = prepare(tmp_path / "d", seq_len=32, tokenizer=tmp_path / "b" / "tokenizer.json", **kw)
    assert longer["seq_len"] == 33 and longer["num_records"] < other["num_records"]
