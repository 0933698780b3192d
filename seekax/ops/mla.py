"""`mla_decode` (FlashMLA): MLA decode over a paged latent KV cache, one validated call for every backend,
plus `mla_metadata`, the split-KV tile scheduler that gives every CTA equal work.

Backends: "mosaic" (the Hopper kernel, `lowering/mosaic/mla_decode_sm90.py`), "interpret" (the same
kernel on the CPU interpreter), "xla" (the plain-JAX reference), "auto" (mosaic on sm_90, else xla).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seekax.ir.mla import MlaDecodeSpec
from seekax.ir.mla_tiling import MlaTileConfig
from seekax.ir.validate import check_int, fail
from seekax.lowering.backend import num_sms_for, resolve_backend
from seekax.lowering.mla_split import MlaMetadata as MlaMetadata
from seekax.lowering.mla_split import mla_metadata as mla_metadata
from seekax.lowering.mla_split import num_parts_for as num_parts_for
from seekax.lowering.mla_split import split_ranges as split_ranges

KERNEL_QK_DIM, KERNEL_V_DIM = 576, 512


def _concrete(x) -> np.ndarray | None:
    """The value of `x` when it is known now (not a tracer), else None: value checks only run eagerly."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


class MlaProblem(NamedTuple):
    """What validation found; `spec()` is the kernel-sized MlaDecodeSpec (576/512-style dims only)."""

    batch: int
    q_len: int
    q_heads: int
    qk_dim: int
    v_dim: int
    page_size: int
    q_dtype: str
    kv_dtype: str
    causal: bool
    mean_len: int

    def spec(self) -> MlaDecodeSpec:
        return MlaDecodeSpec(batch=self.batch, seq_len=self.mean_len, q_len=self.q_len, q_heads=self.q_heads,
                             qk_dim=self.qk_dim, v_dim=self.v_dim, page_size=self.page_size,
                             q_dtype=self.q_dtype, kv_dtype=self.kv_dtype, causal=self.causal)


def validate_mla_decode(q, kv_cache, block_table, seq_lens, *, v_dim, softmax_scale, causal,
                        kernel: bool = False, kv_dtypes=("bfloat16", "float16"), same_dtype: bool = True) -> MlaProblem:
    """The one validation point for every backend. `kernel`: the Mosaic kernel's stricter contract
    (qk_dim 576, v_dim 512). Length values are checked when concrete (eager calls); under jit they are
    trusted (the kernel clamps to the block table, the reference masks)."""
    if getattr(q, "ndim", None) != 4:
        raise fail("q.shape", getattr(q, "shape", None), "[batch, q_len, heads, qk_dim]")
    if getattr(kv_cache, "ndim", None) != 4:
        raise fail("kv_cache.shape", getattr(kv_cache, "shape", None), "[num_pages, page_size, 1, qk_dim]")
    b, s_q, h, d = q.shape
    num_pages, page, kv_heads, d_kv = kv_cache.shape
    if kv_heads != 1:
        raise fail("kv_cache.shape", tuple(kv_cache.shape), "one latent KV head: [num_pages, page_size, 1, qk_dim]")
    if d_kv != d:
        raise fail("kv_cache.shape", tuple(kv_cache.shape), f"qk_dim={d} matching q.shape={tuple(q.shape)}")
    v_dim = check_int("v_dim", v_dim, min_value=1)
    if v_dim > d:
        raise fail("v_dim", v_dim, f"<= qk_dim={d} (V is a prefix of the latent)")
    if kernel and d != KERNEL_QK_DIM:
        raise fail("q.shape", tuple(q.shape), f"qk_dim {KERNEL_QK_DIM} (512 latent + 64 rope) for the kernel")
    if kernel and v_dim != KERNEL_V_DIM:
        raise fail("v_dim", v_dim, f"{KERNEL_V_DIM} for the kernel")
    if kernel and page != 64:
        raise fail("kv_cache.shape", tuple(kv_cache.shape), "64-token pages for the kernel")
    if num_pages < 1:
        raise fail("kv_cache.shape", tuple(kv_cache.shape), "at least one page")
    qd, kvd = np.dtype(q.dtype).name, np.dtype(kv_cache.dtype).name
    q_dtypes = ("bfloat16", "float16") if kernel else ("bfloat16", "float16", "float32")
    if qd not in q_dtypes:
        raise fail("q.dtype", qd, f"one of {q_dtypes}" + (" for the kernel" if kernel else ""))
    kv_dtypes = tuple(kv_dtypes) + (() if kernel else ("float32",))
    if kvd not in kv_dtypes:
        raise fail("kv_cache.dtype", kvd, f"one of {kv_dtypes}")
    if same_dtype and kvd != qd:
        raise fail("kv_cache.dtype", kvd, f"q.dtype={qd}")
    if getattr(block_table, "ndim", None) != 2 or block_table.shape[0] != b:
        raise fail("block_table.shape", getattr(block_table, "shape", None), f"[batch={b}, max_pages]")
    if np.dtype(block_table.dtype).name != "int32":
        raise fail("block_table.dtype", np.dtype(block_table.dtype).name, "int32")
    if getattr(seq_lens, "shape", None) != (b,):
        raise fail("seq_lens.shape", getattr(seq_lens, "shape", None), f"[batch={b}]")
    if np.dtype(seq_lens.dtype).name != "int32":
        raise fail("seq_lens.dtype", np.dtype(seq_lens.dtype).name, "int32")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        raise fail("softmax_scale", softmax_scale, "a positive float or None (1/sqrt(qk_dim))")
    if not isinstance(causal, bool):
        raise fail("causal", causal, "a bool")
    capacity = block_table.shape[1] * page
    lens = _concrete(seq_lens)
    if lens is not None and lens.size:
        if lens.min() < 0:
            raise fail("seq_lens", lens.tolist(), "lengths >= 0")
        if lens.max() > capacity:
            raise fail("seq_lens", lens.tolist(), f"lengths <= the block table's capacity "
                                                  f"{block_table.shape[1]} pages x {page} = {capacity}")
    mean_len = int(lens.mean()) if lens is not None and lens.size else capacity
    return MlaProblem(batch=b, q_len=s_q, q_heads=h, qk_dim=d, v_dim=v_dim, page_size=page, q_dtype=qd,
                      kv_dtype=kvd, causal=causal, mean_len=mean_len)


