"""Schedule generators by name, for the CLI, the benchmark and the tests."""

from __future__ import annotations

from typing import Callable

from seekax.ir.schedule import Schedule
from seekax.ir.validate import check_choice
from seekax.schedules.dualpipe import dualpipe
from seekax.schedules.dualpipev import dualpipev
from seekax.schedules.gpipe import gpipe
from seekax.schedules.interleaved import interleaved_1f1b
from seekax.schedules.one_f_one_b import one_f_one_b
from seekax.schedules.zb1p import zb1p

GENERATORS: dict[str, Callable[[int, int], Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "zb1p": zb1p,
    "interleaved": interleaved_1f1b,
    "dualpipe": dualpipe,
    "dualpipev": dualpipev,
}


def make_schedule(kind: str, num_ranks: int, num_microbatches: int) -> Schedule:
    """`kind` in GENERATORS; interleaved uses two chunks per rank."""
    check_choice("kind", kind, GENERATORS)
    return GENERATORS[kind](num_ranks, num_microbatches)
