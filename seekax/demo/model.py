"""The demo's model: a tiny DeepSeek-V3 (every architectural feature, small dimensions) written as a Hugging Face
directory (config.json, safetensors, a byte-level BPE tokenizer trained on the demo corpus), so training,
saving, reloading and serving run through the same code as a downloaded checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

# A DeepSeek-V3 config.json at small dimensions: MLA with a query LoRA and a decoupled RoPE key, one dense layer
# then MoE layers (sigmoid routing with the correction bias, 2 groups of which the best is kept, a shared
# expert), an untied head. hidden and moe_intermediate_size are multiples of 128 so the served model's experts
# run the FP8 grouped GEMMs. 4 layers: DualPipeV on pp=2 has 4 stages, one layer each.
TINY_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 128,
    "num_hidden_layers": 4, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 64, "kv_lora_rank": 64,
    "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "n_shared_experts": 1,
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
    "max_position_embeddings": 1024, "rope_theta": 10000.0, "rope_scaling": None, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "num_nextn_predict_layers": 0, "hidden_act": "silu",
    "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "torch_dtype": "float32",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def make_model_dir(out_dir: str | os.PathLike, texts: list[str], *, num_layers: int | None = None,
                   seed: int = 0) -> Path:
    """Write the tiny model (random init) with a tokenizer trained on texts; reused when already there."""
    from seekax.models.hf_dir import write_model_dir

    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    cfg = dict(TINY_V3)
    if num_layers is not None:
        cfg["num_hidden_layers"] = num_layers
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    write_model_dir(tmp, cfg, texts, seed=seed)
    tmp.replace(out)
    return out
