"""Shared argument checks: every failure is a ValueError naming the argument, its value and what was expected."""

from __future__ import annotations

import numbers
from typing import Any, Iterable

import ml_dtypes  # noqa: F401  (registers the bfloat16 and float8 dtype names with numpy)
import numpy as np


def fail(name: str, value: Any, expected: str) -> ValueError:
    """The one error format: `name=value: expected ...`."""
    return ValueError(f"{name}={value!r}: expected {expected}")


def check_int(name: str, value: Any, *, min_value: int | None = 0, multiple_of: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise fail(name, value, "an integer")
    value = int(value)
    if min_value is not None and value < min_value:
        raise fail(name, value, f"an integer >= {min_value}")
    if multiple_of is not None and value % multiple_of:
        raise fail(name, value, f"a multiple of {multiple_of}")
    return value


def is_real_number(value: Any) -> bool:
    """A real number, Python's or numpy's, and not a bool (True would silently count as 1)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = tuple(choices)
    if value not in choices:
        raise fail(name, value, f"one of {choices}")
    return value


def canonical_dtype(name: str, value: Any, allowed: Iterable[str]) -> str:
    """Normalise a dtype-like to its numpy name and check it against `allowed` names."""
    allowed = tuple(allowed)
    try:
        dname = np.dtype(value).name
    except TypeError:
        raise fail(name, value, f"a dtype among {allowed}") from None
    if dname not in allowed:
        raise fail(name, value, f"a dtype among {allowed}")
    return dname


def check_shape(name: str, shape: tuple[int, ...], expected: tuple[int | None, ...]) -> None:
    """Check an array shape against `expected` (None matches any size)."""
    shape = tuple(shape)
    ok = len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise fail(f"{name}.shape", shape, f"shape {want}")


def check_array_dtype(name: str, array: Any, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    dname = np.dtype(array.dtype).name
    if dname not in allowed:
        raise fail(f"{name}.dtype", dname, f"one of {allowed}")
