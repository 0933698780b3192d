"""Pipeline stages as the lowering sees them: `Stage` (one function, or sub-steps whose communication steps are
marked), the F&B interleaving of two stages' sub-steps, and `StageProgram`, the static facts the lowering needs
(stage classes, flat layouts of parameters, activations, cotangents, sub-step stashes and aux outputs).

Stages that share a `Stage` object, parameter shapes and input shape form one *class*: the lowering traces one
class once and picks the stage's parameters by chunk at run time, so a stack of identical stages (the
homogeneous form) costs one trace per op kind, and a model with an embedding stage, dense stages, MoE stages and
a head stage costs one per distinct kind of stage.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.extend.core import jaxprs_in_params

from seekax.ir.schedule_costs import interleave_order
from seekax.ir.validate import fail
from seekax.lowering.pipeline_layout import FlatLayout, TreeLayout, dtype_key, float_key


@dataclasses.dataclass(frozen=True, kw_only=True)
class SubStep:
    """One piece of a stage: fn(stage_params, carry) -> carry (carries are pytrees of arrays).
    comm: the step is communication (an expert dispatch or combine all-to-all): in an overlapped F&B it is
    paired with the other stream's computation."""

    fn: Callable
    comm: bool = False
    name: str = ""

    def __post_init__(self):
        if not callable(self.fn):
            raise fail("SubStep.fn", self.fn, "a callable fn(stage_params, carry) -> carry")
        if not isinstance(self.comm, bool):
            raise fail("SubStep.comm", self.comm, "True or False")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
    """A pipeline stage: `fn(stage_params, x) -> y` (or `(y, aux)` with stage_aux), or `substeps` run in order.

    With sub-steps, the forward stashes every intermediate carry, the backward is the chain of the sub-steps'
    VJPs (no forward communication is recomputed), and an F&B op whose stages both have sub-steps runs the
    forward's and the backward's steps interleaved, each communication step next to the other stream's compute.
    """

    fn: Callable | None = None
    substeps: tuple[SubStep, ...] = ()
    name: str = ""

    def __post_init__(self):
        subs = tuple(self.substeps)
        object.__setattr__(self, "substeps", subs)
        if (self.fn is None) == (not subs):
            raise fail("Stage", f"fn={self.fn!r}, substeps={len(subs)}", "exactly one of fn and substeps")
        if self.fn is not None and not callable(self.fn):
            raise fail("Stage.fn", self.fn, "a callable fn(stage_params, x) -> y")
        for i, st in enumerate(subs):
            if not isinstance(st, SubStep):
                raise fail(f"Stage.substeps[{i}]", st, "a SubStep")

    def __call__(self, params: Any, x: Any) -> Any:
        if self.fn is not None:
            return self.fn(params, x)
        for st in self.substeps:
            x = st.fn(params, x)
        return x

    def steps(self) -> tuple[SubStep, ...]:
        """The sub-steps, or the whole stage as one compute step."""
        return self.substeps or (SubStep(fn=self.fn, comm=False, name=self.name or "stage"),)

    @property
    def label(self) -> str:
        return self.name or getattr(self.fn, "__name__", None) or "stage"


@dataclasses.dataclass(frozen=True, order=True)
class ParamKey:
    """The parameter buffer a leaf lives in: its dtype (name) and the mesh axes (besides pp) it is split over."""

    dtype: str
    axes: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.dtype}@{','.join(self.axes) or 'replicated'}"


def as_stage(fn: Any, where: str) -> Stage:
    """A Stage as given, or a plain callable wrapped in one."""
    if isinstance(fn, Stage):
        return fn
    if callable(fn):
        return Stage(fn=fn, name=getattr(fn, "__name__", ""))
    raise fail(where, fn, "a callable stage function or a Stage")


