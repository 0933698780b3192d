"""GPipe, 1F1B, ZB1P, interleaved 1F1B: validity and the bubble formulas under unit costs."""

import pytest

from seekax.schedules.gpipe import gpipe
from seekax.schedules.interleaved import interleaved_1f1b
from seekax.schedules.one_f_one_b import one_f_one_b
from seekax.schedules.passes import add_p2p, merge_bw, split_bw
from seekax.schedules.registry import GENERATORS, make_schedule
from seekax.schedules.zb1p import zb1p

F, B, W = 1, 2, 1  # unit costs; B is the full backward as in the DualPipe README table

SIZES = [(2, 2), (4, 4), (4, 8), (8, 8), (8, 24), (5, 7)]


@pytest.mark.parametrize("p, m", SIZES)
def test_one_f_one_b(p, m):
    r = one_f_one_b(p, m).validate().simulate()
    assert r.bubble == ((p - 1) * (F + B),) * p
    assert r.peak_activations == tuple(min(p - i, m) for i in range(p))


@pytest.mark.parametrize("p, m", SIZES)
def test_gpipe(p, m):
    r = gpipe(p, m).validate().simulate()
    assert r.bubble == ((p - 1) * (F + B),) * p
    assert r.peak_activations == (m,) * p


@pytest.mark.parametrize("p, m", SIZES)
def test_zb1p(p, m):
    r = zb1p(p, m).validate().simulate()
    assert r.bubble == ((p - 1) * (F + B - 2 * W),) * p
    assert r.peak_activations == one_f_one_b(p, m).simulate().peak_activations  # same memory as 1F1B


@pytest.mark.parametrize("p, m, v", [(2, 4, 2), (4, 8, 2), (4, 8, 3), (8, 16, 2), (4, 4, 4)])
def test_interleaved(p, m, v):
    s = interleaved_1f1b(p, m, v).validate()
    assert s.num_stages == p * v and s.location(0, p + 1) == (1, 1)
    r = s.simulate()
    # in units of one chunk op: the (p-1)(F+B) bubble of stage-sized ops, divided by v
    assert r.bubble == ((p - 1) * (F + B),) * p
    assert r.makespan == m * v * (F + B) + (p - 1) * (F + B)


def test_interleaved_errors():
    with pytest.raises(ValueError, match="num_microbatches"):
        interleaved_1f1b(4, 6)
    with pytest.raises(ValueError, match="num_chunks"):
        interleaved_1f1b(4, 8, 0)


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_every_generator_with_p2p(kind):
    s = make_schedule(kind, 4, 8)
    p2p = add_p2p(s).validate()
    assert p2p.compute_only() == s
    assert p2p.simulate().makespan == s.simulate().makespan  # instant transfers change nothing


def test_merge_and_split_backward():
    s = zb1p(4, 8)
    split = split_bw(one_f_one_b(4, 8)).validate()
    assert merge_bw(split) == one_f_one_b(4, 8)
    assert merge_bw(s).validate().simulate().makespan >= s.simulate().makespan


@pytest.mark.parametrize("gen", [gpipe, one_f_one_b, zb1p])
def test_errors(gen):
    with pytest.raises(ValueError, match="num_ranks"):
        gen(0, 4)
    with pytest.raises(ValueError, match="num_microbatches"):
        gen(4, 0)
    with pytest.raises(ValueError, match="kind"):
        make_schedule("pipedream", 4, 4)


GOLDEN = __import__("pathlib").Path(__file__).parent / "golden"


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.txt")), ids=lambda p: p.stem)
def test_golden(path):
    """Generated schedules are pinned: a change in op order must be deliberate (regenerate the file)."""
    kind, pp, mb = path.stem.rsplit("_", 2)
    s = make_schedule(kind, int(pp[2:]), int(mb[2:]))
    assert str(s) + "\n" == path.read_text()
