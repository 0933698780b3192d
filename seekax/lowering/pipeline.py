"""Lower any pipeline `Schedule` to one SPMD program under `jax.shard_map` over a `pp` mesh axis.

Stages of the lowering (each a plain function, each inspectable):
  1. `plan_pipeline(schedule)`: cut time into ticks (a unit-cost replay: one compute op per rank per tick, a
     value produced in tick t is usable in tick t+1), give every activation and gradient a buffer slot
     (interval colouring: slots = peak live values, not chunks x micro-batches), and write per-rank op tables
     [num_ranks, num_ticks] of int32: op code, chunk, slots, and for every transfer channel the slot where the
     value arriving at the end of the tick is stored.
  2. `lower_pipeline(plan, stage_fn, loss_fn, ...)`: a `lax.scan` over ticks in which every rank picks its op
     with `lax.switch` (F, F+loss at the last stage, B = input-grad VJP, W = weight-grad VJP, BW, F&BW), then
     activations and gradients move by cyclic `ppermute` one rank right or left (both directions for
     DualPipe; the wrap from the last rank to the first for interleaved 1F1B), or stay on the rank (the turn
     of DualPipeV's V). Only the shifts the schedule uses are emitted.

B and W recompute the stage forward from the stashed stage input (activation checkpointing per stage): the
stash is one [*x] array per live (chunk, micro-batch), and W needs only that input and the output gradient.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from seekax.ir.schedule import Op, Schedule
from seekax.ir.validate import fail

# Op codes of the per-rank tables (the lax.switch branch index).
NOOP, F, F_LAST, B, W, BW, FBW, FBW_LAST = range(8)
CODE_NAMES = ("noop", "F", "F+loss", "B", "W", "BW", "F&BW", "F+loss&BW")
FIELDS = ("code", "f_chunk", "f_slot", "f_first", "f_gmb", "f_gslot", "b_chunk", "b_slot", "b_gslot", "b_first",
          "b_gmb")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelinePlan:
    """Static tables of a lowered schedule. tables[name]: [num_ranks, num_ticks] int32; slot index
    num_act_slots / num_grad_slots is the trash slot for writes that carry nothing.
    act_channels / grad_channels: cyclic rank shifts d (rank r sends to (r + d) % num_ranks; 1 = right,
    num_ranks - 1 = left, 0 = the same rank) that carry values."""

    schedule: Schedule
    num_ticks: int
    num_act_slots: int
    num_grad_slots: int
    act_channels: tuple[int, ...]
    grad_channels: tuple[int, ...]
    tables: dict[str, np.ndarray]
    ticks: tuple[tuple[int, ...], ...]

    def lockstep_makespan(self, costs: dict[str, float] | None = None) -> float:
        """Time of the lowered program if each tick lasts as long as its longest op (the SPMD program runs
        ticks in lock-step), to compare with `schedule.simulate(costs).makespan` (ranks run freely)."""
        from seekax.ir.schedule import UNIT_COSTS

        costs = dict(UNIT_COSTS if costs is None else costs)
        longest = [0.0] * self.num_ticks
        for r, ops in enumerate(self.schedule.compute_only().ranks):
            for t, op in zip(self.ticks[r], ops):
                longest[t] = max(longest[t], costs[op.kind])
        return float(sum(longest))

    def describe(self) -> str:
        """One row per rank, one column per tick (the op each rank runs)."""
        lines = [f"{self.schedule.name}: {self.num_ticks} ticks, act slots {self.num_act_slots}, "
                 f"grad slots {self.num_grad_slots}, channels act {self.act_channels} grad {self.grad_channels}"]
        for r, ops in enumerate(self.schedule.compute_only().ranks):
            row = ["."] * self.num_ticks
            for t, op in zip(self.ticks[r], ops):
                row[t] = str(op)
            lines.append(f"rank {r}: " + " ".join(f"{x:>8}" for x in row))
        return "\n".join(lines)


def _allocate(intervals: list[tuple[int, int, Any]]) -> tuple[dict[Any, int], int]:
    """Interval colouring: a slot is reused only by a value written after its last read (strictly later
    tick, so one tick's reads and writes never share a slot)."""
    slot_of: dict[Any, int] = {}
    busy: list[tuple[int, int]] = []  # (last_use, slot)
    free: list[int] = []
    count = 0
    for start, end, key in sorted(intervals, key=lambda x: (x[0], x[1])):
        while busy and busy[0][0] < start:
            heapq.heappush(free, heapq.heappop(busy)[1])
        if free:
            slot = heapq.heappop(free)
        else:
            slot, count = count, count + 1
        slot_of[key] = slot
        heapq.heappush(busy, (end, slot))
    return slot_of, count


def plan_pipeline(schedule: Schedule) -> PipelinePlan:
    """Ticks, buffer slots and per-rank op tables for `schedule` (compute ops; SEND/RECV are implied).
    To keep ticks free of mixed-cost ops, run `seekax.schedules.passes.split_all_backward` first."""
    s = schedule.compute_only().validate()
    n, S = s.num_ranks, s.num_stages
    costs = {"F": 1.0, "B": 1.0, "W": 1.0, "BW": 1.0, "F&BW": 1.0}
    sim = s.simulate(costs)
    ticks = tuple(tuple(int(t) for t in row) for row in sim.start)
    num_ticks = 1 + max((t for row in ticks for t in row), default=0)

    # When each (rank, chunk, mb) part runs.
    when: dict[tuple[str, int, int, int], int] = {}
    for r, ops in enumerate(s.ranks):
        for t, op in zip(ticks[r], ops):
            for kind, c, m in op.parts():
                when[("B" if kind == "BW" else kind, r, c, m)] = t
                if kind == "BW":
                    when[("W", r, c, m)] = t

    # Transfers: (channel kind, shift, tick, receiving rank, receiving chunk, mb).
    act_iv, grad_iv, sends = [], [], []
    for r in range(n):
        for c in range(s.num_chunks):
            d, st = s.chunk_streams[r][c], s.chunk_stages[r][c]
            for m in range(s.microbatches_per_stream):
                last_use = when[("W", r, c, m)]
                if st == 0:
                    act_iv.append((when[("F", r, c, m)], last_use, (r, c, m)))
                else:
                    pr, _ = s.location(d, st - 1)
                    t = when[("F", pr, s.location(d, st - 1)[1], m)]
                    act_iv.append((t, last_use, (r, c, m)))
                    sends.append(("act", (r - pr) % n, t, r, c, m))
                if st == S - 1:
                    grad_iv.append((when[("F", r, c, m)], last_use, (r, c, m)))
                else:
                    nr, nc = s.location(d, st + 1)
                    t = when[("B", nr, nc, m)]
                    grad_iv.append((t, last_use, (r, c, m)))
                    sends.append(("grad", (r - nr) % n, t, r, c, m))
    act_slot, grad_slot, n_act, n_grad = {}, {}, 0, 0
    for r in range(n):
        a, na = _allocate([iv for iv in act_iv if iv[2][0] == r])
        g, ng = _allocate([iv for iv in grad_iv if iv[2][0] == r])
        act_slot.update(a)
        grad_slot.update(g)
        n_act, n_grad = max(n_act, na), max(n_grad, ng)

    act_channels = tuple(sorted({x[1] for x in sends if x[0] == "act"}))
    grad_channels = tuple(sorted({x[1] for x in sends if x[0] == "grad"}))
    tables = {k: np.zeros((n, num_ticks), np.int32) for k in FIELDS}
    tables["f_slot"][:] = n_act
    tables["f_gslot"][:] = n_grad
    tables["b_slot"][:] = n_act
    tables["b_gslot"][:] = n_grad
    for kind, chans, trash in (("act", act_channels, n_act), ("grad", grad_channels, n_grad)):
        for d in chans:
            tables[f"recv_{kind}_{d}"] = np.full((n, num_ticks), trash, np.int32)
    for kind, d, t, r, c, m in sends:
        tab = tables[f"recv_{kind}_{d}"]
        slot = (act_slot if kind == "act" else grad_slot)[(r, c, m)]
        if tab[r, t] != (n_act if kind == "act" else n_grad):
            raise AssertionError(f"two {kind} values reach rank {r} over shift {d} in tick {t}")
        tab[r, t] = slot

    for r, ops in enumerate(s.ranks):
        for t, op in zip(ticks[r], ops):
            for kind, c, m in op.parts():
                st = s.chunk_stages[r][c]
                if kind == "F":
                    tables["f_chunk"][r, t] = c
                    tables["f_slot"][r, t] = act_slot[(r, c, m)]
                    tables["f_first"][r, t] = st == 0
                    tables["f_gmb"][r, t] = s.global_mb(r, c, m)
                    if st == S - 1:
                        tables["f_gslot"][r, t] = grad_slot[(r, c, m)]
                else:
                    tables["b_chunk"][r, t] = c
                    tables["b_slot"][r, t] = act_slot[(r, c, m)]
                    tables["b_gslot"][r, t] = grad_slot[(r, c, m)]
                    if kind != "W":  # an input-grad at stage 0 is d loss / d micro-batch
                        tables["b_first"][r, t] = st == 0
                        tables["b_gmb"][r, t] = s.global_mb(r, c, m)
            tables["code"][r, t] = _code(op, s.chunk_stages[r][op.chunk] == S - 1)
    return PipelinePlan(schedule=s, num_ticks=num_ticks, num_act_slots=n_act, num_grad_slots=n_grad,
                        act_channels=act_channels, grad_channels=grad_channels, tables=tables, ticks=ticks)


def _code(op: Op, f_is_last: bool) -> int:
    if op.kind == "F":
        return F_LAST if f_is_last else F
    if op.kind == "F&BW":
        return FBW_LAST if f_is_last else FBW
    return {"B": B, "W": W, "BW": BW}[op.kind]


def lower_pipeline(plan: PipelinePlan, stage_fn: Callable, loss_fn: Callable, *, pp_axis: str = "pp",
                   batch_axes: tuple[str, ...] = (), batch_shards: int = 1, has_targets: bool = True,
                   has_loss_params: bool = False, input_grads: bool = False, has_aux: bool = False) -> Callable:
    """The per-device body for `shard_map`:
    (params_local, loss_params, microbatches, targets, tables) -> (loss, grads, loss_grads, input_grads).

    params_local: pytree of [1, num_chunks, ...] (this rank's chunks); loss_params: pytree (replicated) or ();
    microbatches: [M, *x]; targets: [M, ...] or None; tables: dict of [1, num_ticks] int32.
    loss_fn(y, t) / loss_fn(y), or with has_loss_params loss_fn(loss_params, y, t) / loss_fn(loss_params, y).
    Returns the loss summed over `pp` (mean over micro-batches and over `batch_axes` shards), this rank's
    [1, num_chunks, ...] grads, the loss_params grads (summed over `pp`) and, with input_grads, d loss /
    d microbatches [M, *x] (else ()), and with has_aux (stage_fn returns (x, aux), e.g. MoE expert loads; aux
    is not differentiated) the sum of aux over micro-batches (and `batch_axes` shards) per chunk,
    [1, num_chunks, ...] (else ()).
    """
    s = plan.schedule
    n = s.num_ranks
    scale = 1.0 / (s.num_microbatches * batch_shards)
    vary_axes = (pp_axis,) + tuple(batch_axes)

    def stage_act(p, x):  # the activation part of stage_fn (what B, W and BW differentiate)
        return stage_fn(p, x)[0] if has_aux else stage_fn(p, x)

    def body(params_local, loss_params, microbatches, targets, tables):
        params = jax.tree.map(lambda p: p[0], params_local)  # [num_chunks, ...]
        rows = {k: v[0] for k, v in tables.items()}  # [num_ticks]
        def varying_over(x, axes):
            missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
            return lax.pcast(x, missing, to="varying") if missing else x

        def varying(x):
            return varying_over(x, vary_axes)

        # Every stage input the branches see varies over pp (it comes out of a pp-varying slot buffer), so the
        # shape check must trace with one too: a stage whose layers run under lax.scan needs carry types to match.
        x0 = varying(microbatches[0])
        check_stage_fn(stage_act, jax.tree.map(lambda p: p[0], params), x0)  # inside: extra axes are bound

        def chunk_params(c):
            return jax.tree.map(lambda p: p[c], params)

        # Branches read the buffers but return only small values (the stage input to stash, the messages,
        # the loss gradient, the loss): writing the slot buffers outside the switch keeps XLA from copying
        # whole buffers through the conditional every tick. The weight-grad accumulator passes through.
        def loss_of(y, lp, gmb):
            args = (y, targets[gmb]) if has_targets else (y,)
            return loss_fn(lp, *args) if has_loss_params else loss_fn(*args)

        def forward(bufs, row, last):
            act, grad, gacc, (hacc, aacc) = bufs
            x = jnp.where(row["f_first"] == 1, microbatches[row["f_gmb"]], act[row["f_slot"]])
            if has_aux:
                y, aux = stage_fn(chunk_params(row["f_chunk"]), x)
                aacc = jax.tree.map(lambda a, v: a.at[row["f_chunk"]].add(lax.stop_gradient(v).astype(a.dtype)),
                                    aacc, aux)
            else:
                y = stage_fn(chunk_params(row["f_chunk"]), x)
            gy, l = jnp.zeros_like(y), zero_loss()
            if last:
                l, (gy, gh) = jax.value_and_grad(loss_of, argnums=(0, 1))(y, lp_local, row["f_gmb"])
                gy, l = (gy * scale).astype(y.dtype), l.astype(jnp.float32) * scale
                hacc = jax.tree.map(lambda a, d: a + (d * scale).astype(a.dtype), hacc, gh)
                y = jnp.zeros_like(y)
            return x, y, gy, l, (hacc, aacc)

        def backward(bufs, row, need_x: bool, need_p: bool):
            act, grad, gacc, _ = bufs
            c = row["b_chunk"]
            x, g, p = act[row["b_slot"]], grad[row["b_gslot"]], chunk_params(c)
            if need_x and need_p:
                _, vjp = jax.vjp(stage_act, p, x)
                gp, gx = vjp(g)
            elif need_x:
                _, vjp = jax.vjp(lambda xx: stage_act(p, xx), x)
                (gx,) = vjp(g)
                gp = None
            else:
                _, vjp = jax.vjp(lambda pp: stage_act(pp, x), p)
                (gp,) = vjp(g)
                gx = jnp.zeros_like(x)
            if gp is not None:
                gacc = jax.tree.map(lambda a, d: a.at[c].add(d.astype(a.dtype)), gacc, gp)
            return gacc, gx

        def zero_loss():
            return varying(jnp.zeros((), jnp.float32))

        def zero(bufs):
            return jnp.zeros_like(bufs[0][0])

        def nothing(bufs):  # (stash, act message, grad message, loss grad, loss, gacc, (hacc, aacc))
            z = zero(bufs)
            return z, z, z, z, zero_loss(), bufs[2], bufs[3]

        def br_noop(bufs, row):
            return nothing(bufs)

        def br_f(last):
            def f(bufs, row):
                x, y, gy, l, hacc = forward(bufs, row, last)
                return x, y, zero(bufs), gy, l, bufs[2], hacc
            return f

        def br_b(need_x, need_p):
            def f(bufs, row):
                gacc, gx = backward(bufs, row, need_x, need_p)
                z = zero(bufs)
                return z, z, gx, z, zero_loss(), gacc, bufs[3]
            return f

        def br_fbw(last):
            def f(bufs, row):
                x, y, gy, l, hacc = forward(bufs, row, last)
                gacc, gx = backward(bufs, row, True, True)
                return x, y, gx, gy, l, gacc, hacc
            return f

        branches = [br_noop, br_f(False), br_f(True), br_b(True, False), br_b(False, True), br_b(True, True),
                    br_fbw(False), br_fbw(True)]

        def tick(state, row):
            act, grad, gacc, hacc, loss, ig = state
            bufs = (act, grad, gacc, hacc)
            x, act_msg, grad_msg, gy, l, gacc, hacc = lax.switch(row["code"], branches, bufs, row)
            act = act.at[row["f_slot"]].set(x)  # stash the stage input (trash slot when no forward)
            grad = grad.at[row["f_gslot"]].set(gy)  # the loss gradient at the last stage (else trash)
            loss = loss + l
            if input_grads:  # stage 0's input-grad is d loss / d micro-batch (row M is the trash row)
                ig = ig.at[jnp.where(row["b_first"] == 1, row["b_gmb"], s.num_microbatches)].set(grad_msg)
            for d in plan.act_channels:
                recv = act_msg if d == 0 else lax.ppermute(act_msg, pp_axis, _shift(n, d))
                act = act.at[row[f"recv_act_{d}"]].set(recv)
            for d in plan.grad_channels:
                recv = grad_msg if d == 0 else lax.ppermute(grad_msg, pp_axis, _shift(n, d))
                grad = grad.at[row[f"recv_grad_{d}"]].set(recv)
            return (act, grad, gacc, hacc, loss, ig), None

        # Loss parameters are replicated over pp: make them varying so their VJP inside a branch (which only
        # the last-stage ranks take) does not psum over pp; the sum over ranks happens once, at the end.
        lp_local = jax.tree.map(lambda a: varying_over(a, (pp_axis,)), loss_params)
        if has_aux:
            aux_shape = jax.eval_shape(stage_fn, jax.tree.map(lambda p: p[0], params), x0)[1]
            aacc0 = jax.tree.map(lambda a: varying(jnp.zeros((s.num_chunks,) + a.shape, a.dtype)), aux_shape)
        else:
            aacc0 = ()
        act0 = varying(jnp.zeros((plan.num_act_slots + 1,) + x0.shape, x0.dtype))
        grad0 = varying(jnp.zeros((plan.num_grad_slots + 1,) + x0.shape, x0.dtype))
        gacc0 = jax.tree.map(jnp.zeros_like, params)
        hacc0 = jax.tree.map(jnp.zeros_like, lp_local)
        ig0 = varying(jnp.zeros((s.num_microbatches + 1,) + x0.shape, x0.dtype)) if input_grads else ()
        init = (act0, grad0, gacc0, (hacc0, aacc0), zero_loss(), ig0)
        (_, _, gacc, (hacc, aacc), loss, ig), _ = lax.scan(tick, init, rows)
        loss = lax.psum(loss, pp_axis)
        if batch_axes:  # each shard holds its part of the mean already (scale includes 1/batch_shards)
            loss = lax.psum(loss, tuple(batch_axes))
        hgrads = jax.tree.map(lambda h: lax.psum(h, pp_axis), hacc)
        ig = lax.psum(ig[: s.num_microbatches], pp_axis) if input_grads else ()
        if batch_axes:
            aacc = jax.tree.map(lambda a: lax.psum(a, tuple(batch_axes)), aacc)
        return loss, jax.tree.map(lambda gr: gr[None], gacc), hgrads, ig, jax.tree.map(lambda a: a[None], aacc)

    return body


def _shift(n: int, d: int) -> list[tuple[int, int]]:
    """Cyclic shift by d ranks (wrapped sends land in the receiver's trash slot when unused)."""
    return [(i, (i + d) % n) for i in range(n)]


def check_stage_fn(stage_fn: Callable, stage_params: Any, x: Any) -> None:
    """stage_fn must map an activation to one of the same shape and dtype (it is passed rank to rank)."""
    out = jax.eval_shape(stage_fn, stage_params, x)
    if out.shape != x.shape or out.dtype != x.dtype:
        raise fail("stage_fn", f"{x.shape}/{x.dtype} -> {out.shape}/{out.dtype}",
                   "a stage mapping [*x] to the same shape and dtype")
