"""Costs that know communication: per-chunk sub-steps (computation, or an expert all-to-all), pipeline
send/receive time, and whether an F&BW runs its two streams overlapped (DeepSeek-V3's figure 4) or one after the
other. `Schedule.simulate(CommCosts(...))` uses them; the visualiser draws the pieces (`timeline`).

A rank has a compute stream and a communication stream. A lone F, B, W or BW runs its chunk's sub-steps in
order, so its own all-to-alls wait for its computation and are exposed. An overlapped F&BW runs the forward's
steps and the backward's steps (reversed) as two chains on the two streams, each communication step paired with
the other chain's computation (`interleave_order`); a non-overlapped one is the F and then the BW.
"""

from __future__ import annotations

import dataclasses

from seekax.ir.validate import fail


@dataclasses.dataclass(frozen=True, kw_only=True)
class SubStepCost:
    """One sub-step of one chunk: f (forward), b (input-grad backward), w (weight-grad backward) times. A
    communication step's f and b are its forward and backward transfer times, and it has no w."""

    name: str
    comm: bool = False
    f: float
    b: float
    w: float = 0.0

    def __post_init__(self):
        for field in ("f", "b", "w"):
            v = getattr(self, field)
            if not isinstance(v, (int, float)) or v < 0:
                raise fail(f"SubStepCost.{field}", v, "a non-negative number")
        if self.comm and self.w:
            raise fail("SubStepCost.w", self.w, "0 for a communication step (it has no weights)")


@dataclasses.dataclass(frozen=True)
class Piece:
    """One sub-step inside an op, relative to the op's start: part "F" or "B" (the backward of an F&BW, or
    of a B/W/BW op), its name, whether it is communication, start and end."""

    part: str
    name: str
    comm: bool
    start: float
    end: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommCosts:
    """Sub-step costs of one chunk, the point-to-point time of one activation or gradient between ranks, and
    whether F&BW ops overlap their forward and backward streams."""

    substeps: tuple[SubStepCost, ...]
    p2p: float = 0.0
    overlap: bool = True

    def __post_init__(self):
        object.__setattr__(self, "substeps", tuple(self.substeps))
        if not self.substeps or not all(isinstance(s, SubStepCost) for s in self.substeps):
            raise fail("substeps", self.substeps, "a non-empty sequence of SubStepCost")
        if not isinstance(self.p2p, (int, float)) or self.p2p < 0:
            raise fail("p2p", self.p2p, "a non-negative number")

    @staticmethod
    def deepseek_v3(*, f: float = 1.0, b: float = 1.0, w: float = 1.0, a2a: float = 1.0, p2p: float = 0.0,
                    overlap: bool = True) -> "CommCosts":
        """A DeepSeek-V3 chunk: attention and MLP computation (each half of f, b, w), dispatch and combine
        all-to-alls (each half of a2a, forward and backward alike)."""
        return CommCosts(substeps=(SubStepCost(name="attention", f=f / 2, b=b / 2, w=w / 2),
                                   SubStepCost(name="dispatch", comm=True, f=a2a / 2, b=a2a / 2),
                                   SubStepCost(name="mlp", f=f / 2, b=b / 2, w=w / 2),
                                   SubStepCost(name="combine", comm=True, f=a2a / 2, b=a2a / 2)),
                         p2p=p2p, overlap=overlap)

    def with_overlap(self, overlap: bool) -> "CommCosts":
        return dataclasses.replace(self, overlap=overlap)

    # --- per op ------------------------------------------------------------------------------------------
    def timeline(self, kind: str) -> tuple[Piece, ...]:
        """The sub-steps of one op of `kind` (F, B, W, BW, F&BW) with their times from the op's start."""
        fwd = [(s.name, s.comm, s.f) for s in self.substeps]
        bwd = {"B": [(s.name, s.comm, s.b) for s in reversed(self.substeps)],
               "W": [(s.name, False, s.w) for s in reversed(self.substeps) if not s.comm],
               "BW": [(s.name, s.comm, s.b + s.w) for s in reversed(self.substeps)]}
        if kind == "F":
            return _serial("F", fwd)
        if kind in bwd:
            return _serial("B", bwd[kind])
        if kind != "F&BW":
            raise fail("kind", kind, "one of F, B, W, BW, F&BW")
        if not self.overlap:
            f = _serial("F", fwd)
            t = f[-1].end if f else 0.0
            return f + tuple(dataclasses.replace(p, start=p.start + t, end=p.end + t) for p in _serial("B", bwd["BW"]))
        return _two_streams(fwd, bwd["BW"])

    def timings(self) -> dict[str, tuple[float, float]]:
        """{kind: (duration, compute time)} of every compute kind."""
        out = {}
        for kind in ("F", "B", "W", "BW", "F&BW"):
            pieces = self.timeline(kind)
            out[kind] = (max((p.end for p in pieces), default=0.0),
                         sum(p.end - p.start for p in pieces if not p.comm))
        return out

    def unit_costs(self) -> dict[str, float]:
        """The per-kind durations (what a cost mapping would give `simulate`)."""
        return {k: d for k, (d, _) in self.timings().items()}


def interleave_order(f_comm: list[bool], b_comm: list[bool]) -> list[tuple[str, int]]:
    """The overlapped F&B program order: whenever one chain's next step is communication and the other's is
    computation, the two are paired, communication first (the lowering uses the same rule)."""
    order: list[tuple[str, int]] = []
    i = j = 0
    while i < len(f_comm) or j < len(b_comm):
        if i < len(f_comm) and j < len(b_comm):
            order += [("F", i), ("B", j)] if f_comm[i] and not b_comm[j] else [("B", j), ("F", i)]
            i, j = i + 1, j + 1
        elif i < len(f_comm):
            order.append(("F", i))
            i += 1
        else:
            order.append(("B", j))
            j += 1
    return order


def _serial(part: str, steps) -> tuple[Piece, ...]:
    t, out = 0.0, []
    for name, comm, cost in steps:
        out.append(Piece(part=part, name=name, comm=comm, start=t, end=t + cost))
        t += cost
    return tuple(out)


def _two_streams(fwd, bwd) -> tuple[Piece, ...]:
    """List-schedule two chains on a compute and a communication stream, each stream in program order."""
    chains = {"F": fwd, "B": bwd}
    free = {False: 0.0, True: 0.0}  # stream (comm?) -> time it is free
    done = {"F": 0.0, "B": 0.0}  # chain -> end of its last step
    out = []
    for part, i in interleave_order([c for _, c, _ in fwd], [c for _, c, _ in bwd]):
        name, comm, cost = chains[part][i]
        start = max(free[comm], done[part])
        end = start + cost
        free[comm], done[part] = end, end
        out.append(Piece(part=part, name=name, comm=comm, start=start, end=end))
    return tuple(out)
