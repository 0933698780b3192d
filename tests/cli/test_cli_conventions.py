"""The `seekax` command follows argparse conventions, run in-process: errors name the flag and exit 2 without a
traceback, --help explains every flag with its default, --out/--save create missing folders, progress bars."""

import argparse
import io
import json
import sys

import pytest

import seekax.cli.bench
import seekax.cli.schedule
from seekax.cli.main import build_parser, main
from seekax.ir.placement import ExpertPlacement
from seekax.schedules.registry import GENERATORS

OWN_COMMANDS = ("demo", "lower", "schedule", "eplb", "data", "bench")


def _commands(parser, path=()):
    """(argv prefix, parser) for the root and every subcommand, nested ones included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, path + (name,))


COMMANDS = list(_commands(build_parser()))


@pytest.mark.parametrize("path, parser", COMMANDS, ids=[" ".join(p) or "seekax" for p, _ in COMMANDS])
def test_help_explains_every_flag_and_shows_its_default(path, parser, capsys):
    assert main([*path, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # help is wrapped to the terminal width
    assert text.startswith(f"usage: {' '.join(('seekax',) + path)}")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert choice.help, f"subcommand {choice.dest!r} of {parser.prog!r} has no help"
            continue
        assert action.help and action.help != argparse.SUPPRESS, f"{parser.prog} {action.dest} has no help"
        if action.default not in (None, False, [], argparse.SUPPRESS):
            assert f"(default: {action.default})" in text, f"{parser.prog} {action.dest}: default not shown"


def test_demo_help_offers_the_schedules(capsys):
    assert main(["demo", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"--schedule {{{','.join(sorted(GENERATORS))}}}" in out and "(default: dualpipev)" in out


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "w.json"
    path.write_text(json.dumps([list(range(1, 13))]))
    return str(path)


# (argv, the error line). {tmp} and {weights} are filled in per test. Errors found after parsing are exactly one
# line; argparse's own (marked "usage") print the usage block first.
BAD_VALUES = [
    (["demo", "--pp", "3"], "seekax demo: error: argument --microbatches: expected an integer >= 2 * --pp = 6, got 4"),
    (["demo", "--microbatch-size", "6"], "seekax demo: error: argument --microbatch-size: expected a multiple of "
                                         "--ep=4, got 6"),
    (["demo", "--processes", "3"], "seekax demo: error: argument --processes: expected a divisor of 8 and of --ep=4, "
                                   "got 3"),
    (["demo", "--schedule", "pipedream"], "usage"),
    (["lower", "matmul", "--m", "100", "--emit", "jaxpr"], "seekax lower: error: argument --m: "),
    (["lower", "fp8_gemm", "--n", "100", "--emit", "jaxpr"],
     "seekax lower: error: argument --n: 100 is not supported: "),
    (["lower", "mla_decode", "--heads", "0"], "seekax lower: error: argument --heads: expected an integer >= 1, got 0"),
    (["lower", "matmul", "--block-m", "7", "--emit", "jaxpr"], "seekax lower: error: argument --block-m: "),
    (["lower", "matmul", "--dtype", "float32"], "usage"),
    (["schedule", "simulate", "dualpipev", "--ranks", "4", "--microbatches", "4"],
     "seekax schedule simulate: error: argument --microbatches: expected an integer >= 2 * --ranks = 8, got 4"),
    (["schedule", "show", "1f1b", "--ranks", "0", "--microbatches", "4"],
     "seekax schedule show: error: argument --ranks: expected an integer >= 1, got 0"),
    (["schedule", "plan", "zb1p", "--ranks", "2"], "usage"),
    (["eplb", "--weights", "{weights}", "--replicas", "14", "--gpus", "4"],
     "seekax eplb: error: argument --replicas: expected a multiple of --gpus=4, got 14"),
    (["eplb", "--weights", "{tmp}/none.npy", "--replicas", "12", "--gpus", "4"],
     "seekax eplb: error: argument --weights: expected an existing .npy or .json file, got '{tmp}/none.npy'"),
    (["data", "prepare", "{tmp}/store", "--synthetic", "10", "--workers", "0"],
     "seekax data prepare: error: argument --workers: expected an integer >= 1, got 0"),
    (["data", "inspect", "{tmp}/none"],
     "seekax data inspect: error: argument store: expected an existing sample store directory, got '{tmp}/none'"),
    (["data", "verify"], "usage"),
    (["bench", "nope"], "seekax bench: error: argument NAME: expected names among "),
    (["bench", "--json-dir"], "usage"),
]


def test_every_command_has_bad_values():
    assert {argv[0] for argv, _ in BAD_VALUES} == set(OWN_COMMANDS)


@pytest.mark.parametrize("argv, line", BAD_VALUES, ids=[" ".join(a[:3]) for a, _ in BAD_VALUES])
def test_bad_value_names_the_flag_and_exits_2(argv, line, tmp_path, weights, capsys):
    argv = [a.format(tmp=tmp_path, weights=weights) for a in argv]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err and out == ""
    if line == "usage":  # argparse's own: usage, then `prog: error: argument ...`
        assert err.startswith("usage: seekax ") and err.splitlines()[-1].startswith(f"seekax {argv[0]}")
        assert ": error: " in err.splitlines()[-1]
        return
    assert err.count("\n") == 1 and err.startswith(line.format(tmp=tmp_path))


@pytest.mark.parametrize("bug", [TypeError("a bug"), ValueError("When no rounding mode is specified, a bug"),
                                 KeyError("a bug")])
def test_a_bug_keeps_its_traceback(bug, monkeypatch):
    def run(args):
        raise bug

    monkeypatch.setattr(seekax.cli.schedule, "run", run)
    with pytest.raises(type(bug)):
        main(["schedule", "simulate", "1f1b", "--ranks", "2", "--microbatches", "2"])


def test_no_command_and_version(capsys):
    assert main([]) == 2
    assert capsys.readouterr().err.startswith("usage: seekax")
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("seekax ")


def test_out_and_save_create_missing_folders(tmp_path, weights, capsys):
    svg = tmp_path / "a" / "b" / "dp.svg"
    assert main(["schedule", "show", "dualpipe", "--ranks", "4", "--microbatches", "8", "--out", str(svg)]) == 0
    assert svg.read_text().startswith("<svg") and capsys.readouterr().out == f"wrote {svg}\n"
    saved = tmp_path / "c" / "d" / "placement.json"
    assert main(["eplb", "--weights", weights, "--replicas", "12", "--gpus", "4", "--json", "--save", str(saved)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert ExpertPlacement.from_json(saved.read_text()).phy2log.tolist() == out["placement"]["phy2log"]
    store = tmp_path / "e" / "f" / "store"
    assert main(["data", "prepare", str(store), "--synthetic", "20", "--seq-len", "16", "--partitions", "1",
                 "--executor", "inline", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(store), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_records"] > 0 and summary["seq_len"] == 16


def test_big_schedule_pictures_show_progress(tmp_path, monkeypatch, capsys):
    argv = ["schedule", "show", "1f1b", "--ranks", "2", "--microbatches", "2", "--out", str(tmp_path / "s.png")]
    assert main(argv) == 0
    assert "PNG" not in capsys.readouterr().err  # 8 ops: no bar
    monkeypatch.setattr(seekax.cli.schedule, "BIG_PICTURE_OPS", 4)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "draw PNG" in err and "render PNG: 100%" in err and "8/8" in err
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


FAKE_BENCHMARK = """import json, sys
print("table {name}"); print("row 1")
if "--json" in sys.argv:
    json.dump({{"quick": "--quick" in sys.argv}}, open(sys.argv[sys.argv.index("--json") + 1], "w"))
