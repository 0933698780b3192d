"""Backend choice, the one place every op decides what runs: "mosaic" (the Hopper kernel), "interpret" (the
same kernel on the CPU interpreter), "xla" (the plain-JAX reference), "auto" (the kernel on sm_90 when it takes
the shape, else the reference).

The contract between an op and its kernel: the op validates its input first (a ValueError for every backend
alike), then hands `run_op` two closures. A kernel raises NotImplementedError, with a one-line reason, for a
valid input it does not take; "mosaic" and "interpret" let that error through, "auto" runs the reference
instead. No other module catches NotImplementedError (`tests/lowering/test_backend.py` greps for it).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, TypeVar

import jax

from seekax.ir.device import H200, is_hopper
from seekax.ir.tiling import SharedMemoryBudgetExceeded
from seekax.ir.validate import check_choice

BACKENDS = ("auto", "mosaic", "interpret", "xla")

log = logging.getLogger(__name__)
T = TypeVar("T")


def check_backend(backend: Any) -> str:
    """The backend argument of every op: one of BACKENDS (a ValueError naming it otherwise)."""
    return check_choice("backend", backend, BACKENDS)


def resolve_backend(backend: str) -> str:
    """"auto" -> "mosaic" on an sm_90 GPU, "xla" elsewhere; any other backend is itself."""
    check_backend(backend)
    if backend == "auto":
        return "mosaic" if is_hopper() else "xla"
    return backend


def run_op(requested: str, *, kernel: Callable[[str], T], reference: Callable[[], T], name: str = "op") -> T:
    """Run one op on the requested backend, after the op's validation.

    kernel(backend): the Mosaic path, called with "mosaic" or "interpret"; raises NotImplementedError for a
    shape it does not take. reference(): the plain-JAX path. "auto" on sm_90 tries the kernel and, when it
    declines, runs the reference (logged at debug level); "auto" elsewhere runs the reference directly.
    """
    backend = resolve_backend(requested)
    if backend == "xla":
        return reference()
    if requested != "auto":
        return kernel(backend)
    try:
        return kernel(backend)
    except NotImplementedError as declined:
        log.debug("%s: the kernel declined (%s); running the reference", name, declined)
        return reference()


def kernel_takes(build: Callable[[], Any]) -> bool:
    """Whether a kernel builder accepts its problem and config: False when it declines the shape
    (NotImplementedError) or the config overflows shared memory. For autotuners that sweep candidate configs."""
    try:
        build()
    except (NotImplementedError, SharedMemoryBudgetExceeded):
        return False
    return True


def num_sms_for(backend: str) -> int:
    """SMs of the device the kernel will run on; H200's count when lowering or interpreting on a CPU."""
    if backend == "mosaic":
        dev = jax.devices()[0]
        if dev.platform == "gpu":
            return dev.core_count
    return H200.sm_count


def interpret_context() -> contextlib.AbstractContextManager:
    """The CPU interpreter with default settings, unless the caller already opened one (for example
    `seekax.testing.interpret_mode(detect_races=True)`): an outer context's settings must win."""
    from jax._src import config as jax_config

    if jax_config.pallas_tpu_interpret_mode_context_manager.value is not None:
        return contextlib.nullcontext()
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams())


def run_kernel(kernel: Callable[..., Any], *args: Any, backend: str) -> Any:
    """Call a Mosaic GPU kernel, under the CPU interpreter when backend == "interpret"."""
    with interpret_context() if backend == "interpret" else contextlib.nullcontext():
        return kernel(*args)
