"""The DeepSeek-V2/V3 model family on seekax's layers: embedding, decoder layers (RMSNorm -> MLA ->
RMSNorm -> dense SwiGLU or MoE), final norm, head, and the multi-token-prediction modules.

Parameters (a plain pytree; `seekax.models.checkpoint` maps it to and from Hugging Face tensor names):
  embed [V, H]; norm [H]; head [V, H] (absent when embeddings are tied)
  layers[i]: attn_norm [H], attn (MLA, matrices [in, out] or Fp8Weight [out, in]), mlp_norm [H], and
             mlp {w1, w3 [I, H], w2 [H, I]} (dense layers) or moe {gate [E, H], gate_bias [E], w1, w3
             [E_local, I_moe, H], w2 [E_local, H, I_moe], shared_w1/w3/w2} (MoE layers); with EPLB
             replicas also log2phy [E, maxcnt], logcnt [E] (float32 holding ints), w* per physical slot
  mtp[k]: enorm, hnorm [H], eh_proj [H, 2H], layer (a decoder layer), norm [H]  (embed and head shared)
Weight matrices may be float or `Fp8Weight` (DeepSeek's native FP8 checkpoints); the same functions run both.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from seekax.ir.validate import fail
from seekax.layers.linear import Fp8Weight, as_float, linear_nt
from seekax.layers.mla import PagedLatentCache, _rms_norm, init_mla_params, mla_attention, mla_forward
from seekax.layers.moe import MoeConfig, init_moe_params, moe_layer, swiglu_mlp
from seekax.models.deepseek_config import DeepseekConfig


# ----------------------------------------------------------------------------------------------- params
def init_params(key: jax.Array, cfg: DeepseekConfig, *, dtype=jnp.float32, std: float = 0.02) -> dict:
    """Random parameters (normal(0, std) matrices as transformers initialises them, norms 1, bias 0)."""
    keys = (jax.random.fold_in(key, i) for i in range(1 << 30))
    h, v = cfg.hidden, cfg.vocab

    def nrm(shape):
        return (jax.random.normal(next(keys), shape, jnp.float32) * std).astype(dtype)

    def layer(i):
        attn = jax.tree.map(lambda a: (a * std * math.sqrt(a.shape[0])).astype(dtype) if a.ndim == 2 else a,
                            init_mla_params(next(keys), cfg.mla, dtype))
        p = {"attn_norm": jnp.ones((h,), dtype), "attn": attn, "mlp_norm": jnp.ones((h,), dtype)}
        if cfg.is_moe(i):
            moe = init_moe_params(next(keys), cfg.moe, dtype=dtype)
            moe = {k: a if k == "gate_bias" else (jax.random.normal(next(keys), a.shape) * std).astype(a.dtype)
                   for k, a in moe.items()}
            p["moe"] = moe
        else:
            i_ = cfg.intermediate
            p["mlp"] = {"w1": nrm((i_, h)), "w3": nrm((i_, h)), "w2": nrm((h, i_))}
        return p

    params = {"embed": nrm((v, h)), "layers": [layer(i) for i in range(cfg.num_layers)],
              "norm": jnp.ones((h,), dtype)}
    if not cfg.tie_embeddings:
        params["head"] = nrm((v, h))
    if cfg.mtp_layers:
        params["mtp"] = [{"enorm": jnp.ones((h,), dtype), "hnorm": jnp.ones((h,), dtype), "eh_proj": nrm((h, 2 * h)),
                          "layer": layer(cfg.num_layers + k), "norm": jnp.ones((h,), dtype)}
                         for k in range(cfg.mtp_layers)]
    return params


def head_weight(params: dict) -> jax.Array:
    """The output projection [V, H]: `head`, or the embedding when tied."""
    return params["head"] if "head" in params else params["embed"]


def moe_config_for(p_moe: dict, cfg: DeepseekConfig) -> MoeConfig:
    """The MoE config for these expert weights: FP8 grouped GEMMs when they are stored in FP8."""
    return dataclasses.replace(cfg.moe, fp8=True) if isinstance(p_moe["w1"], Fp8Weight) else cfg.moe


def has_fp8_weights(params) -> bool:
    """Whether any weight in `params` is an `Fp8Weight` (a native FP8 checkpoint, or one quantised on load)."""
    return any(isinstance(x, Fp8Weight) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Fp8Weight)))


def dequantize_params(params: dict, dtype=jnp.float32) -> dict:
    """Every `Fp8Weight` as a float matrix in the layout float params use (MLA [in, out], the rest [N, K])."""
    def deq(path, leaf):
        if not isinstance(leaf, Fp8Weight):
            return leaf
        in_attn = any(getattr(k, "key", None) == "attn" for k in path)
        return as_float(leaf, dtype) if in_attn else leaf.dequantize(dtype)

    return jax.tree_util.tree_map_with_path(deq, params, is_leaf=lambda x: isinstance(x, Fp8Weight))


def validate_params(params: dict, cfg: DeepseekConfig) -> None:
    """The top-level structure (each layer's own checks run in its layer)."""
    if not isinstance(params, dict):
        raise fail("params", type(params).__name__, "a dict (see seekax.models.deepseek)")
    for name in ("embed", "layers", "norm"):
        if name not in params:
            raise fail(f"params[{name!r}]", "missing", f"present (keys given: {sorted(params)})")
    if tuple(params["embed"].shape) != (cfg.vocab, cfg.hidden):
        raise fail("params['embed'].shape", tuple(params["embed"].shape),
                   f"(vocab, hidden) = {(cfg.vocab, cfg.hidden)}")
    if len(params["layers"]) != cfg.num_layers:
        raise fail("len(params['layers'])", len(params["layers"]), f"num_hidden_layers = {cfg.num_layers}")
    if tuple(head_weight(params).shape) != (cfg.vocab, cfg.hidden):
        raise fail("params['head'].shape", tuple(head_weight(params).shape), f"{(cfg.vocab, cfg.hidden)}")


# ----------------------------------------------------------------------------------------------- training
def moe_inputs(p_moe: dict, cfg: DeepseekConfig):
    """A MoE layer's params as `moe_layer` (or its pieces) takes them: (routed/shared weights, MoeConfig,
    placement (log2phy, logcnt) int32 tables or None). With EPLB replicas the routed weights are per physical
    slot and the tables ride in the params as float32 holding integers, outside the gradient."""
    moe, placement = p_moe, None
    if "log2phy" in moe:
        placement = (jax.lax.stop_gradient(moe["log2phy"]).astype(jnp.int32),
                     jax.lax.stop_gradient(moe["logcnt"]).astype(jnp.int32))
        moe = {k: v for k, v in moe.items() if k not in ("log2phy", "logcnt")}
    return moe, moe_config_for(moe, cfg), placement


def _ffn(p: dict, h: jax.Array, cfg: DeepseekConfig, layer: int, ep_axis, backend: str, transport: str = "auto"):
    """The post-attention half: h [B, S, H] -> (h + ffn(norm(h)), topk_idx [B, S, K] or None)."""
    b, s, d = h.shape
    x = _rms_norm(h, p["mlp_norm"], cfg.eps)
    if not cfg.is_moe(layer):
        return h + swiglu_mlp(x, p["mlp"], backend=backend), None
    moe, mcfg, placement = moe_inputs(p["moe"], cfg)
    y, aux = moe_layer(x.reshape(b * s, d), moe, cfg=mcfg, axis_name=ep_axis, placement=placement,
                       transport=transport, backend=backend)
    return h + y.reshape(b, s, d).astype(h.dtype), aux["topk_idx"].reshape(b, s, -1)


def attention_residual(p: dict, h: jax.Array, cfg: DeepseekConfig, backend: str = "auto") -> jax.Array:
    """The pre-attention half of a layer over whole sequences: h + MLA(RMSNorm(h)), h [B, S, H]."""
    return h + mla_forward(p["attn"], _rms_norm(h, p["attn_norm"], cfg.eps), config=cfg.mla, backend=backend)


def decoder_layer(p: dict, h: jax.Array, cfg: DeepseekConfig, layer: int, *, ep_axis=None, backend: str = "auto"):
    """One decoder layer over whole sequences (no cache): h [B, S, H] -> (h, topk_idx [B, S, K] or None)."""
    return _ffn(p, attention_residual(p, h, cfg, backend), cfg, layer, ep_axis, backend)


def logits_from_hidden(params: dict, h: jax.Array, cfg: DeepseekConfig, norm: jax.Array | None = None):
    """Final RMSNorm and head: h [B, S, H] -> logits [B, S, V] float32."""
    x = _rms_norm(h, params["norm"] if norm is None else norm, cfg.eps)
    return linear_nt(x, head_weight(params)).astype(jnp.float32)


def forward(params: dict, tokens: jax.Array, cfg: DeepseekConfig, *, ep_axis=None, backend: str = "auto",
            with_hidden: bool = False):
    """tokens [B, S] int -> (logits [B, S, V] float32, experts: {layer: topk_idx [B, S, K]} of the MoE
    layers[, final hidden [B, S, H] before the norm, for the MTP modules])."""
    validate_params(params, cfg)
    if getattr(tokens, "ndim", None) != 2:
        raise fail("tokens.shape", getattr(tokens, "shape", None), "[batch, seq]")
    h = jnp.take(params["embed"], tokens, axis=0)                                                       # [B, S, H]
    experts = {}
    for i, p in enumerate(params["layers"]):
        h, idx = decoder_layer(p, h, cfg, i, ep_axis=ep_axis, backend=backend)
        if idx is not None:
            experts[i] = idx
    logits = logits_from_hidden(params, h, cfg)
    return (logits, experts, h) if with_hidden else (logits, experts)


def mtp_forward(params: dict, h: jax.Array, tokens: jax.Array, cfg: DeepseekConfig, *, ep_axis=None,
                backend: str = "auto") -> list[jax.Array]:
    """DeepSeek-V3's multi-token prediction: module k (1-based) combines the previous depth's hidden state at
    position i with the embedding of token i+k and predicts token i+k+1. h [B, S, H] (the main model's final
    hidden state before its norm), tokens [B, S] -> [logits [B, S-k, V] for k = 1..mtp_layers]."""
    out = []
    for k, m in enumerate(params.get("mtp", []), start=1):
        s = tokens.shape[1] - k
        if s <= 0:
            break
        e = _rms_norm(jnp.take(params["embed"], tokens[:, k:], axis=0), m["enorm"], cfg.eps)             # [B, S-k, H]
        hk = _rms_norm(h[:, :s], m["hnorm"], cfg.eps)
        h = linear_nt(jnp.concatenate([e, hk], axis=-1), m["eh_proj"], backend=backend)  # [B, S-k, H]
        h, _ = decoder_layer(m["layer"], h, cfg, cfg.num_layers + k - 1, ep_axis=ep_axis, backend=backend)
        out.append(logits_from_hidden(params, h, cfg, m["norm"]))
    return out


def loss_fn(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy: logits [B, S, V], targets [B, S] int32, mask [B, S] (1 = counted)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if mask is None:
        return nll.mean()
    mask = mask.astype(jnp.float32)
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)


# ----------------------------------------------------------------------------------------------- serving
def init_caches(cfg: DeepseekConfig, *, batch: int, num_pages: int, max_pages: int, page_size: int = 64,
                dtype=jnp.bfloat16) -> list[PagedLatentCache]:
    """One paged latent cache per layer (latent kv_lora + qk_rope: 576 for DeepSeek-V3)."""
    return [PagedLatentCache.create(batch=batch, num_pages=num_pages, max_pages=max_pages,
                                    latent_dim=cfg.mla.latent_dim, page_size=page_size, dtype=dtype)
            for _ in range(cfg.num_layers)]


def serve_step(params: dict, tokens: jax.Array, caches: list, cfg: DeepseekConfig, *, mode: str = "decode",
               num_new: jax.Array | None = None, backend: str = "auto"):
    """The next T tokens [B, T] of every sequence through the paged latent caches. mode "prefill" (dense
    attention over the cache) or "decode" (`mla_decode`: the FlashMLA kernel at DeepSeek's dimensions on
    Hopper). num_new [B]: real tokens per row (batched prefill of different lengths; see `mla_attention`).
    -> (logits [B, T, V] float32, caches, experts {layer: topk_idx [B, T, K]})."""
    validate_params(params, cfg)
    if len(caches) != cfg.num_layers:
        raise fail("len(caches)", len(caches), f"one cache per layer = {cfg.num_layers}")
    h = jnp.take(params["embed"], tokens, axis=0)                                     # [B, T, H]
    new, experts = [], {}
    for i, p in enumerate(params["layers"]):
        h, cache, idx = layer_step(p, h, caches[i], cfg, i, mode=mode, num_new=num_new, backend=backend)
        new.append(cache)
        if idx is not None:
            experts[i] = idx
    return logits_from_hidden(params, h, cfg), new, experts


def layer_step(p: dict, h: jax.Array, cache: PagedLatentCache, cfg: DeepseekConfig, layer: int, *,
               mode: str = "decode", num_new: jax.Array | None = None, ep_axis=None, transport: str = "auto",
               backend: str = "auto"):
    """One decoder layer over the next T tokens h [B, T, H] of every sequence, through its paged latent cache.
    ep_axis: the routed experts' axis when called inside `jax.shard_map` (this rank's tokens and expert
    slice); transport: the dispatch's (see `moe_layer`). -> (h [B, T, H], cache, topk_idx [B, T, K] or None)."""
    a, cache = mla_attention(p["attn"], _rms_norm(h, p["attn_norm"], cfg.eps), cache, config=cfg.mla, mode=mode,
                             num_new=num_new, backend=backend)
    h, idx = _ffn(p, h + a, cfg, layer, ep_axis, backend, transport)
    return h, cache, idx
