"""Tiny heterogeneous models for the pipeline tests: an embedding stage with dense layers, MoE stages with
different layer counts, and a head stage with the loss input; optionally expert parallel over a mesh axis
(stages then call all_to_all / all_gather / psum_scatter over it) and optionally split into the DeepSeek-V3
sub-steps (attention, dispatch, experts, combine).

Activations are pytrees: stage 0 takes {"ids": int32 [T], "mask": f32 [T]}, middle stages pass
{"h": f32 [T, D], "ids": int32 [T]} (the token ids ride along as an integer leaf), the last stage returns
logits [T, V]. The reference (`ref_stages`) computes the same math on one device with every expert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from seekax.layers.pipeline import Stage, SubStep

D, F, E, V = 8, 8, 4, 16


def layer_counts(num_stages: int) -> list[int]:
    """MoE layers per stage: 0 on the embedding stage, then 3, 3, 2, 3, 3, 2, ... and 2 on the head stage."""
    middle = [(3, 3, 2)[i % 3] for i in range(num_stages - 2)]
    return [0] + middle + [2]


def init_params(rng: np.random.Generator, num_stages: int) -> list[dict]:
    """Per-stage parameter trees (global shapes; experts [E, ...])."""

    def w(*shape, scale=None):
        return jnp.asarray(rng.normal(size=shape) * (scale or 1 / np.sqrt(shape[-2])), jnp.float32)

    def moe(n):
        return {"wa": w(n, D, D), "router": w(n, D, E), "w1": w(n, E, D, F), "w2": w(n, E, F, D)}

    out = [{"embed": w(V, D, scale=1.0), "dense": w(2, D, D)}]
    for n in layer_counts(num_stages)[1:-1]:
        out.append(moe(n))
    out.append(moe(2) | {"norm": jnp.ones((D,), jnp.float32), "head": w(D, V)})
    return out


def param_specs(params: list[dict], ep: str | None) -> list[dict] | None:
    """Experts split over `ep` (dim 1: dim 0 is the layer), everything else replicated."""
    if ep is None:
        return None
    return [{k: (P(None, ep) if k in ("w1", "w2") else None) for k in p} for p in params]


# --- the math, on local shards -----------------------------------------------------------------------------


def _scan_layers(step, h, stacked):
    return jax.lax.scan(lambda c, p: (step(p, c), None), h, stacked)[0]


def embed_stage(p, mb):
    h = p["embed"][mb["ids"]] * mb["mask"][:, None]  # [T, D]
    h = _scan_layers(lambda w, x: x + jnp.tanh(x @ w), h, p["dense"])
    return {"h": h, "ids": mb["ids"]}


def _attention(lp, h):
    h = h + jnp.tanh(h @ lp["wa"])
    return h, jax.nn.softmax(h @ lp["router"], axis=-1)  # [T, D], [T, E]


def _experts(lp, x, probs, first_expert):
    """x [..., D], probs [..., E]: sum over the local experts e of probs[e] * expert_e(x)."""
    n = lp["w1"].shape[0]
    out = jnp.zeros_like(x)
    for j in range(n):
        pe = jax.lax.dynamic_index_in_dim(probs, first_expert + j, axis=-1, keepdims=True)
        out = out + pe * (jnp.tanh(x @ lp["w1"][j]) @ lp["w2"][j])
    return out


def moe_layer(lp, h, ep):
    """One MoE layer on local tokens h [T_l, D]; with `ep`, tokens are gathered to every expert shard and the
    expert outputs summed back (all_gather / psum_scatter)."""
    h, probs = _attention(lp, h)
    if ep is None:
        return h + _experts(lp, h, probs, 0)
    xs = jax.lax.all_gather(h, ep, axis=0, tiled=True)
    ps = jax.lax.all_gather(probs, ep, axis=0, tiled=True)
    y = _experts(lp, xs, ps, jax.lax.axis_index(ep) * lp["w1"].shape[0])
    return h + jax.lax.psum_scatter(y, ep, scatter_dimension=0, tiled=True)


def make_moe_stage(ep: str | None, head: bool):
    def moe_stage(p, a):
        layers = {k: p[k] for k in ("wa", "router", "w1", "w2")}
        h = _scan_layers(lambda lp, x: moe_layer(lp, x, ep), a["h"], layers)
        if head:
            h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6) * p["norm"]
            return h @ p["head"]  # logits [T, V]
        return {"h": h, "ids": a["ids"]}

    moe_stage.__name__ = "head_stage" if head else "moe_stage"
    return moe_stage


# --- the DeepSeek-V3 sub-steps of a one-layer MoE stage ------------------------------------------------------


def make_substep_stage(ep: str | None, head: bool = False) -> Stage:
    """attention (compute) -> dispatch (all_to_all) -> experts (compute) -> combine (all_to_all) for every
    layer of the stage; with `head`, the norm and head join the last compute step."""

    def layer(p, i):
        return {k: p[k][i] for k in ("wa", "router", "w1", "w2")}

    def steps_for(i, n):
        def attention(p, c):
            h, probs = _attention(layer(p, i), c["h"])
            return {"h": h, "probs": probs, "ids": c["ids"]}

        def dispatch(p, c):  # every token to every expert shard: [ep(dest), T_l, ...] -> [ep(src), T_l, ...]
            if ep is None:
                return c | {"xin": c["h"][None], "pin": c["probs"][None]}
            k = jax.lax.axis_size(ep)
            send_x = jnp.broadcast_to(c["h"][None], (k,) + c["h"].shape)
            send_p = jnp.broadcast_to(c["probs"][None], (k,) + c["probs"].shape)
            return c | {"xin": jax.lax.all_to_all(send_x, ep, 0, 0), "pin": jax.lax.all_to_all(send_p, ep, 0, 0)}

        def experts(p, c):
            lp = layer(p, i)
            first = 0 if ep is None else jax.lax.axis_index(ep) * lp["w1"].shape[0]
            return {"h": c["h"], "ids": c["ids"], "out": _experts(lp, c["xin"], c["pin"], first)}

        def combine(p, c):  # expert outputs back to their tokens' shard, summed over expert shards
            back = c["out"] if ep is None else jax.lax.all_to_all(c["out"], ep, 0, 0)
            h = c["h"] + back.sum(0)
            if head and i == n - 1:
                h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6) * p["norm"]
                return h @ p["head"]
            return {"h": h, "ids": c["ids"]}

        return [SubStep(fn=attention, name=f"attention{i}"), SubStep(fn=dispatch, comm=True, name=f"dispatch{i}"),
                SubStep(fn=experts, name=f"experts{i}"), SubStep(fn=combine, comm=True, name=f"combine{i}")]

    return steps_for


def stages(num_stages: int, ep: str | None = None, substeps: bool = False) -> list:
    """Stage functions for the pipeline (local shards; collectives over `ep` when given)."""
    counts = layer_counts(num_stages)
    out = [embed_stage]
    moe = {False: make_moe_stage(ep, False), True: make_moe_stage(ep, True)}
    made: dict[tuple[int, bool], Stage] = {}
    for st in range(1, num_stages):
        head = st == num_stages - 1
        if not substeps:
            out.append(moe[head])
            continue
        key = (counts[st], head)
        if key not in made:
            steps_for = make_substep_stage(ep, head)
            made[key] = Stage(substeps=[s for i in range(counts[st]) for s in steps_for(i, counts[st])],
                              name=f"moe{counts[st]}{'+head' if head else ''}")
        out.append(made[key])
    return out


def ref_stages(num_stages: int) -> list:
    """The same model on one device (every expert local, no collectives)."""
    return stages(num_stages, ep=None, substeps=False)


def loss_fn(logits, targets):
    """Mean cross-entropy: logits [T, V], targets int32 [T]."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[:, None], axis=-1).mean()


def batch(rng: np.random.Generator, microbatches: int, tokens: int):
    """Micro-batches {"ids": int32 [M, T], "mask": f32 [M, T]} and targets int32 [M, T]."""
    mb = {"ids": jnp.asarray(rng.integers(0, V, (microbatches, tokens)), jnp.int32),
          "mask": jnp.asarray(rng.uniform(0.5, 1.5, (microbatches, tokens)), jnp.float32)}
    return mb, jnp.asarray(rng.integers(0, V, (microbatches, tokens)), jnp.int32)
