"""Per-stage parameter trees <-> the per-rank flat rows the lowered pipeline holds.

Rank r holds one row per chunk, [num_chunks, size] per `ParamKey` (dtype, mesh axes the leaf is split over),
padded to the largest stage of that key: each rank holds only the stages its chunks run (DualPipe's two
copies of a stage live on two ranks, as the schedule places them). Packing runs inside a `shard_map` on each
device's own shards (a `lax.switch` on the pp rank builds only that rank's rows); unpacking gathers the rows
over pp and sums each stage's copies back into its tree.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from seekax.ir.schedule import Schedule
from seekax.ir.validate import fail
from seekax.lowering.pipeline_stages import ParamKey, StageProgram


def spec_axes(spec: P) -> tuple[str, ...]:
    """Mesh axes a PartitionSpec uses, in order of appearance."""
    out: list[str] = []
    for e in spec:
        for a in (e,) if isinstance(e, str) else (e or ()):
            out.append(a)
    return tuple(out)


def check_leaf_spec(where: str, shape: tuple[int, ...], spec: Any, mesh: jax.sharding.Mesh, pp_axis: str) -> P:
    """A PartitionSpec for one per-stage leaf: names mesh axes other than pp, one entry per dim at most, and
    splits every dim evenly. Returns it (None means replicated)."""
    spec = P() if spec is None else spec
    if not isinstance(spec, P):
        raise fail(where, spec, "a PartitionSpec or None")
    if len(spec) > len(shape):
        raise fail(where, spec, f"at most one entry per dim of the leaf's shape {shape}")
    for a in spec_axes(spec):
        if a not in mesh.shape or a == pp_axis:
            raise fail(where, spec, f"mesh axes among {[x for x in mesh.axis_names if x != pp_axis]}")
    for d, e in enumerate(spec):
        k = int(np.prod([mesh.shape[a] for a in ((e,) if isinstance(e, str) else (e or ()))]))
        if shape[d] % k:
            raise fail(where, spec, f"dim {d} of shape {shape} divisible by {k}")
    return spec


def local_shape(shape: tuple[int, ...], spec: P, mesh: jax.sharding.Mesh) -> tuple[int, ...]:
    out = list(shape)
    for d, e in enumerate(spec):
        out[d] //= int(np.prod([mesh.shape[a] for a in ((e,) if isinstance(e, str) else (e or ()))]))
    return tuple(out)


def param_key(dtype: Any, spec: P, mesh: jax.sharding.Mesh) -> ParamKey:
    used = set(spec_axes(spec))
    return ParamKey(dtype=np.dtype(dtype).name, axes=tuple(a for a in mesh.axis_names if a in used))


def row_spec(key: ParamKey, pp_axis: str) -> P:
    """Global rows [num_ranks, num_chunks, *axis sizes, size]: pp and the key's axes sharded."""
    return P(pp_axis, None, *key.axes, None)


def make_pack(schedule: Schedule, program: StageProgram, stage_tree: Callable[[Any, int], Any],
              keys: Sequence[ParamKey], pp_axis: str) -> Callable:
    """The shard_map body: this device's shards of every stage's params -> {key: [1, nc, 1.., size]} rows of
    the stages its pp rank holds. stage_tree(params, st) picks stage st's tree out of the body's input."""
    s = schedule
    nc = s.num_chunks

    def rows_of(params, r):
        out = {k: [] for k in keys}
        for c in range(nc):
            st = s.chunk_stages[r][c]
            packed = program.params.pack(program.stage_class[st], stage_tree(params, st))
            for k in keys:
                out[k].append(packed[k])
        return {k: _vary(jnp.stack(v).reshape((1, nc) + (1,) * len(k.axes) + (-1,)), (pp_axis,) + k.axes)
                for k, v in out.items()}

    def body(params):
        r = lax.axis_index(pp_axis)
        return lax.switch(r, [lambda p, r=r_: rows_of(p, r) for r_ in range(s.num_ranks)], params)

    return body


def make_unpack(schedule: Schedule, program: StageProgram, assemble: Callable[[list], Any]) -> Callable:
    """The shard_map body: {key: [num_ranks, nc, 1.., size]} gathered rows -> assemble(per-stage trees), each
    stage's copies summed (DualPipe holds every stage on two ranks)."""
    s = schedule
    copies: dict[int, list[tuple[int, int]]] = {}
    for r in range(s.num_ranks):
        for c in range(s.num_chunks):
            copies.setdefault(s.chunk_stages[r][c], []).append((r, c))

    def body(rows):
        flat = {k: v.reshape(v.shape[:2] + (v.shape[-1],)) for k, v in rows.items()}  # [N, nc, size]
        trees = []
        for st in range(s.num_stages):
            summed = {k: sum(v[r, c] for r, c in copies[st]) for k, v in flat.items()}
            trees.append(program.params.unpack(program.stage_class[st], summed))
        return assemble(trees)

    return body


def _vary(x, axes):
    missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
    return lax.pcast(x, missing, to="varying") if missing else x
