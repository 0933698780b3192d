"""Where each DeepSeek parameter lives in a Hugging Face checkpoint: the tensor names of the released
checkpoints (per-expert `mlp.experts.{e}.gate_proj.weight`, MTP modules as `model.layers.{L + k}.*`),
the seekax pytree path each one fills, and how (as is, transposed, or one slice of an expert stack).
"""

from __future__ import annotations

import dataclasses

from seekax.models.deepseek_config import DeepseekConfig

# MLA matrices are [in, out] in seekax (float) and [out, in] in checkpoints; FP8 ones stay [out, in].
_ATTN = {"q_proj": "wq", "q_a_proj": "wq_a", "q_b_proj": "wq_b", "kv_a_proj_with_mqa": "wkv_a", "kv_b_proj": "wkv_b",
         "o_proj": "wo"}
_ATTN_NORMS = {"q_a_layernorm": "q_norm", "kv_a_layernorm": "kv_norm"}
_MLP = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: name, the pytree path it fills, its shape in the checkpoint, how it maps
    ("plain": as is; "transpose": an MLA matrix; "expert": row `expert` of a stacked [E, ...] leaf) and
    whether it may be stored in FP8 (linear weights only; norms, embeddings, head and router never)."""

    name: str
    path: tuple
    shape: tuple[int, ...]
    kind: str = "plain"
    expert: int = -1
    num_experts: int = 0
    fp8_ok: bool = False


def _layer_specs(prefix: str, path: tuple, cfg: DeepseekConfig, layer: int, experts: range) -> list[TensorSpec]:
    c, h = cfg.mla, cfg.hidden
    qk = c.qk_nope + c.qk_rope
    attn_shapes = {"q_proj": (c.heads * qk, h), "q_a_proj": (c.q_lora, h), "q_b_proj": (c.heads * qk, c.q_lora),
                   "kv_a_proj_with_mqa": (c.kv_lora + c.qk_rope, h),
                   "kv_b_proj": (c.heads * (c.qk_nope + c.v_head), c.kv_lora), "o_proj": (h, c.heads * c.v_head)}
    wanted = ["q_a_proj", "q_b_proj"] if c.q_lora else ["q_proj"]
    wanted += ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    out = [TensorSpec(f"{prefix}.input_layernorm.weight", path + ("attn_norm",), (h,)),
           TensorSpec(f"{prefix}.post_attention_layernorm.weight", path + ("mlp_norm",), (h,))]
    out += [TensorSpec(f"{prefix}.self_attn.{n}.weight", path + ("attn", _ATTN[n]), attn_shapes[n], "transpose",
                       fp8_ok=True) for n in wanted]
    norms = {"q_a_layernorm": (c.q_lora,), "kv_a_layernorm": (c.kv_lora,)}
    out += [TensorSpec(f"{prefix}.self_attn.{n}.weight", path + ("attn", _ATTN_NORMS[n]), norms[n])
            for n in (["q_a_layernorm"] if c.q_lora else []) + ["kv_a_layernorm"]]
    if not cfg.is_moe(layer):
        i = cfg.intermediate
        shapes = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
        out += [TensorSpec(f"{prefix}.mlp.{n}.weight", path + ("mlp", _MLP[n]), shapes[n], fp8_ok=True) for n in _MLP]
        return out
    m = cfg.moe
    i = m.moe_inter
    shapes = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    out.append(TensorSpec(f"{prefix}.mlp.gate.weight", path + ("moe", "gate"), (m.num_experts, h)))
    if cfg.model_type == "deepseek_v3":
        out.append(TensorSpec(f"{prefix}.mlp.gate.e_score_correction_bias", path + ("moe", "gate_bias"),
                              (m.num_experts,)))
    for local, e in enumerate(experts):
        out += [TensorSpec(f"{prefix}.mlp.experts.{e}.{n}.weight", path + ("moe", _MLP[n]), shapes[n], "expert",
                           expert=local, num_experts=len(experts), fp8_ok=True) for n in _MLP]
    if m.shared:
        si = m.shared * i
        sh = {"gate_proj": (si, h), "up_proj": (si, h), "down_proj": (h, si)}
        out += [TensorSpec(f"{prefix}.mlp.shared_experts.{n}.weight", path + ("moe", "shared_" + _MLP[n]), sh[n],
                           fp8_ok=True) for n in _MLP]
    return out


def tensor_specs(cfg: DeepseekConfig, *, ep_rank: int = 0, ep_size: int = 1, mtp: bool = True,
                 ep_ranks: int = 1) -> list[TensorSpec]:
    """Every tensor the model reads, in checkpoint order. Routed experts: the contiguous slice of EP ranks
    [ep_rank, ep_rank + ep_ranks) out of ep_size."""
    e = cfg.moe.num_experts
    if e % ep_size:
        raise ValueError(f"ep_size={ep_size}: expected a divisor of n_routed_experts={e}")
    if not (0 <= ep_rank and ep_rank + ep_ranks <= ep_size):
        raise ValueError(f"ep_rank={ep_rank}: expected ranks [ep_rank, ep_rank + {ep_ranks}) within ep_size={ep_size}")
    per = e // ep_size
    experts = range(ep_rank * per, (ep_rank + ep_ranks) * per)
    h, v = cfg.hidden, cfg.vocab
    specs = [TensorSpec("model.embed_tokens.weight", ("embed",), (v, h))]
    for i in range(cfg.num_layers):
        specs += _layer_specs(f"model.layers.{i}", ("layers", i), cfg, i, experts)
    specs.append(TensorSpec("model.norm.weight", ("norm",), (h,)))
    if not cfg.tie_embeddings:
        specs.append(TensorSpec("lm_head.weight", ("head",), (v, h)))
    if mtp:
        for k in range(cfg.mtp_layers):
            i = cfg.num_layers + k
            pre, path = f"model.layers.{i}", ("mtp", k)
            specs += [TensorSpec(f"{pre}.enorm.weight", path + ("enorm",), (h,)),
                      TensorSpec(f"{pre}.hnorm.weight", path + ("hnorm",), (h,)),
                      TensorSpec(f"{pre}.eh_proj.weight", path + ("eh_proj",), (h, 2 * h), fp8_ok=True),
                      TensorSpec(f"{pre}.shared_head.norm.weight", path + ("norm",), (h,))]
            specs += _layer_specs(pre, path + ("layer",), cfg, i, experts)
    return specs


def mtp_shared_copies(cfg: DeepseekConfig) -> dict[str, tuple]:
    """The MTP modules' copies of the embedding and head in released checkpoints: name -> the shared path."""
    out = {}
    for k in range(cfg.mtp_layers):
        pre = f"model.layers.{cfg.num_layers + k}"
        out[f"{pre}.embed_tokens.weight"] = ("embed",)
        out[f"{pre}.shared_head.head.weight"] = ("embed",) if cfg.tie_embeddings else ("head",)
    return out
