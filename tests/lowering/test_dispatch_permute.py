"""Local permute/unpermute (XLA path) against a numpy loop oracle: grouping, order, alignment, weights."""

import jax
import numpy as np
import pytest

from seekax.lowering import dispatch_permute as perm


def oracle(local_idx, g, alignment):
    """Rows grouped by expert ascending, (row, k) order inside; each group padded up to `alignment`."""
    rows, sizes, pos = [], [], {}
    for e in range(g):
        pairs = [(r, k) for r in range(local_idx.shape[0]) for k in range(local_idx.shape[1]) if local_idx[r, k] == e]
        for r, k in pairs:
            pos[(r, k)] = len(rows)
            rows.append(r)
        pad = -len(pairs) % alignment
        rows += [-1] * pad
        sizes.append(len(pairs) + pad)
    return rows, np.array(sizes), pos


@pytest.mark.parametrize("alignment", [1, 4])
@pytest.mark.parametrize("case", ["random", "all_one_expert", "none_local"])
def test_permute_unpermute(rng, alignment, case):
    r, k, g, h = 13, 3, 4, 8
    local_idx = np.where(rng.random((r, k)) < 0.3, -1, rng.integers(0, g, (r, k))).astype(np.int32)
    if case == "all_one_expert":
        local_idx[:] = -1
        local_idx[:, 1] = 2
    elif case == "none_local":
        local_idx[:] = -1
    x = rng.standard_normal((r, h)).astype(np.float32)
    w = rng.random((r, k)).astype(np.float32)
    p = jax.jit(perm.make_permutation, static_argnums=(1, 2))(local_idx, g, alignment)
    rows, sizes, pos = oracle(local_idx, g, alignment)
    np.testing.assert_array_equal(p.group_sizes, sizes)
    got = np.asarray(perm.permute(x, p))
    assert got.shape[0] == perm.permuted_rows(r, k, g, alignment)
    want = np.zeros_like(got)
    for i, src in enumerate(rows):
        if src >= 0:
            want[i] = x[src]
    np.testing.assert_array_equal(got, want)
    y = rng.standard_normal(got.shape).astype(np.float32)
    back = np.asarray(perm.unpermute(y, p, w))
    expect = np.zeros((r, h))
    for (row, kk), i in pos.items():
        expect[row] += w[row, kk] * y[i]
    np.testing.assert_allclose(back, expect, rtol=1e-6, atol=1e-6)
