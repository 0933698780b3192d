"""`pipeline_train_step`: loss and gradients of a stage-stacked model run under any pipeline schedule.

The model is `num_stages` applications of one `stage_fn(stage_params, x) -> x` (same shape and dtype in and
out), with `params` stacked along a leading stage axis, and `loss_fn` applied to the last stage's output.
Each rank gets the parameters of the stages its chunks hold (DualPipe: stage r and stage N-1-r, two copies);
the gradients of the copies are summed back into one [num_stages, ...] tree.

Extra mesh axes pass through: with a mesh ("pp", "ep") say, give `param_specs` (a pytree of PartitionSpecs
for the per-stage dims, e.g. P("ep", None, None) for expert weights) and `batch_spec` (for the dims of one
micro-batch after the leading micro-batch axis, e.g. P("ep") to split tokens). `stage_fn` then runs on the
local shards and may use collectives over those axes. Axes named in `batch_spec` are data-parallel: the loss
is the mean over their shards and gradients of parameters replicated over them are summed by the VJP.

`pipeline_value_and_grad` adds a trainable loss head (`loss_fn(loss_params, y[, t])`) and the gradient with
respect to the micro-batches (for an embedding applied before the pipeline).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from seekax.ir.schedule import Schedule
from seekax.ir.validate import fail
from seekax.lowering.pipeline import PipelinePlan, lower_pipeline, plan_pipeline
from seekax.schedules.passes import split_all_backward


class PipelineGrads(NamedTuple):
    """What `pipeline_value_and_grad` returns. loss: scalar; grads: like params [num_stages, ...];
    loss_grads: like loss_params (() without); input_grads: d loss / d microbatches [M, *x] (() unless asked);
    aux: with stage_aux, the sum over micro-batches of each stage's aux output, [num_stages, ...] (else ())."""

    loss: jax.Array
    grads: Any
    loss_grads: Any
    input_grads: Any
    aux: Any


