"""GPipe: every rank runs all forwards, then all full backwards (bubble (p-1)(F+B), peak memory m)."""

from __future__ import annotations

from seekax.ir.schedule import Op, Schedule, single_chunk_placement
from seekax.ir.validate import check_int


def gpipe(num_ranks: int, num_microbatches: int) -> Schedule:
    n = check_int("num_ranks", num_ranks, min_value=1)
    m = check_int("num_microbatches", num_microbatches, min_value=1)
    ranks = tuple(tuple(Op("F", 0, i) for i in range(m)) + tuple(Op("BW", 0, i) for i in range(m))
                  for _ in range(n))
    stages, streams = single_chunk_placement(n)
    return Schedule(name="gpipe", num_microbatches=m, chunk_stages=stages, chunk_streams=streams, ranks=ranks)
