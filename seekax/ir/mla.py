"""MLA decode spec (FlashMLA): queries of 576 dims attend over a paged latent cache (one KV head in DeepSeek's
models, `kv_heads` in FlashMLA's general case), 64-token pages by default."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from seekax.ir.fp8 import FP8_DTYPE, SCALE_BLOCK
from seekax.ir.spec import KernelSpec
from seekax.ir.validate import canonical_dtype, check_int, fail

KV_DTYPES = ("bfloat16", "float16", "float32", FP8_DTYPE)  # float32: the XLA path (tests, tiny models)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MlaDecodeSpec(KernelSpec):
    """q [batch, q_len, q_heads, qk_dim] over a paged cache [pages, page_size, kv_heads, qk_dim];
    V is the first v_dim channels of the cache. `seq_len` is the (mean) context length."""

    op: ClassVar[str] = "mla_decode"
    batch: int
    seq_len: int
    q_len: int = 1
    q_heads: int = 128
    kv_heads: int = 1
    qk_dim: int = 576
    v_dim: int = 512
    page_size: int = 64
    q_dtype: str = "bfloat16"
    kv_dtype: str = "bfloat16"
    causal: bool = True

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("batch", check_int("batch", self.batch, min_value=1))
        set_("seq_len", check_int("seq_len", self.seq_len))
        set_("q_len", check_int("q_len", self.q_len, min_value=1))
        set_("q_heads", check_int("q_heads", self.q_heads, min_value=1))
        set_("kv_heads", check_int("kv_heads", self.kv_heads, min_value=1))
        if self.q_heads % self.kv_heads:
            raise fail("q_heads", self.q_heads, f"a multiple of kv_heads={self.kv_heads}")
        set_("qk_dim", check_int("qk_dim", self.qk_dim, min_value=1, multiple_of=64))
        set_("v_dim", check_int("v_dim", self.v_dim, min_value=1, multiple_of=64))
        if self.v_dim > self.qk_dim:
            raise fail("v_dim", self.v_dim, f"<= qk_dim={self.qk_dim} (V is a prefix of the latent)")
        set_("page_size", check_int("page_size", self.page_size, min_value=1, multiple_of=16))
        set_("q_dtype", canonical_dtype("q_dtype", self.q_dtype, ("bfloat16", "float16", "float32")))
        set_("kv_dtype", canonical_dtype("kv_dtype", self.kv_dtype, KV_DTYPES))
        if not isinstance(self.causal, bool):
            raise fail("causal", self.causal, "a bool")

    @property
    def compute_dtype(self) -> str:
        return "bfloat16"

    def flops(self) -> float:
        # QK^T over qk_dim plus PV over v_dim, for every (query, head, key).
        return 2.0 * self.batch * self.q_len * self.q_heads * self.seq_len * (self.qk_dim + self.v_dim)

    def kv_bytes_per_token(self) -> int:
        """Bytes of cache per token and KV head. float8_e4m3fn is DeepSeek-V3.2's layout: the v_dim latent
        in e4m3, one float32 scale per 128 of its channels, the rope channels kept in bf16 (656 B at 576/512)."""
        if self.kv_dtype == FP8_DTYPE:
            return self.v_dim + 4 * -(-self.v_dim // SCALE_BLOCK) + 2 * (self.qk_dim - self.v_dim)
        return self.qk_dim * np.dtype(self.kv_dtype).itemsize

    def min_bytes(self) -> float:
        kv = self.batch * self.seq_len * self.kv_heads * self.kv_bytes_per_token()
        q = self.batch * self.q_len * self.q_heads * self.qk_dim * np.dtype(self.q_dtype).itemsize
        out = self.batch * self.q_len * self.q_heads * self.v_dim * 2
        lse = self.batch * self.q_len * self.q_heads * 4
        return kv + q + out + lse
