"""cli/parser.py: library errors become one usage line naming the flag; defaults shown in help."""

import argparse

import pytest

from seekax.cli.parser import CommandParser
from seekax.ir.validate import check_int, fail


def _parser() -> CommandParser:
    p = CommandParser(prog="seekax demo-cmd", params={"num_ranks": "ranks", "a.dtype": "dtype"})
    p.add_argument("store", help="a positional")
    p.add_argument("--ranks", type=int, default=4, help="pipeline ranks")
    p.add_argument("--seq-len", type=int, default=8, help="tokens")
    p.add_argument("--dtype", default="bfloat16", help="operand dtype")
    p.add_argument("--out", default=None, help="a file (default: the terminal)")
    p.add_argument("--quiet", action="store_true", help="no progress")
    return p


def _raised(check, *args, **kwargs) -> ValueError:
    with pytest.raises(ValueError) as info:
        check(*args, **kwargs)
    return info.value


@pytest.mark.parametrize("error, line", [
    # a declared parameter name -> its flag, in the subject and inside the expectation
    (_raised(check_int, "num_ranks", 0, min_value=1), "argument --ranks: expected an integer >= 1, got 0"),
    (fail("seq_len", 3, "a multiple of num_ranks=2"), "argument --seq-len: expected a multiple of --ranks=2, got 3"),
    # a parameter named like the dest needs no declaration; a positional is named like argparse names it
    (fail("store", "x", "an existing store"), "argument store: expected an existing store, got 'x'"),
    # an attribute of a parameter keeps its full name after the flag
    (fail("store.shape", (3,), "(n, 2)"), "argument store: expected (n, 2), got store.shape=(3,)"),
    # an element of a parameter (an index, then maybe an attribute) is named the same way
    (fail("store[1]", 7, "an int"), "argument store: expected an int, got store[1]=7"),
    (fail("store[1, 0].dtype", "f4", "int32"), "argument store: expected int32, got store[1, 0].dtype='f4'"),
    (fail("rows[0]", 5, "a multiple of 64"), "rows[0]=5: expected a multiple of 64"),
    # a value holding ': ' ends at the first ': expected'
    (fail("out", "a: b", "a .svg file"), "argument --out: expected a .svg file, got 'a: b'"),
    # no argument fed it: the library's message as it is
    (fail("rows", 5, "a multiple of 64"), "rows=5: expected a multiple of 64"),
    # what a kernel does not support, named by the flag that asked for it
    (NotImplementedError("seq_len=100: the kernel needs a multiple of 64"),
     "argument --seq-len: 100 is not supported: the kernel needs a multiple of 64"),
    (NotImplementedError("a.dtype=float32: the kernel takes bfloat16"),
     "argument --dtype: float32 is not supported: the kernel takes bfloat16"),
    (NotImplementedError("ranks=2, seq_len=0: nothing to launch"),
     "not supported: --ranks=2, --seq-len=0: nothing to launch"),
    (NotImplementedError("autotuning needs a Hopper GPU"), "not supported: autotuning needs a Hopper GPU"),
])
def test_describe_names_the_flag(error, line):
    assert _parser().describe(error) == line


@pytest.mark.parametrize("error", [ValueError("When no rounding mode is specified"), ValueError("x=1 no colon"),
                                   ValueError("")])
def test_describe_leaves_other_value_errors_to_the_traceback(error):
    assert _parser().describe(error) is None


def test_prose_and_config_reprs_keep_their_words():
    p = _parser()
    # only declared names are rewritten, and not inside longer identifiers or after a dot or dash
    msg = "Config(block_m=64, num_ranks_total=3, x.num_ranks=1, --num_ranks): num_ranks"
    assert p.describe(fail("seq_len", 1, msg)) == (
        "argument --seq-len: expected Config(block_m=64, num_ranks_total=3, x.num_ranks=1, --num_ranks): --ranks, "
        "got 1")


def test_fail_usage_is_one_line_and_exit_2(capsys):
    assert _parser().fail_usage("argument --ranks: expected more") == 2
    captured = capsys.readouterr()
    assert captured.err == "seekax demo-cmd: error: argument --ranks: expected more\n" and captured.out == ""


def test_help_shows_defaults_except_unset_and_switches():
    text = _parser().format_help()
    assert "pipeline ranks (default: 4)" in text and "operand dtype (default: bfloat16)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "a file (default: the terminal)" in text


def test_subparsers_share_the_class_and_record_themselves():
    root = CommandParser(prog="seekax")
    sub = root.add_subparsers(dest="command")
    leaf = sub.add_parser("leaf", help="a leaf", params={"num_ranks": "ranks"})
    leaf.add_argument("--ranks", type=int, default=1, help="ranks")
    assert isinstance(leaf, CommandParser) and leaf.formatter_class is root.formatter_class
    args = root.parse_args(["leaf", "--ranks", "3"])
    assert args.cli_parser is leaf and leaf.prog == "seekax leaf"
    assert root.parse_args([]).cli_parser is root
    assert leaf.flag_for("num_ranks") == "--ranks" and leaf.flag_for("ranks") == "--ranks"
    assert leaf.flag_for("help") == "-h/--help" and leaf.flag_for("nothing") is None
    assert isinstance(root, argparse.ArgumentParser)
