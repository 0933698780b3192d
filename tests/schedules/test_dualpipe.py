"""DualPipe / DualPipeV against the original's traces and the DualPipe README invariants."""

import json
import pathlib

import pytest

from seekax.ir.schedule import Op, Schedule
from seekax.schedules.dualpipe import dualpipe
from seekax.schedules.dualpipev import dualpipev
from seekax.schedules.passes import add_p2p

REF = pathlib.Path(__file__).resolve().parents[1] / "data" / "dualpipe"  # see tests/data/README.md


def _reference(name):
    return Schedule.from_trace((REF / f"{name}.json").read_text())


@pytest.mark.parametrize("name, gen", [("dualpipe_pp4_mb8", dualpipe), ("dualpipev_pp4_mb8", dualpipev)])
def test_matches_reference_trace(name, gen):
    ref = _reference(name).validate()  # the original's own P2P ops match and do not deadlock here
    mine = gen(ref.num_ranks, ref.num_microbatches).validate()
    for r in range(ref.num_ranks):
        assert mine.ranks[r] == ref.compute_only().ranks[r], f"rank {r}"
    assert mine.simulate().makespan == ref.simulate().makespan


def _mirror(op: Op) -> Op:
    if op.kind == "F&BW":
        return Op("F&BW", 1 - op.chunk, op.mb, 1 - op.b_chunk, op.b_mb)
    return Op(op.kind, 1 - op.chunk, op.mb)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (6, 14), (8, 20), (16, 40)])
def test_dualpipe_invariants(n, m):
    s = dualpipe(n, m).validate()
    for r in range(n):
        assert s.ranks[n - 1 - r] == tuple(map(_mirror, s.ranks[r]))
    res = s.simulate()
    fb, bw, w = 3, 2, 1
    assert res.bubble == (float((n // 2 - 1) * (fb + bw - 3 * w)),) * n
    assert res.makespan == 3 * m + (n // 2 - 1) * 2
    assert res.peak_activations == (n + 1,) * n  # DualPipe README: PP+1 activations per device
    add_p2p(s).validate()


@pytest.mark.parametrize("n, m, makespan", [(4, 8, 26), (4, 10, 32), (8, 20, 66)])
def test_dualpipe_readme_makespans(n, m, makespan):
    assert dualpipe(n, m).simulate().makespan == makespan


@pytest.mark.parametrize("n, m, makespan", [(4, 8, 54), (4, 10, 66), (2, 4, None), (8, 16, None), (3, 7, None)])
def test_dualpipev_is_half_of_dualpipe(n, m, makespan):
    v = dualpipev(n, m).validate()
    d = dualpipe(2 * n, 2 * m)
    assert v.ranks == d.ranks[:n]
    res = v.simulate()
    if makespan is not None:
        assert res.makespan == makespan
    assert res.bubble == (float((n - 1) * 2),) * n
    assert v.num_stages == 2 * n and v.location(0, n) == (n - 1, 1)
    add_p2p(v).validate()


def test_costs_change_makespan_not_order():
    s = dualpipe(4, 8)
    costs = {"F": 2, "B": 2, "W": 1, "BW": 3, "F&BW": 4}
    heavy = s.simulate(costs)
    assert heavy.makespan > s.simulate().makespan
    assert heavy.busy == tuple(sum(costs[o.kind] for o in ops) for ops in s.ranks)
    assert all(f >= st for fs, ss in zip(heavy.finish, heavy.start) for f, st in zip(fs, ss))


@pytest.mark.parametrize("gen, n, m, match", [
    (dualpipe, 3, 8, "num_ranks"), (dualpipe, 4, 6, "num_microbatches"), (dualpipe, 4, 9, "num_microbatches"),
    (dualpipe, 0, 8, "num_ranks"), (dualpipev, 4, 7, "num_microbatches"), (dualpipev, 0, 4, "num_ranks"),
    (dualpipe, 4.0, 8, "num_ranks"),
])
def test_clear_errors(gen, n, m, match):
    with pytest.raises(ValueError, match=match):
        gen(n, m)


def test_trace_export_matches_reference_layout():
    trace = add_p2p(dualpipe(4, 8)).to_trace()
    ref = json.loads((REF / "dualpipe_pp4_mb8.json").read_text()) if (REF / "dualpipe_pp4_mb8.json").exists() else None
    assert trace["kind"] == "dualpipe" and trace["pp"] == 4 and trace["num_chunks"] == 8
    if ref is not None:
        ops = lambda t: [e["op"] for e in t if e["op"] in ("F", "B", "W", "BW", "F&BW")]  # noqa: E731
        for mine, theirs in zip(trace["ranks"], ref["ranks"]):
            assert ops(mine["trace"]) == ops(theirs["trace"])
