"""Pure passes over a Schedule: add point-to-point transfers, merge or split backwards."""

from __future__ import annotations

import dataclasses

from seekax.ir.schedule import Op, Schedule


def add_p2p(schedule: Schedule) -> Schedule:
    """Insert RECV_F/RECV_B right before the compute op that needs a remote input and SEND_F/SEND_B right
    after the op that produces it. Same-rank hand-offs (the turn of DualPipeV's V) need none."""
    s = schedule.compute_only()
    S = s.num_stages
    ranks = []
    for r, ops in enumerate(s.ranks):
        out: list[Op] = []
        for op in ops:
            after: list[Op] = []
            for kind, c, m in op.parts():
                d, st = s.chunk_streams[r][c], s.chunk_stages[r][c]
                if kind == "F":
                    if st > 0 and (peer := s.location(d, st - 1)[0]) != r:
                        out.append(Op("RECV_F", c, m, peer=peer))
                    if st < S - 1 and (peer := s.location(d, st + 1)[0]) != r:
                        after.append(Op("SEND_F", c, m, peer=peer))
                elif kind in ("B", "BW"):
                    if st < S - 1 and (peer := s.location(d, st + 1)[0]) != r:
                        out.append(Op("RECV_B", c, m, peer=peer))
                    if st > 0 and (peer := s.location(d, st - 1)[0]) != r:
                        after.append(Op("SEND_B", c, m, peer=peer))
            out.append(op)
            out += after
        ranks.append(tuple(out))
    return dataclasses.replace(s, ranks=tuple(ranks))


def merge_bw(schedule: Schedule) -> Schedule:
    """Replace every B immediately followed by its own W with one full backward BW."""
    ranks = []
    for ops in schedule.ranks:
        out: list[Op] = []
        for op in ops:
            if op.kind == "W" and out and out[-1].kind == "B" and (out[-1].chunk, out[-1].mb) == (op.chunk, op.mb):
                out[-1] = Op("BW", op.chunk, op.mb)
            else:
                out.append(op)
        ranks.append(tuple(out))
    return dataclasses.replace(schedule, ranks=tuple(ranks))


def split_bw(schedule: Schedule) -> Schedule:
    """Replace every standalone BW by B then W (F&BW pairs are kept: their backward is full by design)."""
    ranks = tuple(tuple(x for op in ops for x in ((Op("B", op.chunk, op.mb), Op("W", op.chunk, op.mb))
                                                  if op.kind == "BW" else (op,)))
                  for ops in schedule.ranks)
    return dataclasses.replace(schedule, ranks=ranks)


def split_all_backward(schedule: Schedule) -> Schedule:
    """Every op to unit pieces: BW -> B, W and F&BW -> F, B, W (in that order). The lowering's lock-step ticks
    then never mix a 1-cost op with a 2- or 3-cost one (see `PipelinePlan.lockstep_makespan`), at the price
    of separate input-grad and weight-grad VJPs (one more stage recompute per backward in seekax's lowering)."""
    ranks = []
    for ops in schedule.ranks:
        out: list[Op] = []
        for op in ops:
            if op.kind == "F&BW":
                out += [Op("F", op.chunk, op.mb), Op("B", op.b_chunk, op.b_mb), Op("W", op.b_chunk, op.b_mb)]
            elif op.kind == "BW":
                out += [Op("B", op.chunk, op.mb), Op("W", op.chunk, op.mb)]
            else:
                out.append(op)
        ranks.append(tuple(out))
    return dataclasses.replace(schedule, ranks=tuple(ranks))
