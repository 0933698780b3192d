"""Visualiser and `seekax schedule`: SVG structure, terminal view, PNG/HTML files, CLI output and errors."""

import xml.etree.ElementTree as ET

import pytest

from seekax.cli.main import main
from seekax.schedules.dualpipe import dualpipe
from seekax.schedules.visualise import default_costs, to_html, to_png, to_svg, to_text

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
             if r.get("fill") != "none"]
    assert sum(float(r.get("width")) for r in lane0) == pytest.approx((sim.makespan - 6) * unit, abs=0.5)
    legend = [g for g in root.iter(NS + "g") if g.get("class") == "legend"]
    assert legend and "overlapped" in ET.tostring(legend[0], encoding="unicode")


def test_costs_scale_boxes():
    s = dualpipe(4, 8)
    costs = default_costs("2,1,1")
    assert costs == {"F": 2.0, "B": 1.0, "W": 1.0, "BW": 2.0, "F&BW": 4.0}
    root = ET.fromstring(to_svg(s, costs, unit=10))
    first = next(r for r in root.iter(NS + "rect") if r.get("fill") not in ("none", "#ffffff", "#f2f2f2"))
    assert float(first.get("width")) == pytest.approx(20.0)


@pytest.mark.parametrize("text", ["1,2", "a,b,c", "1,-1,1"])
def test_bad_costs(text):
    with pytest.raises(ValueError, match="costs"):
        default_costs(text)


def test_terminal_view():
    s = dualpipe(4, 8)
    lines = to_text(s).splitlines()
    assert len(lines) == 4 and all(line.startswith(f"rank  {r}") for r, line in enumerate(lines))
    assert len({len(line) for line in lines}) == 1  # all rows span the makespan
    assert "0F3&1BW1" in lines[0] and "." in lines[1]


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
