"""DualPipeV: DualPipe folded into a V on half the devices (one stream over 2N stages on N ranks).

Rank r holds stage r (chunk 0, going down the V) and stage 2N-1-r (chunk 1, coming back up). Its op order is
DualPipe's on 2N ranks for ranks 0..N-1, which is how it is built here.
"""

from __future__ import annotations

from seekax.ir.schedule import Schedule, dualpipev_placement
from seekax.ir.validate import check_int, fail
from seekax.schedules.dualpipe import rank_ops


def dualpipev(num_ranks: int, num_microbatches: int) -> Schedule:
    """DualPipeV over `num_ranks` ranks and `num_microbatches` (>= 2 * num_ranks) micro-batches."""
    n = check_int("num_ranks", num_ranks, min_value=1)
    m = check_int("num_microbatches", num_microbatches, min_value=1)
    if m < 2 * n:
        raise fail("num_microbatches", m, f"an integer >= 2 * num_ranks = {2 * n}")
    ranks = tuple(rank_ops(num_half_ranks=n, half_rank=r, half_num_chunks=m, is_middle=r == n - 1, swap=False)
                  for r in range(n))
    stages, streams = dualpipev_placement(n)
    return Schedule(name="dualpipev", num_microbatches=m, chunk_stages=stages, chunk_streams=streams, ranks=ranks)
