"""`mla_decode` on the XLA backend and the split-KV plan (metadata + combine) against a float64 oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seekax.lowering.reference.mla_decode import combine_splits
from seekax.ops.mla import mla_decode, mla_decode_split_xla, mla_metadata, split_ranges
from seekax.testing import assert_close

from seekax.testing.mla_cases import make_case, numpy_mla


def _check(out, lse, ref_out, ref_lse, out_tol=2 / 128):
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    assert_close(out, ref_out, rtol=out_tol, atol=out_tol, name="out")
    assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4, name="lse")


@pytest.mark.parametrize("lens, s_q, causal", [
    ([1, 64, 128, 77], 1, True),          # length 1, page boundaries, a ragged tail
    ([130, 2, 1, 64], 2, True),           # MTP decode: s_q = 2 causal, incl. a length-1 sequence (query 0 sees nothing)
    ([0, 65, 5], 2, False),               # empty sequence: out 0, lse -inf
])
def test_xla_matches_float64(rng, lens, s_q, causal):
    q, kv, table, seq = make_case(rng, lens=lens, s_q=s_q, heads=16)
    out, lse = mla_decode(q, kv, table, seq, causal=causal, backend="xla")
    ref_out, ref_lse = numpy_mla(q, kv, table, seq, causal=causal)
    _check(out, lse, ref_out, ref_lse)


def test_xla_under_jit_and_custom_scale(rng):
    q, kv, table, seq = make_case(rng, lens=[40, 100], heads=4)
    f = jax.jit(lambda *a: mla_decode(*a, softmax_scale=0.05, backend="xla"))
    out, lse = f(q, kv, table, seq)
    ref_out, ref_lse = numpy_mla(q, kv, table, seq, scale=0.05)
    _check(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("lens, num_parts", [
    ([1, 64, 300, 0, 129, 7], 5),        # more parts than some sequences' blocks; an empty sequence
    ([500, 3], 16),                       # one long sequence split many ways
    ([64] * 7, 3),
])
def test_metadata_covers_every_block_once(lens, num_parts):
    meta = mla_metadata(jnp.asarray(lens, jnp.int32), num_parts=num_parts)
    n_blocks = [-(-n // 64) for n in lens]
    b, lo, hi = map(np.asarray, split_ranges(meta))
    offs = np.asarray(meta.split_offsets)
    for i, n in enumerate(n_blocks):
        rows = range(offs[i], offs[i + 1])
        assert all(b[t] == i for t in rows)
        spans = sorted((lo[t], hi[t]) for t in rows)
        covered = [k for s, e in spans for k in range(s, e, 64)]
        assert covered == list(range(0, n * 64, 64)), (i, spans)   # contiguous, disjoint, complete
        assert all(e > s for s, e in spans)                          # no empty splits recorded
    assert offs[-1] <= meta.max_splits
    # Balance: no part gets more than its payload of blocks plus overheads.
    payload = int(meta.payload[0])
    work = np.zeros(num_parts)
    for p in range(num_parts):
        for bb in range(*np.asarray(meta.part_batches)[p]):
            l, h = meta.part_block_range(p, bb)
            work[p] += max(0, int(h) - int(l))
    assert work.sum() == sum(n_blocks) and work.max() <= payload


def test_split_plan_and_combine_equal_the_direct_path(rng):
    lens = [1, 200, 0, 64, 129]
    q, kv, table, seq = make_case(rng, lens=lens, s_q=2, heads=8)
    meta = mla_metadata(seq, num_parts=7)
    out, lse = jax.jit(mla_decode_split_xla)(q, kv, table, seq, meta)
    ref_out, ref_lse = numpy_mla(q, kv, table, seq)
    _check(out, lse, ref_out, ref_lse)


def test_combine_of_empty_and_single_splits():
    out_parts = jnp.asarray(np.random.default_rng(0).standard_normal((4, 1, 2, 8)), jnp.float32)
    lse_parts = jnp.asarray([[[0.5], [1.0]], [[-np.inf], [2.0]], [[0.0], [0.0]], [[9.0], [9.0]]], jnp.float32)
    offs = jnp.asarray([0, 2, 2, 3], jnp.int32)  # batch 0: rows 0-1, batch 1: none, batch 2: row 2; row 3 unused
    out, lse = combine_splits(out_parts, lse_parts, offs, out_dtype=jnp.float32)
    w0 = np.exp(np.array([[0.5, 1.0], [-np.inf, 2.0]]))            # [split, head]
    ref0 = (w0[..., None] * np.asarray(out_parts)[:2, 0]).sum(0) / w0.sum(0)[:, None]
    np.testing.assert_allclose(np.asarray(out)[0, 0], ref0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lse)[0, :, 0], np.log(w0.sum(0)), rtol=1e-6)
    assert np.all(np.asarray(out)[1] == 0) and np.all(np.isneginf(np.asarray(lse)[1]))
    np.testing.assert_allclose(np.asarray(out)[2], np.asarray(out_parts)[2], rtol=1e-6)


def _args(b=2, s_q=1, h=16, d=576, pages=4, page=64, max_pages=2, qd=jnp.bfloat16, kvd=jnp.bfloat16):
    return (jnp.zeros((b, s_q, h, d), qd), jnp.zeros((pages, page, 1, d), kvd),
            jnp.zeros((b, max_pages), jnp.int32), jnp.ones((b,), jnp.int32))


@pytest.mark.parametrize("backend", ["xla", "interpret", "mosaic", "auto"])
@pytest.mark.parametrize("change, kwargs, match", [
    (lambda a: (a[0][..., :512], *a[1:]), {}, "kv_cache.shape"),                      # q/kv dims differ
    (lambda a: a, {"v_dim": 640}, "v_dim"),
    (lambda a: (*a[:3], jnp.asarray([3, 129], jnp.int32)), {}, "seq_lens"),           # beyond 2 pages x 64
    (lambda a: (*a[:3], jnp.asarray([3, -1], jnp.int32)), {}, "seq_lens"),            # negative
    (lambda a: (a[0].astype(jnp.int8), *a[1:]), {}, "^q.dtype"),
    (lambda a: (a[0], a[1].astype(jnp.float16), *a[2:]), {}, "kv_cache.dtype"),
    (lambda a: (a[0], a[1].astype(jnp.float8_e4m3fn), *a[2:]), {}, "kv_cache.dtype"),   # FP8: mla_decode_fp8
    (lambda a: (*a[:2], a[2].astype(jnp.int64) if jax.config.x64_enabled else a[2].astype(jnp.int16), a[3]), {},
     "block_table.dtype"),
    (lambda a: (*a[:3], a[3][:1]), {}, "seq_lens.shape"),
    (lambda a: (a[0], a[1][:, :, :1].repeat(3, 2), *a[2:]), {}, "kv_cache.shape"),   # 3 KV heads for 16 q heads
    (lambda a: a, {"attn_sink": jnp.zeros((8,), jnp.float32)}, "attn_sink"),          # one per query head: 16
    (lambda a: a, {"attn_sink": jnp.zeros((16,), jnp.int32)}, "attn_sink"),
    (lambda a: a, {"lse_empty": 0.0}, "lse_empty"),
    (lambda a: a, {"softmax_scale": -1.0}, "softmax_scale"),
    (lambda a: a, {"metadata": "wrong"}, "metadata"),                            # planned for 3 sequences, not 2
])
def test_bad_input_is_a_clear_value_error_on_every_backend(change, kwargs, match, backend):
    """Invalid input fails in the one validation, before any backend: the same ValueError everywhere."""
    if kwargs.get("metadata") == "wrong":
        kwargs = {**kwargs, "metadata": mla_metadata(jnp.ones((3,), jnp.int32), num_parts=2)}
    with pytest.raises(ValueError, match=match):
        mla_decode(*change(_args()), **{"backend": backend, **kwargs})


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="^backend='cuda'"):
        mla_decode(*_args(), backend="cuda")


@pytest.mark.parametrize("change, kwargs, match", [
    (lambda a: (a[0][..., :512], a[1][..., :512], *a[2:]), {}, "qk_dim=512"),          # the kernel: 576
    (lambda a: a, {"v_dim": 256}, "v_dim=256"),
    (lambda a: (a[0].astype(jnp.float32), a[1].astype(jnp.float32), *a[2:]), {}, "q.dtype=float32"),
    (lambda a: _args(page=48, max_pages=3), {}, "page_size=48"),
])
@pytest.mark.parametrize("backend", ["interpret", "mosaic"])
def test_valid_input_the_kernel_does_not_take(rng, change, kwargs, match, backend):
    """Asked for by name, the kernel declines with a one-line NotImplementedError; "xla" (and "auto", which
    falls back) compute it."""
    args = change(_args())
    with pytest.raises(NotImplementedError, match=match) as declined:
        mla_decode(*args, backend=backend, **kwargs)
    assert "\n" not in str(declined.value)
    out, lse = mla_decode(*args, backend="xla", **kwargs)
    assert out.shape[-1] == kwargs.get("v_dim", 512) and lse.shape == (2, 16, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_m=128), "block_m"), (dict(block_n=32), "block_n"), (dict(stages=0), "stages"),
    (dict(combine="cuda"), "combine"), (dict(v_dim=640), "v_dim"), (dict(num_compute_wgs=1), "num_compute_wgs"),
])
def test_tile_config_rejects_bad_fields(kwargs, match):
    from seekax.ir.mla_tiling import MlaTileConfig

    with pytest.raises(ValueError, match=f"^{match}="):
        MlaTileConfig(**kwargs)


@pytest.mark.parametrize("backend", ["xla", "interpret", "auto"])
@pytest.mark.parametrize("table, lens, match", [
    ([[0, 0], [4, 0]], [1, 1], r"block_table\[1, 0\]=4: expected a page id in \[0, 4\)"),     # 4 pages: 0..3
    ([[0, -1], [1, 0]], [65, 1], r"block_table\[0, 1\]=-1: expected a page id in \[0, 4\)"),  # -1 on a used page
])
def test_block_ids_out_of_range_on_a_used_page_are_named(table, lens, match, backend):
    """A user-built table pointing a sequence's own page outside the cache was clamped to the last (or first) page
    by the gather: a silent wrong result. Entries past a sequence's pages stay free to hold anything."""
    q, kv, _, _ = _args()
    with pytest.raises(ValueError, match=match):
        mla_decode(q, kv, jnp.asarray(table, jnp.int32), jnp.asarray(lens, jnp.int32), backend=backend)


