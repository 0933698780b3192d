"""The `seekax` command. Each subcommand lives in its own module exposing `register(subparsers)`;
modules that are not present (a feature not yet built) are simply absent from the menu."""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, subcommand) in menu order. A module's register() adds its subparser and sets `func`.
COMMAND_MODULES = (
    "seekax.cli.demo",
    "seekax.cli.lower",
    "seekax.cli.schedule",
    "seekax.cli.eplb",
    "seekax.cli.data",
    "seekax.cli.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seekax",
                                     description="DeepSeek infrastructure for JAX: kernels, schedules, storage.")
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
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:
        from seekax.cli.demo import configure_env

        configure_env(argv)  # host devices must be set before jax is first imported
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        import seekax

        print(f"seekax {seekax.__version__}")
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
