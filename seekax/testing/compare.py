"""Comparators that explain failures: relative error in float64, DeepEP's calc_diff, worst element reports."""

from __future__ import annotations

from typing import Any

import numpy as np


def _f64(x: Any) -> np.ndarray:
    return np.asarray(np.asarray(x).astype(np.float64))


def rel_err(out: Any, ref: Any) -> float:
    """||out - ref|| / ||ref|| in float64 (Frobenius norms); 0 when both are all-zero."""
    o, r = _f64(out), _f64(ref)
    if o.shape != r.shape:
        raise ValueError(f"out.shape={o.shape}: expected ref.shape={r.shape}")
    num, den = np.linalg.norm(o - r), np.linalg.norm(r)
    if den == 0:
        return float(num)
    return float(num / den)


def calc_diff(x: Any, y: Any) -> float:
    """DeepEP/DeepGEMM's similarity: 1 - 2*sum(x*y) / sum(x^2 + y^2), on x+1 and y+1 (float64)."""
    x, y = _f64(x) + 1.0, _f64(y) + 1.0
    denom = float((x * x + y * y).sum())
    if denom == 0:
        return 0.0
    return float(1.0 - 2.0 * (x * y).sum() / denom)


# Default tolerances per output dtype: (rtol, atol) for elementwise checks.
DTYPE_TOL = {
    "float64": (1e-12, 1e-12),
    "float32": (1e-5, 1e-5),
    "bfloat16": (2 / 128, 2 / 128),  # FlashMLA's ~2 ulp of bf16
    "float16": (2e-3, 2e-3),
}


def assert_close(out: Any, ref: Any, *, rtol: float | None = None, atol: float | None = None,
                 max_rel_err: float | None = None, name: str = "out") -> None:
    """Elementwise |out - ref| <= atol + rtol*|ref| (float64), NaN/inf positions identical, and optionally
    a global relative-error bound. On failure report the worst element, its index and the error norms."""
    o_raw = np.asarray(out)
    o, r = _f64(o_raw), _f64(ref)
    if o.shape != r.shape:
        raise AssertionError(f"{name}.shape={o.shape}: expected {r.shape}")
    d_rtol, d_atol = DTYPE_TOL.get(np.dtype(o_raw.dtype).name, (1e-5, 1e-5))
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    o_nan, r_nan = ~np.isfinite(o), ~np.isfinite(r)
    if not np.array_equal(o_nan, r_nan):
        bad = np.argwhere(o_nan != r_nan)
        raise AssertionError(f"{name}: non-finite positions differ at {len(bad)} places, first {tuple(bad[0])}: "
                             f"out={o[tuple(bad[0])]} ref={r[tuple(bad[0])]}")
    if o.size == 0:
        return
    fin = ~o_nan
    if not np.array_equal(o[o_nan], r[r_nan], equal_nan=True):
        raise AssertionError(f"{name}: non-finite values differ (inf sign or nan vs inf)")
    err = np.abs(np.where(fin, o, 0.0) - np.where(fin, r, 0.0))   # inf - inf never computed (no warning)
    excess = err - (atol + rtol * np.abs(np.where(fin, r, 0.0)))
    worst = np.unravel_index(int(np.argmax(excess)), excess.shape)
    re = rel_err(np.where(fin, o, 0), np.where(fin, r, 0))
    msg = (f"{name}: worst at index {tuple(int(i) for i in worst)}: out={o[worst]!r} ref={r[worst]!r} "
           f"|err|={err[worst]:.3e} (atol={atol:g}, rtol={rtol:g}); max|err|={err.max():.3e}, rel_err={re:.3e}")
    if excess[worst] > 0:
        raise AssertionError(f"{int((excess > 0).sum())} of {o.size} elements out of tolerance. " + msg)
    if max_rel_err is not None and re > max_rel_err:
        raise AssertionError(f"rel_err={re:.3e} > max_rel_err={max_rel_err:g}. " + msg)


def poison(shape, dtype, value: float = np.nan) -> np.ndarray:
    """An output buffer full of `value` (NaN by default) to prove every element gets written."""
    return np.full(shape, value, dtype=dtype)
