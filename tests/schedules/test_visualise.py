"""Visualiser and `seekax schedule`: SVG structure, terminal view, PNG/HTML files, CLI output and errors."""

import xml.etree.ElementTree as ET

import pytest

from seekax.cli.main import main
from seekax.ir.schedule_costs import CommCosts
from seekax.schedules.dualpipe import dualpipe
from seekax.schedules.one_f_one_b import one_f_one_b
from seekax.schedules.visualise import COLOURS, default_costs, to_html, to_png, to_svg, to_text
from seekax.schedules.zb1p import zb1p

NS = "{http://www.w3.org/2000/svg}"


def test_dualpipe_svg_structure():
    s = dualpipe(8, 20)
    root = ET.fromstring(to_svg(s))
    lanes = [g for g in root.iter(NS + "g") if g.get("class") == "lane"]
    assert [int(g.get("data-rank")) for g in lanes] == list(range(8))
    for lane, ops in zip(lanes, s.ranks):
        boxes = [g for g in lane.iter(NS + "g") if g.get("class") == "op"]
        assert [b.get("data-op") for b in boxes] == [str(op) for op in ops]  # one box per op, in order
        for b, op in zip(boxes, ops):
            texts = [t.text for t in b.iter(NS + "text")]
            assert texts == [str(mb) for _, _, mb in op.parts()]  # micro-batch numbers in the boxes
    # bubbles: lane width = makespan, and op widths on a lane sum to less (busy < makespan by the bubble)
    sim = s.simulate()
    idle = [r for r in root.iter(NS + "rect") if r.get("class") == "idle"]
    assert len(idle) == 8
    unit = float(idle[0].get("width")) / sim.makespan
    lane0 = [r for b in lanes[0].iter(NS + "g") if b.get("class") == "op" for r in b.iter(NS + "rect")
             if r.get("class") == "piece"]
    assert sum(float(r.get("width")) for r in lane0) == pytest.approx((sim.makespan - 6) * unit, abs=0.5)
    legend = [g for g in root.iter(NS + "g") if g.get("class") == "legend"]
    assert legend and "overlapped" in ET.tostring(legend[0], encoding="unicode")


def _legend_texts(root):
    (legend,) = [g for g in root.iter(NS + "g") if g.get("class") == "legend"]
    return [t.text for t in legend.iter(NS + "text")], legend


def test_legend_right_under_the_lanes_and_only_kinds_present():
    # 1F1B has only forwards and full backwards on one chunk: two entries, no pair, no communication.
    root = ET.fromstring(to_svg(one_f_one_b(4, 8)))
    texts, legend = _legend_texts(root)
    assert texts == ["forward, even chunk", "backward (full), even chunk"]
    lanes_bottom = max(float(r.get("y")) + float(r.get("height")) for r in root.iter(NS + "rect")
                       if r.get("class") == "idle")
    legend_top = min(float(r.get("y")) for r in legend.iter(NS + "rect"))
    assert 0 < legend_top - lanes_bottom <= 12  # nothing (no axis) between the lanes and the legend
    # ZB1P adds input-grad and weight-grad backwards; DualPipe both chunks and the overlapped pair.
    assert _legend_texts(ET.fromstring(to_svg(zb1p(4, 8))))[0] == [
        "forward, even chunk", "backward (input grad), even chunk", "backward (weight grad), even chunk"]
    texts = _legend_texts(ET.fromstring(to_svg(dualpipe(4, 8))))[0]
    assert "forward, odd chunk" in texts and "overlapped F&B pair" in texts and not any("all-to-all" in t
                                                                                        for t in texts)


