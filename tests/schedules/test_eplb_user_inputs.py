"""rebalance_experts on loads a user brings: list/int/float16/bfloat16 inputs, and loads too large for
the float32 accumulation (a clear error naming weight, not a broken placement)."""

import ml_dtypes
import numpy as np
import pytest

from seekax.schedules.eplb import rebalance_experts

README = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86]]
README_PHY2LOG = [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]


@pytest.mark.parametrize("dtype", [None, np.int64, np.int32, np.uint16, np.float16, np.float32,
                                   ml_dtypes.bfloat16])
def test_every_real_dtype_gives_the_reference_placement(dtype):
    """Token counts as a list, torch-like int64, float16 or bfloat16 (all exact here) give the same answer."""
    weight = README if dtype is None else np.asarray(README, dtype)
    placement = rebalance_experts(weight, 16, 4, 2, 8)
    assert placement.phy2log[0].tolist() == README_PHY2LOG


@pytest.mark.parametrize("weight", [np.full((1, 12), 1e39), np.full((2, 12), 3e38, np.float32)])
def test_loads_overflowing_float32_are_a_clear_error(weight):
    """The greedy loops accumulate float32: a layer whose total load overflows it fails up front, naming weight."""
    with pytest.raises(ValueError, match=r"^weight=.*expected .*float32"):
        rebalance_experts(weight, 16, 4, 2, 8)


def test_large_but_representable_loads_still_work():
    weight = np.asarray(README, np.float64) * 1e30  # total ~1.1e33: fine in float32
    assert rebalance_experts(weight, 16, 4, 2, 8).phy2log[0].tolist() == README_PHY2LOG
    rebalance_experts(np.full((1, 12), 2e37), 16, 4, 2, 8)  # total 2.4e38 < float32's max 3.4e38
