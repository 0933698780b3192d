"""`pipeline_value_and_grad` / `pipeline_train_step`: loss and gradients of a staged model run under any
pipeline schedule.

Two ways to give the model:
- **one stage per stage** (heterogeneous): `stage_fns` a list of `num_stages` functions or `Stage`s,
  `params` a list of per-stage pytrees. Each stage maps its input activation (any pytree of arrays) to the
  next stage's; stage 0 receives a micro-batch, `loss_fn` the last stage's output. Example: embedding + 2 dense
  layers / 3 MoE layers / 3 MoE layers / 2 MoE layers + norm + head. Gradients come back as the same list.
- **one function for every stage** (homogeneous): `stage_fn(stage_params, x) -> x` (same shape and dtype in
  and out) with `params` stacked along a leading stage axis; gradients come back stacked.

Each rank holds only its own stages' parameters, flattened into rows padded to the largest stage
(`pipeline_params`). Stages that share a function, parameter shapes and input shape are traced once.

Extra mesh axes pass through: with a mesh ("pp", "ep") say, give `param_specs` (PartitionSpecs of the per-stage
dims, e.g. P("ep", None, None) for expert weights; a list of per-stage spec trees for a stage list) and
`batch_spec` (for the dims of one micro-batch after the leading micro-batch axis, applied to every leaf of the
micro-batches and targets, e.g. P("ep") to split tokens). Stages then run on the local shards and may use
collectives over those axes. Axes named in `batch_spec` are data-parallel: the loss is the mean over their
shards and gradients of parameters replicated over them are summed by the VJP.

Shapes are checked before the step is traced: every stage is run once on the previous stage's output shapes
(`jax.eval_shape` under the mesh), and a stage that fails is named with the shapes it got.
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
from seekax.layers.pipeline_params import check_leaf_spec, make_pack, make_unpack, param_key, row_spec, spec_axes
from seekax.lowering.pipeline import PipelinePlan, plan_pipeline
from seekax.lowering.pipeline_body import channel_flags, lower_pipeline, variant_table
from seekax.lowering.pipeline_stages import (SubStep, Stage, as_stage, build_program, hashable_key,
                                            trace_stage_shapes)
from seekax.schedules.passes import split_all_backward


class PipelineGrads(NamedTuple):
    """What `pipeline_value_and_grad` returns. loss: scalar; grads: like params (a stacked tree, or a list of
    per-stage trees); loss_grads: like loss_params (() without); input_grads: d loss / d microbatches, like
    microbatches (() unless asked); aux: with stage_aux, the sum over micro-batches of each stage's aux output
    (stacked [num_stages, ...], or a list per stage; () without)."""

    loss: jax.Array
    grads: Any
    loss_grads: Any
    input_grads: Any
    aux: Any


def make_pipeline_value_and_grad(schedule: Schedule | PipelinePlan, stage_fn: Any, loss_fn: Callable, *,
                                 mesh: jax.sharding.Mesh, pp_axis: str = "pp", param_specs: Any = None,
                                 batch_spec: P | None = None, with_targets: bool = True,
                                 with_loss_params: bool = False, input_grads: bool = False,
                                 stage_aux: bool = False, split_backward: bool = False,
                                 fb_order: str = "overlap") -> Callable:
    """A `fn(params, loss_params, microbatches, targets) -> PipelineGrads`, jitted per input shapes.

    stage_fn: one function or `Stage` for every stage (params stacked [num_stages, ...]), or a list of them,
    one per stage (params a list of per-stage trees). with_loss_params: loss_fn(loss_params, y[, t]) (e.g. a
    head applied at the last stage), gradients in `loss_grads`. input_grads: also return d loss /
    d microbatches (for an embedding applied before the pipeline). stage_aux: stage functions return (y, aux)
    with aux a pytree of arrays not differentiated (MoE expert loads, say); `aux` is their sum over
    micro-batches and batch shards per stage. split_backward: lower every BW as B then W and F&BW as F, B, W
    (`passes.split_all_backward`): lock-step ticks then hold unit ops only, at the price of one more stage
    recompute per backward. fb_order: "overlap" (default) or "serial", see `lower_pipeline`."""
    return _Pipeline(schedule, stage_fn, loss_fn, mesh=mesh, pp_axis=pp_axis, param_specs=param_specs,
                     batch_spec=batch_spec, with_targets=with_targets, with_loss_params=with_loss_params,
                     input_grads=input_grads, stage_aux=stage_aux, split_backward=split_backward,
                     fb_order=fb_order)


def make_pipeline_train_step(schedule: Schedule | PipelinePlan, stage_fn: Any, loss_fn: Callable, *,
                             mesh: jax.sharding.Mesh, pp_axis: str = "pp", param_specs: Any = None,
                             batch_spec: P | None = None, with_targets: bool = True,
                             split_backward: bool = False, fb_order: str = "overlap") -> Callable:
    """A `step(params, microbatches, targets) -> (loss, grads)`; see `pipeline_train_step` and, for
    split_backward, `make_pipeline_value_and_grad`."""
    full = make_pipeline_value_and_grad(schedule, stage_fn, loss_fn, mesh=mesh, pp_axis=pp_axis,
                                        param_specs=param_specs, batch_spec=batch_spec, with_targets=with_targets,
                                        split_backward=split_backward, fb_order=fb_order)

    def step(params, microbatches, targets=None):
        out = full(params, (), microbatches, targets)
        return out.loss, out.grads

    return step


def pipeline_train_step(schedule: Schedule, stage_fn: Any, params: Any, microbatches: Any, loss_fn: Callable, *,
                        mesh: jax.sharding.Mesh, targets: Any = None, pp_axis: str = "pp", param_specs: Any = None,
                        batch_spec: P | None = None, split_backward: bool = False):
    """(loss, grads) of mean_m loss_fn(model(microbatches[m]), targets[m]) run under `schedule`.

    Homogeneous: params pytree of [num_stages, ...], stage_fn(stage_params, x: [*x]) -> [*x]. Heterogeneous:
    stage_fn a list of num_stages functions / `Stage`s and params a list of per-stage trees. microbatches:
    pytree of [num_microbatches, ...]; targets: pytree of [num_microbatches, ...] or None (then loss_fn(y)).
    mesh: has `pp_axis` of size num_ranks (other axes: see the module docstring). grads: like params.
    DualPipe: micro-batches [0, M/2) enter at rank 0, [M/2, M) at rank N-1; both run the same stages.
    The built step is cached per arguments (not per values)."""
    key = (schedule, _freeze_fns(stage_fn), hashable_key(loss_fn), mesh, pp_axis, _freeze(param_specs), batch_spec,
           targets is not None, split_backward)
    step = _STEPS.get(key)
    if step is None:
        step = make_pipeline_train_step(schedule, stage_fn, loss_fn, mesh=mesh, pp_axis=pp_axis,
                                        param_specs=param_specs, batch_spec=batch_spec,
                                        with_targets=targets is not None, split_backward=split_backward)
        _remember(key, step)
    return step(params, microbatches, targets)


def pipeline_value_and_grad(schedule: Schedule, stage_fn: Any, params: Any, microbatches: Any,
                            loss_fn: Callable, *, mesh: jax.sharding.Mesh, targets: Any = None,
                            loss_params: Any = None, input_grads: bool = False, stage_aux: bool = False,
                            pp_axis: str = "pp", param_specs: Any = None, batch_spec: P | None = None,
                            split_backward: bool = False) -> PipelineGrads:
    """`pipeline_train_step` plus a trainable loss head (loss_fn(loss_params, y[, t])), input gradients and
    per-stage aux sums; see `make_pipeline_value_and_grad`."""
    with_lp = loss_params is not None
    key = ("vg", schedule, _freeze_fns(stage_fn), hashable_key(loss_fn), mesh, pp_axis, _freeze(param_specs),
           batch_spec, targets is not None, with_lp, input_grads, stage_aux, split_backward)
    fn = _STEPS.get(key)
    if fn is None:
        fn = make_pipeline_value_and_grad(schedule, stage_fn, loss_fn, mesh=mesh, pp_axis=pp_axis,
                                          param_specs=param_specs, batch_spec=batch_spec,
                                          with_targets=targets is not None, with_loss_params=with_lp,
                                          input_grads=input_grads, stage_aux=stage_aux,
                                          split_backward=split_backward)
        _remember(key, fn)
    return fn(params, loss_params if with_lp else (), microbatches, targets)


class _Pipeline:
    """The built step: static checks at construction, shape checks and one jitted program per input shapes."""

    def __init__(self, schedule, stage_fn, loss_fn, *, mesh, pp_axis, param_specs, batch_spec, with_targets,
                 with_loss_params, input_grads, stage_aux, split_backward, fb_order):
        if isinstance(schedule, PipelinePlan):
            plan = schedule
        elif isinstance(schedule, Schedule):
            plan = plan_pipeline(split_all_backward(schedule) if split_backward else schedule)
        else:
            raise fail("schedule", type(schedule).__name__, "a Schedule or a PipelinePlan")
        s = plan.schedule
        if pp_axis not in mesh.shape or mesh.shape[pp_axis] != s.num_ranks:
            raise fail("mesh", dict(mesh.shape), f"an axis {pp_axis!r} of size num_ranks = {s.num_ranks}")
        if not callable(loss_fn):
            raise fail("loss_fn", loss_fn, "a callable")
        self.hetero = isinstance(stage_fn, (list, tuple))
        if self.hetero:
            if len(stage_fn) != s.num_stages:
                raise fail("stage_fn", f"{len(stage_fn)} stage functions",
                           f"one per stage of the {s.name} schedule ({s.num_stages})")
            self.stages = tuple(as_stage(f, f"stage_fn[{i}]") for i, f in enumerate(stage_fn))
            if param_specs is not None and (not isinstance(param_specs, (list, tuple))
                                            or len(param_specs) != s.num_stages):
                raise fail("param_specs", type(param_specs).__name__,
                           f"None or a list of {s.num_stages} per-stage spec trees (one per stage function)")
        else:
            one = as_stage(stage_fn, "stage_fn")
            self.stages = (one,) * s.num_stages
        for st, stage in enumerate(self.stages):
            if stage.substeps and stage_aux:
                raise fail(f"stage {st}", stage.label, "a stage without sub-steps when stage_aux=True")
        batch_spec = P() if batch_spec is None else batch_spec
        if not isinstance(batch_spec, P):
            raise fail("batch_spec", batch_spec, "a PartitionSpec")
        self.batch_axes = spec_axes(batch_spec)
        if pp_axis in self.batch_axes:
            raise fail("batch_spec", batch_spec, f"no use of the pipeline axis {pp_axis!r}")
        for a in self.batch_axes:
            if a not in mesh.shape:
                raise fail("batch_spec", batch_spec, f"axes of the mesh {tuple(mesh.axis_names)}")
        self.plan, self.schedule, self.mesh, self.pp_axis = plan, s, mesh, pp_axis
        self.param_specs, self.batch_spec, self.loss_fn = param_specs, batch_spec, loss_fn
        self.with_targets, self.with_loss_params = with_targets, with_loss_params
        self.input_grads, self.stage_aux, self.fb_order = input_grads, stage_aux, fb_order
        self.batch_shards = int(np.prod([mesh.shape[a] for a in self.batch_axes])) if self.batch_axes else 1
        self._built: dict[Any, Callable] = {}

    # --- per call -----------------------------------------------------------------------------------------
    def _batch_trees(self, microbatches, targets) -> tuple:
        """(name, tree) of what is split into micro-batches: the inputs, and the targets when loss_fn takes them."""
        return (("microbatches", microbatches),) + ((("targets", targets),) if self.with_targets else ())

    def _program(self, params, loss_params, microbatches, targets):
        """(jitted step, jitted pack) for these input shapes, built (and shape-checked) on first use."""
        s = self.schedule
        if self.hetero:
            if not isinstance(params, (list, tuple)) or len(params) != s.num_stages:
                raise fail("params", type(params).__name__, f"a list of {s.num_stages} per-stage parameter trees")
        else:
            leaves = jax.tree.leaves(params)
            if any(np.shape(leaf)[:1] != (s.num_stages,) for leaf in leaves):
                raise fail("params", [np.shape(leaf) for leaf in leaves],
                           f"leaves with a leading stage axis of {s.num_stages}")
        if self.with_targets and targets is None:
            raise fail("targets", None, "per-micro-batch targets for loss_fn(y, t) (or build the step with "
                       "with_targets=False for loss_fn(y))")
        if not self.with_targets and targets is not None:  # would be silently ignored by loss_fn(y)
            raise fail("targets", type(targets).__name__, "None: this step was built with with_targets=False "
                       "(loss_fn(y)); build it with with_targets=True to pass targets")
        for name, tree in self._batch_trees(microbatches, targets):
            shapes = [np.shape(leaf) for leaf in jax.tree.leaves(tree)]
            if not shapes or any(sh[:1] != (s.num_microbatches,) for sh in shapes):
                raise fail(f"{name}.shape", shapes, f"leaves with a leading axis of {s.num_microbatches}")
        key = jax.tree.map(lambda a: (np.shape(a), str(jnp.result_type(a))),
                           (params, loss_params, microbatches, targets if self.with_targets else None))
        leaves, treedef = jax.tree.flatten(key, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2
                                           and isinstance(x[1], str))
        key = (treedef, tuple(leaves))
        built = self._built.get(key)
        if built is None:
            built = self._build(params, loss_params, microbatches, targets)
            self._built[key] = built
        return built

    def __call__(self, params, loss_params, microbatches, targets):
        step, _ = self._program(params, loss_params, microbatches, targets)
        return step(params, loss_params, microbatches, targets if self.with_targets else None)

    def lower(self, params, loss_params, microbatches, targets=None) -> jax.stages.Lowered:
        """The step lowered for these inputs (inspect with `.as_text(dialect="hlo", debug_info=True)`)."""
        step, _ = self._program(params, loss_params, microbatches, targets)
        return step.lower(params, loss_params, microbatches, targets if self.with_targets else None)

    def pack_params(self, params, loss_params, microbatches, targets=None) -> dict:
        """The parameter rows the ranks hold: {ParamKey: [num_ranks, num_chunks, *axis sizes, size]} (rank r,
        chunk c: that chunk's stage, its leaves raveled in tree order, zero-padded to the largest stage)."""
        _, pack = self._program(params, loss_params, microbatches, targets)
        return pack(params)

    # --- building ------------------------------------------------------------------------------------------
    def _stage_avals(self, params) -> list[Any]:
        if self.hetero:
            return [jax.tree.map(_aval, p) for p in params]
        return [jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], jnp.result_type(a)), params)
                for _ in range(self.schedule.num_stages)]

    def _stage_specs(self, avals) -> list[Any]:
        """Per stage, a tree like its params of checked PartitionSpecs."""
        out = []
        for st, tree in enumerate(avals):
            given = (self.param_specs[st] if self.hetero else self.param_specs) if self.param_specs is not None \
                else None
            if given is None:
                specs = jax.tree.map(lambda _: None, tree)
            else:
                try:
                    specs = jax.tree.map(lambda _, sp: sp, tree, given, is_leaf=lambda x: isinstance(x, P) or x is None)
                except ValueError as e:
                    raise fail("param_specs" + (f"[{st}]" if self.hetero else ""), given,
                               f"a tree like the stage's params ({e})") from None
            flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
            spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P) or x is None)
            checked = []
            for (path, leaf), sp in zip(flat, spec_leaves):
                where = f"param_specs{f'[{st}]' if self.hetero else ''}{jax.tree_util.keystr(path)}"
                checked.append(check_leaf_spec(where, leaf.shape, sp, self.mesh, self.pp_axis))
            out.append(treedef.unflatten(checked))
        return out

    def _trace_shapes(self, avals, specs, loss_params, microbatches, targets):
        """eval_shape the stages chained on one micro-batch under the mesh: boundary shapes, or a ValueError
        naming the stage (or loss_fn) that cannot take its input."""
        mesh, pp = self.mesh, self.pp_axis
        vary_axes = (pp,) + self.batch_axes
        mb_spec = self.batch_spec
        one_mb = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], jnp.result_type(a)), microbatches)
        one_t = (jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], jnp.result_type(a)), targets)
                 if self.with_targets else None)
        lp_avals = jax.tree.map(_aval, loss_params)
        found: list[Any] = []

        def check(stage_params, x, t, lp):
            shapes = trace_stage_shapes(self.stages, stage_params, x, has_aux=self.stage_aux,
                                        vary=lambda tree: _vary_tree(tree, vary_axes),
                                        vary_params=lambda tree: _vary_tree(tree, (pp,)), same_shape=not self.hetero,
                                        pp_axis=pp)
            y = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes.boundaries[-1])
            try:
                args = (y, t) if self.with_targets else (y,)
                out = self.loss_fn(lp, *args) if self.with_loss_params else self.loss_fn(*args)
            except Exception as e:  # noqa: BLE001 - name the loss function and the shapes it got
                raise fail("loss_fn", getattr(self.loss_fn, "__name__", self.loss_fn),
                           f"a function of the last stage's output {shapes.boundaries[-1]} "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
            if not hasattr(out, "dtype") or np.shape(out) != () or not jnp.issubdtype(out.dtype, jnp.floating):
                # a pytree (loss, aux) is named as such, not fed to np.shape (which fails on its tracers)
                got = jax.tree.map(lambda a: f"{jnp.result_type(a)}{list(np.shape(a))}", out)
                raise fail("loss_fn", f"output {got}", "a float scalar (a loss_fn returning (loss, aux) or a "
                           "dict is not supported: return the loss alone)")
            found.append(shapes)
            return jnp.zeros(())

        in_specs = (list(specs), jax.tree.map(lambda _: mb_spec, one_mb),
                    jax.tree.map(lambda _: mb_spec, one_t) if self.with_targets else None,
                    jax.tree.map(lambda _: P(), lp_avals))
        placed = jax.tree.map(lambda a, sp: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, sp)),
                              (list(avals), one_mb, one_t, lp_avals), in_specs)
        jax.eval_shape(jax.shard_map(check, mesh=mesh, in_specs=in_specs, out_specs=P()), *placed)
        return found[0]

    def _build(self, params, loss_params, microbatches, targets) -> Callable:
        s, mesh, pp = self.schedule, self.mesh, self.pp_axis
        # batch_spec splits every leaf of one micro-batch: say which leaf it does not fit, before JAX's sharding
        # error (which names neither the leaf nor batch_spec)
        for name, tree in self._batch_trees(microbatches, targets):
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
                check_leaf_spec(f"batch_spec for {name}{jax.tree_util.keystr(path)}", np.shape(leaf)[1:],
                                self.batch_spec, mesh, pp)
        avals = self._stage_avals(params)
        specs = self._stage_specs(avals)
        shapes = self._trace_shapes(avals, specs, loss_params, microbatches, targets)
        if self.input_grads:
            for path, leaf in jax.tree_util.tree_leaves_with_path(microbatches):
                if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
                    raise fail(f"microbatches{jax.tree_util.keystr(path)}.dtype", str(jnp.result_type(leaf)),
                               "floating leaves only when input_grads=True")
        keys = [jax.tree.map(lambda a, sp: param_key(a.dtype, sp, mesh), a_tree, sp_tree)
                for a_tree, sp_tree in zip(avals, specs)]
        program = build_program(self.stages, shapes, keys, input_grads=self.input_grads, has_aux=self.stage_aux)
        variants, vtable = variant_table(self.plan, program)
        body = lower_pipeline(self.plan, program, variants, self.loss_fn, pp_axis=pp, batch_axes=self.batch_axes,
                              batch_shards=self.batch_shards, has_targets=self.with_targets,
                              has_loss_params=self.with_loss_params, input_grads=self.input_grads,
                              has_aux=self.stage_aux, fb_order=self.fb_order)
        tables = {k: jnp.asarray(v) for k, v in self.plan.tables.items()} | {"variant": jnp.asarray(vtable)}
        tables |= {k: jnp.asarray(v) for k, v in channel_flags(self.plan).items()}
        tspecs = {k: P() if k.startswith("send_") else P(pp) for k in tables}  # channel flags: replicated
        row_keys = list(program.params.sizes)
        hetero = self.hetero

        if hetero:
            in_param_specs = list(specs)

            def stage_tree(p, st):
                return p[st]

            def assemble(trees):
                return trees

            out_param_specs = in_param_specs
        else:
            in_param_specs = jax.tree.map(lambda sp: P(None, *sp), specs[0], is_leaf=lambda x: isinstance(x, P))

            def stage_tree(p, st):
                return jax.tree.map(lambda a: a[st], p)

            def assemble(trees):
                return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)

            out_param_specs = in_param_specs
        rspecs = {k: row_spec(k, pp) for k in row_keys}
        pack = jax.shard_map(make_pack(s, program, stage_tree, row_keys, pp), mesh=mesh,
                             in_specs=(in_param_specs,), out_specs=rspecs)
        gathered = {k: P(None, None, *k.axes, None) for k in row_keys}
        unpack = jax.shard_map(make_unpack(s, program, assemble), mesh=mesh, in_specs=(gathered,),
                               out_specs=out_param_specs)
        mb_specs = jax.tree.map(lambda _: P(None, *self.batch_spec), microbatches)
        tgt_specs = jax.tree.map(lambda _: P(None, *self.batch_spec), targets) if self.with_targets else P()
        main = jax.shard_map(
            body, mesh=mesh,
            in_specs=(rspecs, P(), mb_specs, tgt_specs, tspecs),
            out_specs=(P(), rspecs, P(), mb_specs if self.input_grads else P(),
                       {k: P(pp) for k in program.aux.sizes} if self.stage_aux else P()))
        put = _placer(mesh)
        with_targets, stage_aux = self.with_targets, self.stage_aux
        copies = _copies(s)

        @jax.jit
        def step(params, loss_params, microbatches, targets):
            params = jax.tree.map(put, list(params) if hetero else params, in_param_specs)
            rows = pack(params)
            microbatches = jax.tree.map(put, microbatches, mb_specs)
            tgt = jax.tree.map(put, targets, tgt_specs) if with_targets else jnp.zeros((s.num_microbatches,))
            lp = jax.tree.map(lambda x: put(x, P()), loss_params)
            tabs = {k: put(v, tspecs[k]) for k, v in tables.items()}
            loss, grow, loss_grads, in_grads, aux_rows = main(rows, lp, microbatches, tgt, tabs)
            grads = unpack({k: put(v, gathered[k]) for k, v in grow.items()})
            aux = ()
            if stage_aux:
                flat = {k: put(v, P()) for k, v in aux_rows.items()}  # [num_ranks, num_chunks, size]
                per_stage = [program.aux.unpack(program.stage_class[st],
                                                {k: sum(v[r, c] for r, c in copies[st]) for k, v in flat.items()})
                             for st in range(s.num_stages)]
                aux = per_stage if hetero else jax.tree.map(lambda *xs: jnp.stack(xs), *per_stage)
            return PipelineGrads(loss=loss, grads=grads, loss_grads=loss_grads, input_grads=in_grads, aux=aux)

        @jax.jit
        def pack_only(params):
            return pack(jax.tree.map(put, list(params) if hetero else params, in_param_specs))

        return step, pack_only


