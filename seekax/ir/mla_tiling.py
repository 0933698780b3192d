"""Tile config of the MLA decode kernel (FlashMLA on sm_90) and its shared-memory account.

One CTA owns a 64-row query tile (64 rows of q_len x heads) and walks its split of the KV sequence in
64-token pages. Warpgroup 0 computes S = Q K^T over all 576 channels and the online softmax, writes P
(bf16) and the row rescale to shared memory; both compute warpgroups then do P V on their half of the
512 value channels; a third warpgroup streams pages with TMA through `stages` slots.

Shared memory (bf16): Q 64x576x2 = 72 KiB, each KV slot 64x576x2 = 72 KiB, P 64x64x2 = 8 KiB, the
row-rescale vector (256 B, padded to Mosaic's 1 KiB allocation alignment), 7 barriers: 230,456 B of
the 232,448 B sm_90 limit with two slots (three never fit). This only fits because the kernel sets
Mosaic's `reduction_scratch_bytes=0`: its row reductions stay in registers, the default 2 KiB reserve
would overflow the budget by 56 bytes.
"""

from __future__ import annotations

import dataclasses

from seekax.ir.tiling import SMEM_LIMIT_BYTES, SharedMemoryBudgetExceeded
from seekax.ir.validate import check_int, fail

BARRIER_BYTES = 8
SMEM_ALIGNMENT = 1024  # Mosaic GPU aligns every scoped shared-memory allocation to 1 KiB


def _aligned(n: int) -> int:
    return -(-n // SMEM_ALIGNMENT) * SMEM_ALIGNMENT


@dataclasses.dataclass(frozen=True, kw_only=True)
class MlaTileConfig:
    """block_m query rows per CTA (wgmma M = 64), block_n keys per step (= the page size), `stages` KV slots."""

    block_m: int = 64
    block_n: int = 64
    stages: int = 2
    qk_dim: int = 576
    v_dim: int = 512
    num_compute_wgs: int = 2
    combine: str = "kernel"   # merge split-KV partials with the Mosaic combine kernel, or "xla"

    def __post_init__(self):
        if check_int("block_m", self.block_m, min_value=64) != 64:
            raise fail("block_m", self.block_m, "64 (one wgmma M tile per CTA; warpgroups split V instead)")
        if check_int("block_n", self.block_n, min_value=64) != 64:
            raise fail("block_n", self.block_n, "64 (one page per step)")
        check_int("stages", self.stages, min_value=1)  # bf16 wants 2 (double buffering); fp8 fits only 1
        check_int("qk_dim", self.qk_dim, min_value=64, multiple_of=64)
        check_int("v_dim", self.v_dim, min_value=64, multiple_of=64)
        if self.v_dim > self.qk_dim:
            raise fail("v_dim", self.v_dim, f"<= qk_dim={self.qk_dim}")
        if check_int("num_compute_wgs", self.num_compute_wgs, min_value=1) != 2:
            raise fail("num_compute_wgs", self.num_compute_wgs, "2 (each holds a 64 x v_dim/2 fp32 accumulator)")
        if self.combine not in ("kernel", "xla"):
            raise fail("combine", self.combine, "'kernel' or 'xla'")
        if (self.v_dim // self.num_compute_wgs) % 64 or self.v_dim // self.num_compute_wgs > 256:
            raise fail("v_dim", self.v_dim, "split into per-warpgroup halves that are multiples of 64 and <= 256")

    @property
    def v_per_wg(self) -> int:
        return self.v_dim // self.num_compute_wgs

    def smem_bytes(self, kv_dtype: str = "bfloat16", *, sparse: bool = False) -> int:
        """Q tile + KV slots + P tile + rescale vector + barriers (kv ready/consumed per slot, Q, P ready/free).
        "float8_e4m3fn" (DeepSeek-V3.2's cache): `stages` slots of e4m3 latent + bf16 rope written by TMA,
        one bf16 tile they are dequantised into, and per slot latent/rope ready + slot free barriers.
        `sparse` (top-k decode): `stages` untiled slots of 64 gathered rows, one bf16 tile they are copied
        into, per slot rows ready + slot free barriers; over the FP8 cache the same bytes as "float8_e4m3fn"
        (its slots are untiled, not smaller)."""
        if kv_dtype not in ("bfloat16", "float16", "float8_e4m3fn"):
            raise fail("kv_dtype", kv_dtype, "bfloat16, float16 or float8_e4m3fn")
        q = _aligned(self.block_m * self.qk_dim * 2)
        p = _aligned(self.block_m * self.block_n * 2)
        rescale = _aligned(self.block_m * 4)
        if sparse and kv_dtype != "float8_e4m3fn":
            rows = _aligned(self.stages * self.block_n * self.qk_dim * 2)
            tile = _aligned(self.block_n * self.qk_dim * 2)
            return q + tile + p + rescale + rows + BARRIER_BYTES * (2 + 3 + 2 * self.stages)
        if kv_dtype == "float8_e4m3fn":
            latent = _aligned(self.stages * self.block_n * self.v_dim)
            rope = _aligned(self.stages * self.block_n * (self.qk_dim - self.v_dim) * 2)
            tile = _aligned(self.block_n * self.qk_dim * 2)
            return q + tile + p + rescale + latent + rope + BARRIER_BYTES * (2 + 3 + 3 * self.stages)
        kv = _aligned(self.stages * self.block_n * self.qk_dim * 2)
        barriers = BARRIER_BYTES * (2 * self.stages + 3)
        return q + kv + p + rescale + barriers

    def check_smem(self, kv_dtype: str = "bfloat16", limit: int = SMEM_LIMIT_BYTES, *, sparse: bool = False) -> int:
        need = self.smem_bytes(kv_dtype, sparse=sparse)
        if need > limit:
            raise SharedMemoryBudgetExceeded(need, limit, what=repr(self))
        return need

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MlaTileConfig":
        return cls(**d)
