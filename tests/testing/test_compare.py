"""The comparators must fail when they should, and say where."""

import numpy as np
import pytest

from seekax.testing import assert_close, calc_diff, rel_err


def test_rel_err_and_calc_diff():
    x = np.arange(1.0, 5.0)
    assert rel_err(x, x) == 0 and calc_diff(x, x) == pytest.approx(0, abs=1e-15)
    assert rel_err(2 * x, x) == pytest.approx(1.0)
    assert calc_diff(x, -x) > 0.5
    with pytest.raises(ValueError, match="shape"):
        rel_err(x, x[:2])


def test_assert_close_reports_worst_element():
    ref = np.zeros((4, 5))
    out = ref.copy()
    out[2, 3] = 1.0
    with pytest.raises(AssertionError, match=r"index \(2, 3\)"):
        assert_close(out, ref, rtol=0, atol=1e-3)
    assert_close(out, ref, rtol=0, atol=1.0)


def test_assert_close_nan_positions_must_match():
    ref = np.ones(3)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(np.array([1.0, np.nan, 1.0]), ref)
    assert_close(np.array([1.0, np.nan]), np.array([1.0, np.nan]))
    with pytest.raises(AssertionError, match="rel_err"):
        assert_close(ref * 1.01, ref, rtol=0.1, max_rel_err=1e-3)
