"""Hugging Face config.json parsing: both spellings of RoPE, the released V3 / V2-Lite configs' fields,
and clear errors for what seekax cannot run."""

import copy
import json
import math
import os

import numpy as np
import pytest

from seekax.models.deepseek_config import from_hf_config, load_config

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "models")

# DeepSeek-V3's released config.json (the fields the architecture reads).
V3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
      "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
      "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
      "n_routed_experts": 256, "ep_size": 1, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
      "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8,
      "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
      "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
      "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "rope_theta": 10000,
      "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                       "original_max_position_embeddings": 4096, "type": "yarn"},
      "attention_bias": False, "bos_token_id": 0, "eos_token_id": 1,
      "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                              "weight_block_size": [128, 128]}}
# DeepSeek-V2-Lite's.
V2_LITE = {"model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
           "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
           "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64, "routed_scaling_factor": 1.0,
           "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128,
           "qk_nope_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6,
           "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": False, "scoring_func": "softmax",
           "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000,
           "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                            "original_max_position_embeddings": 4096, "type": "yarn"},
           "tie_word_embeddings": False, "attention_bias": False}


def _transformers5(d):
    """The same config as transformers 5 writes it: rope_parameters instead of rope_theta + rope_scaling."""
    d = copy.deepcopy(d)
    scaling = d.pop("rope_scaling") or {}
    kind = scaling.pop("type", "default")
    d["rope_parameters"] = {"rope_type": kind, "rope_theta": float(d.pop("rope_theta")), **scaling}
    return d


def test_deepseek_v3_released_config():
    cfg = from_hf_config(V3)
    assert (cfg.hidden, cfg.num_layers, cfg.first_k_dense, cfg.mtp_layers, cfg.vocab) == (7168, 61, 3, 1, 129280)
    assert cfg.mla.latent_dim == 576 and cfg.mla.q_lora == 1536 and cfg.mla.heads == 128
    m = cfg.moe
    assert (m.num_experts, m.top_k, m.n_groups, m.topk_group, m.shared, m.moe_inter) == (256, 8, 8, 4, 1, 2048)
    assert (m.scoring, m.topk_method, m.norm_topk_prob, m.routed_scaling_factor) == ("sigmoid", "noaux_tc", True, 2.5)
    assert cfg.fp8_block == (128, 128)
    y = cfg.mla.yarn
    assert (y.factor, y.original_max_position_embeddings, y.mscale, y.mscale_all_dim) == (40, 4096, 1.0, 1.0)
    m_all = 0.1 * 1.0 * math.log(40) + 1.0
    assert cfg.mla.softmax_scale == pytest.approx(m_all ** 2 / math.sqrt(192))
    assert y.cos_sin_factor() == pytest.approx(1.0)


def test_deepseek_v2_lite_released_config():
    cfg = from_hf_config(V2_LITE)
    assert cfg.mla.q_lora == 0 and cfg.first_k_dense == 1 and cfg.mtp_layers == 0
    m = cfg.moe
    assert (m.scoring, m.topk_method, m.norm_topk_prob, m.n_groups, m.top_k) == ("softmax", "greedy", False, 1, 6)
    assert cfg.fp8_block is None


@pytest.mark.parametrize("base", [V3, V2_LITE])
def test_both_spellings_parse_to_the_same_config(base):
    a, b = from_hf_config(base), from_hf_config(_transformers5(base))
    assert a == b
    np.testing.assert_array_equal(a.mla.inv_freq(), b.mla.inv_freq())


def test_yarn_frequencies_interpolate_low_and_keep_high():
    cfg = from_hf_config(V3).mla
    inv = cfg.inv_freq().astype(np.float64)
    plain = 1.0 / 10000 ** (np.arange(0, 64, 2) / 64)
    assert inv[0] == pytest.approx(plain[0])                       # fastest rotations: extrapolated (unchanged)
    assert inv[-1] == pytest.approx(plain[-1] / 40)                # slowest: interpolated by the factor


def test_tiny_golden_configs_load():
    for name in sorted(os.listdir(DATA)):
        cfg = load_config(os.path.join(DATA, name))
        with open(os.path.join(DATA, name, "config.json")) as f:
            assert cfg.hf == json.load(f)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(model_type="llama"), r"model_type.*'llama'.*deepseek_v3"),
    (lambda d: d.pop("kv_lora_rank"), r"kv_lora_rank.*missing"),
    (lambda d: d.update(hidden_act="gelu"), r"hidden_act"),
    (lambda d: d.update(num_key_value_heads=8), r"num_key_value_heads.*8"),
    (lambda d: d["rope_scaling"].update(type="longrope"), r"rope type.*longrope"),
    (lambda d: d.update(scoring_func="softmax"), r"scoring_func.*softmax"),
    (lambda d: d["quantization_config"].update(weight_block_size=[64, 64]), r"weight_block_size"),
    (lambda d: d.update(first_k_dense_replace=62), r"first_k_dense_replace.*62"),
    (lambda d: d.update(n_group=3), r"num_experts.*256.*n_groups=3"),
])
def test_bad_configs_are_clear_errors(edit, match):
    d = copy.deepcopy(V3)
    edit(d)
    with pytest.raises(ValueError, match=match):
        from_hf_config(d)
