"""ZB1P (zero bubble, ZB-H1 of Qi et al. 2023): 1F1B with the backward split into input-grad B and weight-grad W.

B's travel back at the cost of an input-grad only; rank r holds back its first r W's and uses them to fill
the drain, so the bubble drops to (p-1)(F+B-2W) (B = full backward, the DualPipe README's notation) with the
activation memory of 1F1B.
"""

from __future__ import annotations

from collections import deque

from seekax.ir.schedule import Op, Schedule, single_chunk_placement
from seekax.ir.validate import check_int


def zb1p(num_ranks: int, num_microbatches: int) -> Schedule:
    n = check_int("num_ranks", num_ranks, min_value=1)
    m = check_int("num_microbatches", num_microbatches, min_value=1)
    ranks = []
    for r in range(n):
        warm = min(n - 1 - r, m)
        ops = [Op("F", 0, i) for i in range(warm)]
        pending: deque[int] = deque()
        for i in range(m - warm):
            ops += [Op("F", 0, warm + i), Op("B", 0, i)]
            pending.append(i)
            if i >= r:  # the first r weight grads wait for the drain
                ops.append(Op("W", 0, pending.popleft()))
        for i in range(m - warm, m):
            ops.append(Op("B", 0, i))
            pending.append(i)
            ops.append(Op("W", 0, pending.popleft()))
        ops += [Op("W", 0, i) for i in pending]
        ranks.append(tuple(ops))
    stages, streams = single_chunk_placement(n)
    return Schedule(name="zb1p", num_microbatches=m, chunk_stages=stages, chunk_streams=streams, ranks=tuple(ranks))
