"""The communication-aware comparison: DualPipe's overlapped F&B hides the all-to-all; bubbles equal the
DualPipe README formulas evaluated with communication-inclusive op durations; `seekax schedule ... --comm`."""

import pytest

from seekax.cli.main import main
from seekax.ir.schedule_costs import CommCosts
from seekax.schedules.comm_table import comm_table, format_table


@pytest.mark.parametrize("ranks, microbatches, a2a", [(16, 40, 1.0), (8, 20, 1.0), (8, 20, 0.5)])
def test_table_matches_formulas_and_overlap_hides_all_to_all(ranks, microbatches, a2a):
    rows, notes = comm_table(ranks, microbatches, CommCosts.deepseek_v3(a2a=a2a))
    assert not notes
    by = {r.name: r for r in rows}
    for r in rows:
        assert r.bubble == pytest.approx(r.formula_value)
        assert r.busy == pytest.approx(3 * microbatches)  # F + B + W compute per micro-batch per rank
    serial, overlap = by["DualPipe, serial F&B"], by["DualPipe, overlapped F&B"]
    # lone ops expose a2a both ways for every micro-batch; the overlapped pairs hide theirs
    assert by["1F1B"].exposed_comm == pytest.approx(2 * a2a * microbatches)
    assert serial.exposed_comm == pytest.approx(2 * a2a * microbatches)
    assert overlap.exposed_comm < 0.6 * serial.exposed_comm
    assert overlap.makespan < serial.makespan < by["ZB1P"].makespan < by["1F1B"].makespan


def test_deepseek_v3_setting():
    # PP 16, 20 micro-batches per direction, all-to-all = computation per chunk
    rows, _ = comm_table(16, 40, CommCosts.deepseek_v3(a2a=1.0))
    assert [(r.name, r.makespan, r.exposed_comm, r.bubble) for r in rows] == [
        ("1F1B", 275, 80, 75), ("ZB1P", 245, 80, 45), ("DualPipe, serial F&B", 235, 80, 35),
        ("DualPipe, overlapped F&B", 175, 46, 21)]
    text = format_table(rows)
    assert text.splitlines()[0].startswith("| schedule | step time |") and "| 0.64 |" in text


def test_sizes_dualpipe_does_not_admit():
    rows, notes = comm_table(16, 20, CommCosts.deepseek_v3())
    assert [r.name for r in rows] == ["1F1B", "ZB1P"]
    assert notes and "DualPipe" in notes[0] and "32" in notes[0]


def test_cli_simulate_comm(capsys):
    assert main(["schedule", "simulate", "dualpipev", "--ranks", "4", "--microbatches", "10", "--comm", "1"]) == 0
    out = capsys.readouterr().out
    assert "overlapped F&B" in out and "| dualpipev, overlapped F&B |" in out
    assert sum(line.startswith(("   0", "   1", "   2", "   3")) for line in out.splitlines()) == 4


def test_cli_show_comm(tmp_path, capsys):
    svg = tmp_path / "d.svg"
    assert main(["schedule", "show", "dualpipe", "--ranks", "4", "--microbatches", "8", "--comm", "1,0.1",
                 "--out", str(svg)]) == 0
    assert 'class="comm"' in svg.read_text()
    assert main(["schedule", "show", "dualpipe", "--ranks", "4", "--microbatches", "8", "--comm", "1"]) == 0
    assert "~" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["x", "1,2,3", "-1"])
def test_cli_bad_comm(value, capsys):
    assert main(["schedule", "simulate", "1f1b", "--ranks", "4", "--microbatches", "4", "--comm", value]) == 2
    assert "argument --comm" in capsys.readouterr().err
