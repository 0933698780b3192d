"""DeepEP's other dispatch modes on 8 CPU host devices against the numpy reference: cached dispatch (a second
payload along the first dispatch's route), dispatch without top-k (by rank), combine returning the combined
top-k weights, and ranks with their own token counts. Every transport that runs on CPU; DeepEP's oracle
thresholds: calc_diff < 5e-6 on the combined rows, < 1e-9 on the combined weights."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from ep_harness import routing, run_ep
from seekax.lowering.reference import dispatch as ref
from seekax.ops import ep
from seekax.testing.compare import calc_diff

BF16_COMBINE, WEIGHTS_COMBINE = 5e-6, 1e-9
ALL = ["padded", "ragged_emulated", "low_latency"]
NORMAL = ["padded", "ragged_emulated"]


def _dest_factor(d_x):
    """A per-destination-rank factor (rank + 1), so a wrong source/destination pairing changes the sum."""
    return (jax.lax.axis_index("ep").astype(jnp.float32) + 1).astype(d_x.dtype)


def _check_normal_recv(out, want, p, key="x", idx_key="idx", w_key="w"):
    for d in range(p):
        n = len(want[d].src)
        assert out["n"][d] == n
        np.testing.assert_array_equal(out[key][d][:n], want[d].x)
        assert not np.asarray(out[key][d][n:], np.float32).any(), "padding rows must be zero"
        if want[d].topk_idx is not None:
            np.testing.assert_array_equal(out[idx_key][d][:n], want[d].topk_idx)
            np.testing.assert_array_equal(out[w_key][d][:n], want[d].topk_weights.astype(np.float32))
            np.testing.assert_array_equal(out["counts"][d], want[d].tokens_per_expert)


# ---- cached dispatch ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ALL)
@pytest.mark.parametrize("pattern", ["random", "empty_ranks"])
def test_cached_dispatch_sends_a_second_payload_along_the_first_route(rng, transport, pattern):
    """x2 (another dtype and width) along the handle of x's dispatch: rows, order, ids, weights and counts as
    a fresh dispatch of x2 would give (numpy reference), and its combine sums back (calc_diff < 5e-6)."""
    p, t, k, e, m = 8, 10, 4, 16, 10
    idx = routing(rng, p, t, k, e, pattern=pattern)
    x = rng.standard_normal((p, t, 64)).astype(jnp.bfloat16)
    x2 = rng.standard_normal((p, t, 24)).astype(np.float32)
    w = rng.random((p, t, k)).astype(np.float32)
    ll = transport == "low_latency"

    def fn(x, x2, idx, w):
        d = ep.ep_dispatch(x, idx, w, num_experts=e, axis_name="ep", transport=transport, expert_alignment=2,
                           capacity=m if ll else None)
        c = ep.ep_dispatch(x2, axis_name="ep", handle=d.handle)
        y2 = c.x * _dest_factor(c.x)
        out = dict(x2=c.x, n=c.num_recv, same_n=c.num_recv == d.num_recv, same_counts=c.tokens_per_expert ==
                   d.tokens_per_expert, y2=y2, comb=ep.ep_combine(y2, c.handle, weighted=ll))
        if not ll:
            out.update(idx=c.topk_idx, w=c.topk_weights, counts=c.tokens_per_expert)
        return out

    out = run_ep(fn, p, x, x2, idx, w)
    assert out["same_n"].all() and out["same_counts"].all()
    if ll:
        want = ref.ll_dispatch(x2, idx, e, m)
        for d in range(p):
            np.testing.assert_array_equal(out["n"][d], want[d].counts)
            np.testing.assert_array_equal(out["x2"][d], want[d].x)
        expect = ref.ll_combine([out["y2"][d] for d in range(p)], want, w)
    else:
        want = ref.dispatch(x2, idx, w, e, expert_alignment=2)
        _check_normal_recv(out, want, p, key="x2")
        expect = ref.combine([out["y2"][d][:len(want[d].src)] for d in range(p)], want, t)
    assert calc_diff(out["comb"].astype(np.float64), expect) < BF16_COMBINE
    np.testing.assert_allclose(out["comb"], expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transport", ["padded", "low_latency"])
def test_cached_fp8_payload_equals_a_fresh_fp8_dispatch(rng, transport):
    p, t, k, e = 4, 8, 2, 8
    idx = routing(rng, p, t, k, e)
    x = rng.standard_normal((p, t, 32)).astype(np.float32)
    x2 = rng.standard_normal((p, t, 256)).astype(jnp.bfloat16)

    def fn(x, x2, idx):
        d = ep.ep_dispatch(x, idx, num_experts=e, axis_name="ep", transport=transport)
        c = ep.ep_dispatch(x2, axis_name="ep", handle=d.handle, fp8=True)
        f = ep.ep_dispatch(x2, idx, num_experts=e, axis_name="ep", transport=transport, fp8=True)
        return dict(c=jax.lax.bitcast_convert_type(c.x, jnp.uint8), cs=c.x_scale,
                    f=jax.lax.bitcast_convert_type(f.x, jnp.uint8), fs=f.x_scale)

    out = run_ep(fn, p, x, x2, idx)
    np.testing.assert_array_equal(out["c"], out["f"])
    np.testing.assert_array_equal(out["cs"], out["fs"])


def _primitives(jaxpr, counts=None) -> dict:
    """Primitive name -> occurrences in a (closed) jaxpr and every sub-jaxpr (jit, custom_vjp, cond...)."""
    counts = {} if counts is None else counts
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _primitives(sub, counts)
    return counts


RECOUNT = ("cumsum", "all_gather", "psum", "pmax", "reduce_sum", "sort", "scatter", "scatter-add", "argmax",
           "debug_callback")


@pytest.mark.parametrize("transport,moves", [("padded", {"all_to_all": 1}), ("ragged", {"ragged_all_to_all": 1}),
                                             ("low_latency", {"all_to_all": 1})])
def test_cached_dispatch_does_no_recount_forward_or_backward(transport, moves):
    """From the jaxpr of a cached dispatch (handle as input): one payload collective, no counting, cumsum,
    scatter or count exchange; its gradient is one collective back (the route's adjoint), no recount either."""
    env = [("ep", 8)]
    x = jax.ShapeDtypeStruct((12, 64), jnp.bfloat16)
    idx = jax.ShapeDtypeStruct((12, 4), jnp.int32)
    first = lambda x, i: ep.ep_dispatch(x, i, num_experts=16, axis_name="ep", transport=transport).handle  # noqa: E731
    handle = jax.make_jaxpr(first, axis_env=env, return_shape=True)(x, idx)[1]
    fresh = _primitives(jax.make_jaxpr(first, axis_env=env)(x, idx).jaxpr)
    assert fresh.get("cumsum", 0) > 0                                   # the recount a cached dispatch skips

    x2 = jax.ShapeDtypeStruct((12, 32), jnp.float32)
    cached = _primitives(jax.make_jaxpr(lambda x, h: ep.ep_dispatch(x, axis_name="ep", handle=h).x,
                                        axis_env=env)(x2, handle).jaxpr)
    collectives = {n: c for n, c in cached.items() if "all_to_all" in n or n.startswith("all_")}
    assert collectives == moves, cached
    assert not set(RECOUNT) & set(cached), cached

    grad = jax.grad(lambda x, h: (ep.ep_dispatch(x, axis_name="ep", handle=h).x ** 2).sum())
    back = _primitives(jax.make_jaxpr(grad, axis_env=env)(x2, handle).jaxpr)
    collectives = {n: c for n, c in back.items() if "all_to_all" in n or n.startswith("all_")}
    assert collectives == {n: 2 * c for n, c in moves.items()}, back       # forward + its adjoint
    assert not set(RECOUNT) - {"reduce_sum"} & set(back), back              # reduce_sum: the loss and slot sum


def test_cached_dispatch_gradient_equals_single_device(rng):
    """d/dx2 through the cached dispatch and its combine equals the dense formula (each copy scaled by its
    destination's factor): the backward runs on the first dispatch's route."""
    p, t, k, e, h = 4, 8, 3, 8, 16
    idx = routing(rng, p, t, k, e)
    x = rng.standard_normal((p, t, 8)).astype(np.float32)
    x2, r = (rng.standard_normal((p, t, h)).astype(np.float32) for _ in range(2))
    per = e // p

    def ep_loss(x2):
        def fn(x, x2, idx, r):
            d = ep.ep_dispatch(x, idx, num_experts=e, axis_name="ep", transport="padded")
            c = ep.ep_dispatch(x2, axis_name="ep", handle=d.handle)
            return (ep.ep_combine(c.x * _dest_factor(c.x), c.handle) * r).sum()
        return run_grad(fn, p, x, x2, idx, r)

    dest = np.where(idx >= 0, idx // per, p)
    in_rank = (dest[..., None] == np.arange(p)).any(2)                         # [P, T, P]
    factor = (in_rank * (np.arange(p) + 1)).sum(-1, keepdims=True)             # [P, T, 1]
    np.testing.assert_allclose(ep_loss(x2), factor * r, rtol=1e-6, atol=1e-6)


def run_grad(fn, p, x, x2, idx, r):
    """Gradient in x2 of sum over ranks of fn(x, x2, idx, r) -> [P, T, H]."""
    from jax.sharding import PartitionSpec as P

    from ep_harness import shard

    mesh = jax.make_mesh((p,), ("ep",))
    args = shard(mesh, x, x2, idx, r)

    def loss(x2, x, idx, r):
        body = lambda *a: fn(*a)[None]  # noqa: E731
        return jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 4, out_specs=P("ep"))(x, x2, idx, r).sum()

    g = jax.jit(jax.grad(loss))(args[1], args[0], args[2], args[3])
    return np.asarray(g).reshape(x2.shape)


# ---- dispatch without top-k ---------------------------------------------------------------------------------

def _rank_mask(rng, p, t, *, kind):
    """is_token_in_rank [P(src), T, P(dst)]: one rank a token ("dest", -1 with p 0.2) or any ranks ("mask")."""
    if kind == "dest":
        dest = np.where(rng.random((p, t)) < 0.2, -1, rng.integers(0, p, (p, t))).astype(np.int32)
        dest[1] = -1                                                         # a rank that sends nothing
        return dest, (dest[..., None] == np.arange(p))
    mask = rng.random((p, t, p)) < 0.3
    mask[:, :, 3] = False                                                    # a rank that receives nothing
    return None, mask


@pytest.mark.parametrize("transport", NORMAL)
@pytest.mark.parametrize("kind", ["dest", "mask"])
def test_dispatch_without_topk_is_a_permutation_by_rank(rng, transport, kind):
    """dest_rank [T] or is_token_in_rank [T, P]: tokens arrive grouped by source rank, source order kept
    (reference), with no ids, weights or expert counts; combine sums each token's copies back."""
    p, t, h = 8, 9, 32
    dest, mask = _rank_mask(rng, p, t, kind=kind)
    x = rng.standard_normal((p, t, h)).astype(jnp.bfloat16)
    routing_arg = dest if kind == "dest" else mask

    def fn(x, r):
        kw = dict(dest_rank=r) if kind == "dest" else dict(is_token_in_rank=r)
        d = ep.ep_dispatch(x, axis_name="ep", transport=transport, **kw)
        assert d.topk_idx is None and d.topk_weights is None and d.tokens_per_expert is None
        y = d.x * _dest_factor(d.x)
        return dict(x=d.x, n=d.num_recv, y=y, comb=ep.ep_combine(y, d.handle), back=ep.ep_combine(d.x, d.handle))

    out = run_ep(fn, p, x, routing_arg)
    want = ref.dispatch_by_rank(x, mask)
    _check_normal_recv(out, want, p)
    expect = ref.combine([out["y"][d][:len(want[d].src)] for d in range(p)], want, t)
    assert calc_diff(out["comb"].astype(np.float64), expect) < BF16_COMBINE
    np.testing.assert_allclose(out["comb"], expect, rtol=2 / 128, atol=1e-6)
    copies = mask.sum(-1, keepdims=True)                                     # [P, T, 1]
    back = out["back"].astype(np.float64)
    if kind == "dest":                                                       # one copy: back exactly
        np.testing.assert_array_equal(back, np.asarray(x, np.float64) * copies)
    else:
        np.testing.assert_allclose(back, np.asarray(x, np.float64) * copies, rtol=2 / 128, atol=1e-6)


def test_dispatch_by_rank_gradient(rng):
    """d/dx of a rank-mode round trip: each token's gradient is r times the sum of its destinations' factors."""
    p, t, h = 4, 6, 8
    dest, mask = _rank_mask(rng, p, t, kind="mask")
    x, r = (rng.standard_normal((p, t, h)).astype(np.float32) for _ in range(2))

    def fn(_, x, m, r):
        d = ep.ep_dispatch(x, axis_name="ep", is_token_in_rank=m, transport="ragged_emulated")
        return (ep.ep_combine(d.x * _dest_factor(d.x), d.handle) * r).sum()

    g = run_grad(fn, p, x, x, mask, r)
    factor = (mask * (np.arange(p) + 1)).sum(-1, keepdims=True)
    np.testing.assert_allclose(g, factor * r, rtol=1e-6, atol=1e-6)


# ---- combined top-k weights ---------------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ALL)
def test_combine_returns_the_combined_topk_weights(rng, transport):
    """return_weights=True: DeepEP's combined_topk_weights. Default: the dispatched weights summed back,
    which equal the source's weights wherever an expert was selected (every entry is local on exactly one
    rank) and 0 for -1; explicit received weights (here scaled per destination) vs the reference."""
    p, t, k, e, m = 8, 10, 4, 16, 10
    idx = routing(rng, p, t, k, e)
    x = rng.standard_normal((p, t, 32)).astype(jnp.bfloat16)
    w = rng.random((p, t, k)).astype(np.float32)
    ll = transport == "low_latency"

    def fn(x, idx, w):
        d = ep.ep_dispatch(x, idx, w, num_experts=e, axis_name="ep", transport=transport,
                           capacity=m if ll else None)
        plain = ep.ep_combine(d.x, d.handle, weighted=ll)
        both = ep.ep_combine(d.x, d.handle, weighted=ll, return_weights=True)
        if ll:
            ww = jnp.broadcast_to(jnp.arange(d.x.shape[1], dtype=jnp.float32) + 1, d.x.shape[:2])  # [E_l, P*M]
            ww = ww * _dest_factor(ww)
        else:
            ww = d.topk_weights * _dest_factor(d.topk_weights)
        mine = ep.ep_combine(d.x, d.handle, weighted=ll, return_weights=True, topk_weights=ww)
        return dict(plain=plain, x=both.x, w=both.topk_weights, ww=ww, mine=mine.topk_weights)

    out = run_ep(fn, p, x, idx, w)
    np.testing.assert_array_equal(out["x"], out["plain"])                     # same rows as without weights
    expect_w = np.where(idx >= 0, w, 0).astype(np.float64)
    assert calc_diff(out["w"].astype(np.float64), expect_w) < WEIGHTS_COMBINE
    np.testing.assert_array_equal(out["w"], expect_w.astype(np.float32))
    if ll:
        want = ref.ll_dispatch(x, idx, e, m)
        expect = ref.ll_combine_weights([out["ww"][d] for d in range(p)], want, t, k)
    else:
        want = ref.dispatch(x, idx, w, e)
        expect = ref.combine_weights([out["ww"][d][:len(want[d].src)] for d in range(p)], want, t)
    assert calc_diff(out["mine"].astype(np.float64), expect) < WEIGHTS_COMBINE
    np.testing.assert_allclose(out["mine"], expect, rtol=1e-6, atol=0)


def test_combined_weights_without_topk_need_explicit_weights(rng):
    """Rank mode carries no weights: per-row values passed to combine are summed back per token."""
    p, t = 4, 6
    dest, mask = _rank_mask(rng, p, t, kind="mask")
    x = rng.standard_normal((p, t, 8)).astype(np.float32)

    def fn(x, m):
        d = ep.ep_dispatch(x, axis_name="ep", is_token_in_rank=m)
        v = jnp.stack([d.x[:, 0], jnp.full(d.x.shape[:1], 1.0)], -1)          # [R, 2] per received row
        return dict(v=v, w=ep.ep_combine(d.x, d.handle, return_weights=True, topk_weights=v).topk_weights)

    out = run_ep(fn, p, x, mask)
    want = ref.dispatch_by_rank(x, mask)
    expect = ref.combine_weights([out["v"][d][:len(want[d].src)] for d in range(p)], want, t)
    np.testing.assert_allclose(out["w"], expect, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out["w"][..., 1], mask.sum(-1))             # copies per token


# ---- ranks with their own token counts ----------------------------------------------------------------------

@pytest.mark.parametrize("transport", ALL)
def test_ranks_with_different_token_counts(rng, transport):
    """num_tokens per rank (0 and T included): rows past a rank's count are neither sent nor counted, even
    with out-of-range garbage ids there, and combine returns zeros for them (reference with the counts)."""
    p, t, k, e, m = 8, 10, 4, 16, 10
    counts = rng.integers(0, t + 1, p).astype(np.int32)
    counts[0], counts[1] = 0, t                                               # an empty rank and a full one
    idx = routing(rng, p, t, k, e)
    for r in range(p):
        idx[r, counts[r]:] = rng.integers(-5, 3 * e, (t - counts[r], k))    # garbage past the count
    x = rng.standard_normal((p, t, 32)).astype(jnp.bfloat16)
    w = rng.random((p, t, k)).astype(np.float32)
    ll = transport == "low_latency"

    def fn(x, idx, w, n):
        d = ep.ep_dispatch(x, idx, w, num_experts=e, axis_name="ep", transport=transport, num_tokens=n,
                           capacity=m if ll else None, expert_alignment=3)
        y = d.x * _dest_factor(d.x)
        c = ep.ep_combine(y, d.handle, weighted=ll, return_weights=True)
        out = dict(x=d.x, n=d.num_recv, y=y, comb=c.x, cw=c.topk_weights)
        if not ll:
            out.update(idx=d.topk_idx, w=d.topk_weights, counts=d.tokens_per_expert)
        return out

    out = run_ep(fn, p, x, idx, w, counts.reshape(p, 1))
    clean = np.where(np.arange(t)[None, :, None] < counts[:, None, None], idx, -1)
    if ll:
        want = ref.ll_dispatch(x, idx, e, m, num_tokens=counts)
        for d in range(p):
            np.testing.assert_array_equal(out["n"][d], want[d].counts)
            np.testing.assert_array_equal(out["x"][d], want[d].x)
        expect = ref.ll_combine([out["y"][d] for d in range(p)], want, w)
    else:
        want = ref.dispatch(x, idx, w, e, expert_alignment=3, num_tokens=counts)
        _check_normal_recv(out, want, p)
        expect = ref.combine([out["y"][d][:len(want[d].src)] for d in range(p)], want, t)
    assert calc_diff(out["comb"].astype(np.float64), expect) < BF16_COMBINE
    np.testing.assert_allclose(out["comb"], expect, rtol=2 / 128, atol=1e-6)
    for r in range(p):
        assert not out["comb"][r, counts[r]:].astype(np.float32).any(), "rows past num_tokens must be zero"
    np.testing.assert_array_equal(out["cw"], np.where(clean >= 0, w, 0))


@pytest.mark.parametrize("transport", NORMAL)
def test_token_counts_without_topk_and_cached(rng, transport):
    """num_tokens with a dispatch by rank, and a cached dispatch of its handle (which keeps the counts)."""
    p, t, h = 8, 7, 16
    counts = rng.integers(0, t + 1, p).astype(np.int32)
    counts[2] = 0
    dest = rng.integers(-1, p, (p, t)).astype(np.int32)
    x, x2 = (rng.standard_normal((p, t, h)).astype(np.float32) for _ in range(2))

    def fn(x, x2, dest, n):
        d = ep.ep_dispatch(x, axis_name="ep", dest_rank=dest, num_tokens=n, transport=transport)
        c = ep.ep_dispatch(x2, axis_name="ep", handle=d.handle)
        return dict(x=d.x, x2=c.x, n=d.num_recv, back=ep.ep_combine(c.x, c.handle))

    out = run_ep(fn, p, x, x2, dest, counts.reshape(p, 1))
    mask = (dest[..., None] == np.arange(p)) & (np.arange(t)[None, :, None] < counts[:, None, None])
    _check_normal_recv(out, ref.dispatch_by_rank(x, mask, num_tokens=counts), p)
    _check_normal_recv(out, ref.dispatch_by_rank(x2, mask), p, key="x2")
    np.testing.assert_array_equal(out["back"], x2 * mask.any(-1, keepdims=True))


def test_token_count_gradient_is_zero_past_the_count(rng):
    p, t, k, e = 4, 6, 2, 8
    counts = np.array([0, 6, 3, 1], np.int32)
    idx = routing(rng, p, t, k, e, masked=0.0)
    x, r = (rng.standard_normal((p, t, 8)).astype(np.float32) for _ in range(2))

    def fn(idx_n, x, idx, r):
        d = ep.ep_dispatch(x, idx[:, :k], num_experts=e, axis_name="ep", num_tokens=idx[0, k])
        return (ep.ep_combine(d.x * 2, d.handle) * r).sum()

    packed = np.concatenate([idx, np.broadcast_to(counts[:, None, None], (p, t, 1))], -1).astype(np.int32)
    g = run_grad(fn, p, x, x, packed, r)
    dest = idx // (e // p)
    copies = (dest[..., None] == np.arange(p)).any(2).sum(-1, keepdims=True)   # [P, T, 1]
    live = np.arange(t)[None, :, None] < counts[:, None, None]
    np.testing.assert_allclose(g, 2 * copies * r * live, rtol=1e-6, atol=1e-6)