def make_pipeline_value_and_grad(schedule: Schedule | PipelinePlan, stage_fn: Callable, loss_fn: Callable, *,
                                 mesh: jax.sharding.Mesh, pp_axis: str = "pp", param_specs: Any = None,
                                 batch_spec: P | None = None, with_targets: bool = True,
                                 with_loss_params: bool = False, input_grads: bool = False,
                                 stage_aux: bool = False, split_backward: bool = False) -> Callable:
    """A jitted `fn(params, loss_params, microbatches, targets) -> PipelineGrads`.

    with_loss_params: loss_fn(loss_params, y[, t]) (e.g. a final norm + LM head applied at the last stage),
    gradients returned in `loss_grads`. input_grads: also return d loss / d microbatches, so an embedding
    applied before the pipeline can be trained (`jax.vjp` of the embedding with these cotangents).
    stage_aux: stage_fn returns (x, aux) with aux a pytree of arrays not differentiated (MoE expert loads for
    EPLB, say); `aux` is their sum over micro-batches and batch shards per stage.
    split_backward: lower every BW as B then W and F&BW as F, B, W (`passes.split_all_backward`): the
    lock-step ticks then hold unit ops only (1F1B 8x20 at unit costs: 74 instead of 100 cost units, DualPipe
    63 instead of 72), at the price of one more stage recompute per backward."""
    if isinstance(schedule, PipelinePlan):
        plan = schedule
    else:
        plan = plan_pipeline(split_all_backward(schedule) if split_backward else schedule)
    s = plan.schedule
    if pp_axis not in mesh.shape or mesh.shape[pp_axis] != s.num_ranks:
        raise fail("mesh", dict(mesh.shape), f"an axis {pp_axis!r} of size num_ranks = {s.num_ranks}")
    batch_spec = P() if batch_spec is None else batch_spec
    batch_axes = tuple(a for e in batch_spec if e is not None for a in ((e,) if isinstance(e, str) else e))
    if pp_axis in batch_axes:
        raise fail("batch_spec", batch_spec, f"no use of the pipeline axis {pp_axis!r}")
    batch_shards = int(np.prod([mesh.shape[a] for a in batch_axes])) if batch_axes else 1
    stage_index = np.asarray(s.chunk_stages, np.int32)  # [num_ranks, num_chunks] -> stage
    body = lower_pipeline(plan, stage_fn, loss_fn, pp_axis=pp_axis, batch_axes=batch_axes,
                          batch_shards=batch_shards, has_targets=with_targets, has_loss_params=with_loss_params,
                          input_grads=input_grads, has_aux=stage_aux)
    tables = {k: jnp.asarray(v) for k, v in plan.tables.items()}

    def specs_for(params):
        if param_specs is None:
            return jax.tree.map(lambda _: P(pp_axis, None), params)
        return jax.tree.map(lambda _, sp: P(pp_axis, None, *sp), params, param_specs,
                            is_leaf=lambda x: isinstance(x, P))

    @jax.jit
    def step(params, loss_params, microbatches, targets):
        leaves = jax.tree.leaves(params)
        if any(leaf.shape[:1] != (s.num_stages,) for leaf in leaves):
            raise fail("params", [leaf.shape for leaf in leaves], f"leaves with a leading stage axis of {s.num_stages}")
        if microbatches.shape[0] != s.num_microbatches:
            raise fail("microbatches.shape", microbatches.shape, f"a leading axis of {s.num_microbatches}")
        local = jax.tree.map(lambda p: p[stage_index], params)  # [num_ranks, num_chunks, ...]
        pspec = specs_for(params)
        mb_spec = P(None, *batch_spec)
        tgt = targets if with_targets else jnp.zeros((s.num_microbatches,), jnp.float32)
        tgt_spec = mb_spec if with_targets else P()
        loss_params = loss_params if with_loss_params else ()
        put = _placer(mesh)
        local = jax.tree.map(put, local, pspec, is_leaf=lambda x: isinstance(x, P))
        microbatches = put(microbatches, mb_spec)
        tgt = put(tgt, tgt_spec)
        loss_params = jax.tree.map(lambda x: put(x, P()), loss_params)
        tabs = {k: put(v, P(pp_axis)) for k, v in tables.items()}
        loss, g_local, loss_grads, in_grads, aux_local = jax.shard_map(
            body, mesh=mesh,
            in_specs=(pspec, P(), mb_spec, tgt_spec, {k: P(pp_axis) for k in tabs}),
            out_specs=(P(), pspec, P(), mb_spec if input_grads else P(), P(pp_axis)),
        )(local, loss_params, microbatches, tgt, tabs)
        # Sum the copies of each stage (DualPipe holds every stage twice) back into [num_stages, ...].
        flat = stage_index.reshape(-1)

        def combine(g, sp):
            out = P(None, *sp[2:])
            g = put(g, P(None, None, *sp[2:])).reshape((-1,) + g.shape[2:])  # gather the pp shards
            zeros = jnp.zeros((s.num_stages,) + g.shape[1:], g.dtype, device=NamedSharding(mesh, out))
            return zeros.at[flat].add(g, out_sharding=NamedSharding(mesh, out))

        grads = jax.tree.map(combine, g_local, pspec, is_leaf=lambda x: isinstance(x, P))
        aux = jax.tree.map(lambda a: combine(a, P(pp_axis, None)), aux_local)
        return PipelineGrads(loss=loss, grads=grads, loss_grads=loss_grads, input_grads=in_grads, aux=aux)

    return step


def make_pipeline_train_step(schedule: Schedule | PipelinePlan, stage_fn: Callable, loss_fn: Callable, *,
                             mesh: jax.sharding.Mesh, pp_axis: str = "pp", param_specs: Any = None,
                             batch_spec: P | None = None, with_targets: bool = True,
                             split_backward: bool = False) -> Callable:
    """A jitted `step(params, microbatches, targets) -> (loss, grads)`; see `pipeline_train_step` and, for
    split_backward, `make_pipeline_value_and_grad`."""
    full = make_pipeline_value_and_grad(schedule, stage_fn, loss_fn, mesh=mesh, pp_axis=pp_axis,
                                        param_specs=param_specs, batch_spec=batch_spec, with_targets=with_targets,
                                        split_backward=split_backward)

    def step(params, microbatches, targets=None):
        out = full(params, (), microbatches, targets if with_targets else None)
        return out.loss, out.grads

    return step


