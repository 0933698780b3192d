"""DeepSeek-V2/V3 architecture configs, read from a Hugging Face `config.json`.

Both spellings found in the wild are accepted: the released checkpoints' (`rope_theta` and `rope_scaling`
at the top level, `"type": "yarn"`) and transformers 5's (`rope_parameters` holding `rope_type`,
`rope_theta` and the scaling fields). `model_type` "deepseek_v3" (sigmoid routing with a correction bias,
grouped top-k) and "deepseek_v2" (V2 / V2-Lite: softmax routing, greedy or group-limited) are supported;
anything else, a missing field, or a feature seekax does not implement is a ValueError naming the field.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from seekax.ir.validate import fail
from seekax.layers.mla import MlaConfig, YarnScaling
from seekax.layers.moe import MoeConfig
from seekax.models.safetensors_dir import read_json

MODEL_TYPES = ("deepseek_v3", "deepseek_v2")

# Fields every config must have (the rest have the defaults transformers uses for that model type).
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")

_DEFAULTS = {
    "deepseek_v3": dict(q_lora_rank=1536, moe_intermediate_size=2048, n_routed_experts=256, num_experts_per_tok=8,
                        n_group=8, topk_group=4, n_shared_experts=1, first_k_dense_replace=3, norm_topk_prob=True,
                        routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc",
                        num_nextn_predict_layers=1, rope_interleave=True),
    "deepseek_v2": dict(q_lora_rank=1536, moe_intermediate_size=1407, n_routed_experts=64, n_shared_experts=2,
                        first_k_dense_replace=0, norm_topk_prob=False, routed_scaling_factor=1.0,
                        scoring_func="softmax", topk_method="greedy", num_nextn_predict_layers=0, rope_interleave=True),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeepseekConfig:
    """One DeepSeek-V2/V3 model: the per-layer MLA and MoE configs plus the stack around them.

    Layers [0, first_k_dense) have a dense SwiGLU MLP of width `intermediate`, the rest the MoE layer.
    `mtp_layers` multi-token-prediction modules follow the main layers (V3). `fp8_block`: the checkpoint's
    `quantization_config.weight_block_size` when it is stored in FP8, else None. `hf`: the parsed config.json
    (written back when saving; not compared)."""

    model_type: str
    vocab: int
    num_layers: int
    intermediate: int
    first_k_dense: int
    mla: MlaConfig
    moe: MoeConfig
    eps: float = 1e-6
    tie_embeddings: bool = False
    mtp_layers: int = 0
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    fp8_block: tuple[int, int] | None = None
    hf: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise fail("model_type", self.model_type, f"one of {MODEL_TYPES}")
        if not 0 <= self.first_k_dense <= self.num_layers:
            raise fail("first_k_dense_replace", self.first_k_dense, f"in [0, num_hidden_layers={self.num_layers}]")
        if self.mla.hidden != self.moe.hidden:
            raise fail("moe.hidden", self.moe.hidden, f"== mla.hidden={self.mla.hidden}")

    @property
    def hidden(self) -> int:
        return self.mla.hidden

    def is_moe(self, layer: int) -> bool:
        return layer >= self.first_k_dense

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else (e,) if isinstance(e, int) else tuple(e)


def _get(d: dict, name: str, default: Any = dataclasses.MISSING):
    v = d.get(name, None)
    if v is None:
        if default is dataclasses.MISSING:
            raise fail(f"config.json[{name!r}]", "missing", "a value (DeepSeek-V2/V3 configs always set it)")
        return default
    return v


def _rope(d: dict) -> tuple[float, YarnScaling | None]:
    """(theta, yarn) from either spelling: rope_parameters (transformers 5) or rope_theta + rope_scaling."""
    params = d.get("rope_parameters")
    if params:
        if not isinstance(params, dict):
            raise fail("config.json['rope_parameters']", type(params).__name__, "a dict")
        if any(isinstance(v, dict) for v in params.values()):
            raise fail("config.json['rope_parameters']", sorted(params), "one RoPE for every layer (not per type)")
        theta = params.get("rope_theta") or d.get("rope_theta") or 10000.0
        scaling = params
    else:
        theta = d.get("rope_theta") or 10000.0
        scaling = d.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "yarn":
        raise fail("config.json rope type", kind, "'default' or 'yarn' (DeepSeek's RoPE variants)")
    max_pos = d.get("max_position_embeddings") or 4096
    orig = scaling.get("original_max_position_embeddings") or max_pos
    factor = scaling.get("factor") or max_pos / orig
    opt = {k: scaling[k] for k in ("mscale", "mscale_all_dim", "attention_factor") if scaling.get(k) is not None}
    return float(theta), YarnScaling(factor=float(factor), original_max_position_embeddings=int(orig),
                                     beta_fast=float(scaling.get("beta_fast") or 32),
                                     beta_slow=float(scaling.get("beta_slow") or 1),
                                     truncate=bool(scaling.get("truncate", True)), **opt)


def from_hf_config(d: dict) -> DeepseekConfig:
    """Parse a config.json dict (either spelling) into a DeepseekConfig; clear errors before any work."""
    if not isinstance(d, dict):
        raise fail("config", type(d).__name__, "a config.json dict")
    mt = d.get("model_type")
    if mt not in MODEL_TYPES:
        raise fail("config.json['model_type']", mt, f"one of {MODEL_TYPES}")
    for name in REQUIRED:
        _get(d, name)
    dflt = _DEFAULTS[mt]
    g = lambda name: _get(d, name, dflt.get(name, dataclasses.MISSING))  # noqa: E731
    if d.get("hidden_act", "silu") != "silu":
        raise fail("config.json['hidden_act']", d["hidden_act"], "'silu' (DeepSeek's SwiGLU)")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise fail("config.json['attention_bias']", True, "false: DeepSeek's projections have no bias")
    if d.get("moe_layer_freq", 1) != 1:
        raise fail("config.json['moe_layer_freq']", d["moe_layer_freq"], "1 (every layer after the dense ones)")
    heads = int(g("num_attention_heads"))
    kv_heads = d.get("num_key_value_heads")
    if kv_heads not in (None, heads):
        raise fail("config.json['num_key_value_heads']", kv_heads, f"== num_attention_heads={heads} (MLA)")
    theta, yarn = _rope(d)
    mla = MlaConfig(hidden=int(g("hidden_size")), heads=heads, kv_lora=int(g("kv_lora_rank")),
                    q_lora=int(d.get("q_lora_rank", dflt["q_lora_rank"]) or 0), qk_nope=int(g("qk_nope_head_dim")),
                    qk_rope=int(g("qk_rope_head_dim")), v_head=int(g("v_head_dim")), rope_theta=theta,
                    eps=float(_get(d, "rms_norm_eps", 1e-6)), rope_interleave=bool(g("rope_interleave")), yarn=yarn)
    experts = int(g("n_routed_experts"))
    n_group = int(d.get("n_group") or 1)
    topk_method = d.get("topk_method") or dflt["topk_method"]
    if mt == "deepseek_v2" and topk_method not in ("greedy", "group_limited_greedy"):
        raise fail("config.json['topk_method']", topk_method, "'greedy' or 'group_limited_greedy' for deepseek_v2")
    scoring = d.get("scoring_func") or dflt["scoring_func"]
    if mt == "deepseek_v3" and scoring != "sigmoid":
        raise fail("config.json['scoring_func']", scoring, "'sigmoid' for deepseek_v3")
    # transformers' DeepseekV2 router never renormalises the top-k weights, whatever norm_topk_prob says; follow it.
    norm = bool(g("norm_topk_prob")) if mt == "deepseek_v3" else False
    moe = MoeConfig(hidden=mla.hidden, moe_inter=int(g("moe_intermediate_size")), num_experts=experts,
                    top_k=int(g("num_experts_per_tok")), n_groups=n_group, topk_group=int(d.get("topk_group") or 1),
                    shared=int(g("n_shared_experts")), routed_scaling_factor=float(g("routed_scaling_factor")),
                    scoring=scoring, topk_method="noaux_tc" if mt == "deepseek_v3" else topk_method,
                    norm_topk_prob=norm)
    quant = d.get("quantization_config")
    fp8_block = None
    if quant:
        if quant.get("quant_method") not in ("fp8", None) or quant.get("fmt", "e4m3") != "e4m3":
            raise fail("config.json['quantization_config']", quant, "DeepSeek's block FP8 (quant_method 'fp8', e4m3)")
        fp8_block = tuple(int(v) for v in quant.get("weight_block_size", (128, 128)))
        if fp8_block != (128, 128):
            raise fail("config.json['quantization_config']['weight_block_size']", list(fp8_block), "[128, 128]")
    eos = d.get("eos_token_id")
    return DeepseekConfig(model_type=mt, vocab=int(g("vocab_size")), num_layers=int(g("num_hidden_layers")),
                          intermediate=int(g("intermediate_size")), first_k_dense=int(g("first_k_dense_replace")),
                          mla=mla, moe=moe, eps=mla.eps, tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                          mtp_layers=int(g("num_nextn_predict_layers")),
                          max_position_embeddings=int(_get(d, "max_position_embeddings", 4096)),
                          bos_token_id=d.get("bos_token_id"), eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
                          fp8_block=fp8_block, hf=dict(d))


def load_config(model_dir: str | os.PathLike) -> DeepseekConfig:
    """Read `model_dir/config.json`."""
    path = os.path.join(os.fspath(model_dir), "config.json")
    if not os.path.isfile(path):
        raise fail("model_dir", os.fspath(model_dir), "a directory with a config.json")
    return from_hf_config(read_json(path))
