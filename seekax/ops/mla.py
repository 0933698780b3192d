"""`mla_decode` (FlashMLA): MLA decode over a paged latent KV cache, plus `mla_metadata`, the split-KV tile
scheduler that gives every CTA equal work, and the FP8-cache and sparse (top-k) variants.

Every variant runs one skeleton: validate once (`validate_mla_decode`; a ValueError for every backend), then
`lowering.backend.run_op` chooses the backend. The kernel path checks what the Hopper kernel takes (576/512
dims, 64-token pages, bf16/f16; NotImplementedError otherwise), picks a tile config (explicit > the
autotuned cache > the default) and launches `lowering/mosaic/mla_decode_sm90.py`; "interpret" runs the
same kernel on the CPU interpreter, "xla" the plain-JAX reference, "auto" the kernel on sm_90 when it takes
the problem, else the reference.

FlashMLA's surface beyond one latent head: several KV heads (query head h reads KV head h // (H / h_kv)), any
page size, an attention sink (`attn_sink`, a learned logit per head in the softmax denominator; lse stays that
of the keys), the lse of a query with no key (`lse_empty`: -inf, seekax's default, or +inf, FlashMLA's), and for
sparse decode per-query top-k lengths and an extra cache with its own indices (one softmax over both).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seekax.ir.config_cache import pick_config
from seekax.ir.fp8 import FP8_DTYPE, SCALE_BLOCK
from seekax.ir.mla import MlaDecodeSpec
from seekax.ir.mla_tiling import MlaTileConfig
from seekax.ir.validate import check_int, fail, is_real_number
from seekax.lowering.backend import num_sms_for, run_op
from seekax.lowering.mla_split import MlaMetadata as MlaMetadata
from seekax.lowering.mla_split import mla_metadata as mla_metadata
from seekax.lowering.mla_split import split_ranges as split_ranges
from seekax.lowering.reference import mla_decode as ref

KERNEL_Q_DTYPES = ("bfloat16", "float16")
LSE_EMPTY = (-math.inf, math.inf)   # the lse of a query with no key: seekax's -inf, or FlashMLA's +inf


def _concrete(x) -> np.ndarray | None:
    """The value of `x` when it is known now (not a tracer), else None: value checks only run eagerly."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


class MlaProblem(NamedTuple):
    """What validation found: the sizes, dtypes and the resolved softmax scale of one decode call."""

    batch: int
    q_len: int
    q_heads: int
    kv_heads: int
    qk_dim: int
    v_dim: int
    page_size: int
    q_dtype: str
    kv_dtype: str
    causal: bool
    mean_len: int
    softmax_scale: float
    lse_empty: float

    def spec(self) -> MlaDecodeSpec:
        """The kernel-sized spec (the config cache's key); only for problems the kernel takes."""
        return MlaDecodeSpec(batch=self.batch, seq_len=self.mean_len, q_len=self.q_len, q_heads=self.q_heads,
                             kv_heads=self.kv_heads, qk_dim=self.qk_dim, v_dim=self.v_dim, page_size=self.page_size,
                             q_dtype=self.q_dtype, kv_dtype=self.kv_dtype, causal=self.causal)