def _copies(s: Schedule) -> dict[int, list[tuple[int, int]]]:
    out: dict[int, list[tuple[int, int]]] = {}
    for r in range(s.num_ranks):
        for c in range(s.num_chunks):
            out.setdefault(s.chunk_stages[r][c], []).append((r, c))
    return out


def _aval(a) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a))


def _vary_tree(tree, axes):
    def one(x):
        missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
        return jax.lax.pcast(x, missing, to="varying") if missing else x
    return jax.tree.map(one, tree)


def _placer(mesh: jax.sharding.Mesh) -> Callable:
    """Place a value inside jit: `reshard` on Explicit meshes (JAX 0.11's default), a sharding constraint
    on Auto ones."""
    explicit = all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    if explicit:
        return lambda x, sp: jax.sharding.reshard(x, NamedSharding(mesh, sp))
    return lambda x, sp: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, sp))


# Built steps by (schedule, functions, mesh, specs): repeated calls reuse the plan and the jit cache.
_STEPS: dict[Any, Callable] = {}


def _remember(key: Any, fn: Callable) -> None:
    if len(_STEPS) >= 32:
        _STEPS.pop(next(iter(_STEPS)))
    _STEPS[key] = fn


def _freeze(tree: Any) -> Any:
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: isinstance(x, P))
    return treedef, tuple(leaves)


