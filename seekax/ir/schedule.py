"""Pipeline schedule IR: per-rank op lists, their validation, a cost replay and the reference trace format.

A `Schedule` says, for every pipeline rank, which op it runs in which order. Ops name a *chunk* (a model stage
held by the rank) and a *micro-batch*; `chunk_stages[rank][chunk]` says which model stage the chunk is and
`chunk_streams[rank][chunk]` which micro-batch stream flows through it (DualPipe has two streams entering at
opposite ends; every other schedule has one). Micro-batch `mb` of stream `d` is global micro-batch
`d * microbatches_per_stream + mb`.

Op kinds (the names of the DualPipe reference traces):
  F      forward                          B   input-grad backward (weight grad deferred to a W)
  W      deferred weight grad             BW  full backward (input + weight grad)
  F&BW   one forward (chunk, mb) overlapped with one full backward (b_chunk, b_mb)
  SEND_F / RECV_F / SEND_B / RECV_B   point-to-point transfer of an activation (F) or gradient (B) with `peer`
Printed form: "0F3" (chunk 0, F, micro-batch 3), "0F3&1BW1", "1SEND_B2@0" (peer 0).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from seekax.ir.validate import check_int, fail

if TYPE_CHECKING:
    from seekax.ir.schedule_costs import CommCosts

COMPUTE_KINDS = ("F", "B", "W", "BW", "F&BW")
COMM_KINDS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
KINDS = COMPUTE_KINDS + COMM_KINDS

# Unit costs of the DualPipe README: F=1, input-grad B=1, W=1, full backward BW=2, overlapped F&BW=3.
UNIT_COSTS: Mapping[str, float] = {"F": 1.0, "B": 1.0, "W": 1.0, "BW": 2.0, "F&BW": 3.0}

_OP_RE = re.compile(r"^(\d+)(F|B|W|BW|SEND_F|RECV_F|SEND_B|RECV_B)(\d+)(?:&(\d+)BW(\d+))?(?:@(\d+))?$")


@dataclasses.dataclass(frozen=True, slots=True)
class Op:
    """One step of one rank. `b_chunk`/`b_mb` only for F&BW, `peer` only for SEND_*/RECV_*."""

    kind: str
    chunk: int
    mb: int
    b_chunk: int | None = None
    b_mb: int | None = None
    peer: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise fail("kind", self.kind, f"one of {KINDS}")
        if self.chunk < 0 or self.mb < 0:
            raise fail("op", (self.chunk, self.mb), "non-negative chunk and micro-batch")
        if (self.kind == "F&BW") != (self.b_chunk is not None and self.b_mb is not None):
            raise fail("b_chunk", self.b_chunk, "b_chunk and b_mb set exactly for F&BW ops")
        if (self.kind in COMM_KINDS) != (self.peer is not None):
            raise fail("peer", self.peer, "a peer exactly for SEND_*/RECV_* ops")

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS

    def parts(self) -> tuple[tuple[str, int, int], ...]:
        """The compute parts as (kind, chunk, mb): F&BW is an F and a BW."""
        if self.kind == "F&BW":
            return (("F", self.chunk, self.mb), ("BW", self.b_chunk, self.b_mb))
        return ((self.kind, self.chunk, self.mb),)

    def __str__(self) -> str:
        s = f"{self.chunk}{'F' if self.kind == 'F&BW' else self.kind}{self.mb}"
        if self.kind == "F&BW":
            s += f"&{self.b_chunk}BW{self.b_mb}"
        if self.peer is not None:
            s += f"@{self.peer}"
        return s

    @staticmethod
    def parse(text: str) -> "Op":
        m = _OP_RE.match(text.strip())
        if not m:
            raise fail("op", text, 'an op like "0F3", "1B2", "0F3&1BW1" or "0SEND_F3@1"')
        chunk, kind, mb, bc, bm, peer = m.groups()
        if bc is not None:
            if kind != "F":
                raise fail("op", text, "an overlapped pair written F&BW")
            return Op("F&BW", int(chunk), int(mb), int(bc), int(bm))
        return Op(kind, int(chunk), int(mb), peer=None if peer is None else int(peer))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule:
    """Per-rank op lists plus the chunk -> (model stage, stream) placement.

    ranks: [num_ranks][steps] ops; chunk_stages / chunk_streams: [num_ranks][num_chunks].
    """

    name: str
    num_microbatches: int
    chunk_stages: tuple[tuple[int, ...], ...]
    chunk_streams: tuple[tuple[int, ...], ...]
    ranks: tuple[tuple[Op, ...], ...]

    def __post_init__(self):
        check_int("num_microbatches", self.num_microbatches, min_value=1)
        n = len(self.ranks)
        if n < 1:
            raise fail("ranks", self.ranks, "at least one rank")
        if len(self.chunk_stages) != n or len(self.chunk_streams) != n:
            raise fail("chunk_stages", len(self.chunk_stages), f"one entry per rank ({n})")
        nc = {len(c) for c in self.chunk_stages} | {len(c) for c in self.chunk_streams}
        if len(nc) != 1 or 0 in nc:
            raise fail("chunk_stages", self.chunk_stages, "the same non-zero number of chunks on every rank")
        if self.num_microbatches % self.num_streams:
            raise fail("num_microbatches", self.num_microbatches, f"a multiple of the {self.num_streams} streams")
        # Every stream must pass through stages 0..S-1 exactly once.
        for d in range(self.num_streams):
            stages = sorted(st for r in range(n) for c, st in enumerate(self.chunk_stages[r])
                            if self.chunk_streams[r][c] == d)
            if stages != list(range(self.num_stages)):
                raise fail("chunk_stages", self.chunk_stages,
                           f"stream {d} to visit stages 0..{self.num_stages - 1} once")

    # --- placement -----------------------------------------------------------------------------------------
    @property
    def num_ranks(self) -> int:
        return len(self.ranks)

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_stages[0])

    @property
    def num_streams(self) -> int:
        return 1 + max(max(c) for c in self.chunk_streams)

    @property
    def num_stages(self) -> int:
        return 1 + max(max(c) for c in self.chunk_stages)

    @property
    def microbatches_per_stream(self) -> int:
        return self.num_microbatches // self.num_streams

    def location(self, stream: int, stage: int) -> tuple[int, int]:
        """(rank, chunk) holding `stage` for `stream`."""
        return self._routes()[stream][stage]

    def _routes(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        cached = self.__dict__.get("_route_cache")
        if cached is None:
            route = [[None] * self.num_stages for _ in range(self.num_streams)]
            for r in range(self.num_ranks):
                for c in range(self.num_chunks):
                    route[self.chunk_streams[r][c]][self.chunk_stages[r][c]] = (r, c)
            cached = tuple(tuple(x) for x in route)
            object.__setattr__(self, "_route_cache", cached)
        return cached

    def global_mb(self, rank: int, chunk: int, mb: int) -> int:
        return self.chunk_streams[rank][chunk] * self.microbatches_per_stream + mb

    def compute_only(self) -> "Schedule":
        """The same schedule without SEND/RECV ops."""
        return dataclasses.replace(self, ranks=tuple(tuple(o for o in ops if o.is_compute) for ops in self.ranks))

    def __str__(self) -> str:
        return "\n".join(f"rank {r}: " + " ".join(map(str, ops)) for r, ops in enumerate(self.ranks))

    # --- checks and replay ---------------------------------------------------------------------------------
    def validate(self) -> "Schedule":
        """Raise ValueError unless the schedule is complete, locally ordered, matched and deadlock-free."""
        _validate(self)
        return self

    def simulate(self, costs: "Mapping[str, float] | CommCosts | None" = None) -> "SimResult":
        """Replay with per-kind costs (default UNIT_COSTS) and instant point-to-point transfers, or with
        `CommCosts` (`seekax.ir.schedule_costs`): sub-step compute and all-to-all times, overlapped or serial
        F&BW, and a point-to-point time added to every cross-rank dependency."""
        return _simulate(self, UNIT_COSTS if costs is None else costs)

    # --- trace format --------------------------------------------------------------------------------------
    def to_trace(self) -> dict[str, Any]:
        """The JSON object of the original DualPipe traces (tests/data/dualpipe/; a WAIT closes each run of P2P ops)."""
        ranks = []
        for r, ops in enumerate(self.ranks):
            trace: list[dict[str, Any]] = []
            pending = 0
            for op in ops:
                if op.is_compute and pending:
                    trace.append({"op": "WAIT", "n_p2p": pending})
                    pending = 0
                entry: dict[str, Any] = {"op": op.kind, "chunk": op.chunk, "mb": op.mb}
                if op.kind == "F&BW":
                    entry.update(b_chunk=op.b_chunk, b_mb=op.b_mb)
                if op.peer is not None:
                    entry["peer"] = op.peer
                    pending += 1
                trace.append(entry)
            if pending:
                trace.append({"op": "WAIT", "n_p2p": pending})
            for i, e in enumerate(trace):
                e["seq"] = i
            ranks.append({"rank": r, "trace": trace})
        return {"kind": self.name, "pp": self.num_ranks, "num_chunks": self.num_microbatches,
                "chunk_stages": [list(c) for c in self.chunk_stages],
                "chunk_streams": [list(c) for c in self.chunk_streams], "ranks": ranks}

    @staticmethod
    def from_trace(trace: Mapping[str, Any] | str) -> "Schedule":
        """Parse a trace (dict or JSON text). WAITs are dropped: sends are buffered and receives block anyway.

        Traces without placement fields get DualPipe's (two streams) or DualPipeV's (one V) from `kind`."""
        if isinstance(trace, str):
            trace = json.loads(trace)
        n = check_int("pp", trace["pp"], min_value=1)
        if "chunk_stages" in trace:
            stages = tuple(tuple(c) for c in trace["chunk_stages"])
            streams = tuple(tuple(c) for c in trace["chunk_streams"])
        elif trace["kind"] == "dualpipe":
            stages, streams = dualpipe_placement(n)
        elif trace["kind"] == "dualpipev":
            stages, streams = dualpipev_placement(n)
        else:
            raise fail("trace.kind", trace["kind"], "'dualpipe', 'dualpipev' or a trace with chunk_stages")
        ranks: list[tuple[Op, ...]] = [()] * n
        for entry in trace["ranks"]:
            ops = []
            for e in entry["trace"]:
                if e["op"] == "WAIT":
                    continue
                ops.append(Op(e["op"], e["chunk"], e["mb"], e.get("b_chunk"), e.get("b_mb"), e.get("peer")))
            ranks[entry["rank"]] = tuple(ops)
        return Schedule(name=trace["kind"], num_microbatches=trace["num_chunks"], chunk_stages=stages,
                        chunk_streams=streams, ranks=tuple(ranks))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimResult:
    """Outcome of `Schedule.simulate`. Per-rank tuples are indexed by rank.

    start/finish: [rank][step] times of every op; busy: compute time per rank; exposed_comm: time ops spend
    waiting on their own all-to-alls (zero with per-kind costs); bubble = makespan - busy - exposed_comm (idle
    time waiting for other ranks, point-to-point transfers included); peak_activations: most (chunk,
    micro-batch) forward activations held at once (taken at F, released by the B or BW that consumes them; a W
    afterwards holds only its small inputs and is counted in peak_pending_w).
    """

    makespan: float
    busy: tuple[float, ...]
    bubble: tuple[float, ...]
    peak_activations: tuple[int, ...]
    peak_pending_w: tuple[int, ...]
    start: tuple[tuple[float, ...], ...]
    finish: tuple[tuple[float, ...], ...]
    exposed_comm: tuple[float, ...] = ()

    @property
    def max_bubble(self) -> float:
        return max(self.bubble)


def single_chunk_placement(num_ranks: int) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """Rank r holds stage r (GPipe, 1F1B, ZB1P)."""
    return tuple((r,) for r in range(num_ranks)), tuple((0,) for _ in range(num_ranks))


def dualpipe_placement(num_ranks: int):
    """Chunk 0 = stage r of stream A (enters at rank 0); chunk 1 = stage N-1-r of stream B (enters at N-1)."""
    n = num_ranks
    return tuple((r, n - 1 - r) for r in range(n)), tuple((0, 1) for _ in range(n))


def dualpipev_placement(num_ranks: int):
    """One stream along a V over 2N stages: chunk 0 = stage r, chunk 1 = stage 2N-1-r."""
    n = num_ranks
    return tuple((r, 2 * n - 1 - r) for r in range(n)), tuple((0, 0) for _ in range(n))


def interleaved_placement(num_ranks: int, num_chunks: int):
    """Chunk c of rank r = stage c*N + r (Megatron's interleaved 1F1B)."""
    n = num_ranks
    return (tuple(tuple(c * n + r for c in range(num_chunks)) for r in range(n)),
            tuple((0,) * num_chunks for _ in range(n)))


def parse_ranks(lines: Iterable[str]) -> tuple[tuple[Op, ...], ...]:
    """Parse `str(schedule)`-style lines ("rank 0: 0F0 0F1 ...") back into per-rank ops."""
    out = []
    for line in lines:
        body = line.split(":", 1)[1] if ":" in line else line
        out.append(tuple(Op.parse(t) for t in body.split()))
    return tuple(out)


# --- validation and replay (private) ---------------------------------------------------------------------------


def _validate(s: Schedule) -> None:
    n, nc, mps = s.num_ranks, s.num_chunks, s.microbatches_per_stream
    for r, ops in enumerate(s.ranks):
        seen: dict[tuple[str, int, int], int] = {}
        for i, op in enumerate(ops):
            if op.peer is not None and not (0 <= op.peer < n and op.peer != r):
                raise fail(f"rank {r} step {i} peer", op.peer, f"another rank in 0..{n - 1}")
            for kind, c, m in op.parts() if op.is_compute else ((op.kind, op.chunk, op.mb),):
                if c >= nc or m >= mps:
                    raise fail(f"rank {r} step {i} op", str(op), f"chunk < {nc} and micro-batch < {mps}")
                key = ("B" if kind == "BW" else kind, c, m)
                if key in seen:
                    raise fail(f"rank {r} step {i} op", str(op),
                               f"one {kind} per (chunk, micro-batch) (again after step {seen[key]})")
                seen[key] = i
                if kind in ("B", "BW") and ("F", c, m) not in seen:
                    raise fail(f"rank {r} step {i} op", str(op), f"after the forward {c}F{m}")
                if kind == "W" and ("B", c, m) not in seen:
                    raise fail(f"rank {r} step {i} op", str(op), f"after the input-grad backward {c}B{m}")
                if kind == "BW":
                    seen[("W", c, m)] = i
        for c in range(nc):
            for m in range(mps):
                for k in ("F", "B", "W"):
                    if (k, c, m) not in seen:
                        name = {"F": "F", "B": "B or BW", "W": "W or BW"}[k]
                        raise fail(f"rank {r} ops", f"no {name} for chunk {c} micro-batch {m}", "a complete schedule")
        # a B must be followed by its W (not satisfied by a BW, which would double-count)
        b_only = {(c, m) for op in ops if op.kind == "B" for (_, c, m) in op.parts()}
        w_ops = {(op.chunk, op.mb) for op in ops if op.kind == "W"}
        if b_only != w_ops:
            raise fail(f"rank {r} W ops", sorted(w_ops ^ b_only), "exactly one W per input-grad-only B")
    if any(not op.is_compute for ops in s.ranks for op in ops):
        expected, found = _expected_p2p(s), set()
        for r, ops in enumerate(s.ranks):
            for op in ops:
                if not op.is_compute:
                    key = (r, op.kind, op.chunk, op.mb, op.peer)
                    if key in found:
                        raise fail(f"rank {r} op", str(op), "one transfer per (chunk, micro-batch, direction)")
                    found.add(key)
        if found != expected:
            extra, missing = sorted(found - expected), sorted(expected - found)
            raise fail("point-to-point ops", f"unmatched {extra[:4]}, missing {missing[:4]}",
                       "one SEND/RECV pair per cross-rank dependency")
    _simulate(s, UNIT_COSTS)  # raises on deadlock


def _expected_p2p(s: Schedule) -> set[tuple[int, str, int, int, int]]:
    out = set()
    for d in range(s.num_streams):
        for st in range(s.num_stages - 1):
            (r0, c0), (r1, c1) = s.location(d, st), s.location(d, st + 1)
            if r0 == r1:
                continue
            for m in range(s.microbatches_per_stream):
                out |= {(r0, "SEND_F", c0, m, r1), (r1, "RECV_F", c1, m, r0),
                        (r1, "SEND_B", c1, m, r0), (r0, "RECV_B", c0, m, r1)}
    return out


def _timings(costs: Any) -> tuple[dict[str, tuple[float, float]], float]:
    """{kind: (duration, compute time)} and the point-to-point time, from a per-kind mapping or CommCosts."""
    if hasattr(costs, "timings"):
        return costs.timings(), float(costs.p2p)
    for k in COMPUTE_KINDS:
        if k not in costs:
            raise fail("costs", dict(costs), f"a cost for every compute kind {COMPUTE_KINDS}")
    return {k: (float(costs[k]), float(costs[k])) for k in COMPUTE_KINDS}, 0.0


def _simulate(s: Schedule, costs: Any) -> SimResult:
    timing, p2p = _timings(costs)
    n, S, nc = s.num_ranks, s.num_stages, s.num_chunks
    has_comm = any(not op.is_compute for ops in s.ranks for op in ops)
    # Per (rank, chunk): stream, stage, and whether the neighbouring stages live on another rank.
    where = [[(s.chunk_streams[r][c], s.chunk_stages[r][c]) for c in range(nc)] for r in range(n)]
    remote_prev = [[st > 0 and s.location(d, st - 1)[0] != r for d, st in where[r]] for r in range(n)]
    remote_next = [[st < S - 1 and s.location(d, st + 1)[0] != r for d, st in where[r]] for r in range(n)]
    comm_tag = {"SEND_F": "SF", "SEND_B": "SB", "RECV_F": "RF", "RECV_B": "RB"}

    # Event keys: (tag, stream, mb, stage). F/B = compute done, Bi = input-grad-only B done,
    # SF/SB = sent, RF/RB = received. Each op becomes (cost, deps, produced, activation delta, pending-W delta).
    def compile_op(r: int, op: Op):
        if not op.is_compute:
            d, st = where[r][op.chunk]
            dep = {"SEND_F": ("F", d, op.mb, st), "SEND_B": ("B", d, op.mb, st),
                   "RECV_F": ("SF", d, op.mb, st - 1), "RECV_B": ("SB", d, op.mb, st + 1)}[op.kind]
            remote = (op.kind.startswith("RECV"),)
            return op.kind, (dep,), ((comm_tag[op.kind], d, op.mb, st),), True, 0, 0, 0, remote
        deps, prods, peak_after, remote = [], [], 0, []
        da = dw = 0
        for kind, c, m in op.parts():
            d, st = where[r][c]
            if kind == "F":
                if st > 0:
                    deps.append(("RF", d, m, st) if has_comm and remote_prev[r][c] else ("F", d, m, st - 1))
                    remote.append(remote_prev[r][c] and not has_comm)
                prods.append(("F", d, m, st))
                da += 1
                peak_after = max(peak_after, da)
            elif kind in ("B", "BW"):
                deps.append(("F", d, m, st))
                remote.append(False)
                if st < S - 1:
                    deps.append(("RB", d, m, st) if has_comm and remote_next[r][c] else ("B", d, m, st + 1))
                    remote.append(remote_next[r][c] and not has_comm)
                prods.append(("B", d, m, st))
                da -= 1
                if kind == "B":
                    prods.append(("Bi", d, m, st))
                    dw += 1
            else:
                deps.append(("Bi", d, m, st))
                remote.append(False)
                dw -= 1
        return op.kind, tuple(deps), tuple(prods), False, da, dw, peak_after, tuple(remote)

    # The dependency structure does not depend on costs: build it once per schedule (validate + simulate
    # share it), then bind this call's costs.
    structure = s.__dict__.get("_deps_cache")
    if structure is None:
        structure = [[compile_op(r, op) for op in ops] for r, ops in enumerate(s.ranks)]
        object.__setattr__(s, "_deps_cache", structure)
    cost_of = {k: timing[k][0] for k in COMPUTE_KINDS} | {k: 0.0 for k in COMM_KINDS}
    compiled = [[(cost_of[x[0]],) + x[1:] for x in ops] for ops in structure]
    events: dict[tuple, float] = {}
    waiters: dict[tuple, list[int]] = {}
    idx = [0] * n
    clock = [0.0] * n
    start = [[0.0] * len(ops) for ops in s.ranks]
    finish = [[0.0] * len(ops) for ops in s.ranks]
    peak_a, peak_w = [0] * n, [0] * n
    live_a, live_w = [0] * n, [0] * n
    todo = list(range(n))
    while todo:
        r = todo.pop()
        ops = compiled[r]
        i, t_now, acts, pend = idx[r], clock[r], live_a[r], live_w[r]
        while i < len(ops):
            cost, deps, prods, instant, da, dw, peak_after, remote = ops[i]
            ready = t_now
            blocked = None
            for j, key in enumerate(deps):
                t = events.get(key)
                if t is None:
                    blocked = key
                    break
                if p2p and remote[j]:
                    t += p2p
                if t > ready:
                    ready = t
            if blocked is not None:
                waiters.setdefault(blocked, []).append(r)
                break
            end = ready + cost
            start[r][i], finish[r][i] = ready, end
            t_now = end
            if acts + peak_after > peak_a[r]:
                peak_a[r] = acts + peak_after
            acts += da
            pend += dw
            if pend > peak_w[r]:
                peak_w[r] = pend
            done_at = ready if instant else end
            for key in prods:
                events[key] = done_at
                w = waiters.pop(key, None)
                if w:
                    todo.extend(w)
            i += 1
        idx[r], clock[r], live_a[r], live_w[r] = i, t_now, acts, pend
    stuck = [r for r in range(n) if idx[r] < len(s.ranks[r])]
    if stuck:
        where_s = ", ".join(f"rank {r} at step {idx[r]} ({s.ranks[r][idx[r]]})" for r in stuck[:4])
        raise fail("schedule", s.name, f"a deadlock-free order; blocked: {where_s}")
    makespan = max((f[-1] for f in finish if f), default=0.0)
    busy = tuple(sum(timing[o.kind][1] for o in ops if o.is_compute) for ops in s.ranks)
    exposed = tuple(sum(timing[o.kind][0] - timing[o.kind][1] for o in ops if o.is_compute) for ops in s.ranks)
    return SimResult(makespan=makespan, busy=busy, bubble=tuple(makespan - b - e for b, e in zip(busy, exposed)),
                     peak_activations=tuple(peak_a), peak_pending_w=tuple(peak_w),
                     start=tuple(map(tuple, start)), finish=tuple(map(tuple, finish)), exposed_comm=exposed)
