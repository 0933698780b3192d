"""A tiny DeepSeek-V3-style language model built from seekax's layers, shaped for pipelining.

Each pipeline stage is one transformer block: RMSNorm -> MLA attention -> RMSNorm -> MoE (DeepSeek-V3
routing, a shared expert, routed experts as grouped GEMMs over the EP axis, EPLB replicas). The first
stage also embeds, the last also applies the FP8 output head (`fp8_linear`): every stage keeps the same
activation shape [B, S, hidden] because `hidden == vocab`, so one `stage_fn` serves every stage of any
schedule. Token ids enter the pipeline as channel 0 of the float activation.

Per-stage constants ride in the stage params under `stop_gradient`: `flags` [2] (is_first, is_last) and
the layer's EPLB tables `log2phy` [E, maxcnt] / `logcnt` [E] (float32 holding integers, so a new placement
changes values, not the compiled program).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seekax.ir.placement import ExpertPlacement
from seekax.ir.validate import check_int, fail
from seekax.ops.fp8 import fp8_linear
from seekax.layers.mla import MlaConfig, _project, _rms_norm, _split_wkv_b, init_mla_params, mla_attention
from seekax.layers.moe import MoeConfig, init_moe_params, moe_layer


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """vocab == hidden (see the module docstring); num_layers blocks = pipeline stages; num_slots physical
    expert slots (EPLB replicas; a multiple of the EP size)."""

    vocab: int = 128
    seq_len: int = 64
    num_layers: int = 4
    num_slots: int = 12
    mla: MlaConfig = MlaConfig(hidden=128, heads=4, kv_lora=32, q_lora=0, qk_nope=16, qk_rope=16, v_head=16)
    moe: MoeConfig = MoeConfig(hidden=128, moe_inter=128, num_experts=8, top_k=2, n_groups=4, topk_group=2,
                               shared=1, routed_scaling_factor=1.0)
    fp8_head: bool = True
    eps: float = 1e-6

    def __post_init__(self):
        check_int("vocab", self.vocab, min_value=2)
        check_int("seq_len", self.seq_len, min_value=1)
        check_int("num_layers", self.num_layers, min_value=1)
        check_int("num_slots", self.num_slots, min_value=self.moe.num_experts)
        if not (self.vocab == self.mla.hidden == self.moe.hidden):
            raise fail("vocab", self.vocab, f"== mla.hidden == moe.hidden (got {self.mla.hidden}, {self.moe.hidden})")

    @property
    def hidden(self) -> int:
        return self.mla.hidden

    @property
    def maxcnt(self) -> int:
        """Widest log2phy row any placement can need: one expert holding every spare slot."""
        return self.num_slots - self.moe.num_experts + 1


def initial_placement(cfg: ModelConfig) -> ExpertPlacement:
    """Slots 0..E-1 hold experts 0..E-1, the spare slots replicate experts 0, 1, ... (round robin)."""
    e, s = cfg.moe.num_experts, cfg.num_slots
    return ExpertPlacement.from_phy2log(np.tile(np.arange(s) % e, (cfg.num_layers, 1)), e)


def placement_arrays(placement: ExpertPlacement, cfg: ModelConfig) -> dict:
    """The stage-stacked placement leaves of the params: log2phy [L, E, maxcnt], logcnt [L, E] (float32)."""
    return {"log2phy": jnp.asarray(placement.padded(cfg.maxcnt).log2phy, jnp.float32),
            "logcnt": jnp.asarray(placement.logcnt, jnp.float32)}


def init_params(key: jax.Array, cfg: ModelConfig, placement: ExpertPlacement | None = None) -> dict:
    """Stage-stacked parameters: every leaf has a leading [num_layers] axis. Routed expert weights are
    per physical slot, replicas initialised equal to their logical expert."""
    placement = placement or initial_placement(cfg)
    keys = jax.random.split(key, cfg.num_layers + 2)
    embed = jax.random.normal(keys[-2], (cfg.vocab, cfg.hidden), jnp.float32)
    head = jax.random.normal(keys[-1], (cfg.vocab, cfg.hidden), jnp.float32) / np.sqrt(cfg.hidden)
    stages = []
    for layer in range(cfg.num_layers):
        ka, km = jax.random.split(keys[layer])
        moe = init_moe_params(km, cfg.moe, dtype=jnp.float32)                   # logical experts [E, ...]
        for name in ("w1", "w2", "w3"):
            moe[name] = moe[name][jnp.asarray(placement.phy2log[layer])]       # physical slots [S, ...]
        flags = jnp.asarray([layer == 0, layer == cfg.num_layers - 1], jnp.float32)
        stages.append({
            "embed": embed, "head": head, "flags": flags,
            "attn_norm": jnp.ones((cfg.hidden,)), "attn": init_mla_params(ka, cfg.mla),
            "moe_norm": jnp.ones((cfg.hidden,)), "moe": moe, "head_norm": jnp.ones((cfg.hidden,)),
        })
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *stages)
    params.update(placement_arrays(placement, cfg))
    return params


def param_specs(params: dict, ep_axis: str | None):
    """PartitionSpecs of the per-stage dims: routed expert slots split over `ep_axis`, all else replicated."""
    from jax.sharding import PartitionSpec as P

    def spec(path, leaf):
        names = [getattr(k, "key", None) for k in path]
        if ep_axis and names[:1] == ["moe"] and names[-1] in ("w1", "w2", "w3"):
            return P(ep_axis, *([None] * (leaf.ndim - 2)))
        return P(*([None] * (leaf.ndim - 1)))

    return jax.tree_util.tree_map_with_path(spec, params)


def causal_attention(p: dict, x: jax.Array, c: MlaConfig) -> jax.Array:
    """MLA over a whole sequence without a cache (training): x [B, S, hidden] -> [B, S, hidden].
    The unabsorbed form, the same math `mla_attention(mode="prefill")` runs over a paged cache."""
    b, s, _ = x.shape
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    q_nope, q_pe, lat = _project(p, x, pos, c)                                   # [B,S,H,n], [B,S,H,r], [B,S,L]
    w_uk, w_uv = _split_wkv_b(p, c)
    k_nope = jnp.einsum("bsc,chn->bshn", lat[..., :c.kv_lora], w_uk)             # [B, S, H, nope]
    v = jnp.einsum("bsc,chv->bshv", lat[..., :c.kv_lora], w_uv)                  # [B, S, H, v]
    logits = (jnp.einsum("bthn,bshn->bhts", q_nope, k_nope)
              + jnp.einsum("bthr,bsr->bhts", q_pe, lat[..., c.kv_lora:])) * c.softmax_scale
    mask = jnp.tril(jnp.ones((s, s), bool))
    probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)           # [B, H, S, S]
    o = jnp.einsum("bhts,bshv->bthv", probs, v)                                  # [B, S, H, v]
    return o.reshape(b, s, c.heads * c.v_head) @ p["wo"]


def _moe(p: dict, h: jax.Array, cfg: ModelConfig, ep_axis: str | None, moe_cfg: MoeConfig | None = None):
    b, s, d = h.shape
    placement = (jax.lax.stop_gradient(p["log2phy"]).astype(jnp.int32),
                 jax.lax.stop_gradient(p["logcnt"]).astype(jnp.int32))
    y, aux = moe_layer(_rms_norm(h, p["moe_norm"], cfg.eps).reshape(b * s, d), p["moe"], cfg=moe_cfg or cfg.moe,
                       axis_name=ep_axis, placement=placement)
    return y.reshape(b, s, d).astype(h.dtype), aux


def _head(p: dict, h: jax.Array, cfg: ModelConfig) -> jax.Array:
    x = _rms_norm(h, p["head_norm"], cfg.eps)
    if cfg.fp8_head:
        return fp8_linear(x, p["head"]).astype(jnp.float32)                    # [B, S, V], FP8 GEMMs fwd+bwd
    return x @ p["head"].T


def make_stage_fn(cfg: ModelConfig, ep_axis: str | None = None, *, with_aux: bool = False):
    """stage_fn(stage_params, x [B, S, hidden] f32) -> [B, S, hidden] (logits on the last stage)."""

    def stage_fn(p, x):
        flags = jax.lax.stop_gradient(p["flags"])
        ids = jnp.clip(x[..., 0].astype(jnp.int32), 0, cfg.vocab - 1)
        h = jnp.where(flags[0] > 0.5, p["embed"][ids], x)
        h = h + causal_attention(p["attn"], _rms_norm(h, p["attn_norm"], cfg.eps), cfg.mla)
        y, aux = _moe(p, h, cfg, ep_axis)
        h = h + y
        out = jnp.where(flags[1] > 0.5, _head(p, h, cfg), h)
        return (out, aux["tokens_per_expert"]) if with_aux else out

    return stage_fn


def loss_fn(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy: logits [B, S, V], targets [B, S] int32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()


def tokens_to_stage_input(tokens: jax.Array, hidden: int) -> jax.Array:
    """tokens [..., S] int -> [..., S, hidden] float32 with the ids in channel 0 (the pipeline's input)."""
    t = tokens.astype(jnp.float32)[..., None]
    return jnp.pad(t, [(0, 0)] * tokens.ndim + [(0, hidden - 1)])  # keeps the tokens' sharding


def forward(params: dict, tokens: jax.Array, cfg: ModelConfig, *, ep_axis: str | None = None):
    """The unpipelined model: tokens [B, S] -> (logits [B, S, V], tokens per logical expert [L, E])."""
    stage_fn = make_stage_fn(cfg, ep_axis, with_aux=True)
    x = tokens_to_stage_input(tokens, cfg.hidden)
    loads = []
    for layer in range(cfg.num_layers):
        x, load = stage_fn(jax.tree.map(lambda a: a[layer], params), x)
        loads.append(load)
    return x, jnp.stack(loads)


def unstack(params: dict, layer: int) -> dict:
    return jax.tree.map(lambda a: a[layer], params)


def decode_step(params: dict, tokens: jax.Array, caches: list, cfg: ModelConfig, *, mode: str = "decode",
                moe_cfg: MoeConfig | None = None, backend: str = "auto"):
    """Serve: the next T tokens [B, T] of every sequence through the paged latent caches (one per layer).
    mode "prefill" (dense attention over the cache, XLA) or "decode" (`mla_decode`). -> (logits [B, T, V],
    caches). moe_cfg may differ from training's (e.g. fp8=True: FP8 grouped-GEMM experts)."""
    h = params["embed"][0][tokens]                                               # [B, T, hidden]
    new = []
    for layer in range(cfg.num_layers):
        p = unstack(params, layer)
        a, cache = mla_attention(p["attn"], _rms_norm(h, p["attn_norm"], cfg.eps), caches[layer], config=cfg.mla,
                                 mode=mode, backend=backend)
        new.append(cache)
        h = h + a
        y, _ = _moe(p, h, cfg, None, moe_cfg)
        h = h + y
    return _head(unstack(params, cfg.num_layers - 1), h, cfg), new


def param_count(params: Any) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))
