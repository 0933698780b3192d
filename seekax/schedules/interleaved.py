"""Interleaved 1F1B (Megatron-LM virtual stages): rank r holds chunks c = 0..v-1, chunk c being model stage
c*p + r. Micro-batches go in groups of p through chunk 0, then chunk 1, ...; backwards in the same groups
through the chunks in reverse. The bubble shrinks v-fold against stage-sized ops."""

from __future__ import annotations

from seekax.ir.schedule import Op, Schedule, interleaved_placement
from seekax.ir.validate import check_int, fail


def interleaved_1f1b(num_ranks: int, num_microbatches: int, num_chunks: int = 2) -> Schedule:
    """num_microbatches must be a multiple of num_ranks (Megatron's rule for the grouped order)."""
    n = check_int("num_ranks", num_ranks, min_value=1)
    m = check_int("num_microbatches", num_microbatches, min_value=1)
    v = check_int("num_chunks", num_chunks, min_value=1)
    if m % n:
        raise fail("num_microbatches", m, f"a multiple of num_ranks = {n}")
    total = m * v

    def fwd(k: int) -> Op:
        return Op("F", (k // n) % v, (k // (n * v)) * n + k % n)

    def bwd(k: int) -> Op:
        return Op("BW", v - 1 - (k // n) % v, (k // (n * v)) * n + k % n)

    ranks = []
    for r in range(n):
        warm = min((n - r - 1) * 2 + (v - 1) * n, total)
        ops = [fwd(k) for k in range(warm)]
        for k in range(total - warm):
            ops += [fwd(warm + k), bwd(k)]
        ops += [bwd(k) for k in range(total - warm, total)]
        ranks.append(tuple(ops))
    stages, streams = interleaved_placement(n, v)
    return Schedule(name="interleaved_1f1b", num_microbatches=m, chunk_stages=stages, chunk_streams=streams,
                    ranks=tuple(ranks))
