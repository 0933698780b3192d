"""Schedule IR: op printing/parsing, validation errors, replay on hand-made schedules, trace round trip."""

import json

import pytest

from seekax.ir.schedule import Op, Schedule, parse_ranks, single_chunk_placement
from seekax.schedules.one_f_one_b import one_f_one_b
from seekax.schedules.passes import add_p2p


def _sched(lines, m):
    ranks = parse_ranks(lines)
    st, sr = single_chunk_placement(len(ranks))
    return Schedule(name="t", num_microbatches=m, chunk_stages=st, chunk_streams=sr, ranks=ranks)


@pytest.mark.parametrize("text", ["0F3", "1B2", "0W0", "1BW7", "0F3&1BW1", "0SEND_F3@1", "1RECV_B0@2"])
def test_op_round_trip(text):
    assert str(Op.parse(text)) == text


@pytest.mark.parametrize("text", ["F3", "0X1", "0B3&1BW1", "0F"])
def test_op_parse_rejects(text):
    with pytest.raises(ValueError, match="op"):
        Op.parse(text)


def test_op_checks_fields():
    with pytest.raises(ValueError, match="kind"):
        Op("Q", 0, 0)
    with pytest.raises(ValueError, match="peer"):
        Op("SEND_F", 0, 0)
    with pytest.raises(ValueError, match="b_chunk"):
        Op("F&BW", 0, 0)


def test_schedule_str_parses_back():
    s = one_f_one_b(3, 5)
    assert parse_ranks(str(s).splitlines()) == s.ranks


def test_simulate_two_ranks_by_hand():
    # rank 0: F0 F1 . . BW0 . BW1 ; rank 1 starts F0 at t=1.
    s = _sched(["0F0 0F1 0BW0 0BW1", "0F0 0BW0 0F1 0BW1"], 2).validate()
    r = s.simulate()
    assert r.start[1] == (1.0, 2.0, 4.0, 5.0)
    assert r.start[0] == (0.0, 1.0, 4.0, 7.0)
    assert r.makespan == 9.0 and r.bubble == (3.0, 3.0)
    assert r.peak_activations == (2, 1)
    custom = s.simulate({"F": 2, "B": 1, "W": 1, "BW": 1, "F&BW": 3})
    # r0: F0 [0,2] F1 [2,4] BW0 [5,6] BW1 [8,9]; r1: F0 [2,4] BW0 [4,5] F1 [5,7] BW1 [7,8]
    assert custom.makespan == 9.0
    assert custom.busy == (6.0, 6.0)


@pytest.mark.parametrize(
    "lines, match",
    [
        (["0F0 0BW0", "0BW0 0F0"], "after the forward"),
        (["0F0", "0F0 0BW0"], "no B or BW"),
        (["0F0 0F0 0BW0", "0F0 0BW0"], "one F"),
        (["0F0 0B0", "0F0 0BW0"], "W"),
        (["0F0 0W0 0B0", "0F0 0BW0"], "after the input-grad"),
        (["0F0 0BW0 0W0", "0F0 0BW0"], "one W"),
        (["0F1 0BW1", "0F0 0BW0"], "micro-batch < 1"),
    ],
)
def test_validate_rejects(lines, match):
    with pytest.raises(ValueError, match=match):
        _sched(lines, 1).validate()


def test_validate_detects_deadlock():
    # rank 0 waits for micro-batch 1's gradient before sending micro-batch 1's activation.
    s = _sched(["0F0 0BW0 0F1 0BW1", "0F1 0BW1 0F0 0BW0"], 2)
    with pytest.raises(ValueError, match="deadlock"):
        s.validate()


def test_validate_p2p_matching():
    s = add_p2p(one_f_one_b(3, 4)).validate()
    ranks = list(s.ranks)
    ranks[1] = tuple(o for o in ranks[1] if o.kind != "RECV_F" or o.mb != 2)
    with pytest.raises(ValueError, match="missing"):
        Schedule(name="x", num_microbatches=4, chunk_stages=s.chunk_stages, chunk_streams=s.chunk_streams,
                 ranks=tuple(ranks)).validate()
    # a receive placed after the op that needs it deadlocks
    ops = list(s.ranks[1])
    i = next(i for i, o in enumerate(ops) if o.kind == "RECV_F")
    ops.insert(i + 2, ops.pop(i))
    bad = Schedule(name="x", num_microbatches=4, chunk_stages=s.chunk_stages, chunk_streams=s.chunk_streams,
                   ranks=(s.ranks[0], tuple(ops), s.ranks[2]))
    with pytest.raises(ValueError, match="deadlock"):
        bad.validate()


def test_schedule_checks_placement():
    with pytest.raises(ValueError, match="chunk_stages"):
        Schedule(name="x", num_microbatches=1, chunk_stages=((0,), (0,)), chunk_streams=((0,), (0,)),
                 ranks=((), ()))
    with pytest.raises(ValueError, match="num_microbatches"):
        Schedule(name="x", num_microbatches=3, chunk_stages=((0, 1), (1, 0)), chunk_streams=((0, 1), (0, 1)),
                 ranks=((), ()))


def test_trace_round_trip_with_p2p():
    s = add_p2p(one_f_one_b(4, 6)).validate()
    trace = json.loads(json.dumps(s.to_trace()))
    assert any(e["op"] == "WAIT" for e in trace["ranks"][1]["trace"])
    assert Schedule.from_trace(trace) == s


def test_simulate_needs_all_costs():
    with pytest.raises(ValueError, match="costs"):
        one_f_one_b(2, 2).simulate({"F": 1})
