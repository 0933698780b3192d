"""Overlapped F&B: the forward's and the backward's sub-steps are interleaved in DeepSeek-V3's order, and in
the lowered program no data dependency runs from one stream's collective to the other stream's computation
inside the tick; a deliberately serialised lowering of the same model is caught by the same check."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from seekax.layers.pipeline import make_pipeline_value_and_grad
from seekax.lowering.pipeline_hlo import fb_async_windows, fb_stream_reports, parse_hlo
from seekax.lowering.pipeline_stages import interleave
from seekax.schedules.registry import make_schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "layers"))
import pipeline_models as pm  # noqa: E402


def test_interleave_is_deepseek_v3_order():
    # forward: attention, dispatch (comm), experts, combine (comm); the backward runs them in reverse:
    # combine_B (comm), experts_B, dispatch_B (comm), attention_B.
    f, b = [False, True, False, True], [True, False, True, False]
    assert interleave(f, b) == (("B", 0), ("F", 0), ("F", 1), ("B", 1), ("B", 2), ("F", 2), ("F", 3), ("B", 3))
    # every step appears once, each stream in its own order, whatever the two sequences
    for f, b in [([False], [True, False, True]), ([True, True], [False]), ([], [False, True]), ([False] * 3, [])]:
        order = interleave(f, b)
        assert [i for s, i in order if s == "F"] == list(range(len(f)))
        assert [j for s, j in order if s == "B"] == list(range(len(b)))


def _lowered(fb_order):
    s = make_schedule("dualpipev", 2, 4)  # F&BW ops on both ranks; stages 1-3 declare sub-steps
    S = s.num_stages
    rng = np.random.default_rng(0)
    params = pm.init_params(rng, S)
    mb, tgt = pm.batch(rng, 4, 8)
    mesh = jax.make_mesh((2, 2), ("pp", "ep"), devices=jax.devices()[:4])
    fn = make_pipeline_value_and_grad(s, pm.stages(S, "ep", substeps=True), pm.loss_fn, mesh=mesh,
                                      param_specs=pm.param_specs(params, "ep"), batch_spec=P("ep"),
                                      fb_order=fb_order)
    return fn.lower(params, (), mb, tgt)


@pytest.fixture(scope="module")
def overlapped():
    return _lowered("overlap")


def test_fb_streams_share_no_data(overlapped):
    reports = fb_stream_reports(overlapped.as_text(dialect="hlo", debug_info=True))
    assert reports, "no F&B branch found in the lowered program"
    for r in reports:
        assert not r.paths, f"{r.computation}: a collective feeds the other stream: {r.paths[0]}"
    # not vacuous: some F&B branch has all-to-alls and computation in both streams
    assert any(min(r.collectives["F"], r.collectives["B"], r.compute["F"], r.compute["B"]) > 0 for r in reports)


def test_xla_cpu_passes_keep_the_streams_apart(overlapped):
    reports = fb_stream_reports(overlapped.compile().as_text())
    assert reports
    assert all(not r.paths for r in reports), [r.paths[0] for r in reports if r.paths]


def test_serialised_lowering_is_caught():
    reports = fb_stream_reports(_lowered("serial").as_text(dialect="hlo", debug_info=True))
    flagged = [r for r in reports if r.paths]
    assert flagged
    path = flagged[0].paths[0]
    assert path[0].startswith("all_to_all") and "optimization_barrier" in path[-1]


HLO = """HloModule m
fused_b {
  p = f32[4] parameter(0)
  ROOT n = f32[4] negate(p), metadata={op_name="x/seekax_fb_backward/neg"}
}
branch {
  arg = (f32[4], f32[4]) parameter(0)
  a = f32[4] get-tuple-element(arg), index=0
  b = f32[4] get-tuple-element(arg), index=1
  s = f32[4] sine(a), metadata={op_name="seekax_fb_forward/sin"}
  x = f32[4] all-to-all(s), dimensions={0}, metadata={op_name="seekax_fb_forward/all_to_all"}
  c = f32[4] cosine(b), metadata={op_name="seekax_fb_backward/cos"}
  y = f32[4] all-to-all(c), dimensions={0}, metadata={op_name="seekax_fb_backward/all_to_all"}
  z = f32[4] add(x, x), metadata={op_name="seekax_fb_forward/add"}
  f = f32[4] fusion(%x), kind=kLoop, calls=%fused_b
  ROOT t = (f32[4], f32[4], f32[4]) tuple(z, y, f)
}
"""


def test_checker_follows_fusions_and_reports_paths():
    comps = parse_hlo(HLO)
    assert set(comps) == {"fused_b", "branch"}
    assert [i.name for i in comps["branch"]][:3] == ["arg", "a", "b"]
    (r,) = fb_stream_reports(HLO)
    assert r.collectives == {"F": 1, "B": 1}
    # x (forward all-to-all) feeds a fusion whose backward instruction reads it: one path
    assert r.paths == (("x", "f"),)
    assert not fb_stream_reports(HLO.replace("calls=%fused_b", "calls=%none"))[0].paths
    # a fusion that holds a backward instruction reading another operand only (CSE across streams): no path
    other = HLO.replace("fusion(%x)", "fusion(%x, %b)").replace("negate(p)", "negate(q)").replace(
        "  p = f32[4] parameter(0)\n", "  p = f32[4] parameter(0)\n  q = f32[4] parameter(1)\n")
    assert not fb_stream_reports(other)[0].paths


def test_async_windows_on_a_scheduled_program():
    sched = """HloModule m, is_scheduled=true
body {
  p = f32[4] parameter(0)
  s = f32[4] all-to-all-start(p), metadata={op_name="seekax_fb_forward/all_to_all"}
  c = f32[4] cosine(p), metadata={op_name="seekax_fb_backward/cos"}
  d = f32[4] tanh(c), metadata={op_name="seekax_fb_backward/tanh"}
  e = f32[4] all-to-all-done(s), metadata={op_name="seekax_fb_forward/all_to_all"}
  ROOT t = (f32[4], f32[4]) tuple(e, d)
}
"""
    (w,) = fb_async_windows(sched)
    assert (w.start, w.stream, w.other_stream_between) == ("s", "F", 2)
