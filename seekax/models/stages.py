"""A DeepSeek model cut into pipeline stages: contiguous runs of its layers, stage 0 also embedding the tokens
and the last stage also applying the final norm and the head, so the stages differ in parameters and in what
they take and give (token ids in, [b, S, H] between, logits out).

With `overlap`, a stage holding MoE layers is a `Stage` of sub-steps in DeepSeek-V3's order (the report's
figure 4): attention and routing (compute), dispatch (all-to-all), routed and shared experts (compute),
combine (all-to-all), one group per MoE layer, the embedding, dense layers and head joined to the compute
steps around them. Under DualPipe(V) an F&B tick then runs one micro-batch's forward interleaved with
another's backward, each all-to-all next to the other stream's computation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from seekax.ir.validate import fail
from seekax.layers.mla import _rms_norm
from seekax.layers.moe import moe_combine, moe_dispatch, moe_experts, moe_route, moe_shared
from seekax.layers.pipeline import Stage, SubStep
from seekax.models.deepseek import attention_residual, decoder_layer, logits_from_hidden, moe_inputs
from seekax.models.deepseek_config import DeepseekConfig

EXPERT_LEAVES = ("w1", "w2", "w3")


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous runs of layers, as even as possible, earlier stages taking the remainder."""
    if num_layers < num_stages:
        raise fail("num_hidden_layers", num_layers, f">= the schedule's {num_stages} stages (one layer a stage)")
    base, extra = divmod(num_layers, num_stages)
    out, at = [], 0
    for s in range(num_stages):
        n = base + (s < extra)
        out.append(range(at, at + n))
        at += n
    return out


def split_stages(params: dict, stages: list[range]) -> list[dict]:
    """The model's params as one tree per stage: {"embed"} on the first, {"norm", "head"} on the last."""
    if "head" not in params:
        raise fail("params['head']", "missing (tied embeddings)", "an untied head: the first and last pipeline "
                   "stages cannot share the embedding")
    out = []
    for s, layers in enumerate(stages):
        p: dict[str, Any] = {"layers": [params["layers"][i] for i in layers]}
        if s == 0:
            p["embed"] = params["embed"]
        if s == len(stages) - 1:
            p["norm"], p["head"] = params["norm"], params["head"]
        out.append(p)
    return out


def merge_stages(stage_params: list[dict], params_like: dict | None = None, *, logical: bool = True) -> dict:
    """The inverse of `split_stages` (MTP modules, not trained here, taken from params_like). logical: EPLB
    replicas collapse to one slot per expert (its first replica; host arrays); else they stay (jit-able)."""
    params = {"embed": stage_params[0]["embed"], "norm": stage_params[-1]["norm"], "head": stage_params[-1]["head"],
              "layers": [_logical(layer) if logical else layer for p in stage_params for layer in p["layers"]]}
    if params_like is not None and "mtp" in params_like:
        params["mtp"] = params_like["mtp"]
    return params


def _logical(layer: dict) -> dict:
    moe = layer.get("moe")
    if moe is None or "log2phy" not in moe:
        return layer
    first = np.asarray(moe["log2phy"])[:, 0].astype(np.int64)                       # [E] a slot of each expert
    take = lambda v: jax.tree.map(lambda a: np.asarray(a)[first], v)  # noqa: E731  (an Fp8Train too)
    moe = {k: (take(v) if k in EXPERT_LEAVES else v) for k, v in moe.items() if k not in ("log2phy", "logcnt")}
    return {**layer, "moe": moe}


def leaf_key(path) -> str | None:
    """The dict key naming the weight at `path`, looking through an `Fp8Train` wrapper's `.w`."""
    keys = [getattr(k, "key", None) for k in path]
    if len(path) > 1 and getattr(path[-1], "name", None) == "w":
        return keys[-2]
    return keys[-1] if keys else None


def stage_specs(stage_params: list[dict], ep_axis: str | None) -> list:
    """PartitionSpecs of each stage's per-stage dims: routed expert weights split over `ep_axis`."""
    def spec(path, leaf):
        names = [getattr(k, "key", None) for k in path]
        if ep_axis and "moe" in names and leaf_key(path) in EXPERT_LEAVES:
            return P(ep_axis, *([None] * (leaf.ndim - 1)))
        return P(*([None] * leaf.ndim))

    return [jax.tree_util.tree_map_with_path(spec, p) for p in stage_params]


