"""Every op family through the one backend choice (`lowering.backend.run_op`), under every backend.

For each family a valid problem its kernel does not take: "mosaic" and "interpret" decline with a one-line
NotImplementedError, "xla" computes it, "auto" on a pretend Hopper tries the kernel, logs the refusal and returns
the reference's exact numbers, "auto" elsewhere never tries the kernel. And an invalid input per family: the
same ValueError on every backend, raised before the backend choice runs. Kernel numerics on shapes the kernels
take live beside each kernel's tests (tests/lowering/test_*_sm90.py, test_fp8_gemm_kernels.py).
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest

from seekax.lowering import backend
from seekax.lowering import dispatch_permute as perm
from seekax.lowering.reference.mla_decode import quantize_fp8_latent
from seekax.ops import fp8, matmul, mla
from seekax.testing.mla_cases import make_case

E4M3 = jnp.float8_e4m3fn


def _fp8_gemm_args(rng, m=64, n=40, k=256, groups=None):
    """Quantised operands with N = 40 (no FP8 kernel tile divides it)."""
    lead = () if groups is None else (groups,)
    a, sa = fp8.quantize_fp8(jnp.asarray(rng.standard_normal(lead + (m, k)), jnp.float32))
    b, sb = fp8.quantize_fp8(jnp.asarray(rng.standard_normal((groups or 1, n, k)), jnp.float32), (128, 128))
    return a, sa, (b if groups else b[0]), (sb if groups else sb[0])


def _permutation(rng, r=12, k=2, g=3):
    local = np.where(rng.random((r, k)) < 0.3, -1, rng.integers(0, g, (r, k))).astype(np.int32)
    return perm.make_permutation(jnp.asarray(local), g, 4)


def _mla_small(rng):
    """A latent of 64 dims (32 of them V): the demo model's kind, not the kernel's 576/512."""
    return make_case(rng, lens=[5, 70], heads=4, d=64, nan_unused=False)


def _declined(rng):
    """name -> (call(backend), what the refusal names)."""
    a, b = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in ((100, 128), (128, 128)))
    x = jnp.asarray(rng.standard_normal((64, 256)), jnp.float32)
    d = _fp8_gemm_args(rng)
    g = _fp8_gemm_args(rng, groups=2)
    sizes = jnp.asarray([30, 20], jnp.int32)
    gm = (g[0], g[1], g[2], g[3])
    kq, ks = fp8.quantize_fp8(jnp.asarray(rng.standard_normal((40, 256)), jnp.float32))        # [N, T] per token
    aq, sa = fp8.quantize_fp8(jnp.asarray(rng.standard_normal((64, 256)), jnp.float32))
    q, kv, table, seq = _mla_small(rng)
    q8, kv8, table8, seq8 = make_case(rng, lens=[5, 70], heads=4, nan_unused=False)
    lat2, scales2, rope2 = quantize_fp8_latent(kv8, tile=256)                   # 2 scales a token: not the kernel's 4
    lat, scales, rope = quantize_fp8_latent(kv8)
    ids = jnp.asarray(rng.integers(-1, kv.shape[0] * 64, (2, 1, 20)), jnp.int32)
    p = _permutation(rng)
    rows = jnp.asarray(rng.standard_normal((12, 100)), jnp.bfloat16)          # 200-byte rows: not 128-byte tiles
    w = jnp.asarray(rng.standard_normal((40, 128)) / 10, jnp.bfloat16)
    xs = jnp.asarray(rng.standard_normal((8, 128)), jnp.bfloat16)
    return {
        "matmul_nt": (lambda be: matmul.matmul_nt(a, b, backend=be), "m=100"),
        "quantize_fp8": (lambda be: fp8.quantize_fp8(x, (128, 128), backend=be), "block=(128, 128)"),
        "fp8_gemm_nt": (lambda be: fp8.fp8_gemm_nt(*d, backend=be), "n=40"),
        "m_grouped_contiguous": (lambda be: fp8.m_grouped_fp8_gemm_nt_contiguous(
            gm[0].reshape(128, 256), gm[1].reshape(128, 2), gm[2], gm[3], sizes, backend=be), "n=40"),
        "m_grouped_masked": (lambda be: fp8.m_grouped_fp8_gemm_nt_masked(*gm, sizes, backend=be), "n=40"),
        "k_grouped": (lambda be: fp8.k_grouped_fp8_gemm_tn_contiguous(
            aq.T, sa.T, kq.T, ks.T, jnp.asarray([128, 128], jnp.int32), backend=be), "n=40"),
        "fp8_linear": (lambda be: fp8.fp8_linear(xs, w, backend=be), "n=40"),
        "mla_decode": (lambda be: mla.mla_decode(q, kv, table, seq, v_dim=32, backend=be), "qk_dim=64"),
        "mla_decode_fp8": (lambda be: mla.mla_decode_fp8(q8, lat2, scales2, rope2, table8, seq8, backend=be),
                           "one scale per token and 128 channels"),
        "mla_decode_sparse": (lambda be: mla.mla_decode_sparse(q, kv, ids, v_dim=32, backend=be), "qk_dim=64"),
        "mla_decode_sparse_fp8": (lambda be: mla.mla_decode_sparse_fp8(
            q8.astype(jnp.float32), lat, scales, rope, ids, backend=be), "q.dtype=float32"),
        "permute": (lambda be: perm.permute(rows, p, backend=be), "hidden=100"),
    }


FAMILIES = ["fp8_gemm_nt", "fp8_linear", "k_grouped", "m_grouped_contiguous", "m_grouped_masked", "matmul_nt",
            "mla_decode", "mla_decode_fp8", "mla_decode_sparse", "mla_decode_sparse_fp8", "permute", "quantize_fp8"]


def _leaves(out):
    return [np.asarray(v, np.float32) for v in (out if isinstance(out, tuple) else (out,))]


def _same(x, y):
    for u, v in zip(_leaves(x), _leaves(y), strict=True):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_kernel_the_shape_does_not_fit_declines_and_auto_falls_back(rng, monkeypatch, caplog, family):
    cases = _declined(rng)
    assert sorted(cases) == FAMILIES
    call, reason = cases[family]
    want = call("xla")
    assert all(np.isfinite(v).all() for v in _leaves(want))
    for requested in ("mosaic", "interpret"):
        with pytest.raises(NotImplementedError, match=re.escape(reason)) as declined:
            call(requested)
        assert "\n" not in str(declined.value), "the refusal is one line"
    _same(call("auto"), want)                                       # on this CPU: the reference, no kernel
    assert "declined" not in caplog.text
    monkeypatch.setattr(backend, "is_hopper", lambda: True)         # a pretend sm_90: the kernel is tried
    with caplog.at_level("DEBUG", logger=backend.__name__):
        got = call("auto")
    assert "the kernel declined (" in caplog.text and reason in caplog.text
    _same(got, want)


def _invalid():
    """name -> a call with an invalid argument (wrong rank, dtype or inconsistent shapes), and its name."""
    bf = jnp.bfloat16
    z = jnp.zeros
    q, kv = z((1, 1, 4, 576), bf), z((2, 64, 1, 576), bf)
    table, seq = z((1, 2), jnp.int32), jnp.ones((1,), jnp.int32)
    lat, scales, rope = z((2, 64, 1, 512), E4M3), z((2, 64, 1, 4), jnp.float32), z((2, 64, 1, 64), bf)
    a8, s8 = z((64, 256), E4M3), z((64, 2), jnp.float32)
    b8, t8 = z((2, 128, 256), E4M3), z((2, 1, 2), jnp.float32)
    return {
        "matmul_nt": (lambda be: matmul.matmul_nt(z((64, 128), bf), z((64, 96), bf), backend=be), "b.shape"),
        "quantize_fp8": (lambda be: fp8.quantize_fp8(z((64, 128), jnp.int32), backend=be), "x.dtype"),
        "fp8_gemm_nt": (lambda be: fp8.fp8_gemm_nt(a8, s8[:, :1], b8[0], t8[0], backend=be), "a_scale"),
        "m_grouped_contiguous": (lambda be: fp8.m_grouped_fp8_gemm_nt_contiguous(
            a8, s8, b8, t8, jnp.asarray([60, 60], jnp.int32), backend=be), "group_sizes"),
        "m_grouped_masked": (lambda be: fp8.m_grouped_fp8_gemm_nt_masked(
            a8.reshape(2, 32, 256), s8.reshape(2, 32, 2), b8, t8, jnp.asarray([33, 0], jnp.int32), backend=be),
            "masked_m"),
        "k_grouped": (lambda be: fp8.k_grouped_fp8_gemm_tn_contiguous(
            z((256, 64), E4M3), z((2, 64), jnp.float32), z((256, 128), E4M3), z((2, 128), jnp.float32),
            jnp.asarray([64, 192], jnp.int32), backend=be), "group_sizes_k"),
        "fp8_linear": (lambda be: fp8.fp8_linear(z((4, 64), bf), z((32, 128), bf), backend=be), "x.shape"),
        "mla_decode": (lambda be: mla.mla_decode(q, kv, table, seq, v_dim=640, backend=be), "v_dim"),
        "mla_decode_fp8": (lambda be: mla.mla_decode_fp8(q, lat, scales[..., :3], rope, table, seq, backend=be),
                           "scales"),
        "mla_decode_sparse": (lambda be: mla.mla_decode_sparse(q, kv, z((1, 1, 4), jnp.float32), backend=be),
                              "indices.dtype"),
        "mla_decode_sparse_fp8": (lambda be: mla.mla_decode_sparse_fp8(
            q, kv[..., :512], scales, rope, z((1, 1, 4), jnp.int32), backend=be), "latent_fp8"),
        "permute": (lambda be: perm.permute(z((5, 128), bf), _permutation(np.random.default_rng(1)), backend=be),
                    "x.shape"),
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_invalid_input_is_the_same_value_error_on_every_backend(monkeypatch, family):
    assert sorted(_invalid()) == FAMILIES
    call, name = _invalid()[family]
    chosen = []
    monkeypatch.setattr(backend, "resolve_backend", lambda b: chosen.append(b) or "xla")
    for requested in backend.BACKENDS:
        with pytest.raises(ValueError, match=f"^{name}"):
            call(requested)
    assert chosen == [], "validation runs before the backend choice"
