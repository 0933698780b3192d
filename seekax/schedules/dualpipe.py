"""DualPipe (DeepSeek-V3): two micro-batch streams enter at opposite ends; every rank holds stage r and stage N-1-r.

The planner follows the original's eight steps per rank and emits compute ops only (F, B, W, BW, F&BW); a
pass (`seekax.schedules.passes.add_p2p`) adds the transfers. Chunk 0 of rank r is stage r of stream A (enters
at rank 0), chunk 1 is stage N-1-r of stream B (enters at rank N-1): ranks in the second half run the same
steps as their mirror rank with the two chunks swapped.
"""

from __future__ import annotations

from collections import deque

from seekax.ir.schedule import Op, Schedule, dualpipe_placement
from seekax.ir.validate import check_int, fail


def dualpipe(num_ranks: int, num_microbatches: int) -> Schedule:
    """DualPipe over `num_ranks` (even) ranks; `num_microbatches` counts both streams (the original's
    num_chunks): an even number >= 2 * num_ranks, half of it entering at each end."""
    n = check_int("num_ranks", num_ranks, min_value=2, multiple_of=2)
    m = check_int("num_microbatches", num_microbatches, min_value=1)
    if m % 2 or m < 2 * n:
        raise fail("num_microbatches", m, f"an even number >= 2 * num_ranks = {2 * n}")
    half = n // 2
    ranks = []
    for r in range(n):
        h = min(r, n - 1 - r)
        ranks.append(rank_ops(num_half_ranks=half, half_rank=h, half_num_chunks=m // 2,
                              is_middle=h == half - 1, swap=r >= half))
    stages, streams = dualpipe_placement(n)
    return Schedule(name="dualpipe", num_microbatches=m, chunk_stages=stages, chunk_streams=streams,
                    ranks=tuple(ranks))


def rank_ops(*, num_half_ranks: int, half_rank: int, half_num_chunks: int, is_middle: bool,
             swap: bool) -> tuple[Op, ...]:
    """The compute ops of one rank, in the original's step order. Phase p of the algorithm is chunk p ^ swap;
    W ops take the oldest pending input-grad backward (FIFO), as the original's weight-grad store does."""
    ops: list[Op] = []
    f_next, b_next = [0, 0], [0, 0]
    pending_w: deque[tuple[int, int]] = deque()

    def forward(p: int) -> None:
        ops.append(Op("F", p ^ swap, f_next[p]))
        f_next[p] += 1

    def backward(p: int, zero_bubble: bool = False) -> None:
        c, mb = p ^ swap, b_next[p]
        b_next[p] += 1
        if zero_bubble:
            ops.append(Op("B", c, mb))
            pending_w.append((c, mb))
        else:
            ops.append(Op("BW", c, mb))

    def weight() -> None:
        c, mb = pending_w.popleft()
        ops.append(Op("W", c, mb))

    def forward_backward(p0: int, p1: int) -> None:
        ops.append(Op("F&BW", p0 ^ swap, f_next[p0], p1 ^ swap, b_next[p1]))
        f_next[p0] += 1
        b_next[p1] += 1

    h, nh = half_rank, num_half_ranks
    # Step 1: nF0 -- fill the pipe for the stream entering here.
    for _ in range((nh - h - 1) * 2):
        forward(0)
    # Step 2: nF0F1 -- the other stream arrives; alternate.
    for _ in range(h + 1):
        forward(0)
        forward(1)
    # Step 3: nB1W1F1 -- first backwards of stream 1, weight grads right away (zero bubble).
    for _ in range(nh - h - 1):
        backward(1, zero_bubble=True)
        weight()
        forward(1)
    # Step 4 (main): nF0B1F1B0 -- overlapped forward/backward pairs (the middle ranks do not overlap the first).
    for i in range(half_num_chunks - 2 * nh + h + 1):
        if i == 0 and is_middle:
            forward(0)
            backward(1)
        else:
            forward_backward(0, 1)
        forward_backward(1, 0)
    # Step 5: nB1F1B0
    for _ in range(nh - h - 1):
        backward(1)
        forward_backward(1, 0)
    # Step 6: nB1B0 -- the second half of these backwards split off their weight grads.
    zero_bubble = False
    steps = h + 1
    for i in range(steps):
        if i == steps // 2 and h % 2 == 1:
            zero_bubble = True
        backward(1, zero_bubble)
        if i == steps // 2 and h % 2 == 0:
            zero_bubble = True
        backward(0, zero_bubble)
    # Step 7: nWB0
    for _ in range(nh - h - 1):
        weight()
        backward(0, zero_bubble=True)
    # Step 8: nW -- drain the weight grads.
    for _ in range(h + 1):
        weight()
    return tuple(ops)