def stage_fns(cfg: DeepseekConfig, stages: list[range], ep_axis: str | None, backend: str = "auto",
              with_hidden: bool = False, overlap: bool = False) -> list:
    """One function (or, with overlap, a `Stage` of sub-steps where the stage has MoE layers) per stage:
    f(stage_params, x) -> next x (token ids -> hidden -> ... -> logits, or (logits, final hidden state)
    with_hidden: what the MTP modules continue from)."""
    fns = []
    for s, layers in enumerate(stages):
        first, last = s == 0, s == len(stages) - 1
        if overlap and any(cfg.is_moe(i) for i in layers):
            fns.append(_substep_stage(cfg, layers, first, last, ep_axis, backend, with_hidden, s))
            continue

        def fn(p, x, layers=layers, first=first, last=last):
            h = jnp.take(p["embed"], x, axis=0) if first else x                      # [b, S, H]
            for j, i in enumerate(layers):
                h, _ = decoder_layer(p["layers"][j], h, cfg, i, ep_axis=ep_axis, backend=backend)
            if not last:
                return h
            return (logits_from_hidden(p, h, cfg), h) if with_hidden else logits_from_hidden(p, h, cfg)

        fn.__name__ = f"stage{s}"
        fns.append(fn)
    return fns


# ---------------------------------------------------------------------------------------------- sub-steps
def _layer_steps(cfg: DeepseekConfig, j: int, i: int, ep_axis, backend: str) -> list[SubStep]:
    """Layer i (the stage's j-th) as sub-steps; a dense layer is one compute step. Carries between the steps of
    a MoE layer are dicts: the residual stream h [b, S, H] and what the next step needs."""
    if not cfg.is_moe(i):
        return [SubStep(fn=lambda p, h: decoder_layer(p["layers"][j], h, cfg, i, backend=backend)[0],
                        name=f"layer{i}")]

    def attention(p, h):
        lp = p["layers"][j]
        h = attention_residual(lp, h, cfg, backend)
        x = _rms_norm(h, lp["mlp_norm"], cfg.eps).reshape(-1, h.shape[-1])                    # [T, H]
        moe, mcfg, placement = moe_inputs(lp["moe"], cfg)
        return {"h": h, "x": x, "routed": moe_route(x, moe, cfg=mcfg, axis_name=ep_axis, placement=placement)}

    def dispatch(p, c):
        moe, mcfg, _ = moe_inputs(p["layers"][j]["moe"], cfg)
        d = moe_dispatch(c["x"], c["routed"], moe, cfg=mcfg, axis_name=ep_axis)
        return {"h": c["h"], "x": c["x"], "d": d}

    def experts(p, c):
        moe, mcfg, _ = moe_inputs(p["layers"][j]["moe"], cfg)
        out = moe_experts(c["d"], moe, cfg=mcfg, dtype=c["x"].dtype, backend=backend)
        shared = moe_shared(c["x"], moe, cfg=mcfg, backend=backend)
        return {"h": c["h"], "out": out, "handle": c["d"].handle,
                **({} if shared is None else {"shared": shared})}

    def combine(p, c):
        h = c["h"]
        y = moe_combine(c["out"], c["handle"])                                              # [T, H]
        if "shared" in c:
            y = (y.astype(jnp.float32) + c["shared"]).astype(h.dtype)
        return h + y.reshape(h.shape).astype(h.dtype)

    return [SubStep(fn=attention, name=f"attention{i}"), SubStep(fn=dispatch, comm=True, name=f"dispatch{i}"),
            SubStep(fn=experts, name=f"experts{i}"), SubStep(fn=combine, comm=True, name=f"combine{i}")]


def _then(f, g):
    return lambda p, c: g(p, f(p, c))


def _fuse(steps: list[SubStep]) -> list[SubStep]:
    """Adjacent compute steps joined into one: the overlap pairs each communication with one compute step."""
    out: list[SubStep] = []
    for st in steps:
        if out and not st.comm and not out[-1].comm:
            out[-1] = SubStep(fn=_then(out[-1].fn, st.fn), name=f"{out[-1].name}+{st.name}")
        else:
            out.append(st)
    return out


def _substep_stage(cfg: DeepseekConfig, layers: range, first: bool, last: bool, ep_axis, backend: str,
                   with_hidden: bool, s: int) -> Stage:
    steps: list[SubStep] = []
    if first:
        steps.append(SubStep(fn=lambda p, x: jnp.take(p["embed"], x, axis=0), name="embed"))
    for j, i in enumerate(layers):
        steps += _layer_steps(cfg, j, i, ep_axis, backend)
    if last:
        def head(p, h):
            logits = logits_from_hidden(p, h, cfg)
            return (logits, h) if with_hidden else logits

        steps.append(SubStep(fn=head, name="head"))
    return Stage(substeps=_fuse(steps), name=f"stage{s}")