def validate_mla_decode(q, kv_cache, block_table, seq_lens, *, v_dim, softmax_scale, causal,
                        metadata: MlaMetadata | None = None, config: MlaTileConfig | None = None,
                        kv_dtypes=("bfloat16", "float16", "float32"), same_dtype: bool = True,
                        attn_sink=None, lse_empty: float = -math.inf) -> MlaProblem:
    """The one validation point for every backend (the reference's contract; the kernel's narrower one is
    `_check_kernel_takes`). Length values are checked when concrete (eager calls); under jit they are trusted
    (the kernel clamps to the block table, the reference masks). `metadata` must be planned for this batch, its
    KV heads and the tile config's block."""
    if getattr(q, "ndim", None) != 4:
        raise fail("q.shape", getattr(q, "shape", None), "[batch, q_len, heads, qk_dim]")
    if getattr(kv_cache, "ndim", None) != 4:
        raise fail("kv_cache.shape", getattr(kv_cache, "shape", None), "[num_pages, page_size, kv_heads, qk_dim]")
    b, s_q, h, d = q.shape
    num_pages, page, kv_heads, d_kv = kv_cache.shape
    if kv_heads < 1 or h % kv_heads:
        raise fail("kv_cache.shape", tuple(kv_cache.shape), f"kv_heads (dim 2) >= 1 dividing the {h} query heads "
                                                             f"of q.shape={tuple(q.shape)}")
    if d_kv != d:
        raise fail("kv_cache.shape", tuple(kv_cache.shape), f"qk_dim={d} matching q.shape={tuple(q.shape)}")
    v_dim = check_int("v_dim", v_dim, min_value=1)
    if v_dim > d:
        raise fail("v_dim", v_dim, f"<= qk_dim={d} (V is a prefix of the latent)")
    if num_pages < 1 or page < 1:
        raise fail("kv_cache.shape", tuple(kv_cache.shape), "at least one page of at least one token")
    qd, kvd = np.dtype(q.dtype).name, np.dtype(kv_cache.dtype).name
    q_dtypes = ("bfloat16", "float16", "float32")
    if qd not in q_dtypes:
        raise fail("q.dtype", qd, f"one of {q_dtypes}")
    if kvd not in kv_dtypes:
        raise fail("kv_cache.dtype", kvd, f"one of {tuple(kv_dtypes)}")
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
    if softmax_scale is not None and not (is_real_number(softmax_scale) and 0 < softmax_scale < math.inf):
        raise fail("softmax_scale", softmax_scale, "a positive finite float or None (1/sqrt(qk_dim))")
    if not isinstance(causal, bool):
        raise fail("causal", causal, "a bool")
    _check_sink(attn_sink, h)
    if not isinstance(lse_empty, (int, float)) or lse_empty not in LSE_EMPTY:
        raise fail("lse_empty", lse_empty, "-inf (seekax's default) or +inf (FlashMLA's)")
    if config is not None and not isinstance(config, MlaTileConfig):
        raise fail("config", config, "an MlaTileConfig or None")
    block = (config or MlaTileConfig()).block_n
    if metadata is not None and (getattr(metadata, "block", None) != block
                                 or getattr(metadata.block_start, "shape", None) != (b * kv_heads,)):
        raise fail("metadata", f"MlaMetadata(block={getattr(metadata, 'block', None)}, "
                               f"batch={getattr(getattr(metadata, 'block_start', None), 'shape', None)})",
                   f"block={block} and batch x kv_heads = {b * kv_heads} "
                   f"(from mla_metadata(seq_lens, kv_heads={kv_heads}))")
    capacity = block_table.shape[1] * page
    lens = _concrete(seq_lens)
    if lens is not None and lens.size:
        if lens.min() < 0:
            raise fail("seq_lens", lens.tolist(), "lengths >= 0")
        if lens.max() > capacity:
            raise fail("seq_lens", lens.tolist(), f"lengths <= the block table's capacity "
                                                  f"{block_table.shape[1]} pages x {page} = {capacity}")
        _check_used_pages(_concrete(block_table), lens, page, num_pages)
        planned = None if metadata is None else _concrete(metadata.n_blocks)
        if planned is not None and not np.array_equal(planned, -(-np.repeat(lens, kv_heads) // block)):
            raise fail("metadata", f"MlaMetadata(n_blocks={planned.tolist()})",
                       f"a plan by mla_metadata(seq_lens) planned for seq_lens={lens.tolist()} "
                       f"(n_blocks={(-(-np.repeat(lens, kv_heads) // block)).tolist()}; a plan for other lengths "
                       "skips keys)")
    mean_len = int(lens.mean()) if lens is not None and lens.size else capacity
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
    return MlaProblem(batch=b, q_len=s_q, q_heads=h, kv_heads=kv_heads, qk_dim=d, v_dim=v_dim, page_size=page,
                      q_dtype=qd, kv_dtype=kvd, causal=causal, mean_len=mean_len, softmax_scale=scale,
                      lse_empty=float(lse_empty))


def _check_used_pages(table: np.ndarray | None, lens: np.ndarray, page: int, num_pages: int) -> None:
    """Eager calls: every block-table entry a sequence reads (its first ceil(len / page)) is a page of the cache;
    the gather (and the kernel) would clamp it to a real page, silently. Entries past them may hold anything."""
    if table is None:
        return
    used = np.arange(table.shape[1])[None] * page < lens[:, None]                 # [B, max_pages]
    bad = np.argwhere(used & ((table < 0) | (table >= num_pages)))
    if bad.size:
        b, j = bad[0]
        raise fail(f"block_table[{b}, {j}]", int(table[b, j]), f"a page id in [0, {num_pages}) of kv_cache (page {j} "
                   f"of sequence {b}, seq_len {int(lens[b])}; entries past a sequence's pages are never read)")


def _check_sink(attn_sink, heads: int) -> None:
    """attn_sink: None or one float logit per query head, [heads] (FlashMLA's `attn_sink`, float32)."""
    if attn_sink is None:
        return
    if getattr(attn_sink, "shape", None) != (heads,) or not jnp.issubdtype(attn_sink.dtype, jnp.floating):
        raise fail("attn_sink", (getattr(attn_sink, "shape", None), str(getattr(attn_sink, "dtype", None))),
                   f"a float array [heads={heads}] (one logit per query head) or None")


def _kernel_takes_page(page_size: int, block_n: int = 64) -> bool:
    """Page sizes the paged kernel reads: a multiple of its 64-key step (a step is part of one page) or 16 and
    32 (a step spans 64 / page pages, one TMA each; 8-row swizzled tiles take 16-row slices)."""
    return page_size % block_n == 0 or page_size in (16, 32)


def _check_kernel_takes(p: MlaProblem, config: MlaTileConfig | None, *, cache: str,
                        scales_shape: tuple[int, ...] = ()) -> None:
    """The Hopper decode kernel's contract, checked at its entry: NotImplementedError (one line) for a valid
    problem it does not take. cache: "bf16" | "fp8" (DeepSeek-V3.2's cache, its scales of `scales_shape`) |
    "sparse" | "sparse_fp8" (token ids instead of pages: no page-size rule)."""
    k = config or MlaTileConfig()
    if (p.qk_dim, p.v_dim) != (k.qk_dim, k.v_dim):
        raise NotImplementedError(f"qk_dim={p.qk_dim}, v_dim={p.v_dim}: the MLA decode kernel takes qk_dim "
                                  f"{k.qk_dim} (latent + rope) and v_dim {k.v_dim}")
    if not cache.startswith("sparse") and not _kernel_takes_page(p.page_size, k.block_n):
        raise NotImplementedError(f"page_size={p.page_size}: the MLA decode kernel takes pages of 16, 32 or a "
                                  f"multiple of {k.block_n} tokens")
    if min(p.batch, p.q_len, p.q_heads) == 0:
        raise NotImplementedError(f"batch={p.batch}, q_len={p.q_len}, heads={p.q_heads}: nothing to launch")
    if cache.endswith("fp8"):
        if p.q_dtype != "bfloat16":
            raise NotImplementedError(f"q.dtype={p.q_dtype}: the FP8-cache kernel takes bfloat16 (its rope and "
                                      "tile are bf16)")
        if scales_shape[-1] != k.v_dim // SCALE_BLOCK:
            raise NotImplementedError(f"scales.shape={scales_shape}: the FP8-cache kernel takes one scale per token "
                                      f"and {SCALE_BLOCK} channels ([..., {k.v_dim // SCALE_BLOCK}])")
    elif p.q_dtype not in KERNEL_Q_DTYPES:
        raise NotImplementedError(f"q.dtype={p.q_dtype}: the MLA decode kernel takes one of {KERNEL_Q_DTYPES}")


def _tile_config(p: MlaProblem, config: MlaTileConfig | None, backend: str, *, stages: int,
                 kv_dtype: str | None = None) -> MlaTileConfig:
    """Explicit > autotuned winner cached for this spec on this device > the default with `stages` KV slots
    (2 for the bf16 cache; 1 where a staging slot sits beside the bf16 tile: FP8 and sparse)."""
    spec_key = p._replace(kv_dtype=kv_dtype or p.kv_dtype, page_size=MlaTileConfig().block_n).spec().key()
    return pick_config(config, spec_key=spec_key, from_dict=MlaTileConfig.from_dict,
                       heuristic=lambda: MlaTileConfig(stages=stages), use_cache=backend == "mosaic")


def mla_decode(q: jax.Array, kv_cache: jax.Array, block_table: jax.Array, seq_lens: jax.Array, *,
               v_dim: int = 512, softmax_scale: float | None = None, causal: bool = True,
               metadata: MlaMetadata | None = None, config: MlaTileConfig | None = None,
               backend: str = "auto", num_sms: int | None = None, attn_sink: jax.Array | None = None,
               lse_empty: float = -math.inf) -> tuple[jax.Array, jax.Array]:
    """MLA decode over a paged latent cache (FlashMLA's `flash_mla_with_kvcache`).

    q: [B, q_len, H, 576] bf16; kv_cache: [num_pages, page_size, h_kv, 576] (V = first v_dim channels; query
    head h reads KV head h // (H / h_kv)); block_table: [B, max_pages] int32; seq_lens: [B] int32 -> out
    [B, q_len, H, v_dim] (q.dtype), lse [B, H, q_len] float32. Causal for q_len > 1: query i sees keys
    < seq_len - q_len + i + 1. attn_sink [H] (optional): out scaled by 1 / (1 + exp(sink - lse)), lse unchanged.
    A query with no visible key returns out = 0 and lse = `lse_empty` (-inf; +inf is FlashMLA's value).
    The reference also takes other head dims, page sizes and float32 (small demo models, exact tests); the
    kernel takes bf16/f16, 576/512 and pages of 16, 32 or a multiple of 64 tokens.
    """
    p = validate_mla_decode(q, kv_cache, block_table, seq_lens, v_dim=v_dim, softmax_scale=softmax_scale,
                            causal=causal, metadata=metadata, config=config, attn_sink=attn_sink,
                            lse_empty=lse_empty)

    def kernel(backend):
        _check_kernel_takes(p, config, cache="bf16")
        cfg = _tile_config(p, config, backend, stages=2)
        return _run_kernel(q, (kv_cache,), block_table, seq_lens, p, mode="bf16", metadata=metadata, config=cfg,
                           backend=backend, num_sms=num_sms, attn_sink=attn_sink)

    return run_op(backend, kernel=kernel, name="mla_decode", reference=lambda: ref.mla_decode(
        q, kv_cache, block_table, seq_lens, v_dim=p.v_dim, softmax_scale=p.softmax_scale, causal=causal,
        attn_sink=attn_sink, lse_empty=p.lse_empty))


def _run_kernel(q, cache: tuple, block_table, seq_lens, p: MlaProblem, *, mode: str, metadata,
                config: MlaTileConfig, backend: str, num_sms: int | None, attn_sink):
    """The paged kernel path shared by the bf16 and FP8 caches: build the split metadata unless given (one
    kernel "batch" per sequence and KV head), then launch."""
    from seekax.lowering.mosaic import mla_decode_sm90

    if metadata is None:
        metadata = mla_metadata(seq_lens, num_sms or num_sms_for(backend), q_len=p.q_len, num_heads=p.q_heads,
                                kv_heads=p.kv_heads, block=config.block_n)
    return mla_decode_sm90.mla_decode(q, cache, block_table, seq_lens, metadata, mode=mode,
                                      softmax_scale=p.softmax_scale, causal=p.causal, config=config,
                                      interpret=backend == "interpret", attn_sink=attn_sink, lse_empty=p.lse_empty)


def mla_decode_split_xla(q, kv_cache, block_table, seq_lens, metadata: MlaMetadata, *, v_dim: int = 512,
                         softmax_scale: float | None = None, causal: bool = True, attn_sink=None,
                         lse_empty: float = -math.inf):
    """The split-KV algorithm in plain JAX: one partial per metadata split, then the combine. Same result
    as `mla_decode(..., backend="xla")` up to float32 rounding; the executable spec of the kernel's plan
    (several KV heads: one plan "batch" per sequence and KV head, as the kernel runs them)."""
    p = validate_mla_decode(q, kv_cache, block_table, seq_lens, v_dim=v_dim, softmax_scale=softmax_scale,
                            causal=causal, metadata=metadata, attn_sink=attn_sink, lse_empty=lse_empty)
    q1, kv1, table1, lens1 = ref.one_kv_head(q, kv_cache, block_table, seq_lens)   # [B*h_kv, ...]
    b, lo, hi = split_ranges(metadata)                                        # [T] each
    bc = jnp.clip(b, 0, q1.shape[0] - 1)
    out_p, lse_p = ref.mla_decode_partial(q1[bc], kv1, table1[bc], lens1[bc], lo, hi,
                                          v_dim=v_dim, softmax_scale=p.softmax_scale, causal=causal)
    out, lse = ref.merge_kv_heads(*ref.combine_splits(out_p, lse_p, metadata.split_offsets, out_dtype=jnp.float32),
                                  kv_heads=p.kv_heads)
    return ref.apply_sink(out, lse, attn_sink).astype(q.dtype), ref.fill_empty_lse(lse, p.lse_empty)


def mla_decode_fp8(q: jax.Array, latent_fp8: jax.Array, scales: jax.Array, rope: jax.Array, block_table: jax.Array,
                   seq_lens: jax.Array, *, softmax_scale: float | None = None, causal: bool = True,
                   metadata: MlaMetadata | None = None, config: MlaTileConfig | None = None,
                   backend: str = "auto", num_sms: int | None = None, attn_sink: jax.Array | None = None,
                   lse_empty: float = -math.inf) -> tuple[jax.Array, jax.Array]:
    """MLA decode over DeepSeek-V3.2's FP8 cache (`reference.mla_decode.quantize_fp8_latent`): latent_fp8
    [P, page, h_kv, 512] e4m3, scales [P, page, h_kv, 4] float32 (one per token and 128 channels), rope
    [P, page, h_kv, 64] bf16. Same outputs and options as `mla_decode`. "mosaic"/"interpret": the Hopper kernel
    reads the FP8 pages (656 bytes per token instead of 1152) and dequantises them in shared memory, so K and V
    enter the bf16 wgmma rounded to bf16 (it takes bf16 q, 576/512 dims, pages of 16, 32 or a multiple of 64
    tokens, 4 scales a token); "xla": dequantise to float32, then the reference."""
    dequantised = _fp8_cache_shape(latent_fp8, scales, rope)                  # what the reference sees
    p = validate_mla_decode(q, dequantised, block_table, seq_lens, v_dim=latent_fp8.shape[-1],
                            softmax_scale=softmax_scale, causal=causal, metadata=metadata, config=config,
                            kv_dtypes=("float32",), same_dtype=False, attn_sink=attn_sink, lse_empty=lse_empty)

    def kernel(backend):
        _check_kernel_takes(p, config, cache="fp8", scales_shape=tuple(scales.shape))
        cfg = _tile_config(p, config, backend, stages=1, kv_dtype=FP8_DTYPE)  # two fp8 slots exceed 227 KiB
        return _run_kernel(q, (latent_fp8, scales, rope), block_table, seq_lens, p, mode="fp8", metadata=metadata,
                           config=cfg, backend=backend, num_sms=num_sms, attn_sink=attn_sink)

    def reference():
        kv = ref.dequantize_fp8_latent(latent_fp8, scales, rope)                 # [P, page, h_kv, v + rope] f32
        return ref.mla_decode(q, kv, block_table, seq_lens, v_dim=p.v_dim, softmax_scale=p.softmax_scale,
                              causal=causal, attn_sink=attn_sink, lse_empty=p.lse_empty)

    return run_op(backend, kernel=kernel, reference=reference, name="mla_decode_fp8")


def _fp8_cache_shape(latent_fp8, scales, rope, name: str = "") -> jax.ShapeDtypeStruct:
    """Check DeepSeek-V3.2's FP8 cache arrays against each other; the dequantised cache's shape (float32).
    `name` prefixes the argument names (the sparse decode's extra cache)."""
    if getattr(latent_fp8, "ndim", None) != 4 or np.dtype(latent_fp8.dtype).name != FP8_DTYPE:
        raise fail(f"{name}latent_fp8", (getattr(latent_fp8, "shape", None), str(getattr(latent_fp8, "dtype", None))),
                   f"a {FP8_DTYPE} array [num_pages, page_size, kv_heads, v_dim]")
    p, page, h, v = latent_fp8.shape
    if getattr(scales, "shape", None) is None or scales.shape[:3] != (p, page, h) or scales.ndim != 4 \
            or v % scales.shape[-1] or np.dtype(scales.dtype).name != "float32":
        raise fail(f"{name}scales", getattr(scales, "shape", None),
                   f"float32 [{p}, {page}, {h}, tiles] with tiles dividing {v}")
    if getattr(rope, "ndim", None) != 4 or rope.shape[:3] != (p, page, h) or np.dtype(rope.dtype).name != "bfloat16":
        raise fail(f"{name}rope", getattr(rope, "shape", None), f"bfloat16 [{p}, {page}, {h}, rope_dim]")
    return jax.ShapeDtypeStruct((p, page, h, v + rope.shape[-1]), jnp.float32)


def _check_ids(name: str, ids, q, length_name: str, length) -> None:
    """Sparse token ids [batch, q_len, topk] int32 matching q, and their optional top-k lengths ([batch] or
    [batch, q_len] int32; values in [0, topk], checked when concrete)."""
    if getattr(ids, "ndim", None) != 3 or ids.shape[:2] != tuple(getattr(q, "shape", (None, None))[:2]):
        raise fail(f"{name}.shape", getattr(ids, "shape", None), "[batch, q_len, topk] matching q")
    if np.dtype(ids.dtype).name != "int32":
        raise fail(f"{name}.dtype", np.dtype(ids.dtype).name, "int32")
    if ids.shape[2] < 1:
        raise fail(f"{name}.shape", tuple(ids.shape), "topk >= 1")
    if length is None:
        return
    if getattr(length, "shape", None) not in (ids.shape[:1], ids.shape[:2]) \
            or np.dtype(length.dtype).name != "int32":
        raise fail(length_name, (getattr(length, "shape", None), str(getattr(length, "dtype", None))),
                   f"int32 [batch={ids.shape[0]}] or [batch, q_len={ids.shape[1]}] (or None)")
    value = _concrete(length)
    if value is not None and value.size and (value.min() < 0 or value.max() > ids.shape[2]):
        raise fail(length_name, value.tolist(), f"lengths in [0, topk={ids.shape[2]}]")


def _validate_sparse(q, kv_cache, indices, *, v_dim, softmax_scale, topk_length=None, extra_cache=None,
                     extra_indices=None, extra_topk_length=None, **kv) -> MlaProblem:
    """Sparse decode's validation: the indices and top-k lengths, the extra cache (its dequantised shape for
    the FP8 cache) against the main one, then the dense checks over a token table of one entry."""
    _check_ids("indices", indices, q, "topk_length", topk_length)
    if (extra_cache is None) != (extra_indices is None):
        raise fail("extra_indices", None if extra_indices is None else "given",
                   "given exactly when an extra cache is (its own token ids into it)")
    if extra_cache is None and extra_topk_length is not None:
        raise fail("extra_topk_length", "given", "None without an extra cache")
    if extra_cache is not None:
        _check_ids("extra_indices", extra_indices, q, "extra_topk_length", extra_topk_length)
        main, extra = kv_cache, extra_cache
        if getattr(extra, "ndim", None) != 4 or extra.shape[2:] != main.shape[2:] \
                or np.dtype(extra.dtype) != np.dtype(main.dtype):
            raise fail("extra_kv_cache", (getattr(extra, "shape", None), str(getattr(extra, "dtype", None))),
                       f"{np.dtype(main.dtype).name} [pages, page_size, {main.shape[2]}, {main.shape[3]}] like "
                       "kv_cache (its page size may differ)")
    if getattr(kv_cache, "ndim", None) == 4 and kv_cache.shape[2] != 1:
        raise fail("kv_cache.shape", tuple(kv_cache.shape), "one latent KV head for sparse decode "
                                                             "(FlashMLA's sparse decode takes h_kv = 1)")
    b = q.shape[0] if getattr(q, "ndim", None) == 4 else 0                 # a bad q fails in the dense checks
    return validate_mla_decode(q, kv_cache, jnp.zeros((b, 1), jnp.int32), jnp.zeros((b,), jnp.int32), v_dim=v_dim,
                               softmax_scale=softmax_scale, causal=False, **kv)


def mla_decode_sparse(q: jax.Array, kv_cache: jax.Array, indices: jax.Array, *, v_dim: int = 512,
                      softmax_scale: float | None = None, config: MlaTileConfig | None = None,
                      backend: str = "auto", num_sms: int | None = None, topk_length: jax.Array | None = None,
                      extra_kv_cache: jax.Array | None = None, extra_indices: jax.Array | None = None,
                      extra_topk_length: jax.Array | None = None, attn_sink: jax.Array | None = None,
                      lse_empty: float = -math.inf) -> tuple[jax.Array, jax.Array]:
    """Sparse MLA decode (DeepSeek-V3.2 DSA, FlashMLA's sparse decode): q [B, s_q, H, 576] attends only to
    its top-k cache tokens, indices [B, s_q, topk] int32 flat token ids (page * page_size + slot); -1 or
    out of range entries are skipped, and with topk_length ([B] as FlashMLA's, or [B, s_q] per query token)
    only the first topk_length ids count. extra_kv_cache [P2, page2, 1, 576] with extra_indices [B, s_q, topk2]
    (and extra_topk_length): more tokens from a second cache, one softmax over both sets. No causal mask (the
    indexer chose the tokens). Same outputs, attn_sink and lse_empty as `mla_decode`.
    "mosaic"/"interpret": the Hopper kernel with one "batch" per query token, its valid ids (both caches') moved
    to the front (a stable sort of [B, s_q, topk + topk2] ids, in XLA) and gathered row by row by TMA inside
    the kernel; split-KV over the valid counts as for `mla_decode`. "xla": the reference (gather, then attend)."""
    p = _validate_sparse(q, kv_cache, indices, v_dim=v_dim, softmax_scale=softmax_scale, config=config,
                         topk_length=topk_length, extra_cache=extra_kv_cache, extra_indices=extra_indices,
                         extra_topk_length=extra_topk_length, attn_sink=attn_sink, lse_empty=lse_empty)

    def kernel(backend):
        _check_kernel_takes(p, config, cache="sparse")
        caches = [(kv_cache.reshape(-1, p.qk_dim),)]                          # [tokens, 576]
        if extra_kv_cache is not None:
            caches.append((extra_kv_cache.reshape(-1, p.qk_dim),))
        return _run_sparse_kernel(q, caches, (indices, extra_indices), (topk_length, extra_topk_length), p,
                                  config=config, backend=backend, num_sms=num_sms, attn_sink=attn_sink)

    return run_op(backend, kernel=kernel, name="mla_decode_sparse", reference=lambda: ref.mla_decode_sparse(
        q, kv_cache, indices, v_dim=p.v_dim, softmax_scale=p.softmax_scale, topk_length=topk_length,
        extra_kv_cache=extra_kv_cache, extra_indices=extra_indices, extra_topk_length=extra_topk_length,
        attn_sink=attn_sink, lse_empty=p.lse_empty))


def mla_decode_sparse_fp8(q: jax.Array, latent_fp8: jax.Array, scales: jax.Array, rope: jax.Array,
                          indices: jax.Array, *, softmax_scale: float | None = None,
                          config: MlaTileConfig | None = None, backend: str = "auto",
                          num_sms: int | None = None, topk_length: jax.Array | None = None,
                          extra_cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                          extra_indices: jax.Array | None = None, extra_topk_length: jax.Array | None = None,
                          attn_sink: jax.Array | None = None,
                          lse_empty: float = -math.inf) -> tuple[jax.Array, jax.Array]:
    """`mla_decode_sparse` over DeepSeek-V3.2's FP8 cache (as `mla_decode_fp8` takes it), the combination
    FlashMLA's sparse decode serves; extra_cache is a second FP8 cache (latent, scales, rope). "mosaic"/
    "interpret": the kernel gathers latent and rope rows by TMA and dequantises them in shared memory; each query
    token's scales are gathered in XLA first (16 B per token, too small for a TMA row copy). "xla": dequantise
    to float32, then the sparse reference."""
    dequantised = _fp8_cache_shape(latent_fp8, scales, rope)
    extra_deq = None
    if extra_cache is not None:
        if not isinstance(extra_cache, tuple) or len(extra_cache) != 3:
            raise fail("extra_cache", type(extra_cache).__name__, "a tuple (latent_fp8, scales, rope) or None")
        extra_deq = _fp8_cache_shape(*extra_cache, name="extra_cache.")
    p = _validate_sparse(q, dequantised, indices, v_dim=latent_fp8.shape[-1], softmax_scale=softmax_scale,
                         config=config, kv_dtypes=("float32",), same_dtype=False, topk_length=topk_length,
                         extra_cache=extra_deq, extra_indices=extra_indices, extra_topk_length=extra_topk_length,
                         attn_sink=attn_sink, lse_empty=lse_empty)
    if extra_cache is not None and extra_cache[1].shape[-1] != scales.shape[-1]:
        raise fail("extra_cache.scales", tuple(extra_cache[1].shape), f"{scales.shape[-1]} scales a token like scales")

    def kernel(backend):
        _check_kernel_takes(p, config, cache="sparse_fp8", scales_shape=tuple(scales.shape))
        caches = [tuple(x.reshape(-1, x.shape[-1]) for x in (latent_fp8, scales, rope))]   # [tokens, ...] each
        if extra_cache is not None:
            caches.append(tuple(x.reshape(-1, x.shape[-1]) for x in extra_cache))
        return _run_sparse_kernel(q, caches, (indices, extra_indices), (topk_length, extra_topk_length), p,
                                  config=config, backend=backend, num_sms=num_sms, attn_sink=attn_sink,
                                  kv_dtype=FP8_DTYPE)

    def reference():
        kv = ref.dequantize_fp8_latent(latent_fp8, scales, rope)
        extra = None if extra_cache is None else ref.dequantize_fp8_latent(*extra_cache)
        return ref.mla_decode_sparse(q, kv, indices, v_dim=p.v_dim, softmax_scale=p.softmax_scale,
                                     topk_length=topk_length, extra_kv_cache=extra, extra_indices=extra_indices,
                                     extra_topk_length=extra_topk_length, attn_sink=attn_sink, lse_empty=p.lse_empty)

    return run_op(backend, kernel=kernel, reference=reference, name="mla_decode_sparse_fp8")


def _run_sparse_kernel(q, caches: list[tuple], indices: tuple, lengths: tuple, p: MlaProblem, *,
                       config: MlaTileConfig | None, backend: str, num_sms: int | None, attn_sink,
                       kv_dtype: str | None = None):
    """Sparse decode as dense decode over a token table: one "batch" per query token, its valid ids first
    (a stable sort), padded to whole 64-token steps, their count as its length. `caches`: the flat main cache
    and optionally the extra one, each (rows [tokens, 576],) or FP8 (latent, scales, rope) [tokens, ...]; the
    extra cache's ids are offset by the main cache's token count. FP8 scales are gathered here by the ids."""
    from seekax.lowering.mosaic import mla_decode_sm90

    config = _tile_config(p, config, backend, stages=1, kv_dtype=kv_dtype)   # a 2nd staging slot: > 227 KiB
    b, s_q, heads = p.batch, p.q_len, p.q_heads
    counts = [c[0].shape[0] for c in caches]                                          # tokens per cache
    ids, valid = [], []
    for n, offset, idx, length in zip(counts, (0, counts[0]), indices, lengths):
        ok = ref.valid_ids(idx, n, length).reshape(b * s_q, idx.shape[2])            # [B*s_q, k]
        ids.append(idx.reshape(b * s_q, idx.shape[2]) + offset)
        valid.append(ok)
    ids, valid = jnp.concatenate(ids, axis=1), jnp.concatenate(valid, axis=1)        # [B*s_q, k (+ k2)]
    order = jnp.argsort(~valid, axis=1, stable=True)                                  # valid ids first
    ids = jnp.take_along_axis(jnp.where(valid, ids, 0), order, axis=1)
    width = -(-ids.shape[1] // config.block_n) * config.block_n
    ids = jnp.pad(ids, ((0, 0), (0, width - ids.shape[1])))                           # [B*s_q, topk_p]
    lens = valid.sum(axis=1).astype(jnp.int32)                                        # [B*s_q]
    if kv_dtype == FP8_DTYPE:                                                         # scales per query token
        scale = lambda c, i: jnp.take(c[1], jnp.clip(i, 0, c[1].shape[0] - 1), axis=0)  # noqa: E731
        gathered = scale(caches[0], ids)                                              # [B*s_q, topk_p, 4]
        if len(caches) > 1:
            gathered = jnp.where((ids < counts[0])[..., None], gathered, scale(caches[1], ids - counts[0]))
        cache = (caches[0][0], gathered, caches[0][2]) + ((caches[1][0], caches[1][2]) if len(caches) > 1 else ())
        mode = "sparse_fp8"
    else:
        cache, mode = tuple(c[0] for c in caches), "sparse"
    metadata = mla_metadata(lens, num_sms or num_sms_for(backend), q_len=1, num_heads=heads, block=config.block_n)
    out, lse = mla_decode_sm90.mla_decode(
        q.reshape(b * s_q, 1, heads, p.qk_dim), cache, ids, lens, metadata, mode=mode, extra=len(caches) > 1,
        softmax_scale=p.softmax_scale, causal=False, config=config, interpret=backend == "interpret",
        attn_sink=attn_sink, lse_empty=p.lse_empty)
    out = out.reshape(b, s_q, heads, p.v_dim)                                         # [B, s_q, H, 512]
    return out, jnp.transpose(lse.reshape(b, s_q, heads), (0, 2, 1))                 # [B, H, s_q]
