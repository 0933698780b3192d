"""Golden lowered IR: the Mosaic GPU module each Hopper kernel lowers to, for fixed small problems, pinned by digest,
so a change to a generated kernel (a refactor that was meant to change nothing included) is noticed.

The digest is sha256 of the decoded module text (`seekax lower OP --emit mosaic`) without its dump counter and
module symbol name, which vary between runs. After an intended kernel change, check its evidence (interpret mode,
cross-lowering, GPU) and replace the digest with the one the failure prints."""

import functools
import hashlib
import re

import jax
import jax.numpy as jnp
import pytest

from seekax.lowering.inspect import lower_for_hopper
from seekax.ops import fp8, mla
from seekax.ops.matmul import matmul_nt

S, BF, F8, F32, I32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float8_e4m3fn, jnp.float32, jnp.int32


def _fp8_cache(pages):
    return S((pages, 64, 1, 512), F8), S((pages, 64, 1, 4), F32), S((pages, 64, 1, 64), BF)


def _grouped(g, m, n, k, masked):
    lead = (g, m) if masked else (m,)
    return S((*lead, k), F8), S((*lead, k // 128), F32), S((g, n, k), F8), S((g, n // 128, k // 128), F32), S((g,), I32)


_Q = S((4, 2, 64, 576), BF)                                   # B=4, s_q=2 (the causal row limits), 64 heads
_PAGED = (S((4, 4), I32), S((4,), I32))                       # block table, lengths
_TOPK = S((4, 2, 128), I32)                                   # sparse: 128 token ids per query token
CASES = {  # name -> (fn, abstract args, digest of the first kernel's module)
    "mla_decode": (mla.mla_decode, (_Q, S((16, 64, 1, 576), BF), *_PAGED), "ecdbd10526dffb2e"),
    "mla_decode_fp8": (mla.mla_decode_fp8, (_Q, *_fp8_cache(16), *_PAGED), "296ed3bd748f1f86"),
    "mla_decode_sparse": (mla.mla_decode_sparse, (_Q, S((16, 64, 1, 576), BF), _TOPK), "0d077fc1aed5440b"),
    "mla_decode_sparse_fp8": (mla.mla_decode_sparse_fp8, (_Q, *_fp8_cache(16), _TOPK), "2e0a954eebc0929e"),
    "matmul": (matmul_nt, (S((256, 256), BF), S((256, 256), BF)), "58967382310f8474"),
    "fp8_gemm": (fp8.fp8_gemm_nt, fp8.lowering_example(256, 256, 256)[1], "bd816b1f1b9219a7"),
    "fp8_gemm_small_m": (fp8.fp8_gemm_nt, fp8.lowering_example(8, 7168, 256)[1], "d38b6a1dcaea5022"),
    "fp8_contiguous": (fp8.m_grouped_fp8_gemm_nt_contiguous, _grouped(2, 256, 256, 256, masked=False),
                       "820c1293b4a61b43"),
    "fp8_masked": (fp8.m_grouped_fp8_gemm_nt_masked, _grouped(2, 128, 256, 256, masked=True), "7a57db9bad99f0f4"),
    "fp8_k_grouped": (fp8.k_grouped_fp8_gemm_tn_contiguous,
                      (S((512, 128), F8), S((4, 128), F32), S((512, 256), F8), S((4, 256), F32), S((2,), I32)),
                      "1f286b9c6381e54d"),
}


def module_digest(module_text: str) -> str:
    """16 hex digits of sha256 over the module text, its dump counter and symbol name removed."""
    text = re.sub(r'mosaic_gpu\.dump_basename = "[^"]*"', "", module_text)
    text = re.sub(r"^module @\w+", "module", text)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_digest_ignores_only_the_run_dependent_names():
    a = 'module @_kernel attributes {mosaic_gpu.dump_basename = "_kernel_3"} {\n  %c1 = arith.constant 1 : i32\n}'
    b = a.replace("_kernel_3", "_kernel_11").replace("@_kernel", "@anonymous")
    assert module_digest(a) == module_digest(b)
    assert module_digest(a) != module_digest(a.replace("constant 1", "constant 2"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_lowered_module_is_pinned(name):
    fn, args, digest = CASES[name]
    modules = lower_for_hopper(functools.partial(fn, backend="mosaic"), *args).mosaic_modules
    got = module_digest(modules[0])
    assert got == digest, (f"{name}: the lowered Mosaic module changed (digest {got}, pinned {digest}); "
                           "if intended, update CASES with the new digest")
