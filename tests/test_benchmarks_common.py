"""benchmarks/common.py: the GPU timing helpers' logic (rotated input sets, partial results), checked on CPU."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402


def test_cold_l2_time_rotates_distinct_copies_on_gpu(monkeypatch):
    seen = []

    def fake_device_time(fn, *args, iters=10):
        seen.append(args)
        jax.block_until_ready(fn(*args))
        return 1.0
    monkeypatch.setattr(common, "device_time", fake_device_time)
    f = jax.jit(lambda x, y: x @ y)
    x, y = jnp.ones((64, 64)), jnp.arange(64.0 * 64).reshape(64, 64)
    monkeypatch.setattr(common, "on_gpu", lambda: False)
    assert common.cold_l2_time(f, (x, y), 32768) == 1.0 and seen[-1] == (x, y)   # CPU: one set, plain timing
    monkeypatch.setattr(common, "on_gpu", lambda: True)
    t = common.cold_l2_time(f, (x, y), 32768)                                      # tiny: capped at 16 sets
    (sets,) = seen[-1]
    assert len(sets) == 16 and t == 1.0 / 16
    assert all(s[1] is not y for s in sets[1:]) and all(np.array_equal(s[1], y) for s in sets)
    n = -(-3 * common.L2_BYTES // (40 << 20))
    common.cold_l2_time(f, (x, y), 40 << 20)
    assert len(seen[-1][0]) == n == 5
    assert common.cold_l2_time(f, (x, y), 1 << 30) == 1.0 and seen[-1] == (x, y)  # big: one set


def test_rel_err_and_partial_rows(tmp_path):
    assert common.rel_err(np.ones(4), np.ones(4)) == 0.0
    assert abs(common.rel_err(np.array([1.0, 1.0]), np.array([1.0, 0.0])) - 1.0) < 1e-12
    path = tmp_path / "rows.json"
    common.save_partial("x", [{"a": 1.5}], str(path))
    data = json.loads(path.read_text())
    assert data["rows"] == [{"a": 1.5}] and data["meta"]["benchmark"] == "x"