def test_kinds_differ_in_hue_and_odd_chunks_are_hatched():
    import colorsys

    def hue(colour):
        r, g, b = (int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
        return colorsys.rgb_to_hls(r, g, b)[0] * 360

    kinds = ("F", "B", "BW", "W")
    for c in (0, 1):
        hues = sorted(hue(COLOURS[(k, c)]) for k in kinds)
        gaps = [b - a for a, b in zip(hues, hues[1:])] + [360 - hues[-1] + hues[0]]
        assert min(gaps) > 40, (c, hues)  # four clearly different hues, not shades of one
    for k in kinds:  # chunks of one kind: the same hue family, told apart by lightness and the hatch
        assert abs(hue(COLOURS[(k, 0)]) - hue(COLOURS[(k, 1)])) < 30
    root = ET.fromstring(to_svg(dualpipe(4, 8)))
    hatched = [r for r in root.iter(NS + "rect") if r.get("class") == "hatch"]
    pieces = [r for r in root.iter(NS + "rect") if r.get("class") == "piece"]
    odd = [r for r in pieces if r.get("fill") in {COLOURS[(k, 1)] for k in kinds}]
    assert len(hatched) >= len(odd) > 0


@pytest.mark.parametrize("costs", [{"F": 1.0, "B": 1.0, "W": 1.0, "BW": 2.0, "F&BW": 3.0},
                                   {"F": 2.0, "B": 1.0, "W": 0.5, "BW": 1.5, "F&BW": 3.0}])
def test_overlapped_pair_halves_follow_costs(costs):
    root = ET.fromstring(to_svg(dualpipe(4, 8), costs, unit=10))
    for g in root.iter(NS + "g"):
        if g.get("class") == "op" and "&" in g.get("data-op"):
            f, b = [r for r in g.iter(NS + "rect") if r.get("class") == "piece"]
            share = costs["F"] / (costs["F"] + costs["BW"])
            assert float(f.get("width")) == pytest.approx(10 * costs["F&BW"] * share, abs=0.1)
            assert float(b.get("width")) == pytest.approx(10 * costs["F&BW"] * (1 - share), abs=0.1)
            pair = next(r for r in g.iter(NS + "rect") if r.get("class") == "pair")
            assert float(pair.get("width")) == pytest.approx(10 * costs["F&BW"], abs=0.2)


def test_communication_row_per_rank():
    costs = CommCosts.deepseek_v3(a2a=1.0)
    s = dualpipe(4, 8)
    root = ET.fromstring(to_svg(s, costs, unit=10))
    texts = _legend_texts(root)[0]
    assert texts[-1].startswith("all-to-all")
    for lane in (g for g in root.iter(NS + "g") if g.get("class") == "lane"):
        comp = [r for r in lane.iter(NS + "rect") if r.get("class") == "piece"]
        comm = [r for r in lane.iter(NS + "rect") if r.get("class") == "comm"]
        assert comm and {r.get("y") for r in comm}.isdisjoint({r.get("y") for r in comp})  # a row of its own
        # an overlapped F&B: 4 compute and 4 communication sub-steps, computation back to back (comm hidden)
        pair = next(g for g in lane.iter(NS + "g") if g.get("class") == "op" and "&" in g.get("data-op"))
        cp = sorted((float(r.get("x")), float(r.get("width"))) for r in pair.iter(NS + "rect")
                    if r.get("class") == "piece")
        assert len(cp) == 4 and len([r for r in pair.iter(NS + "rect") if r.get("class") == "comm"]) == 4
        assert all(abs(x0 + w0 - x1) < 0.2 for (x0, w0), (x1, _) in zip(cp, cp[1:]))
        assert sum(w for _, w in cp) == pytest.approx(30.0, abs=0.5)  # F + B + W compute of the pair


def test_costs_scale_boxes():
    s = dualpipe(4, 8)
    costs = default_costs("2,1,1")
    assert costs == {"F": 2.0, "B": 1.0, "W": 1.0, "BW": 2.0, "F&BW": 4.0}
    root = ET.fromstring(to_svg(s, costs, unit=10))
    first = next(r for r in root.iter(NS + "rect") if r.get("class") == "piece")
    assert float(first.get("width")) == pytest.approx(20.0)


@pytest.mark.parametrize("text", ["1,2", "a,b,c", "1,-1,1"])
def test_bad_costs(text):
    with pytest.raises(ValueError, match="costs"):
        default_costs(text)


def test_terminal_view_rows():
    s = dualpipe(4, 8)
    lines = to_text(s, layout="rows").splitlines()
    assert len(lines) == 4 and all(line.startswith(f"rank  {r}") for r, line in enumerate(lines))
    assert len({len(line) for line in lines}) == 1  # all rows span the makespan
    assert "0F3&1BW1" in lines[0] and "." in lines[1]
    assert to_text(dualpipe(16, 32)).splitlines()[0].startswith("rank  0 0F0|")  # many ranks: rows


def test_terminal_view_columns_fit_a_terminal():
    s = dualpipe(4, 8)
    lines = to_text(s).splitlines()  # 4 ranks: time down, ranks across
    assert lines[0].split() == ["time", "rank", "0", "rank", "1", "rank", "2", "rank", "3"]
    assert max(map(len, lines)) <= 100
    sim = s.simulate()
    assert len(lines) == 1 + int(sim.makespan)  # one row per time unit (the shortest op)
    for r, ops in enumerate(s.ranks):  # every op's label appears in its rank's column, in order
        col = lines[0].index(f"rank {r}")
        cells = [line[col:col + 10].split()[0] for line in lines[1:] if len(line) > col and line[col:col + 10].strip()]
        assert [c for c in cells if c not in ("|", ".")] == [str(op) for op in ops]
    comm = to_text(s, CommCosts.deepseek_v3()).splitlines()
    assert "~" in "".join(comm) and max(map(len, comm)) <= 100


def test_png_and_html(tmp_path):
    s = dualpipe(4, 8)
    to_png(s, str(tmp_path / "d.png"))
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = to_html(s)
    assert page.startswith("<!doctype html>") and "<svg" in page and "peak activations" in page


def test_cli_simulate(capsys):
    assert main(["schedule", "simulate", "dualpipe", "--ranks", "8", "--microbatches", "20"]) == 0
    out = capsys.readouterr().out
    assert "makespan 66" in out and "(PP/2-1)(F&B+B-3W)" in out
    line = next(x for x in out.splitlines() if "(PP/2-1)" in x)
    assert line.split()[-2] == "6"


def test_cli_show(tmp_path, capsys):
    out_svg = tmp_path / "z.svg"
    assert main(["schedule", "show", "zb1p", "--ranks", "4", "--microbatches", "8", "--out", str(out_svg)]) == 0
    ET.parse(out_svg)
    assert main(["schedule", "show", "interleaved", "--ranks", "2", "--microbatches", "4", "--chunks", "3"]) == 0
    assert capsys.readouterr().out.count("rank ") == 2


@pytest.mark.parametrize("argv", [
    ["schedule", "show", "dualpipe", "--ranks", "3", "--microbatches", "8"],
    ["schedule", "simulate", "1f1b", "--ranks", "4", "--microbatches", "4", "--costs", "x"],
    ["schedule", "show", "1f1b", "--ranks", "4", "--microbatches", "4", "--out", "a.txt"],
])
def test_cli_errors(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"seekax schedule {argv[1]}: error: argument --") and "Traceback" not in err


def test_cli_plan(capsys):
    assert main(["schedule", "plan", "dualpipe", "--ranks", "4", "--microbatches", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dualpipe: 16 ticks") and out.count("rank ") == 4