def mla_decode(q: jax.Array, kv_cache: jax.Array, block_table: jax.Array, seq_lens: jax.Array, *,
               v_dim: int = 512, softmax_scale: float | None = None, causal: bool = True,
               metadata: MlaMetadata | None = None, config: MlaTileConfig | None = None,
               backend: str = "auto", num_sms: int | None = None) -> tuple[jax.Array, jax.Array]:
    """MLA decode over a paged latent cache (FlashMLA's `flash_mla_with_kvcache`).

    q: [B, q_len, H, 576] bf16; kv_cache: [num_pages, 64, 1, 576] (V = first v_dim channels);
    block_table: [B, max_pages] int32; seq_lens: [B] int32 -> out [B, q_len, H, v_dim] (q.dtype),
    lse [B, H, q_len] float32. Causal for q_len > 1: query i sees keys < seq_len - q_len + i + 1.
    A query with no visible key returns out = 0, lse = -inf. The "xla" backend also accepts other head
    dims and float32 (small demo models, exact tests); the kernel requires bf16/f16, 576/512, 64-token pages.
    """
    strict = backend in ("mosaic", "interpret")  # asked for the kernel by name: its contract is an error
    backend = resolve_backend(backend)
    spec = validate_mla_decode(q, kv_cache, block_table, seq_lens, v_dim=v_dim, softmax_scale=softmax_scale,
                               causal=causal, kernel=strict)
    if backend == "mosaic" and ((spec.qk_dim, spec.v_dim, spec.page_size) != (KERNEL_QK_DIM, KERNEL_V_DIM, 64)
                                or spec.q_dtype == "float32"):
        backend = "xla"  # "auto" on Hopper with a small or float32 model: only the reference handles it
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(spec.qk_dim)
    if backend == "xla":
        from seekax.lowering.reference import mla_decode as ref

        return ref.mla_decode(q, kv_cache, block_table, seq_lens, v_dim=v_dim, softmax_scale=scale, causal=causal)
    return _run_kernel(q, kv_cache, block_table, seq_lens, spec, metadata=metadata, config=config or MlaTileConfig(),
                       softmax_scale=scale, causal=causal, backend=backend, num_sms=num_sms)


