"""DeepSeek-V2/V3 MoE layer: routing (V3's sigmoid + correction bias with group-limited top-k, or V2's
softmax, greedy or group-limited), shared experts, routed SwiGLU experts through grouped GEMMs (bf16 or
FP8; FP8 weights may come pre-quantised as `Fp8Weight`s), expert-parallel dispatch/combine, per-expert
loads for EPLB.

Call `moe_layer` inside `jax.shard_map` over the EP axis (x: this rank's tokens; routed expert weights:
this rank's slice, [slots / ep_size, ...]) or with axis_name=None on one device. `moe_reference` is the
dense single-device oracle (every expert on every token, float32).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from seekax.ir.validate import check_choice, check_int, fail
from seekax.layers.linear import Fp8Train, Fp8Weight, linear_nt, padded_k
from seekax.ops import ep as ep
from seekax.lowering import dispatch_permute as perm
from seekax.lowering.dispatch_route import axis_index, axis_size


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoeConfig:
    """hidden H, moe_inter I (per expert), num_experts E routed, top_k K; routing groups: n_groups groups of
    E / n_groups experts, keep the topk_group best; shared: number of shared experts (one fused MLP of width
    shared * I); routed_scaling_factor multiplies the (normalised, if norm_topk_prob) weights; fp8: FP8
    payload + FP8 GEMMs. scoring: "sigmoid" (V3) or "softmax" (V2). topk_method: "noaux_tc" (V3: groups
    ranked by the sum of their two best biased scores), "group_limited_greedy" (V2: by their best score),
    "greedy" (no groups)."""

    hidden: int
    moe_inter: int
    num_experts: int
    top_k: int
    n_groups: int = 1
    topk_group: int = 1
    shared: int = 1
    routed_scaling_factor: float = 1.0
    fp8: bool = False
    scoring: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True

    def __post_init__(self):
        check_choice("scoring", self.scoring, ("sigmoid", "softmax"))
        check_choice("topk_method", self.topk_method, ("noaux_tc", "greedy", "group_limited_greedy"))
        for name in ("hidden", "moe_inter", "num_experts", "top_k", "n_groups", "topk_group"):
            check_int(name, getattr(self, name), min_value=1)
        check_int("shared", self.shared, min_value=0)
        if self.num_experts % self.n_groups:
            raise fail("num_experts", self.num_experts, f"a multiple of n_groups={self.n_groups}")
        if self.topk_group > self.n_groups:
            raise fail("topk_group", self.topk_group, f"<= n_groups={self.n_groups}")
        if self.top_k > self.topk_group * (self.num_experts // self.n_groups):
            raise fail("top_k", self.top_k, f"<= topk_group * experts per group = "
                       f"{self.topk_group * (self.num_experts // self.n_groups)}")
        if self.fp8 and not self.fp8_tileable:
            name = next(n for n in ("hidden", "moe_inter") if getattr(self, n) % 128)
            raise fail(name, getattr(self, name), "a multiple of 128 when fp8=True (the FP8 expert GEMMs' blocks)")

    @property
    def fp8_tileable(self) -> bool:
        """Whether the FP8 expert GEMMs can run these experts (fp8=True is accepted): hidden and moe_inter are
        multiples of their 128-wide blocks (DeepSeek-V3's 7168 and 2048 are; tiny test configs often are not)."""
        return self.hidden % 128 == 0 and self.moe_inter % 128 == 0


def init_moe_params(key: jax.Array, cfg: MoeConfig, *, dtype=jnp.bfloat16, num_slots: int | None = None) -> dict:
    """Global parameters. Routed weights are NT ([N, K]) per expert slot: w1/w3 [S, I, H], w2 [S, H, I]
    (S = num_slots, default E; with an EPLB placement S = physical replicas, weights = logical[phy2log]).
    gate [E, H] and gate_bias [E] (the aux-loss-free balancing bias) are float32."""
    e, h, i = cfg.num_experts, cfg.hidden, cfg.moe_inter
    s = e if num_slots is None else num_slots
    ks = jax.random.split(key, 7)

    def nrm(k, shape, fan_in):
        return (jax.random.normal(k, shape, jnp.float32) / jnp.sqrt(fan_in)).astype(dtype)

    params = {
        "gate": jax.random.normal(ks[0], (e, h), jnp.float32) / jnp.sqrt(h),
        "gate_bias": jnp.zeros((e,), jnp.float32),
        "w1": nrm(ks[1], (s, i, h), h), "w3": nrm(ks[2], (s, i, h), h), "w2": nrm(ks[3], (s, h, i), i),
    }
    if cfg.shared:
        si = cfg.shared * i
        params.update(shared_w1=nrm(ks[4], (si, h), h), shared_w3=nrm(ks[5], (si, h), h),
                      shared_w2=nrm(ks[6], (h, si), si))
    return params


def route(x: jax.Array, gate: jax.Array, gate_bias: jax.Array, cfg: MoeConfig):
    """DeepSeek's gate. x: [T, H] -> (topk_idx [T, K] int32 logical ids, topk_weights [T, K] float32).

    scores = sigmoid or softmax of x @ gate^T (float32); selection uses scores + bias (V3's correction bias
    steers load only; zeros for V2); with groups, the topk_group best groups are kept (ranked by the sum of
    their top-2 biased scores, or V2's best score); weights = unbiased scores of the chosen experts,
    normalised to sum 1 if norm_topk_prob, times routed_scaling_factor."""
    t = x.shape[0]
    logits = jnp.einsum("th,eh->te", x.astype(jnp.float32), gate.astype(jnp.float32))                 # [T, E]
    scores = jax.nn.sigmoid(logits) if cfg.scoring == "sigmoid" else jax.nn.softmax(logits, axis=-1)  # [T, E]
    biased = scores + gate_bias.astype(jnp.float32)[None]                                              # [T, E]
    if cfg.n_groups > 1 and cfg.topk_method != "greedy":
        grouped = biased.reshape(t, cfg.n_groups, -1)                                                  # [T, G, E/G]
        if cfg.topk_method == "noaux_tc":
            group_score = jax.lax.top_k(grouped, min(2, grouped.shape[-1]))[0].sum(-1)                # [T, G]
        else:
            group_score = grouped.max(-1)                                                              # [T, G]
        keep_groups = jax.lax.top_k(group_score, cfg.topk_group)[1]                                    # [T, topk_group]
        keep = (keep_groups[:, :, None] == jnp.arange(cfg.n_groups)).any(1)                            # [T, G]
        biased = jnp.where(jnp.repeat(keep, cfg.num_experts // cfg.n_groups, axis=1), biased, -jnp.inf)
    idx = jax.lax.top_k(biased, cfg.top_k)[1].astype(jnp.int32)                                        # [T, K]
    w = jnp.take_along_axis(scores, idx, axis=1)                                                       # [T, K]
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return idx, w * cfg.routed_scaling_factor


def _swiglu_dense(x, w1, w3, w2, backend: str = "auto"):
    """x: [T, H], w1/w3: [I, H], w2: [H, I] (float or Fp8Weight) -> [T, H] (float32 math, output in x.dtype).
    The dense MLP of DeepSeek's first layers and the shared experts."""
    if any(isinstance(w, (Fp8Weight, Fp8Train)) for w in (w1, w3, w2)):
        g, u = linear_nt(x, w1, backend=backend), linear_nt(x, w3, backend=backend)
        a = (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(x.dtype)
        return linear_nt(a, w2, backend=backend)
    g = jnp.einsum("th,ih->ti", x, w1, preferred_element_type=jnp.float32)
    u = jnp.einsum("th,ih->ti", x, w3, preferred_element_type=jnp.float32)
    a = (jax.nn.silu(g) * u).astype(x.dtype)
    return jnp.einsum("ti,hi->th", a, w2, preferred_element_type=jnp.float32).astype(x.dtype)


def swiglu_mlp(x: jax.Array, params: dict, *, backend: str = "auto") -> jax.Array:
    """DeepSeek's dense MLP: x [..., H], params w1/w3 [I, H], w2 [H, I] (NT, float or Fp8Weight) -> [..., H]."""
    for name in ("w1", "w3", "w2"):
        if name not in params:
            raise fail(f"params[{name!r}]", "missing", f"the dense MLP's weights w1, w3 [I, H], w2 [H, I] "
                       f"(keys given: {sorted(params)})")
    h = x.shape[-1]
    want = {"w1": (params["w1"].shape[0], h), "w3": (params["w1"].shape[0], h), "w2": (h, params["w1"].shape[0])}
    for name, shape in want.items():
        if tuple(params[name].shape) != shape:
            raise fail(f"params[{name!r}].shape", tuple(params[name].shape), f"{shape} for hidden {h}")
    y = _swiglu_dense(x.reshape(-1, h), params["w1"], params["w3"], params["w2"], backend)
    return y.reshape(x.shape)


def _expert_b(w):
    """Routed expert weights as the grouped GEMM's B operand: pre-quantised, or quantised now."""
    from seekax.ops.fp8 import WEIGHT_BLOCK, quantize_fp8

    if isinstance(w, Fp8Weight):
        return padded_k(w), w.scale_inv
    return quantize_fp8(w, WEIGHT_BLOCK)


def _gemm_out(out_dtype):
    """The down projection's output dtype: the activations' for bf16/f16 (DeepGEMM's; half the epilogue's
    shared memory and the combine's bytes), float32 otherwise."""
    return out_dtype if jnp.dtype(out_dtype).name in ("bfloat16", "float16") else jnp.float32


def _fp8_gemm_contiguous(a, a_scale, w, sizes, backend, out_dtype=jnp.float32):
    from seekax.ops.fp8 import m_grouped_fp8_gemm_nt_contiguous

    wq, ws = _expert_b(w)
    return m_grouped_fp8_gemm_nt_contiguous(a, a_scale, wq, ws, sizes, out_dtype=out_dtype, backend=backend)


def _fp8_gemm_masked(a, a_scale, w, masked_m, backend, out_dtype=jnp.float32):
    from seekax.ops.fp8 import m_grouped_fp8_gemm_nt_masked

    wq, ws = _expert_b(w)
    return m_grouped_fp8_gemm_nt_masked(a, a_scale, wq, ws, masked_m, out_dtype=out_dtype, backend=backend)


def _quant(a):
    from seekax.ops.fp8 import quantize_fp8

    return quantize_fp8(a)


def _experts_fp8_train(rows, scale, sizes, w1, w3, w2, out_dtype, backend):
    """Routed experts trained through FP8 GEMMs (`Fp8Train` weights, `grouped_fp8_linear`): forward, dgrad and
    wgrad in FP8, the weights and their gradients float. rows: [M, H] sorted by expert (sizes [G])."""
    from seekax.ops.fp8 import dequantize_fp8, grouped_fp8_linear

    if scale is not None:                                                                    # an FP8 payload
        rows = dequantize_fp8(rows, scale, dtype=out_dtype)
    rows = rows.astype(out_dtype)
    lin = lambda a, w: grouped_fp8_linear(a, w.w.astype(a.dtype), sizes, backend=backend)  # noqa: E731
    a = (jax.nn.silu(lin(rows, w1).astype(jnp.float32)) * lin(rows, w3).astype(jnp.float32)).astype(out_dtype)
    return lin(a, w2)                                                                        # [M, H]


def _experts_contiguous(rows, scale, sizes, params, cfg, out_dtype, backend):
    """rows: [M, H] sorted by local expert (group sizes [G]) -> [M, H] SwiGLU expert outputs."""
    w1, w3, w2 = params["w1"], params["w3"], params["w2"]
    if isinstance(w1, Fp8Train):
        return _experts_fp8_train(rows, scale, sizes, w1, w3, w2, out_dtype, backend)
    if cfg.fp8:
        g = _fp8_gemm_contiguous(rows, scale, w1, sizes, backend)                           # [M, I]
        u = _fp8_gemm_contiguous(rows, scale, w3, sizes, backend)
        aq, a_s = _quant(jax.nn.silu(g) * u)
        return _fp8_gemm_contiguous(aq, a_s, w2, sizes, backend, _gemm_out(out_dtype)).astype(out_dtype)
    dot = lambda a, w: jax.lax.ragged_dot(a, jnp.swapaxes(w, 1, 2), sizes,  # noqa: E731
                                          preferred_element_type=jnp.float32)
    a = (jax.nn.silu(dot(rows, w1)) * dot(rows, w3)).astype(out_dtype)                      # [M, I]
    return dot(a, w2).astype(out_dtype)                                                      # [M, H]


def _experts_masked(x, scale, counts, params, cfg, out_dtype, backend):
    """x: [G, M, H] fixed per-expert buffers, counts [G] -> [G, M, H] (rows past counts are zero)."""
    w1, w3, w2 = params["w1"], params["w3"], params["w2"]
    if isinstance(w1, Fp8Train):  # one contiguous run per expert buffer; rows past counts zeroed in and out
        g_, m, h = x.shape
        valid = (jnp.arange(m)[None, :] < counts[:, None])[..., None]                      # [G, M, 1]
        if scale is not None:                                                                # an FP8 payload
            from seekax.ops.fp8 import dequantize_fp8

            x = dequantize_fp8(x, scale, dtype=out_dtype)
        rows = jnp.where(valid, x.astype(out_dtype), 0).reshape(g_ * m, h)
        out = _experts_fp8_train(rows, None, jnp.full((g_,), m, jnp.int32), w1, w3, w2, out_dtype, backend)
        return jnp.where(valid, out.reshape(g_, m, -1), 0).astype(out_dtype)
    if cfg.fp8:
        g = _fp8_gemm_masked(x, scale, w1, counts, backend)
        u = _fp8_gemm_masked(x, scale, w3, counts, backend)
        aq, a_s = _quant(jax.nn.silu(g) * u)
        return _fp8_gemm_masked(aq, a_s, w2, counts, backend, _gemm_out(out_dtype)).astype(out_dtype)
    dot = lambda a, w: jnp.einsum("gmk,gnk->gmn", a, w, preferred_element_type=jnp.float32)  # noqa: E731
    a = (jax.nn.silu(dot(x, w1)) * dot(x, w3)).astype(out_dtype)
    return dot(a, w2).astype(out_dtype)


def validate_moe_layer(x, params: dict, cfg: MoeConfig, ep_size: int, placement) -> int:
    """Shapes of x and every parameter against cfg; returns the global number of routed expert slots."""
    if not isinstance(cfg, MoeConfig):
        raise fail("cfg", type(cfg).__name__, "a MoeConfig")
    h, i, e = cfg.hidden, cfg.moe_inter, cfg.num_experts
    if getattr(x, "ndim", None) != 2 or x.shape[1] != h:
        raise fail("x.shape", getattr(x, "shape", None), f"[tokens, hidden={h}]")
    if "w1" not in params or getattr(params["w1"], "ndim", None) != 3:
        raise fail("params['w1']", type(params.get("w1")).__name__, "routed weights [slots / ep_size, I, H]")
    local = params["w1"].shape[0]
    slots = local * ep_size
    if placement is None and slots != e:
        raise fail("params['w1'].shape[0]", local, f"num_experts / ep_size = {e} / {ep_size} routed experts a rank")
    want = {"gate": (e, h), "gate_bias": (e,), "w1": (local, i, h), "w3": (local, i, h), "w2": (local, h, i)}
    if cfg.shared:
        want.update(shared_w1=(cfg.shared * i, h), shared_w3=(cfg.shared * i, h), shared_w2=(h, cfg.shared * i))
    for name, shape in want.items():
        if name not in params:
            raise fail("params", sorted(params), f"a dict with {name!r}")
        if tuple(params[name].shape) != shape:
            raise fail(f"params[{name!r}].shape", tuple(params[name].shape), str(shape))
        if isinstance(params[name], Fp8Weight) and not cfg.fp8:
            raise fail(f"params[{name!r}]", "Fp8Weight", "float weights, or cfg.fp8=True (FP8 expert GEMMs)")
    if placement is not None:
        log2phy, logcnt = placement
        if tuple(logcnt.shape) != (e,) or log2phy.ndim != 2 or log2phy.shape[0] != e:
            raise fail("placement", (tuple(log2phy.shape), tuple(logcnt.shape)),
                       f"(log2phy [{e}, maxcnt], logcnt [{e}]) for this layer")
    return slots


class Routed(NamedTuple):
    """`moe_route`'s result for this rank's tokens: logical top-k ids and weights [T, K], the physical slots
    the rows go to [T, K] (the replicas' with an EPLB placement, else the logical ids), and this rank's
    logical load [E] int32 (`moe_layer` sums it over the EP axis)."""

    topk_idx: jax.Array
    topk_weights: jax.Array
    phys: jax.Array
    load: jax.Array


def moe_route(x: jax.Array, params: dict, *, cfg: MoeConfig, axis_name=None, placement=None) -> Routed:
    """The gate, and with a placement each chosen expert's replica: the first piece of `moe_layer` (its
    arguments' shapes are checked here)."""
    validate_moe_layer(x, params, cfg, axis_size(axis_name), placement)
    topk_idx, topk_w = route(x, params["gate"], params["gate_bias"], cfg)                    # [T, K] each
    load = (topk_idx[:, :, None] == jnp.arange(cfg.num_experts)).sum((0, 1), dtype=jnp.int32)   # [E]
    phys = topk_idx
    if placement is not None:
        from seekax.ops.replica_routing import route_to_replicas

        phys = route_to_replicas(topk_idx, placement[0], placement[1], token_offset=axis_index(axis_name) * x.shape[0])
    return Routed(topk_idx, topk_w, phys, load)


def moe_dispatch(x: jax.Array, routed: Routed, params: dict, *, cfg: MoeConfig, axis_name=None,
                 transport: str = "auto", capacity: int | None = None, drop: bool = False) -> ep.Dispatched:
    """The rows to the ranks holding their experts' slots (`ep_dispatch`): moe_layer's communication out."""
    slots = params["w1"].shape[0] * axis_size(axis_name)
    return ep.ep_dispatch(x, routed.phys, routed.topk_weights, transport=transport,
                          num_experts=slots, axis_name=axis_name, fp8=cfg.fp8, capacity=capacity, drop=drop,
                          check_ids=False)


def moe_experts(d: ep.Dispatched, params: dict, *, cfg: MoeConfig, dtype, backend: str = "auto") -> jax.Array:
    """This rank's routed experts on the rows it received: [R, H] weighted rows in receive order for the normal
    transports, [E_local, R, H] per-expert buffers for low latency (weighted in the combine)."""
    if d.x.ndim == 3:
        return _experts_masked(d.x, d.x_scale, d.num_recv, params, cfg, dtype, backend)       # [G, P*M, H]
    pm = perm.make_permutation(d.topk_idx, params["w1"].shape[0])
    rows = perm.permute(d.x, pm, backend=backend)                                             # [M, H]
    scale = None if d.x_scale is None else perm.permute(d.x_scale, pm)                       # tiny rows: XLA
    out = _experts_contiguous(rows, scale, pm.group_sizes, params, cfg, dtype, backend)      # [M, H]
    return perm.unpermute(out, pm, d.topk_weights)                                           # [R, H]


def moe_combine(out: jax.Array, handle: ep.DispatchHandle) -> jax.Array:
    """The experts' rows back to their tokens, summed per token (`ep_combine`): moe_layer's communication back."""
    return ep.ep_combine(out, handle, weighted=out.ndim == 3)


def moe_shared(x: jax.Array, params: dict, *, cfg: MoeConfig, backend: str = "auto") -> jax.Array | None:
    """The shared experts on this rank's tokens [T, H] (float32), or None without them."""
    if not cfg.shared:
        return None
    return _swiglu_dense(x, params["shared_w1"], params["shared_w3"], params["shared_w2"], backend).astype(jnp.float32)


def moe_layer(x: jax.Array, params: dict, *, cfg: MoeConfig, axis_name=None, placement=None,
              transport: str = "auto", capacity: int | None = None, drop: bool = False,
              backend: str = "auto") -> tuple[jax.Array, dict[str, Any]]:
    """y = shared(x) + sum_k w_k expert_k(x) for this rank's tokens x [T, H] -> (y [T, H], aux).

    placement: optional (log2phy [E, maxcnt], logcnt [E]) of this layer: routed experts become physical
    replicas (token t of rank r goes to replica (r*T + t) % logcnt[e]) and params' routed weights are
    indexed by physical slot. transport: "auto" | "ragged" | "padded" (grouped contiguous GEMM) |
    "low_latency" (fixed buffers, masked GEMM, weighted combine). backend: the FP8 GEMMs' and the permute's.
    aux: tokens_per_expert [E] int32 (logical, summed over the EP axis: EPLB's load), num_dropped [] (summed),
    topk_idx [T, K], topk_weights [T, K]. Differentiable on the bf16/f32 path (fp8=False).

    The same computation in pieces, for pipelines that overlap one micro-batch's communication with another's
    computation: `moe_route` -> `moe_dispatch` (communication) -> `moe_experts` and `moe_shared` ->
    `moe_combine` (communication).
    """
    r = moe_route(x, params, cfg=cfg, axis_name=axis_name, placement=placement)
    d = moe_dispatch(x, r, params, cfg=cfg, axis_name=axis_name, transport=transport, capacity=capacity, drop=drop)
    y = moe_combine(moe_experts(d, params, cfg=cfg, dtype=x.dtype, backend=backend), d.handle)
    shared = moe_shared(x, params, cfg=cfg, backend=backend)
    if shared is not None:
        y = (y.astype(jnp.float32) + shared).astype(x.dtype)
    load, dropped = r.load, d.num_dropped
    if axis_name is not None:
        load, dropped = jax.lax.psum(load, axis_name), jax.lax.psum(dropped, axis_name)
    return y, {"tokens_per_expert": load, "num_dropped": dropped, "topk_idx": r.topk_idx,
               "topk_weights": r.topk_weights}


def moe_reference(x: jax.Array, params: dict, *, cfg: MoeConfig) -> jax.Array:
    """Dense single-device MoE in float32: every expert on every token, weighted by the routing.
    x: [N, H] all tokens; params with logical routed weights [E, ...] -> [N, H] float32."""
    idx, w = route(x, params["gate"], params["gate_bias"], cfg)                               # [N, K]
    comb = (jax.nn.one_hot(idx, cfg.num_experts, dtype=jnp.float32) * w[..., None]).sum(1)   # [N, E]
    xf = x.astype(jnp.float32)
    f = lambda n: (params[n].dequantize() if isinstance(params[n], Fp8Weight)  # noqa: E731
                   else params[n].w.astype(jnp.float32) if isinstance(params[n], Fp8Train)
                   else params[n].astype(jnp.float32))
    g = jnp.einsum("nh,eih->nei", xf, f("w1"))
    u = jnp.einsum("nh,eih->nei", xf, f("w3"))
    outs = jnp.einsum("nei,ehi->neh", jax.nn.silu(g) * u, f("w2"))                           # [N, E, H]
    y = jnp.einsum("ne,neh->nh", comb, outs)
    if cfg.shared:
        a = jax.nn.silu(xf @ f("shared_w1").T) * (xf @ f("shared_w3").T)
        y = y + a @ f("shared_w2").T
    return y
