"""Tile configs for the FP8 (DeepGEMM-style) Mosaic GPU GEMMs: hardware rules, shared-memory accounting,
a heuristic and the candidate list the autotuner sweeps.

Each pipeline step covers exactly one 128-wide K block (the scale granularity), so a step's wgmma result is
promoted (scaled by a_scale[row] * b_scale) into the fp32 main accumulator once per step. Each compute
warpgroup holds two fp32 accumulators of (block_m, block_n): 64 x 128 costs 128 registers per thread.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from seekax.ir.fp8 import ACT_BLOCK, SCALE_BLOCK
from seekax.ir.tiling import SMEM_LIMIT_BYTES, SharedMemoryBudgetExceeded, WgSplit
from seekax.ir.validate import check_int, fail

FP8_BLOCK_K = SCALE_BLOCK   # one scale block per pipeline step; also one 128-byte swizzle row of e4m3


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fp8TileConfig:
    """One CTA computes (cta_block_m, cta_block_n) of the output; each compute warpgroup (block_m, block_n)."""

    block_m: int = 64
    block_n: int = 128
    stages: int = 4
    num_compute_wgs: int = 2
    wg_split: WgSplit = WgSplit.M
    epi_block_n: int = 64
    grid_tile_width: int = 1

    def __post_init__(self):
        check_int("block_m", self.block_m, min_value=64, multiple_of=64)   # wgmma M = 64 per warpgroup
        if self.block_m > 128:
            raise fail("block_m", self.block_m, "64 or 128 (two fp32 accumulators must fit the registers)")
        check_int("block_n", self.block_n, min_value=16, multiple_of=16)
        if SCALE_BLOCK % self.block_n:
            raise fail("block_n", self.block_n, f"a divisor of {SCALE_BLOCK} (one b_scale per warpgroup tile)")
        if self.block_m * self.block_n > 64 * 128:
            raise fail("block_m", self.block_m, f"block_m * block_n <= 8192 (registers), got block_n={self.block_n}")
        check_int("stages", self.stages, min_value=2)
        check_int("num_compute_wgs", self.num_compute_wgs, min_value=1)
        if self.num_compute_wgs > 2:
            raise fail("num_compute_wgs", self.num_compute_wgs, "1 or 2")
        object.__setattr__(self, "wg_split", WgSplit(self.wg_split))
        check_int("epi_block_n", self.epi_block_n, min_value=16, multiple_of=16)
        if self.block_n % self.epi_block_n:
            raise fail("epi_block_n", self.epi_block_n, f"a divisor of block_n={self.block_n}")
        check_int("grid_tile_width", self.grid_tile_width, min_value=1)

    @property
    def block_k(self) -> int:
        return FP8_BLOCK_K

    @property
    def cta_block_m(self) -> int:
        return self.block_m * (self.num_compute_wgs if self.wg_split == WgSplit.M else 1)

    @property
    def cta_block_n(self) -> int:
        return self.block_n * (self.num_compute_wgs if self.wg_split == WgSplit.N else 1)

    def smem_bytes(self, out_itemsize: int = 2, col_scales: bool = False, tile_epilogue: bool = False) -> int:
        """Pipelined e4m3 A/B tiles + a_scale rows per stage (+ per-column b scales for the k-grouped
        kernel), the double-buffered [64, epi_block_n] epilogue (tile_epilogue: one whole [block_m, block_n]
        tile per warpgroup instead, the grouped contiguous kernel's), barriers."""
        per_stage = FP8_BLOCK_K * (self.cta_block_m + self.cta_block_n) + 4 * self.cta_block_m
        per_stage += 4 * self.cta_block_n if col_scales else 0
        rows, cols = (self.block_m, self.block_n) if tile_epilogue else (2 * 64, self.epi_block_n)
        epilogue = self.num_compute_wgs * rows * cols * out_itemsize
        barriers = 8 * 4 * self.stages + 64
        return self.stages * per_stage + epilogue + barriers

    def check_smem(self, out_itemsize: int = 2, limit: int = SMEM_LIMIT_BYTES, col_scales: bool = False,
                   tile_epilogue: bool = False) -> int:
        need = self.smem_bytes(out_itemsize, col_scales, tile_epilogue)
        if need > limit:
            raise SharedMemoryBudgetExceeded(need, limit, what=repr(self))
        return need

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["wg_split"] = str(self.wg_split)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Fp8TileConfig":
        return cls(**d)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fp8SwapAbConfig:
    """The small-M (decode) dense kernel's tiles: it computes out^T = B A^T, so B's rows (the output's columns)
    fill wgmma's fixed 64-row side and the few tokens its N side (a multiple of 8). A token tile of
    `block_tokens` rows replaces the 64-row activation tile an M of 1..64 would otherwise pad to, and each CTA
    streams `cta_rows` rows of B, the bytes that bound a decode GEMM."""

    block_rows: int = 64         # B rows per compute warpgroup (wgmma M)
    block_tokens: int = 64       # tokens per tile (wgmma N)
    num_compute_wgs: int = 1
    stages: int = 8
    grid_tile_width: int = 1

    def __post_init__(self):
        check_int("block_rows", self.block_rows, min_value=64, multiple_of=64)
        if SCALE_BLOCK % self.block_rows:
            raise fail("block_rows", self.block_rows, f"64 or 128 (a divisor of {SCALE_BLOCK}: one b_scale per tile)")
        check_int("block_tokens", self.block_tokens, min_value=8, multiple_of=8)
        if self.block_rows * self.block_tokens > 64 * 128:
            raise fail("block_tokens", self.block_tokens,
                       f"block_rows * block_tokens <= 8192 (registers), got block_rows={self.block_rows}")
        check_int("stages", self.stages, min_value=2)
        check_int("num_compute_wgs", self.num_compute_wgs, min_value=1)
        if self.num_compute_wgs > 2:
            raise fail("num_compute_wgs", self.num_compute_wgs, "1 or 2")
        check_int("grid_tile_width", self.grid_tile_width, min_value=1)

    @property
    def cta_rows(self) -> int:
        return self.block_rows * self.num_compute_wgs

    def smem_bytes(self, out_itemsize: int = 2) -> int:
        """Pipelined e4m3 B rows and token tiles + token scales per stage, one [tokens, rows] output tile per
        warpgroup, barriers."""
        per_stage = FP8_BLOCK_K * (self.cta_rows + self.block_tokens) + 4 * self.block_tokens
        epilogue = self.num_compute_wgs * self.block_tokens * self.block_rows * out_itemsize
        return self.stages * per_stage + epilogue + 8 * 4 * self.stages + 64

    def check_smem(self, out_itemsize: int = 2, limit: int = SMEM_LIMIT_BYTES) -> int:
        need = self.smem_bytes(out_itemsize)
        if need > limit:
            raise SharedMemoryBudgetExceeded(need, limit, what=repr(self))
        return need

    def to_dict(self) -> dict[str, Any]:
        return {"kind": SWAP_AB, **dataclasses.asdict(self)}


SWAP_AB = "swap_ab"          # the `kind` a serialised Fp8SwapAbConfig carries


def fp8_config_from_dict(d: dict[str, Any]) -> "Fp8TileConfig | Fp8SwapAbConfig":
    """Either FP8 config from its `to_dict` (the autotuner's cache stores both kinds)."""
    d = dict(d)
    if d.pop("kind", None) == SWAP_AB:
        return Fp8SwapAbConfig(**d)
    return Fp8TileConfig.from_dict(d)


SMEM_HEADROOM = 1024  # bytes the heuristic leaves unplanned (a grouped kernel was once reported 80 B past the model)


def _out_itemsize(spec) -> int:
    return {"float32": 4}.get(spec.out_dtype, 2)


def _deepest(cfg: Fp8TileConfig, out_itemsize: int, k_steps: int, limit: int,
             col_scales: bool = False, tile_epilogue: bool = False) -> Fp8TileConfig:
    """The deepest pipeline (<= 6 stages, <= K steps, >= 2) that fits the shared-memory budget, keeping
    SMEM_HEADROOM spare: the model counts the big buffers, Mosaic adds a few small ones (group metadata)."""
    for stages in range(6, 1, -1):
        c = dataclasses.replace(cfg, stages=stages)
        if c.smem_bytes(out_itemsize, col_scales, tile_epilogue) <= limit - SMEM_HEADROOM:
            return dataclasses.replace(c, stages=max(2, min(stages, k_steps)))
    need = dataclasses.replace(cfg, stages=2).smem_bytes(out_itemsize, col_scales, tile_epilogue)
    raise SharedMemoryBudgetExceeded(need, limit, repr(cfg))


# CTA layouts in order of preference (bigger tiles reuse more operand bytes per wgmma):
# (block_n, compute warpgroups, split).
_LAYOUTS = ((128, 2, WgSplit.M), (128, 2, WgSplit.N), (64, 2, WgSplit.M), (64, 2, WgSplit.N), (64, 1, WgSplit.M),
            (32, 1, WgSplit.M), (16, 1, WgSplit.M))


def uses_col_scales(spec) -> bool:
    """Whether the kernel pipelines a per-column b_scale row per K block (k-grouped, dense with (1, 128) B scales)."""
    return getattr(spec, "layout", None) == "k_grouped" or tuple(getattr(spec, "b_scale", None) or ()) == ACT_BLOCK


SWAP_AB_MAX_M = 64          # the small-M kernel's token tile is at most wgmma's 64-row side
SWAP_AB_MIN_SM_SHARE = 0.75  # ... and it is chosen when its 64-row CTAs still cover 3/4 of the SMs


def swap_ab_config(spec, limit: int = SMEM_LIMIT_BYTES, sm_count: int = 132) -> Fp8SwapAbConfig | None:
    """The small-M kernel's config for a dense spec, or None where it does not apply: M in 1..64, 128 x 128
    B scales, no c, N a multiple of 64 with N / 64 >= 3/4 of the SMs (one warpgroup of 64 B rows per CTA;
    fewer, larger streams of B would leave SMs idle, and the regular tiles then give every SM work).
    The deepest pipeline (<= 10 stages: a decode GEMM is bound by B's bytes in flight) that fits."""
    m, n = spec.m, spec.n
    if (getattr(spec, "layout", None) != "nt" or getattr(spec, "accumulate", False) or uses_col_scales(spec)
            or not 1 <= m <= SWAP_AB_MAX_M or n % 64 or n // 64 < SWAP_AB_MIN_SM_SHARE * sm_count):
        return None
    tokens = -(-m // 8) * 8
    k_steps = math.ceil(spec.k / FP8_BLOCK_K)
    for stages in range(10, 1, -1):
        cfg = Fp8SwapAbConfig(block_tokens=tokens, stages=max(2, min(stages, k_steps)))
        if cfg.smem_bytes(_out_itemsize(spec)) <= limit - SMEM_HEADROOM:
            return cfg
    return None


def choose_fp8_config(spec, limit: int = SMEM_LIMIT_BYTES, sm_count: int = 132,
                      min_block_n: int = 16, tile_epilogue: bool = False) -> Fp8TileConfig | Fp8SwapAbConfig:
    """Heuristic from a GemmSpec/GroupedGemmSpec. A dense M of 1..64 gets the small-M kernel where it applies
    (`swap_ab_config`). Otherwise the first CTA layout (largest first) that divides N,
    does not pad M past one 64-row block more than needed, and gives every one of `sm_count` SMs an output
    tile (else the layout with the most tiles: small M is memory-bound on B, and more CTAs stream B in
    parallel); then the deepest pipeline that fits 227 KiB. `min_block_n`, `tile_epilogue`: the grouped
    contiguous kernel stores rows at arbitrary offsets from one unswizzled [block_m, block_n] tile per
    warpgroup and wants rows of >= 128 bytes."""
    m, n, k = spec.m, spec.n, spec.k
    swap = swap_ab_config(spec, limit, sm_count)
    if swap is not None:
        return swap
    out_itemsize = _out_itemsize(spec)
    col_scales = uses_col_scales(spec)
    options = []
    for bn, wgs, split in _LAYOUTS:
        cfg = Fp8TileConfig(block_m=64, block_n=bn, num_compute_wgs=wgs, wg_split=split,
                            epi_block_n=min(bn, 128 // out_itemsize), stages=2)   # 128-byte epilogue rows
        if n % cfg.cta_block_n or (m <= 64 and cfg.cta_block_m > 64) or bn < min_block_n:
            continue
        options.append(cfg)
    if not options:
        raise NotImplementedError(f"n={n}: the FP8 kernels need a multiple of 16")
    tiles = lambda c: -(-max(m, 1) // c.cta_block_m) * (n // c.cta_block_n)  # noqa: E731
    cfg = next((c for c in options if tiles(c) >= sm_count), max(options, key=tiles))
    return _deepest(cfg, out_itemsize, math.ceil(k / FP8_BLOCK_K), limit, col_scales, tile_epilogue)


def candidate_fp8_configs(spec, limit: int = SMEM_LIMIT_BYTES) -> list[Fp8TileConfig | Fp8SwapAbConfig]:
    """The autotuner's sweep: warpgroup layouts x N tiles x grid swizzle widths, each at its deepest pipeline;
    for a dense M of 1..64 also the small-M kernel with one or two warpgroups and two pipeline depths."""
    out: list[Fp8TileConfig | Fp8SwapAbConfig] = []
    swap = swap_ab_config(spec, limit, sm_count=0)
    if swap is not None:
        for wgs in (1, 2):
            for stages in (swap.stages, max(2, swap.stages - 3)):
                c = dataclasses.replace(swap, num_compute_wgs=wgs, stages=stages)
                if c.smem_bytes(_out_itemsize(spec)) <= limit - SMEM_HEADROOM and spec.n % c.cta_rows == 0:
                    out.append(c)
    k_steps = math.ceil(spec.k / FP8_BLOCK_K)
    for block_n in (128, 64):
        for split in (WgSplit.M, WgSplit.N):
            cfg = Fp8TileConfig(block_m=64, block_n=block_n, wg_split=split, epi_block_n=64, stages=2)
            if spec.n % cfg.cta_block_n:
                continue
            for width in (1, 4, 8):
                c = _deepest(dataclasses.replace(cfg, grid_tile_width=width), _out_itemsize(spec), k_steps, limit,
                             uses_col_scales(spec))
                out.append(c)
                if c.stages > 2:
                    out.append(dataclasses.replace(c, stages=c.stages - 1))
    return out
