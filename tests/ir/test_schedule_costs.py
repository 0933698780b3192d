"""Communication-aware costs: sub-step timelines, the two-stream F&B, exposed communication, point-to-point
latency, and agreement with per-kind costs when there is no communication."""

import pytest

from seekax.ir.schedule import UNIT_COSTS
from seekax.ir.schedule_costs import CommCosts, SubStepCost, interleave_order
from seekax.schedules.passes import add_p2p
from seekax.schedules.registry import GENERATORS, make_schedule


def test_deepseek_v3_timings():
    c = CommCosts.deepseek_v3(f=1, b=1, w=1, a2a=1)
    t = c.timings()
    # lone ops wait on their own all-to-alls; the overlapped F&B hides both streams' communication
    assert t == {"F": (2.0, 1.0), "B": (2.0, 1.0), "W": (1.0, 1.0), "BW": (3.0, 2.0), "F&BW": (3.0, 3.0)}
    assert c.with_overlap(False).timings()["F&BW"] == (5.0, 3.0)
    # all-to-all twice the computation: the pair is bound by communication (4 units of it, 3 of compute)
    assert CommCosts.deepseek_v3(a2a=2).timings()["F&BW"] == (4.0, 3.0)


@pytest.mark.parametrize("a2a", [0.0, 0.3, 1.0, 2.5])
def test_two_stream_pieces_respect_order_and_resources(a2a):
    pieces = CommCosts.deepseek_v3(f=1.2, b=0.8, w=0.6, a2a=a2a).timeline("F&BW")
    for part in ("F", "B"):
        chain = [p for p in pieces if p.part == part]
        assert all(a.end <= b.start + 1e-12 for a, b in zip(chain, chain[1:]))  # a chain runs in order
    for comm in (False, True):
        res = sorted((p.start, p.end) for p in pieces if p.comm == comm and p.end > p.start)
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(res, res[1:]))  # one thing at a time per stream
    names = [p.name for p in pieces if p.part == "B"]
    assert names == ["combine", "mlp", "dispatch", "attention"]  # the backward runs the steps in reverse


def test_interleave_order_pairs_comm_with_compute():
    order = interleave_order([False, True, False, True], [True, False, True, False])
    assert order == [("B", 0), ("F", 0), ("F", 1), ("B", 1), ("B", 2), ("F", 2), ("F", 3), ("B", 3)]


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_no_communication_equals_per_kind_costs(kind):
    s = make_schedule(kind, 4, 8)
    c = CommCosts.deepseek_v3(f=1, b=1, w=1, a2a=0)
    ref, got = s.simulate({**UNIT_COSTS, "F&BW": 3.0}), s.simulate(c)
    assert got.makespan == ref.makespan and got.busy == ref.busy and got.bubble == ref.bubble
    assert got.exposed_comm == (0.0,) * 4 and ref.exposed_comm == (0.0,) * 4


@pytest.mark.parametrize("kind", ["gpipe", "1f1b", "zb1p", "interleaved"])
def test_lone_ops_expose_all_their_communication(kind):
    # no F&B ops: every forward and backward waits on its own all-to-alls, a2a each way per chunk
    s = make_schedule(kind, 4, 8)
    sim = s.simulate(CommCosts.deepseek_v3(a2a=0.7))
    per_rank = 0.7 * 2 * 8 * s.num_chunks
    assert sim.exposed_comm == pytest.approx((per_rank,) * 4)
    assert [m - b - e for m, b, e in zip([sim.makespan] * 4, sim.busy, sim.exposed_comm)] == pytest.approx(sim.bubble)


def test_point_to_point_latency_by_hand():
    # 2 ranks, 1 micro-batch: F0 [0,1], F1 [1+d, 2+d], BW1 [2+d, 4+d], BW0 [4+2d, 6+2d]
    d = 0.25
    c = CommCosts.deepseek_v3(f=1, b=1, w=1, a2a=0, p2p=d)
    s = make_schedule("1f1b", 2, 1)
    assert s.simulate(c).makespan == pytest.approx(6 + 2 * d)
    assert add_p2p(s).simulate(c).makespan == pytest.approx(6 + 2 * d)  # explicit SEND/RECV: the same
    assert s.simulate(c).bubble == pytest.approx((3 + 2 * d, 3 + 2 * d))  # makespan - F - BW


def test_bad_costs():
    with pytest.raises(ValueError, match="SubStepCost.f"):
        SubStepCost(name="x", f=-1, b=0)
    with pytest.raises(ValueError, match="SubStepCost.w"):
        SubStepCost(name="x", comm=True, f=1, b=1, w=1)
    with pytest.raises(ValueError, match="substeps"):
        CommCosts(substeps=())
    with pytest.raises(ValueError, match="p2p"):
        CommCosts.deepseek_v3(p2p=-1)
    with pytest.raises(ValueError, match="kind"):
        CommCosts.deepseek_v3().timeline("X")
