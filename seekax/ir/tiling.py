"""Tile configs for the Mosaic GPU GEMM kernels: frozen, keyword-only, checked against Hopper's rules.

Priority of config sources (one documented order, as tokamax does): explicit argument > config cache
(autotuned winners) > `choose_gemm_config` heuristic.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import numpy as np

from seekax.ir.validate import check_int, fail

SMEM_LIMIT_BYTES = 227 * 1024  # opt-in shared memory per block on sm_90


class SharedMemoryBudgetExceeded(ValueError):
    """A tile config needs more shared memory than one Hopper thread block may use."""

    def __init__(self, needed: int, limit: int = SMEM_LIMIT_BYTES, what: str = "config"):
        self.needed, self.limit = needed, limit
        super().__init__(f"{what} needs {needed} bytes ({needed / 1024:.1f} KiB) of shared memory; "
                         f"the sm_90 limit is {limit} bytes ({limit / 1024:.0f} KiB)")


class WgSplit(enum.StrEnum):
    """Which output dimension the compute warpgroups split between them."""

    M = "m"
    N = "n"


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmTileConfig:
    """One CTA computes a (cta_block_m, cta_block_n) output tile; each compute warpgroup a (block_m, block_n)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    stages: int = 4
    num_compute_wgs: int = 2
    wg_split: WgSplit = WgSplit.N
    epi_block_n: int = 64
    grid_tile_width: int = 1

    def __post_init__(self):
        check_int("block_m", self.block_m, min_value=64, multiple_of=64)  # wgmma M = 64 per warpgroup
        check_int("block_n", self.block_n, min_value=8, multiple_of=8)
        if self.block_n > 256:
            raise fail("block_n", self.block_n, "<= 256 (the widest wgmma N)")
        check_int("block_k", self.block_k, min_value=32, multiple_of=32)
        check_int("stages", self.stages, min_value=2)  # a pipeline needs at least double buffering
        check_int("num_compute_wgs", self.num_compute_wgs, min_value=1)
        if self.num_compute_wgs > 2:
            raise fail("num_compute_wgs", self.num_compute_wgs, "1 or 2")
        object.__setattr__(self, "wg_split", WgSplit(self.wg_split))
        check_int("epi_block_n", self.epi_block_n, min_value=8, multiple_of=8)
        if self.block_n % self.epi_block_n:
            raise fail("epi_block_n", self.epi_block_n, f"a divisor of block_n={self.block_n}")
        check_int("grid_tile_width", self.grid_tile_width, min_value=1)

    @property
    def cta_block_m(self) -> int:
        return self.block_m * (self.num_compute_wgs if self.wg_split == WgSplit.M else 1)

    @property
    def cta_block_n(self) -> int:
        return self.block_n * (self.num_compute_wgs if self.wg_split == WgSplit.N else 1)

    def smem_bytes(self, in_dtype: str, out_dtype: str) -> int:
        """Shared memory of the pipelined operand tiles plus the double-buffered epilogue tile."""
        isz, osz = np.dtype(in_dtype).itemsize, np.dtype(out_dtype).itemsize
        operands = self.stages * self.block_k * (self.cta_block_m + self.cta_block_n) * isz
        epilogue = self.num_compute_wgs * 2 * 64 * self.epi_block_n * osz
        barriers = 8 * 4 * self.stages
        return operands + epilogue + barriers

    def check_smem(self, in_dtype: str, out_dtype: str, limit: int = SMEM_LIMIT_BYTES) -> int:
        need = self.smem_bytes(in_dtype, out_dtype)
        if need > limit:
            raise SharedMemoryBudgetExceeded(need, limit, what=repr(self))
        return need

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["wg_split"] = str(self.wg_split)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GemmTileConfig":
        return cls(**d)


def choose_gemm_config(m: int, n: int, k: int, in_dtype: str, out_dtype: str = "bfloat16",
                       limit: int = SMEM_LIMIT_BYTES) -> GemmTileConfig:
    """Heuristic: the largest wgmma-friendly tiles that divide the problem, then the deepest pipeline that fits."""
    isz = np.dtype(in_dtype).itemsize
    block_k = 128 // isz if k % (128 // isz) == 0 else 64 // isz  # one 128-byte swizzle row per K step
    block_k = max(block_k, 32)
    block_n = next((b for b in (128, 64, 32, 16, 8) if n % (2 * b) == 0), None)
    if block_n is None:
        raise NotImplementedError(f"n={n}: the matmul kernel needs a multiple of 16")
    block_m = 128 if m >= 256 else 64
    best = None
    for stages in (6, 5, 4, 3, 2):
        cfg = GemmTileConfig(block_m=block_m, block_n=block_n, block_k=block_k, stages=stages,
                             epi_block_n=min(64, block_n), grid_tile_width=1)
        if cfg.smem_bytes(in_dtype, out_dtype) <= limit:
            best = cfg
            break
    if best is None:
        raise SharedMemoryBudgetExceeded(
            GemmTileConfig(block_m=block_m, block_n=block_n, block_k=block_k, stages=2).smem_bytes(in_dtype, out_dtype),
            limit)
    # More K steps than stages needed for the pipeline to pay; never more stages than K steps.
    k_steps = math.ceil(k / best.block_k)
    if best.stages > max(k_steps, 2):
        best = dataclasses.replace(best, stages=max(k_steps, 2))
    return best
