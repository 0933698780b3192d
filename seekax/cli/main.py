"""The `seekax` command. Each subcommand lives in its own module exposing `register(subparsers)`;
modules that are not present (a feature not yet built) are simply absent from the menu.

Conventions every subcommand gets from here: usage errors exit 2 with one `seekax CMD: error: ...` line that
names the flag (argparse's own errors, and library ValueError / NotImplementedError, see cli/parser.py);
other exceptions are bugs and keep their traceback; output piped into a reader that stops early (`| head`)
ends quietly with exit 0."""

from __future__ import annotations

import importlib
import os
import sys

from seekax.cli.parser import CommandParser
from seekax.storage.extras import MissingExtraError

# (module, subcommand) in menu order. A module's register() adds its subparser and sets `func`.
COMMAND_MODULES = (
    "seekax.cli.demo",
    "seekax.cli.lower",
    "seekax.cli.schedule",
    "seekax.cli.eplb",
    "seekax.cli.data",
    "seekax.cli.bench",
    "seekax.cli.generate",
    "seekax.cli.train",
)


def build_parser() -> CommandParser:
    parser = CommandParser(prog="seekax", description="DeepSeek infrastructure for JAX: kernels, schedules, storage.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (0 ok, 1 a check failed, 2 a usage error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:
        from seekax.cli.demo import configure_env

        configure_env(argv)  # host devices must be set before jax is first imported
    elif argv[:1] == ["train"]:
        from seekax.cli.train import configure_env

        configure_env(argv)
    try:
        return _run(build_parser(), argv)
    except BrokenPipeError:
        _quiet_stdout()
        return 0


def _run(parser: CommandParser, argv: list[str]) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or argparse's usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    if args.version:
        import seekax

        print(f"seekax {seekax.__version__}")
        return 0
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        rc = int(args.func(args) or 0)
    except (ValueError, NotImplementedError) as e:
        message = args.cli_parser.describe(e)
        if message is None:
            raise
        sys.stdout.flush()
        return args.cli_parser.fail_usage(message)
    except MissingExtraError as e:  # an optional dependency group is not installed: one line, exit 1
        sys.stdout.flush()
        print(f"{args.cli_parser.prog}: error: {e}", file=sys.stderr)
        return 1
    sys.stdout.flush()  # a closed pipe surfaces here rather than at interpreter exit
    return rc


def _quiet_stdout() -> None:
    """The reader of stdout went away (`seekax ... | head`): send what is left to devnull, as Python's docs
    recommend, so the flush at exit raises nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (an in-process capture)
        pass


if __name__ == "__main__":
    sys.exit(main())
