"""One decode step of a DeepSeek-V3-shaped MoE layer, as abstract shapes: the Hopper cross-lowering test,
the GPU test and the layer benchmark share it.

Serving layout: attention data-parallel (each rank its own sequences and latent cache), routed experts
expert-parallel over `ep` ranks (256 / ep a rank), weights in DeepSeek's native FP8 (e4m3 + 128x128 block
scales) as the released checkpoint stores them; bf16 activations and cache (the MLA kernel's dtype).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from seekax.layers.linear import Fp8Weight, cdiv
from seekax.layers.mla import PagedLatentCache
from seekax.models.deepseek import layer_step
from seekax.models.deepseek_config import DeepseekConfig, from_hf_config

V3_CONFIG = {"model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
             "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1,
             "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
             "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
             "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
             "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True, "scoring_func": "sigmoid",
             "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000,
             "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                              "original_max_position_embeddings": 4096, "type": "yarn"},
             "quantization_config": {"fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}}


def v3_config(**overrides) -> DeepseekConfig:
    return from_hf_config({**V3_CONFIG, **overrides})


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeStepShape:
    """batch: sequences a rank decodes; seq_len: tokens cached per sequence; ep: expert-parallel ranks."""

    batch: int = 16
    seq_len: int = 4096
    ep: int = 8
    page: int = 64

    @property
    def max_pages(self) -> int:
        return cdiv(self.seq_len + 1, self.page)


def _fp8(n: int, k: int, lead=()) -> Fp8Weight:
    return Fp8Weight(weight=jax.ShapeDtypeStruct((*lead, n, k), jnp.float8_e4m3fn),
                     scale_inv=jax.ShapeDtypeStruct((*lead, cdiv(n, 128), cdiv(k, 128)), jnp.float32))


def layer_param_shapes(cfg: DeepseekConfig, local_experts: int) -> dict:
    """A MoE layer's parameters as ShapeDtypeStructs: FP8 linears, bf16 norms, float32 router."""
    c, m, h = cfg.mla, cfg.moe, cfg.hidden
    qk = c.qk_nope + c.qk_rope
    bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    attn = {"wq_a": _fp8(c.q_lora, h), "q_norm": bf(c.q_lora), "wq_b": _fp8(c.heads * qk, c.q_lora),
            "wkv_a": _fp8(c.kv_lora + c.qk_rope, h), "kv_norm": bf(c.kv_lora),
            "wkv_b": _fp8(c.heads * (c.qk_nope + c.v_head), c.kv_lora), "wo": _fp8(h, c.heads * c.v_head)}
    i, si = m.moe_inter, m.moe_inter * m.shared
    moe = {"gate": jax.ShapeDtypeStruct((m.num_experts, h), jnp.float32),
           "gate_bias": jax.ShapeDtypeStruct((m.num_experts,), jnp.float32),
           "w1": _fp8(i, h, (local_experts,)), "w3": _fp8(i, h, (local_experts,)), "w2": _fp8(h, i, (local_experts,)),
           "shared_w1": _fp8(si, h), "shared_w3": _fp8(si, h), "shared_w2": _fp8(h, si)}
    return {"attn_norm": bf(h), "attn": attn, "mlp_norm": bf(h), "moe": moe}


def decode_step_fn(cfg: DeepseekConfig, shape: DecodeStepShape, *, backend: str = "mosaic", transport: str = "auto",
                   mesh=None):
    """(fn, abstract args): fn(params, h [ep*B, 1, H], cache) -> (h, cache, topk_idx) under shard_map over
    `ep` (tokens and caches split by rank, routed experts split, the rest replicated)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = mesh or jax.make_mesh((shape.ep,), ("ep",))
    layer = cfg.first_k_dense                                                         # the first MoE layer
    params = layer_param_shapes(cfg, cfg.moe.num_experts)                            # global: experts split below

    def spec(path, _leaf):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        return P("ep") if names[:2] in (["moe", "w1"], ["moe", "w2"], ["moe", "w3"]) else P()

    p_specs = jax.tree_util.tree_map_with_path(spec, params)
    b, pages = shape.batch, shape.max_pages
    cache = PagedLatentCache(pages=jax.ShapeDtypeStruct((shape.ep * b * pages, shape.page, 1, cfg.mla.latent_dim),
                                                        jnp.bfloat16),
                             block_table=jax.ShapeDtypeStruct((shape.ep * b, pages), jnp.int32),
                             seq_lens=jax.ShapeDtypeStruct((shape.ep * b,), jnp.int32),
                             free=jax.ShapeDtypeStruct((shape.ep * b * pages,), jnp.bool_))
    c_specs = PagedLatentCache(pages=P("ep"), block_table=P("ep"), seq_lens=P("ep"), free=P("ep"))

    def body(p, h, c):
        return layer_step(p, h, c, cfg, layer, mode="decode", ep_axis="ep", transport=transport, backend=backend)

    # check_vma off: the MLA kernel's loop carries are rank-local values that the varying-axes check
    # cannot type inside a Pallas body (a while_loop carry of int32[]{V:ep} in, int32[] out).
    fn = jax.shard_map(body, mesh=mesh, in_specs=(p_specs, P("ep"), c_specs), check_vma=False,
                       out_specs=(P("ep"), c_specs, P("ep")))
    put = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s))  # noqa: E731
    args = (jax.tree.map(put, params, p_specs), put(jax.ShapeDtypeStruct((shape.ep * b, 1, cfg.hidden),
                                                                           jnp.bfloat16), P("ep")),
            jax.tree.map(put, cache, c_specs))
    return fn, args


def step_bytes(cfg: DeepseekConfig, shape: DecodeStepShape) -> dict[str, float]:
    """HBM bytes one rank must read per decode step: its FP8 weights (attention, shared expert, router, and
    the routed experts that receive tokens: all local ones at this batch) and its sequences' cached latents."""
    params = layer_param_shapes(cfg, cfg.moe.num_experts // shape.ep)
    weights = sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(params))
    cache = shape.batch * shape.seq_len * cfg.mla.latent_dim * 2
    return {"weights": float(weights), "cache": float(cache)}
