"""Warp-specialised set-up the Hopper kernels here share: swizzled shared-memory tiles, the register split
between compute and memory warpgroups, and the GEMMs' TMA pipeline over K blocks with its allocations.

Every kernel here runs `num_compute_wgs` compute warpgroups plus one memory warpgroup that only issues TMA
copies; the memory warpgroup gives registers back so the compute warpgroups can hold fp32 accumulators.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

MEMORY_WG_REGISTERS = 40      # per thread, the TMA-issuing warpgroup (setmaxnreg.dec)
COMPUTE_WG_REGISTERS = 232    # per thread, each compute warpgroup (setmaxnreg.inc): 2 x 232 + 40 fits 64 K
WARPGROUP_PARAMS = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def persistent_kernel(body: Callable, out_type: Any, *, num_compute_wgs: int, num_sms: int,
                      tiles: int | None = None):
    """`plgpu.kernel` for a persistent, warp-specialised GEMM: one CTA per SM (no more than `tiles`, the
    output tiles its `nd_loop` over the "sm" axis walks), `num_compute_wgs` compute warpgroups plus the memory
    warpgroup on the "wg" axis, warpgroup lowering semantics."""
    grid = num_sms if tiles is None else min(num_sms, tiles)
    return plgpu.kernel(body, out_type=out_type, grid=(grid,), grid_names=("sm",), num_threads=num_compute_wgs + 1,
                        thread_name="wg", compiler_params=WARPGROUP_PARAMS)


def swizzled(dtype, cols: int) -> tuple:
    """Transforms for a shared-memory tile whose rows hold `cols` elements of `dtype`: (8, s / itemsize) tiling
    and the widest swizzle s (128, 64, 32 or 16 bytes) the row allows; the layout wgmma and TMA read without
    bank conflicts. bf16 rows of 64 or 576 channels and e4m3 rows of 128 or 512 get (8, 128 B) + 128-byte swizzle."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(cols * itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def k_tile_spec(rows: int, block_k: int, transforms: tuple) -> plgpu.BlockSpec:
    """An operand tile [rows, block_k] of a K-major [rows, K] array, the ki-th K block per pipeline step."""
    return plgpu.BlockSpec((rows, block_k), lambda ki: (0, ki), transforms=transforms, memory_space=plgpu.SMEM)


def k_row_spec(cols: int) -> plgpu.BlockSpec:
    """Row ki of a [K blocks, cols] array (per-block scales, M-major) per pipeline step."""
    return plgpu.BlockSpec((1, cols), lambda ki: (ki, 0), memory_space=plgpu.SMEM)


def k_pipeline(*, in_specs: Sequence[plgpu.BlockSpec], k_iters: int, num_compute_wgs: int,
               stages: int) -> Callable[[Callable[..., Any], Callable[..., Any]], Any]:
    """make(body, compute_context) -> the warp-specialised pipeline over `k_iters` K blocks: the memory
    warpgroup streams `in_specs` into `stages` slots, each compute warpgroup runs body(idx, *tiles, carry)
    per block inside compute_context(run_pipeline). Call the result on the CTA's GMEM operands with
    `allocations=` from `pipeline_allocations`."""

    def make(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_iters,),
            memory_registers=MEMORY_WG_REGISTERS,
            in_specs=list(in_specs),
            wg_axis="wg",
            num_compute_wgs=num_compute_wgs,
            max_concurrent_steps=stages,
            compute_context=compute_context,
        )

    return make


def pipeline_allocations(make: Callable[..., Any], *gmem_refs: Any) -> Any:
    """The shared-memory slots and barriers `make`'s pipeline needs for operands shaped like `gmem_refs`:
    allocated once, outside the persistent tile loop, and passed to every launch of the pipeline."""
    ignore = lambda *_, **__: None  # noqa: E731 - the allocations do not depend on the body
    return make(ignore, ignore).get_allocations(*gmem_refs)
