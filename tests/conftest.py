"""Test harness: 8 CPU host devices (set before jax is imported), markers, seeded RNG per test."""

import os

# Must precede any jax import: every test sees 8 host devices for shard_map / mesh tests.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
# CPU unless the GPU check asks for the accelerator (scripts/gpu_check.sh sets SEEKAX_TEST_GPU=1).
if os.environ.get("SEEKAX_TEST_GPU") != "1":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from seekax.testing.kernels import seed_from  # noqa: E402


def _hopper_present() -> bool:
    try:
        from seekax.ir.device import is_hopper
        return is_hopper()
    except Exception:  # noqa: BLE001 - no GPU backend at all
        return False


def pytest_collection_modifyitems(config, items):
    if _hopper_present():
        return
    skip = pytest.mark.skip(reason="needs a Hopper (sm_90) GPU; run scripts/gpu_check.sh on one")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A numpy Generator seeded from the test's node id: fresh per test, reproducible per test."""
    return np.random.default_rng(seed_from(request.node.nodeid))


@pytest.fixture
def seed(request) -> int:
    return seed_from(request.node.nodeid)
