"""The lowering's static plan: ticks, slots and transfer tables, checked by replaying the tables in numpy."""

import pytest

from seekax.ir.schedule import parse_ranks
from seekax.lowering import pipeline as lp
from seekax.schedules.passes import add_p2p
from seekax.schedules.registry import GENERATORS, make_schedule

CASES = [(k, n, m) for k in sorted(GENERATORS) for n, m in ((4, 8), (8, 16))] + [("dualpipe", 2, 6), ("1f1b", 1, 3)]


def replay(plan):
    """Run the tables symbolically: every slot holds the (kind, stage, global mb) it was written with, and every
    read must find exactly the value the op needs. Returns the set of (op part, stage, gmb) executed."""
    s, t = plan.schedule, plan.tables
    n, S = s.num_ranks, s.num_stages
    act = [[None] * (plan.num_act_slots + 1) for _ in range(n)]
    grad = [[None] * (plan.num_grad_slots + 1) for _ in range(n)]
    done = set()
    for tick in range(plan.num_ticks):
        out_act, out_grad = [None] * n, [None] * n
        for r in range(n):
            code = int(t["code"][r, tick])
            if code in (lp.F, lp.F_LAST, lp.FBW, lp.FBW_LAST):
                c, slot, g = int(t["f_chunk"][r, tick]), int(t["f_slot"][r, tick]), int(t["f_gmb"][r, tick])
                st = s.chunk_stages[r][c]
                assert bool(t["f_first"][r, tick]) == (st == 0)
                if st > 0:
                    assert act[r][slot] == ("act", st, g), (r, tick)
                act[r][slot] = ("act", st, g)
                done.add(("F", st, g))
                if code in (lp.F_LAST, lp.FBW_LAST):
                    assert st == S - 1
                    grad[r][int(t["f_gslot"][r, tick])] = ("grad", st, g)
                else:
                    out_act[r] = ("act", st + 1, g)
            if code in (lp.B, lp.W, lp.BW, lp.FBW, lp.FBW_LAST):
                c = int(t["b_chunk"][r, tick])
                st = s.chunk_stages[r][c]
                a, gr = act[r][int(t["b_slot"][r, tick])], grad[r][int(t["b_gslot"][r, tick])]
                assert a is not None and gr is not None and a[:2] == ("act", st) and gr[:2] == ("grad", st)
                assert a[2] == gr[2]
                kind = {lp.B: "B", lp.W: "W"}.get(code, "BW")
                done.add((kind, st, a[2]))
                if kind != "W" and st > 0:
                    out_grad[r] = ("grad", st - 1, a[2])
        for d in plan.act_channels:
            for r in range(n):
                slot = int(t[f"recv_act_{d}"][r, tick])
                if slot != plan.num_act_slots:
                    msg = out_act[(r - d) % n]
                    assert msg is not None
                    act[r][slot] = msg
        for d in plan.grad_channels:
            for r in range(n):
                slot = int(t[f"recv_grad_{d}"][r, tick])
                if slot != plan.num_grad_slots:
                    msg = out_grad[(r - d) % n]
                    assert msg is not None
                    grad[r][slot] = msg
    return done


@pytest.mark.parametrize("kind, n, m", CASES)
def test_tables_replay(kind, n, m):
    s = make_schedule(kind, n, m)
    plan = lp.plan_pipeline(s)
    done = replay(plan)
    S, M = s.num_stages, s.num_microbatches
    copies = 2 if kind == "dualpipe" else 1  # every stage runs each micro-batch once, on one of its copies
    assert {(k, st, g) for k, st, g in done if k == "F"} == {("F", st, g) for st in range(S) for g in range(M)}
    back = {(st, g) for k, st, g in done if k in ("B", "BW")}
    assert back == {(st, g) for st in range(S) for g in range(M)}
    assert copies * S == s.num_ranks * s.num_chunks
    # slots never exceed one per (chunk, micro-batch) and usually far fewer
    assert plan.num_act_slots <= s.num_chunks * s.microbatches_per_stream
    assert (plan.tables["code"] != lp.NOOP).sum(axis=1).tolist() == [len(ops) for ops in s.ranks]


def test_slots_follow_memory():
    # 1F1B on 8 ranks x 32 micro-batches: rank 0 holds at most 8 activations, GPipe all 32.
    assert lp.plan_pipeline(make_schedule("1f1b", 8, 32)).num_act_slots <= 9
    assert lp.plan_pipeline(make_schedule("gpipe", 8, 32)).num_act_slots == 32


def test_channels():
    assert lp.plan_pipeline(make_schedule("1f1b", 4, 4)).act_channels == (1,)
    assert lp.plan_pipeline(make_schedule("1f1b", 4, 4)).grad_channels == (3,)
    assert lp.plan_pipeline(make_schedule("dualpipe", 4, 8)).act_channels == (1, 3)
    assert 0 in lp.plan_pipeline(make_schedule("dualpipev", 4, 8)).act_channels  # the turn of the V


def test_p2p_ops_are_ignored_and_describe_prints():
    plan = lp.plan_pipeline(add_p2p(make_schedule("zb1p", 3, 4)))
    text = plan.describe()
    assert text.count("rank ") == 3 and "0W3" in text


def test_rejects_invalid_schedule():
    from seekax.ir.schedule import Schedule, single_chunk_placement

    st, sr = single_chunk_placement(2)
    bad = Schedule(name="bad", num_microbatches=1, chunk_stages=st, chunk_streams=sr,
                   ranks=parse_ranks(["0F0", "0F0 0BW0"]))
    with pytest.raises(ValueError, match="no B or BW"):
        lp.plan_pipeline(bad)


@pytest.mark.parametrize("kind, n, m, lockstep", [("gpipe", 8, 20, 81), ("zb1p", 8, 20, 67), ("1f1b", 8, 20, 100),
                                                  ("dualpipe", 8, 20, 72)])
def test_lockstep_makespan(kind, n, m, lockstep):
    # The SPMD program runs ticks in lock-step: a tick lasts as long as its longest op. With unit-cost ops only
    # (GPipe's F phase then BW phase, ZB1P) that equals the free-running replay; 1F1B and DualPipe pay for
    # mixing F (1) with BW (2) or F&B (3) in one tick.
    s = make_schedule(kind, n, m)
    plan = lp.plan_pipeline(s)
    assert plan.lockstep_makespan() == lockstep
    assert plan.lockstep_makespan() >= s.simulate().makespan


@pytest.mark.parametrize("kind, n, m, lockstep", [("1f1b", 8, 20, 74), ("dualpipe", 8, 20, 63), ("zb1p", 8, 20, 67)])
def test_split_backward_keeps_ticks_unit(kind, n, m, lockstep):
    from seekax.schedules.passes import split_all_backward

    s = split_all_backward(make_schedule(kind, n, m)).validate()
    assert {op.kind for ops in s.ranks for op in ops} <= {"F", "B", "W"}
    plan = lp.plan_pipeline(s)
    assert plan.lockstep_makespan() == plan.num_ticks == lockstep == s.simulate().makespan
    replay(plan)
