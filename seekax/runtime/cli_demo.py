"""`seekax demo`: the end-to-end job on the embedded default (8 CPU host devices, a local data directory)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo (train + serve a tiny DeepSeek-V3)", description=__doc__)
    p.set_defaults(func=run)


def run(args) -> int:
    from seekax.runtime import demo

    return demo.main(args)
