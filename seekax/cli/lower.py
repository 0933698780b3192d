"""`seekax lower OP ...`: print an op's IR at a named stage, or `--check` its kernel against Hopper limits.

Cross-lowers for CUDA on any machine (no GPU needed), so a GPU failure can be reproduced on a laptop.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp

from seekax.ir.tiling import GemmTileConfig, SharedMemoryBudgetExceeded
from seekax.ir.validate import check_int, fail
from seekax.lowering.inspect import EMIT_STAGES, lower_for_hopper

# Library parameter -> the flag's dest, for errors that name the flag.
PARAMS = {"a_dtype": "dtype", "a.dtype": "dtype", "b.dtype": "dtype"}


def _matmul(args) -> tuple[Callable[..., Any], tuple]:
    from seekax.ops.matmul import matmul_nt

    config = None
    if any(v is not None for v in (args.block_m, args.block_n, args.block_k, args.stages)):
        config = GemmTileConfig(block_m=args.block_m or 128, block_n=args.block_n or 128,
                                block_k=args.block_k or 64, stages=args.stages or 4)
    _check_sizes(args, "m", "n", "k")
    dtype = jnp.dtype(args.dtype)
    fn = functools.partial(matmul_nt, backend="mosaic", config=config)
    return fn, (jax.ShapeDtypeStruct((args.m, args.k), dtype), jax.ShapeDtypeStruct((args.n, args.k), dtype))


def _check_sizes(args, *dests: str) -> None:
    """Sizes the CLI turns into shapes must be positive (the library accepts empty shapes: nothing to lower)."""
    for dest in dests:
        check_int(dest, getattr(args, dest), min_value=1)


def _fp8_gemm(args):
    from seekax.ops.fp8 import lowering_example

    _check_sizes(args, "m", "n", "k")
    return lowering_example(args.m, args.n, args.k)


def _fp8_cache(pages: int, page: int = 64, kv_heads: int = 1) -> tuple:
    """DeepSeek-V3.2's FP8 cache as shapes: latent e4m3, a scale per token and 128 channels, bf16 rope."""
    return (jax.ShapeDtypeStruct((pages, page, kv_heads, 512), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((pages, page, kv_heads, 4), jnp.float32),
            jax.ShapeDtypeStruct((pages, page, kv_heads, 64), jnp.bfloat16))


def _mla(args, *, fp8: bool, sparse: bool):
    """MLA decode at FlashMLA's shapes: --batch, --seq-len (context tokens), --heads, --q-len, --kv-heads (FlashMLA's
    h_kv), --page-size. Sparse: --topk token ids per query token out of the --batch x --seq-len cached tokens."""
    from seekax.ops import mla

    _check_sizes(args, "batch", "seq_len", "heads", "q_len", "kv_heads", "page_size", *(("topk",) if sparse else ()))
    if args.heads % args.kv_heads:
        raise fail("kv_heads", args.kv_heads, f"a divisor of --heads={args.heads}")
    if sparse and args.kv_heads != 1:
        raise fail("kv_heads", args.kv_heads, "1 for sparse decode (FlashMLA's sparse decode takes one KV head)")
    page, heads = args.page_size, args.kv_heads
    pages = args.batch * -(-args.seq_len // page)
    q = jax.ShapeDtypeStruct((args.batch, args.q_len, args.heads, 576), jnp.bfloat16)
    cache = _fp8_cache(pages, page, heads) if fp8 else (jax.ShapeDtypeStruct((pages, page, heads, 576), jnp.bfloat16),)
    if sparse:
        rest = (jax.ShapeDtypeStruct((args.batch, args.q_len, args.topk), jnp.int32),)
    else:
        rest = (jax.ShapeDtypeStruct((args.batch, -(-args.seq_len // page)), jnp.int32),   # block table
                jax.ShapeDtypeStruct((args.batch,), jnp.int32))                          # lengths
    fn = getattr(mla, "mla_decode" + ("_sparse" if sparse else "") + ("_fp8" if fp8 else ""))
    return functools.partial(fn, backend="mosaic"), (q, *cache, *rest)


OPS: dict[str, Callable[[argparse.Namespace], tuple[Callable[..., Any], tuple]]] = {
    "matmul": _matmul,
    "fp8_gemm": _fp8_gemm,
    "mla_decode": functools.partial(_mla, fp8=False, sparse=False),
    "mla_decode_fp8": functools.partial(_mla, fp8=True, sparse=False),
    "mla_decode_sparse": functools.partial(_mla, fp8=False, sparse=True),
    "mla_decode_sparse_fp8": functools.partial(_mla, fp8=True, sparse=True),
}


def register(sub) -> None:
    p = sub.add_parser("lower", help="print an op's IR (jaxpr, StableHLO, Mosaic GPU MLIR) or check it for Hopper",
                       description=__doc__, params=PARAMS)
    p.add_argument("op", choices=sorted(OPS), help="the op to lower")
    p.add_argument("--m", type=int, default=1024, help="matmul, fp8_gemm: rows of A and of the output")
    p.add_argument("--n", type=int, default=1024, help="matmul, fp8_gemm: rows of B (columns of the output)")
    p.add_argument("--k", type=int, default=1024, help="matmul, fp8_gemm: the contracted dimension")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"),
                   help="matmul: operand dtype (the Mosaic matmul's; FP8 is the fp8_gemm op)")
    p.add_argument("--batch", type=int, default=128, help="mla_decode*: sequences")
    p.add_argument("--seq-len", type=int, default=4096, help="mla_decode*: context tokens per sequence")
    p.add_argument("--heads", type=int, default=128, help="mla_decode*: query heads")
    p.add_argument("--q-len", type=int, default=1, help="mla_decode*: query tokens per sequence (MTP: 2)")
    p.add_argument("--kv-heads", type=int, default=1,
                   help="mla_decode, mla_decode_fp8: KV heads (FlashMLA's h_kv), each with --heads / --kv-heads "
                        "query heads")
    p.add_argument("--page-size", type=int, default=64,
                   help="mla_decode*: tokens per cache page (the kernel takes 16, 32 or a multiple of 64)")
    p.add_argument("--topk", type=int, default=2048, help="mla_decode_sparse: token ids per query token")
    p.add_argument("--emit", choices=EMIT_STAGES, default="report", help="which stage to print")
    p.add_argument("--check", action="store_true",
                   help="report shared memory (limit 227 KiB) and wgmma use; "
                        "exit 1 if a kernel overflows or lacks wgmma")
    for name in ("block-m", "block-n", "block-k", "stages"):
        p.add_argument(f"--{name}", type=int, default=None,
                       help="matmul: tile config override (default: the heuristic's config)")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        fn, avals = OPS[args.op](args)
        lowered = lower_for_hopper(fn, *avals)
        text = lowered.emit("report" if args.check else args.emit)
    except SharedMemoryBudgetExceeded as e:  # a finding about the tile config, as --check reports it
        print(f"seekax lower {args.op}: FAIL shared memory: {e}", file=sys.stderr)
        return 1
    print(text)
    if args.check:
        reports = lowered.reports
        bad = [i for i, r in enumerate(reports) if not r.fits_smem]
        if not reports or bad or not any(r.has_wgmma for r in reports):
            print(f"seekax lower {args.op}: FAIL kernels {bad or 'none found'} overflow shared memory, or no kernel "
                  "uses wgmma", file=sys.stderr)
            return 1
        print(f"seekax lower {args.op}: OK ({len(reports)} kernel(s) fit 227 KiB; wgmma in "
              f"{sum(r.has_wgmma for r in reports)})")
    return 0
