"""Backend choice shared by every op: "mosaic" (Hopper), "interpret" (the Mosaic kernel on the CPU
interpreter), "xla" (the plain-JAX reference), "auto" (mosaic on sm_90, xla elsewhere)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import jax

from seekax.ir.device import H200, is_hopper
from seekax.ir.validate import check_choice

BACKENDS = ("auto", "mosaic", "interpret", "xla")


def resolve_backend(backend: str) -> str:
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "mosaic" if is_hopper() else "xla"
    return backend


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