sys.exit({rc})
"""


def test_bench_streams_each_benchmark_under_one_bar(tmp_path, monkeypatch, capsys):
    bench_dir = tmp_path / "benchmarks"
    bench_dir.mkdir()
    (bench_dir / "common.py").write_text("raise SystemExit('common is a helper, not a benchmark')\n")
    (bench_dir / "alpha.py").write_text(FAKE_BENCHMARK.format(name="alpha", rc=0))
    (bench_dir / "beta.py").write_text(FAKE_BENCHMARK.format(name="beta", rc=3))
    monkeypatch.setattr(seekax.cli.bench, "BENCH_DIR", bench_dir)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    json_dir = tmp_path / "j" / "k"
    assert main(["bench", "--quick", "--json-dir", str(json_dir)]) == 3  # a failing benchmark fails the run
    assert capsys.readouterr().out == "== alpha\ntable alpha\nrow 1\n== beta\ntable beta\nrow 1\n"
    assert "bench: 100%" in terminal.getvalue() and "2/2" in terminal.getvalue()
    assert json.loads((json_dir / "alpha.json").read_text()) == {"quick": True}
    assert main(["bench", "alpha"]) == 0
    assert capsys.readouterr().out == "== alpha\ntable alpha\nrow 1\n"


def test_bench_without_the_repository_says_where_benchmarks_live(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(seekax.cli.bench, "BENCH_DIR", tmp_path / "benchmarks")
    assert main(["bench", "--quick"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"seekax bench: error: no benchmarks at {tmp_path / 'benchmarks'}: they live in the "
                          "seekax repository's benchmarks/ folder")



def test_missing_data_extra_is_one_line(monkeypatch, capsys):
    """Without the [data] extra, `seekax demo` names the extra to install in one line (exit 1), no traceback."""
    import builtins

    from seekax.cli.main import main

    real_import = builtins.__import__

    def no_grain(name, *args, **kwargs):
        if name == "grain" or name.startswith("grain."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(__import__("sys").modules, "grain", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_grain)
    assert main(["demo", "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "seekax[data]" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
