"""Lower any pipeline `Schedule` to one SPMD program under `jax.shard_map` over a `pp` mesh axis.

Stages of the lowering (each a plain function, each inspectable):
  1. `plan_pipeline(schedule)` (here): cut time into ticks (a unit-cost replay: one compute op per rank per
     tick, a value produced in tick t is usable in tick t+1), give every activation and gradient a buffer slot
     (interval colouring: slots = peak live values, not chunks x micro-batches), and write per-rank op tables
     [num_ranks, num_ticks] of int32: op code, chunk, slots, and for every transfer channel the slot where the
     value arriving at the end of the tick is stored.
  2. `pipeline_stages.build_program(...)`: stage classes and the flat layouts of parameters and activations.
  3. `pipeline_body.lower_pipeline(plan, program, ...)`: the per-device body, a `lax.scan` over ticks with one
     `lax.switch` branch per (op, stage class) variant and `ppermute`s between ranks.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any

import numpy as np

from seekax.ir.schedule import Op, Schedule

# Op codes of the per-rank tables (with the stage classes they pick the lax.switch branch).
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
