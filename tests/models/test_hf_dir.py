"""A new Hugging Face directory written from a config dict and texts: config, params and a trained byte-level
BPE tokenizer that load back unchanged."""

import jax
import numpy as np

from seekax.models.checkpoint import load_checkpoint
from seekax.models.hf_dir import write_model_dir
from seekax.models.tokenizer import Tokenizer

TINY = {"model_type": "deepseek_v3", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
        "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "kv_lora_rank": 16,
        "q_lora_rank": None, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 4,
        "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "n_shared_experts": 1, "first_k_dense_replace": 1,
        "num_nextn_predict_layers": 0}


def test_write_model_dir_round_trips(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog"] * 8 + ["hello world, hello seekax"] * 8
    cfg, params = write_model_dir(tmp_path / "m", TINY, texts, seed=3)
    tok = Tokenizer(tmp_path / "m")
    assert tok.vocab_size <= 300 and cfg.eos_ids == (tok.eos_id,)
    ids = tok.encode("hello world")
    assert ids[0] == cfg.bos_token_id and tok.decode(ids) == "hello world"
    assert tok.encode_chat([{"role": "user", "content": "hi"}])[0] == cfg.bos_token_id
    cfg2, params2 = load_checkpoint(tmp_path / "m", progress=False)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
