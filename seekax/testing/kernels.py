"""Kernel evidence helpers: Mosaic GPU interpret mode with the race detector, cross-lowering for Hopper."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Callable, Iterator



def seed_from(name: str) -> int:
    """A stable 31-bit seed from a test's name (pytest: request.node.nodeid)."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


@contextlib.contextmanager
def interpret_mode(*, detect_races: bool = True, uninitialized_memory: str = "nan") -> Iterator[None]:
    """Run every Mosaic GPU kernel traced inside on the CPU interpreter (simulated SMEM, TMA, barriers,
    wgmma). With `detect_races`, raise AssertionError if the happens-before detector saw a race."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc

    params = plgpu.InterpretGPUParams(detect_races=detect_races, uninitialized_memory=uninitialized_memory)
    ipc.reset_gpu_interpret_mode_state()
    try:
        with plgpu.force_gpu_interpret_mode(params):
            yield
        # Results must be materialised inside the block by the caller (block_until_ready).
        if detect_races:
            races = ipc.get_races()
            if races is not None and races.races_found:
                raise AssertionError("Mosaic GPU interpret mode detected a data race in the kernel")
    finally:
        ipc.reset_gpu_interpret_mode_state()


def cross_lower(fn: Callable[..., Any], *args: Any, **kwargs: Any):
    """Lower `fn` for CUDA (Hopper) on this CPU machine: runs Mosaic GPU's own passes, including the
    shared-memory budget. `args` may be jax.ShapeDtypeStruct. Returns a `seekax.lowering.inspect.LoweredKernel`."""
    from seekax.lowering.inspect import lower_for_hopper

    return lower_for_hopper(fn, *args, **kwargs)