def _freeze_fns(stage_fn: Any) -> Any:
    return tuple(map(hashable_key, stage_fn)) if isinstance(stage_fn, (list, tuple)) else hashable_key(stage_fn)


def reference_train_step(stage_fn: Any, params: Any, microbatches: Any, loss_fn: Callable,
                         targets: Any = None):
    """The unpipelined model: value_and_grad of the mean loss over micro-batches (the test oracle).
    stage_fn and params as for `pipeline_train_step` (one function and stacked params, or lists)."""
    hetero = isinstance(stage_fn, (list, tuple))
    stages = [as_stage(f, "stage_fn") for f in stage_fn] if hetero else None

    def total(params):
        def one(x, t):
            if hetero:
                for stage, p in zip(stages, params):
                    x = stage(p, x)
            else:
                for st in range(jax.tree.leaves(params)[0].shape[0]):
                    x = stage_fn(jax.tree.map(lambda p: p[st], params), x)
            return loss_fn(x, t) if targets is not None else loss_fn(x)

        # lax.map over micro-batches: one trace of the model whatever their number, and no batching rules
        # needed (ragged_dot has none for a leading micro-batch axis)
        tgt = targets if targets is not None else jnp.zeros(jax.tree.leaves(microbatches)[0].shape[:1])
        return jnp.mean(jax.lax.map(lambda a: one(*a), (microbatches, tgt)))

    return jax.value_and_grad(total)(params)


__all__ = ["PipelineGrads", "Stage", "SubStep", "make_pipeline_train_step", "make_pipeline_value_and_grad",
           "pipeline_train_step", "pipeline_value_and_grad", "reference_train_step"]