def _run_kernel(q, cache, block_table, seq_lens, spec: MlaProblem, *, metadata, config: MlaTileConfig,
                softmax_scale: float, causal: bool, backend: str, num_sms: int | None):
    """The kernel path shared by the bf16 and FP8 caches: check or build the split metadata, then launch."""
    from seekax.lowering.mosaic import mla_decode_sm90

    if metadata is not None and (metadata.block != config.block_n or metadata.block_start.shape != (spec.batch,)):
        raise fail("metadata", f"MlaMetadata(block={metadata.block}, batch={metadata.block_start.shape[0]})",
                   f"block={config.block_n} and batch={spec.batch} (from mla_metadata(seq_lens))")
    if metadata is None:
        metadata = mla_metadata(seq_lens, num_sms or num_sms_for(backend), q_len=spec.q_len,
                                num_heads=spec.q_heads, block=config.block_n)
    return mla_decode_sm90.mla_decode(q, cache, block_table, seq_lens, metadata, softmax_scale=softmax_scale,
                                      causal=causal, config=config, interpret=backend == "interpret")


def mla_decode_split_xla(q, kv_cache, block_table, seq_lens, metadata: MlaMetadata, *, v_dim: int = 512,
                         softmax_scale: float | None = None, causal: bool = True):
    """The split-KV algorithm in plain JAX: one partial per metadata split, then the combine. Same result
    as `mla_decode(..., backend="xla")` up to float32 rounding; the executable spec of the kernel's plan."""
    from seekax.lowering.reference import mla_decode as ref

    spec = validate_mla_decode(q, kv_cache, block_table, seq_lens, v_dim=v_dim, softmax_scale=softmax_scale,
                               causal=causal)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(spec.qk_dim)
    b, lo, hi = split_ranges(metadata)                                        # [T] each
    bc = jnp.clip(b, 0, spec.batch - 1)
    out_p, lse_p = ref.mla_decode_partial(q[bc], kv_cache, block_table[bc], seq_lens[bc], lo, hi,
                                          v_dim=v_dim, softmax_scale=scale, causal=causal)
    return ref.combine_splits(out_p, lse_p, metadata.split_offsets, out_dtype=q.dtype)


def mla_decode_fp8(q: jax.Array, latent_fp8: jax.Array, scales: jax.Array, rope: jax.Array, block_table: jax.Array,
                   seq_lens: jax.Array, *, softmax_scale: float | None = None, causal: bool = True,
                   metadata: MlaMetadata | None = None, config: MlaTileConfig | None = None,
                   backend: str = "auto", num_sms: int | None = None) -> tuple[jax.Array, jax.Array]:
    """MLA decode over DeepSeek-V3.2's FP8 cache (`reference.mla_decode.quantize_fp8_latent`): latent_fp8
    [P, page, 1, 512] e4m3, scales [P, page, 1, 4] float32 (one per token and 128 channels), rope
    [P, page, 1, 64] bf16. Same outputs as `mla_decode`. "mosaic"/"interpret": the Hopper kernel reads the
    FP8 pages (656 bytes per token instead of 1152) and dequantises them in shared memory, so K and V enter
    the bf16 wgmma rounded to bf16; "xla": dequantise to float32, then the reference."""
    from seekax.lowering.reference import mla_decode as ref

    strict = backend in ("mosaic", "interpret")
    backend = resolve_backend(backend)
    dequantised = _fp8_cache_shape(latent_fp8, scales, rope)                  # what the kernel sees
    spec = validate_mla_decode(q, dequantised, block_table, seq_lens, v_dim=latent_fp8.shape[-1],
                               softmax_scale=softmax_scale, causal=causal, kernel=strict, kv_dtypes=("float32",),
                               same_dtype=False)
    kernel_ok = _fp8_kernel_ok(spec, scales, strict) and spec.page_size == 64
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(spec.qk_dim)
    v = spec.v_dim
    if backend == "xla" or not kernel_ok:
        kv = ref.dequantize_fp8_latent(latent_fp8, scales, rope)                   # [P, page, 1, v + rope] f32
        return ref.mla_decode(q, kv, block_table, seq_lens, v_dim=v, softmax_scale=scale, causal=causal)
    config = config or MlaTileConfig(stages=1)           # two fp8 slots + the bf16 tile exceed 227 KiB
    return _run_kernel(q, (latent_fp8, scales, rope), block_table, seq_lens, spec, metadata=metadata, config=config,
                       softmax_scale=scale, causal=causal, backend=backend, num_sms=num_sms)