def test_unused_block_table_entries_may_be_anything(rng):
    q, kv, table, seq = make_case(rng, lens=[70, 3], heads=16)
    table = table.at[0, 2:].set(-1).at[1, 1:].set(2 ** 31 - 1)                    # past each sequence's pages
    out, lse = mla_decode(q, kv, table, seq, backend="xla")
    _check(out, lse, *numpy_mla(q, kv, table, seq))


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), 0.0, True])
def test_non_finite_or_non_positive_scale_is_named(scale):
    with pytest.raises(ValueError, match="^softmax_scale="):
        mla_decode(*_args(), softmax_scale=scale, backend="xla")


def test_numpy_scale_is_a_scale(rng):
    """np.float32 (a numpy scalar, not a Python float) was refused; it is the same scale."""
    q, kv, table, seq = make_case(rng, lens=[40, 100], heads=4)
    out, lse = mla_decode(q, kv, table, seq, softmax_scale=np.float32(0.05), backend="xla")
    _check(out, lse, *numpy_mla(q, kv, table, seq, scale=0.05))


def test_head_counts_and_pages_a_user_picks_match_float64(rng):
    """Heads not a multiple of 16 and a page size that is not a power of two, float32, against float64."""
    from seekax.ops.mla import mla_decode as op

    b, h, d, v, page = 3, 5, 40, 24, 7
    q = rng.standard_normal((b, 2, h, d)).astype(np.float32)
    kv = rng.standard_normal((6, page, 1, d)).astype(np.float32)
    table = np.asarray([[5, 0, 1], [2, 9, 9], [4, 3, 1]], np.int32)           # 9: past sequence 1's one page
    lens = np.asarray([15, 7, 0], np.int32)
    out, lse = op(jnp.asarray(q), jnp.asarray(kv), jnp.asarray(table), jnp.asarray(lens), v_dim=v, backend="xla")
    scale = 1 / np.sqrt(d)
    for i in range(b):
        keys = kv[table[i, :-(-lens[i] // page)], :, 0].reshape(-1, d)[:lens[i]].astype(np.float64)
        for t in range(2):
            k = keys[:max(lens[i] - 1 + t, 0)]                                   # causal, s_q = 2
            if not len(k):
                assert np.all(np.asarray(out[i, t]) == 0) and np.all(np.isneginf(np.asarray(lse[i, :, t])))
                continue
            s = q[i, t].astype(np.float64) @ k.T * scale                         # [H, keys]
            w = np.exp(s - s.max(-1, keepdims=True))
            np.testing.assert_allclose(np.asarray(out[i, t]), w @ k[:, :v] / w.sum(-1, keepdims=True),
                                       rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.asarray(lse[i, :, t]), s.max(-1) + np.log(w.sum(-1)), rtol=1e-5)


@pytest.mark.parametrize("backend", ["xla", "interpret"])
def test_metadata_planned_for_other_lengths_is_named(rng, backend):
    """A plan made from other lengths covers other key blocks: the split path and the kernel attended only to the
    planned blocks (a silent wrong result); the same plan for these lengths is fine."""
    q, kv, table, seq = make_case(rng, lens=[100, 70], heads=16)
    stale = mla_metadata(jnp.asarray([10, 10], jnp.int32), num_parts=3)
    with pytest.raises(ValueError, match=r"^metadata=.*planned for seq_lens=\[100, 70\]"):
        mla_decode_split_xla(q, kv, table, seq, stale)
    with pytest.raises(ValueError, match=r"^metadata="):
        mla_decode(q, kv, table, seq, metadata=stale, backend=backend)
    out, lse = mla_decode_split_xla(q, kv, table, seq, mla_metadata(seq, num_parts=3))
    _check(out, lse, *numpy_mla(q, kv, table, seq))