def pipeline_train_step(schedule: Schedule, stage_fn: Callable, params: Any, microbatches: jax.Array,
                        loss_fn: Callable, *, mesh: jax.sharding.Mesh, targets: jax.Array | None = None,
                        pp_axis: str = "pp", param_specs: Any = None, batch_spec: P | None = None,
                        split_backward: bool = False):
    """(loss, grads) of mean_m loss_fn(model(microbatches[m]), targets[m]) run under `schedule`.

    params: pytree of [num_stages, ...]; microbatches: [num_microbatches, *x]; targets: [num_microbatches, ...]
    or None (then loss_fn(y)). stage_fn(stage_params, x: [*x]) -> [*x]. mesh: has `pp_axis` of size
    num_ranks (other axes: see the module docstring). grads: same tree and shapes as params.
    DualPipe: micro-batches [0, M/2) enter at rank 0, [M/2, M) at rank N-1; both run the same stages.
    split_backward: see `make_pipeline_train_step`. The built step is cached per arguments (not per values).
    """
    key = (schedule, stage_fn, loss_fn, mesh, pp_axis, _freeze(param_specs), batch_spec, targets is not None,
           split_backward)
    step = _STEPS.get(key)
    if step is None:
        step = make_pipeline_train_step(schedule, stage_fn, loss_fn, mesh=mesh, pp_axis=pp_axis,
                                        param_specs=param_specs, batch_spec=batch_spec,
                                        with_targets=targets is not None, split_backward=split_backward)
        if len(_STEPS) >= 32:
            _STEPS.pop(next(iter(_STEPS)))
        _STEPS[key] = step
    return step(params, microbatches, targets)


def _placer(mesh: jax.sharding.Mesh) -> Callable:
    """Place a value inside jit: `reshard` on Explicit meshes (JAX 0.11's default), a sharding constraint
    on Auto ones."""
    explicit = all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    if explicit:
        return lambda x, sp: jax.sharding.reshard(x, NamedSharding(mesh, sp))
    return lambda x, sp: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, sp))


def pipeline_value_and_grad(schedule: Schedule, stage_fn: Callable, params: Any, microbatches: jax.Array,
                            loss_fn: Callable, *, mesh: jax.sharding.Mesh, targets: jax.Array | None = None,
                            loss_params: Any = None, input_grads: bool = False, stage_aux: bool = False,
                            pp_axis: str = "pp",
                            param_specs: Any = None, batch_spec: P | None = None,
                            split_backward: bool = False) -> PipelineGrads:
    """`pipeline_train_step` plus a trainable loss head and input gradients (for a model whose embedding runs
    before the pipeline and whose final norm + head run in `loss_fn(loss_params, y[, t])`)."""
    with_lp = loss_params is not None
    key = ("vg", schedule, stage_fn, loss_fn, mesh, pp_axis, _freeze(param_specs), batch_spec, targets is not None,
           with_lp, input_grads, stage_aux, split_backward)
    fn = _STEPS.get(key)
    if fn is None:
        fn = make_pipeline_value_and_grad(schedule, stage_fn, loss_fn, mesh=mesh, pp_axis=pp_axis,
                                          param_specs=param_specs, batch_spec=batch_spec,
                                          with_targets=targets is not None, with_loss_params=with_lp,
                                          input_grads=input_grads, stage_aux=stage_aux,
                                          split_backward=split_backward)
        if len(_STEPS) >= 32:
            _STEPS.pop(next(iter(_STEPS)))
        _STEPS[key] = fn
    return fn(params, loss_params if with_lp else (), microbatches, targets)


# Built steps by (schedule, functions, mesh, specs): repeated calls reuse the plan and the jit cache.
_STEPS: dict[Any, Callable] = {}


def _freeze(tree: Any) -> Any:
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: isinstance(x, P))
    return treedef, tuple(leaves)


def reference_train_step(stage_fn: Callable, params: Any, microbatches: jax.Array, loss_fn: Callable,
                         targets: jax.Array | None = None):
    """The unpipelined model: value_and_grad of the mean loss over micro-batches (the test oracle)."""
    num_stages = jax.tree.leaves(params)[0].shape[0]

    def total(params):
        def one(i):
            x = microbatches[i]
            for st in range(num_stages):
                x = stage_fn(jax.tree.map(lambda p: p[st], params), x)
            return loss_fn(x, targets[i]) if targets is not None else loss_fn(x)

        return sum(one(i) for i in range(microbatches.shape[0])) / microbatches.shape[0]

    return jax.value_and_grad(total)(params)