def _fp8_cache_shape(latent_fp8, scales, rope) -> jax.ShapeDtypeStruct:
    """Check DeepSeek-V3.2's FP8 cache arrays against each other; the dequantised cache's shape (float32)."""
    if getattr(latent_fp8, "ndim", None) != 4 or np.dtype(latent_fp8.dtype).name != "float8_e4m3fn":
        raise fail("latent_fp8", (getattr(latent_fp8, "shape", None), str(getattr(latent_fp8, "dtype", None))),
                   "a float8_e4m3fn array [num_pages, page_size, 1, v_dim]")
    p, page, h, v = latent_fp8.shape
    if getattr(scales, "shape", None) is None or scales.shape[:3] != (p, page, h) or scales.ndim != 4 \
            or v % scales.shape[-1] or np.dtype(scales.dtype).name != "float32":
        raise fail("scales", getattr(scales, "shape", None),
                   f"float32 [{p}, {page}, {h}, tiles] with tiles dividing {v}")
    if getattr(rope, "ndim", None) != 4 or rope.shape[:3] != (p, page, h) or np.dtype(rope.dtype).name != "bfloat16":
        raise fail("rope", getattr(rope, "shape", None), f"bfloat16 [{p}, {page}, {h}, rope_dim]")
    return jax.ShapeDtypeStruct((p, page, h, v + rope.shape[-1]), jnp.float32)


def _fp8_kernel_ok(spec: MlaProblem, scales, strict: bool) -> bool:
    """Whether the FP8-cache kernel takes this problem; asked for by name (`strict`), a clear error if not."""
    tiles_ok = scales.shape[-1] == KERNEL_V_DIM // 128
    if strict and not tiles_ok:
        raise fail("scales", scales.shape[-1], f"one scale per 128 channels ({KERNEL_V_DIM // 128}) for the kernel")
    if strict and spec.q_dtype != "bfloat16":
        raise fail("q.dtype", spec.q_dtype, "bfloat16 for the FP8-cache kernel (its rope and tile are bf16)")
    return (spec.qk_dim, spec.v_dim) == (KERNEL_QK_DIM, KERNEL_V_DIM) and tiles_ok and spec.q_dtype == "bfloat16"


