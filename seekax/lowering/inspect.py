"""Inspect any op at each lowering stage (jaxpr, StableHLO, Mosaic GPU MLIR) and cross-lower for sm_90a
on a CPU machine, so a GPU failure can be reproduced and read without a GPU.

Stages, in order: `jaxpr` -> `stablehlo` (lowered for the "cuda" platform) -> `mosaic` (the Mosaic GPU
module embedded in each `mosaic_gpu` custom call, decoded to MLIR text) -> `report` (shared memory,
threads, grid, wgmma instructions read off the decoded module).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable

import jax

from seekax.ir.tiling import SMEM_LIMIT_BYTES

EMIT_STAGES = ("jaxpr", "stablehlo", "mosaic", "report")


@dataclasses.dataclass(frozen=True)
class KernelReport:
    """What one Mosaic GPU kernel asks of the hardware, read from its lowered module."""

    smem_bytes: int
    threads: tuple[int, int, int]
    grid: tuple[int, int, int]
    wgmma: tuple[str, ...]          # distinct wgmma.mma_async shapes/dtypes, e.g. m64n128k32.f32.e4m3.e4m3
    tma: bool                       # uses cp.async.bulk.tensor

    @property
    def has_wgmma(self) -> bool:
        return bool(self.wgmma)

    @property
    def fits_smem(self) -> bool:
        return self.smem_bytes <= SMEM_LIMIT_BYTES

    def summary(self) -> str:
        return (f"smem {self.smem_bytes} B ({self.smem_bytes / 1024:.1f} KiB of {SMEM_LIMIT_BYTES / 1024:.0f} KiB, "
                f"{'fits' if self.fits_smem else 'OVERFLOWS'}), threads {self.threads}, grid {self.grid}, "
                f"wgmma {', '.join(self.wgmma) if self.wgmma else 'none'}, TMA {'yes' if self.tma else 'no'}")


@dataclasses.dataclass
class LoweredKernel:
    """A function lowered for CUDA on this machine, with its stages available by name."""

    lowered: Any  # jax.stages.Lowered
    jaxpr: str

    def stablehlo(self) -> str:
        return self.lowered.as_text()

    @functools.cached_property
    def mosaic_modules(self) -> list[str]:
        """Each embedded Mosaic GPU module, deserialised and printed as MLIR text."""
        return [decode_mosaic_module(b) for b in _mosaic_payloads(self.lowered.compiler_ir("stablehlo"))]

    @functools.cached_property
    def reports(self) -> list[KernelReport]:
        return [kernel_report(m) for m in self.mosaic_modules]

    def emit(self, stage: str) -> str:
        if stage == "jaxpr":
            return self.jaxpr
        if stage == "stablehlo":
            return self.stablehlo()
        if stage == "mosaic":
            return "\n\n".join(self.mosaic_modules)
        if stage == "report":
            return "\n".join(f"kernel {i}: {r.summary()}" for i, r in enumerate(self.reports))
        raise ValueError(f"stage={stage!r}: expected one of {EMIT_STAGES}")


def lower_for_hopper(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> LoweredKernel:
    """`jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))`; args may be ShapeDtypeStructs."""
    traced = jax.jit(fn, **kwargs).trace(*args)
    jaxpr = str(traced.jaxpr)
    lowered = traced.lower(lowering_platforms=("cuda",))
    return LoweredKernel(lowered=lowered, jaxpr=jaxpr)


def _mosaic_payloads(module) -> list[bytes]:
    """The serialised Mosaic GPU modules inside `stablehlo.custom_call @mosaic_gpu*` ops."""
    from jax._src.lib.mlir import ir

    found: list[bytes] = []

    def visit(op):
        op = op.operation if hasattr(op, "operation") else op
        if op.name == "stablehlo.custom_call":
            target = ir.StringAttr(op.attributes["call_target_name"]).value
            if target.startswith("mosaic_gpu") and "mhlo.backend_config" in op.attributes:
                cfg = ir.DictAttr(op.attributes["mhlo.backend_config"])
                found.append(ir.StringAttr(cfg["module"]).value_bytes)
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    visit(child)

    visit(module.operation)
    return found


def decode_mosaic_module(payload: bytes) -> str:
    """Deserialise a Mosaic GPU module (bytecode + the mosaic_gpu-serde pass) and print it as MLIR."""
    import jax.experimental.mosaic.gpu as mgpu
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir, passmanager

    with mlir.make_ir_context() as ctx, ir.Location.unknown():
        mgpu.dialect.register_dialect(ctx)
        ctx.allow_unregistered_dialects = True
        module = ir.Module.parse(payload)
        passmanager.PassManager.parse("builtin.module(mosaic_gpu-serde{serialize=false})").run(module.operation)
        return str(module)


_LAUNCH = re.compile(
    r"gpu\.launch .*?blocks\([^)]*\) in \(%\w+ = %c(\d+)\w*, %\w+ = %c(\d+)\w*, %\w+ = %c(\d+)\w*\)"
    r" threads\([^)]*\) in \(%\w+ = %c(\d+)\w*, %\w+ = %c(\d+)\w*, %\w+ = %c(\d+)\w*\)"
    r" dynamic_shared_memory_size %c(\d+)")
_WGMMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.([\w.]+)")


def kernel_report(mlir_text: str) -> KernelReport:
    m = _LAUNCH.search(mlir_text)
    if m is None:
        raise ValueError("no gpu.launch with constant grid/threads/shared memory found in the Mosaic module")
    g = tuple(int(x) for x in m.groups())
    return KernelReport(smem_bytes=g[6], grid=g[0:3], threads=g[3:6],
                        wgmma=tuple(sorted(set(_WGMMA.findall(mlir_text)))),
                        tma="cp.async.bulk.tensor" in mlir_text or "nvvm.cp.async.bulk.tensor" in mlir_text)
