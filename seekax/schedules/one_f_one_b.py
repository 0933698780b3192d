"""1F1B (PipeDream-flush): rank r warms up with p-1-r forwards, then alternates one forward and one full
backward, then drains. Same bubble as GPipe, (p-1)(F+B), with at most p-r activations held."""

from __future__ import annotations

from seekax.ir.schedule import Op, Schedule, single_chunk_placement
from seekax.ir.validate import check_int


def one_f_one_b(num_ranks: int, num_microbatches: int) -> Schedule:
    n = check_int("num_ranks", num_ranks, min_value=1)
    m = check_int("num_microbatches", num_microbatches, min_value=1)
    ranks = []
    for r in range(n):
        warm = min(n - 1 - r, m)
        ops = [Op("F", 0, i) for i in range(warm)]
        for i in range(m - warm):
            ops += [Op("F", 0, warm + i), Op("BW", 0, i)]
        ops += [Op("BW", 0, i) for i in range(m - warm, m)]
        ranks.append(tuple(ops))
    stages, streams = single_chunk_placement(n)
    return Schedule(name="1f1b", num_microbatches=m, chunk_stages=stages, chunk_streams=streams, ranks=tuple(ranks))