def mla_decode_sparse(q: jax.Array, kv_cache: jax.Array, indices: jax.Array, *, v_dim: int = 512,
                      softmax_scale: float | None = None, config: MlaTileConfig | None = None,
                      backend: str = "auto", num_sms: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Sparse MLA decode (DeepSeek-V3.2 DSA, FlashMLA's sparse decode): q [B, s_q, H, 576] attends only to
    its top-k cache tokens, indices [B, s_q, topk] int32 flat token ids (page * page_size + slot); -1 or
    out of range entries are skipped. No causal mask (the indexer chose the tokens). Same outputs as
    `mla_decode`; a query with no valid index gets out = 0, lse = -inf.
    "mosaic"/"interpret": the Hopper kernel with one "batch" per query token, its valid ids moved to the
    front (a stable sort of [B, s_q, topk] ids, in XLA) and gathered row by row by TMA inside the kernel;
    split-KV over the valid counts as for `mla_decode`. "xla": the reference (gather, then attend)."""
    from seekax.lowering.reference import mla_decode as ref

    _check_indices(q, indices)
    strict = backend in ("mosaic", "interpret")
    backend = resolve_backend(backend)
    b = q.shape[0]
    spec = validate_mla_decode(q, kv_cache, jnp.zeros((b, 1), jnp.int32), jnp.zeros((b,), jnp.int32), v_dim=v_dim,
                               softmax_scale=softmax_scale, causal=False, kernel=strict)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(spec.qk_dim)
    if backend == "xla" or (spec.qk_dim, spec.v_dim) != (KERNEL_QK_DIM, KERNEL_V_DIM) or spec.q_dtype == "float32":
        return ref.mla_decode_sparse(q, kv_cache, indices, v_dim=v_dim, softmax_scale=scale)
    flat = kv_cache.reshape(-1, spec.qk_dim)
    return _run_sparse_kernel(q, lambda ids: flat, flat.shape[0], indices, spec, softmax_scale=scale,
                              config=config, backend=backend, num_sms=num_sms)


def mla_decode_sparse_fp8(q: jax.Array, latent_fp8: jax.Array, scales: jax.Array, rope: jax.Array,
                          indices: jax.Array, *, softmax_scale: float | None = None,
                          config: MlaTileConfig | None = None, backend: str = "auto",
                          num_sms: int | None = None) -> tuple[jax.Array, jax.Array]:
    """`mla_decode_sparse` over DeepSeek-V3.2's FP8 cache (as `mla_decode_fp8` takes it), the combination
    FlashMLA's sparse decode serves. "mosaic"/"interpret": the kernel gathers latent and rope rows by TMA and
    dequantises them in shared memory; each query token's scales are gathered in XLA first (16 B per token,
    too small for a TMA row copy). "xla": dequantise to float32, then the sparse reference."""
    from seekax.lowering.reference import mla_decode as ref

    _check_indices(q, indices)
    strict = backend in ("mosaic", "interpret")
    backend = resolve_backend(backend)
    b = q.shape[0]
    dequantised = _fp8_cache_shape(latent_fp8, scales, rope)
    spec = validate_mla_decode(q, dequantised, jnp.zeros((b, 1), jnp.int32), jnp.zeros((b,), jnp.int32),
                               v_dim=latent_fp8.shape[-1], softmax_scale=softmax_scale, causal=False, kernel=strict,
                               kv_dtypes=("float32",), same_dtype=False)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(spec.qk_dim)
    if backend == "xla" or not _fp8_kernel_ok(spec, scales, strict):
        kv = ref.dequantize_fp8_latent(latent_fp8, scales, rope)
        return ref.mla_decode_sparse(q, kv, indices, v_dim=spec.v_dim, softmax_scale=scale)
    lat, sc, rp = (x.reshape(-1, x.shape[-1]) for x in (latent_fp8, scales, rope))    # [tokens, ...]
    return _run_sparse_kernel(q, lambda ids: (lat, jnp.take(sc, ids, axis=0), rp), lat.shape[0], indices, spec,
                              softmax_scale=scale, config=config, backend=backend, num_sms=num_sms)


def _check_indices(q, indices) -> None:
    if getattr(indices, "ndim", None) != 3 or indices.shape[:2] != tuple(getattr(q, "shape", (None, None))[:2]):
        raise fail("indices.shape", getattr(indices, "shape", None), "[batch, q_len, topk] matching q")
    if np.dtype(indices.dtype).name != "int32":
        raise fail("indices.dtype", np.dtype(indices.dtype).name, "int32")
    if indices.shape[2] < 1:
        raise fail("indices.shape", tuple(indices.shape), "topk >= 1")


def _run_sparse_kernel(q, cache_for, tokens: int, indices, spec: MlaProblem, *, softmax_scale: float,
                       config: MlaTileConfig | None, backend: str, num_sms: int | None):
    """Sparse decode as dense decode over a token table: one "batch" per query token, its valid ids first
    (a stable sort), padded to whole 64-token steps, their count as its length. `cache_for(ids)` gives the
    kernel's cache arguments (the FP8 cache gathers its scales by the ids)."""
    from seekax.lowering.mosaic import mla_decode_sm90

    config = config or MlaTileConfig(stages=1)           # a second staging slot + the bf16 tile exceed 227 KiB
    b, s_q, heads = spec.batch, spec.q_len, spec.q_heads
    ids = indices.reshape(b * s_q, indices.shape[2])                                  # one "batch" per query
    valid = (ids >= 0) & (ids < tokens)
    order = jnp.argsort(~valid, axis=1, stable=True)                                  # valid ids first
    ids = jnp.take_along_axis(jnp.where(valid, ids, 0), order, axis=1)
    width = -(-ids.shape[1] // config.block_n) * config.block_n
    ids = jnp.pad(ids, ((0, 0), (0, width - ids.shape[1])))                           # [B*s_q, topk_p]
    counts = valid.sum(axis=1).astype(jnp.int32)                                      # [B*s_q]
    metadata = mla_metadata(counts, num_sms or num_sms_for(backend), q_len=1, num_heads=heads,
                            block=config.block_n)
    out, lse = mla_decode_sm90.mla_decode(
        q.reshape(b * s_q, 1, heads, spec.qk_dim), cache_for(ids), ids, counts, metadata,
        softmax_scale=softmax_scale, causal=False, config=config, interpret=backend == "interpret", sparse=True)
    out = out.reshape(b, s_q, heads, spec.v_dim)                                      # [B, s_q, H, 512]
    return out, jnp.transpose(lse.reshape(b, s_q, heads), (0, 2, 1))                 # [B, H, s_q]