def interleave(f_comm: Sequence[bool], b_comm: Sequence[bool]) -> tuple[tuple[str, int], ...]:
    """Program order of an overlapped F&B: ("F", i) / ("B", j) over the forward's steps and the backward's steps
    (the backward runs its stage's steps in reverse). Whenever one stream's next step is communication and the
    other's is compute, the two are paired, communication first, so the transfer runs under the computation.
    For the DeepSeek-V3 stage (attention, dispatch, experts, combine) this is
    (combine_B, attention_F), (dispatch_F, experts_B), (dispatch_B, experts_F), (combine_F, attention_B).
    The simulator's cost model uses the same rule (`seekax.ir.schedule_costs.interleave_order`)."""
    return tuple(interleave_order(list(f_comm), list(b_comm)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageProgram:
    """Static facts about the stages, in local (per-device) shapes.

    stage_class[st] -> class; class_stages[k] -> its stages (ascending); class_stage[k] -> its Stage.
    params: one member per class (its parameter row, keyed by `ParamKey`); acts: one member per boundary
    0..S (boundary b is stage b's input, S the last output), buffers sized by boundaries 0..S-1; cots: the
    floating leaves of the same boundaries, sized by 1..S (and 0 with input grads); subs: one member per class
    (the intermediate carries a sub-step stage stashes; empty for others), None when no stage has sub-steps;
    aux: one member per class, None without stage_aux."""

    stage_class: tuple[int, ...]
    class_stages: tuple[tuple[int, ...], ...]
    class_stage: tuple[Stage, ...]
    params: FlatLayout
    acts: FlatLayout
    cots: FlatLayout
    subs: FlatLayout | None
    aux: FlatLayout | None

    @property
    def num_stages(self) -> int:
        return len(self.stage_class)

    def has_substeps(self, k: int) -> bool:
        return bool(self.class_stage[k].substeps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageShapes:
    """What tracing the stages once gives: per stage its local parameter avals, input and output avals, the
    carries after each sub-step but the last (sub-step stages) and the aux avals (stage_aux)."""

    params: tuple[Any, ...]
    boundaries: tuple[Any, ...]  # S + 1 entries
    carries: tuple[tuple[Any, ...], ...]
    aux: tuple[Any, ...]


def trace_stage_shapes(stages: Sequence[Stage], params: Sequence[Any], x: Any, *, has_aux: bool,
                       vary: Callable[[Any], Any], vary_params: Callable[[Any], Any],
                       same_shape: bool = False, pp_axis: str | None = None) -> StageShapes:
    """Run inside a shard_map trace (so collectives over the mesh axes bind): chain the stages on `x`, recording
    every boundary; raises ValueError naming the stage whose input or output is wrong. `vary` / `vary_params`
    cast activations / parameters to the manual axes the lowering's buffers vary over. same_shape: every stage
    must return its input's shapes and dtypes (one function for all stages). pp_axis: refuse stages that run a
    collective over it (ranks run different stages in one tick, so it would deadlock, not fail)."""
    x = vary(x)
    boundaries, carries, auxes = [_avals(x)], [], []
    checked: set = set()
    for st, (stage, p) in enumerate(zip(stages, params)):
        p = vary_params(p)
        where = f"stage {st} ({stage.label})"
        steps = []
        try:
            if stage.substeps:
                h = x
                for i, sub in enumerate(stage.substeps):
                    try:
                        out = sub.fn(p, h)
                    except Exception as e:  # noqa: BLE001 - re-raised with the stage and step named
                        raise _stage_error(f"{where} sub-step {i} ({sub.name or sub.fn.__name__})", h, e) from e
                    _check_leaves(f"{where} sub-step {i} output", out)
                    h = vary(out)
                    steps.append(_avals(h))
                y, aux = h, None
                steps = steps[:-1]
            else:
                out = stage.fn(p, x)
                if has_aux:
                    if not (isinstance(out, tuple) and len(out) == 2):
                        raise fail(f"{where} output", type(out).__name__, "a pair (y, aux) with stage_aux")
                    y, aux = out
                else:
                    y, aux = out, None
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's function failed on this input: name the stage
            raise _stage_error(where, x, e) from e
        _check_leaves(f"{where} output", y)
        sig = (_stage_identity(stage), _signature(_avals(p)), _signature(_avals(x)))
        if pp_axis is not None and sig not in checked:  # one more trace per distinct stage, for the check
            checked.add(sig)
            found = collectives_over(stage, (p, x), pp_axis)
            if found:
                raise fail(where, f"collectives over {pp_axis!r}: {sorted(set(found))}",
                           f"no collective over the pipeline axis {pp_axis!r} in a stage (the ranks run different "
                           "stages in one tick: it would deadlock); collectives over other mesh axes are fine")
        y = vary(y)
        if same_shape and _signature(_avals(y)) != _signature(_avals(x)):
            raise fail("stage_fn", f"{_describe(x)} -> {_describe(y)}",
                       "a stage mapping [*x] to the same shapes and dtypes (or a list of stage functions)")
        boundaries.append(_avals(y))
        carries.append(tuple(steps))
        auxes.append(None if aux is None else _avals(aux))
        x = y
    return StageShapes(params=tuple(_avals(p) for p in params), boundaries=tuple(boundaries),
                       carries=tuple(carries), aux=tuple(auxes))


def build_program(stages: Sequence[Stage], shapes: StageShapes, param_keys: Sequence[Any], *,
                  input_grads: bool, has_aux: bool) -> StageProgram:
    """Classes and layouts. param_keys[st]: a pytree like the stage's params of buffer keys (dtype, axes)."""
    S = len(stages)
    classes: list[tuple[int, ...]] = []
    owner: dict[tuple, int] = {}
    stage_class = []
    for st in range(S):
        sig = (_stage_identity(stages[st]), _signature(shapes.params[st]), _signature(param_keys[st]),
               _signature(shapes.boundaries[st]))
        k = owner.setdefault(sig, len(owner))
        if k == len(classes):
            classes.append(())
        classes[k] += (st,)
        stage_class.append(k)
    reps = [c[0] for c in classes]
    param_layouts = []
    for st in reps:
        key_iter = iter(jax.tree.leaves(param_keys[st]))
        param_layouts.append(TreeLayout.of(shapes.params[st], lambda path, leaf: next(key_iter)))
    acts = [TreeLayout.of(b, dtype_key) for b in shapes.boundaries]
    cots = [TreeLayout.of(b, float_key) for b in shapes.boundaries]
    cot_sized = list(range(1, S + 1)) + ([0] if input_grads else [])
    any_sub = any(stages[st].substeps for st in reps)
    subs = FlatLayout.of([TreeLayout.of(shapes.carries[st], dtype_key) for st in reps]) if any_sub else None
    aux = FlatLayout.of([TreeLayout.of(shapes.aux[st], dtype_key) for st in reps]) if has_aux else None
    return StageProgram(stage_class=tuple(stage_class), class_stages=tuple(classes),
                        class_stage=tuple(stages[st] for st in reps), params=FlatLayout.of(param_layouts),
                        acts=_flat(acts, range(S)), cots=_flat(cots, cot_sized), subs=subs, aux=aux)


_NOT_COMMUNICATION = frozenset({"pvary", "pcast", "axis_index"})


def collectives_over(fn: Callable, args: tuple, axis: str) -> list[str]:
    """Primitive names of the collectives over mesh axis `axis` in fn(*args), sub-jaxprs (cond, scan, remat)
    included. Call inside a shard_map trace, where the axis is bound."""
    found: list[str] = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name not in _NOT_COMMUNICATION:
                for name in ("axes", "axis_name"):
                    v = eqn.params.get(name)
                    if v == axis or (isinstance(v, (tuple, list)) and axis in v):
                        found.append(eqn.primitive.name)
            for sub in jaxprs_in_params(eqn.params):
                walk(getattr(sub, "jaxpr", sub))

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


class _ById:
    """Cache-key stand-in for an unhashable object (a user's callable dataclass): equal only to itself, and
    holding the object keeps its id from being reused while the key lives."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _ById) and other.obj is self.obj


def hashable_key(x: Any) -> Any:
    """x itself when hashable, else keyed by identity (what is built for one object is reused for that object)."""
    try:
        hash(x)
        return x
    except TypeError:
        return _ById(x)


def _stage_identity(stage: Stage) -> Any:
    """The stage as a dict key: itself, or, when its function is unhashable (a callable non-frozen dataclass, a
    method of one), its functions keyed by identity, so stages sharing a function still share a trace."""
    try:
        hash(stage)
        return stage
    except TypeError:
        return (hashable_key(stage.fn), tuple((hashable_key(sub.fn), sub.comm, sub.name) for sub in stage.substeps),
                stage.name)


def _flat(layouts: list[TreeLayout], sized_by) -> FlatLayout:
    sizes = FlatLayout.of([layouts[i] for i in sized_by]).sizes
    return FlatLayout(members=tuple(layouts), sizes=sizes)


def _avals(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jax.numpy.result_type(a)), tree)


def _signature(tree: Any) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(x.shape), str(x.dtype)) if hasattr(x, "shape") else x for x in leaves)


def _check_leaves(where: str, tree: Any) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise fail(f"{where}{jax.tree_util.keystr(path)}", type(leaf).__name__, "arrays only")


def _describe(tree: Any) -> str:
    return jax.tree_util.tree_map(lambda a: f"{jax.numpy.result_type(a)}{list(np.shape(a))}", tree).__repr__()


def _stage_error(where: str, x: Any, e: Exception) -> ValueError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ValueError(f"{where} failed on its input {_describe(x)}: {type(e).__name__}: {msg}")
