"""ep_dispatch / ep_combine on routing a user brings: unsigned and 64-bit ids, repeated experts in a row,
no tokens at all, payload and weight dtypes; compared with a plain numpy transcription of the semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from seekax.ops import ep

RANKS, EXPERTS = 4, 8


def _run(fn, *arrays):
    mesh = jax.make_mesh((RANKS,), ("ep",))
    args = [jax.device_put(a, NamedSharding(mesh, P("ep"))) for a in arrays]
    body = lambda *xs: jax.tree.map(lambda o: o[None], fn(*xs))  # noqa: E731
    out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=tuple(P("ep") for _ in args), out_specs=P("ep")))(*args)
    return jax.tree.map(np.asarray, jax.block_until_ready(out))


def _normal_reference(x, idx, w, tokens):
    """Per destination rank: (rows, local ids, weights), rows from source ranks ascending in source order,
    one copy per (token, destination rank); and combine(2 * received) = 2 * x * destination ranks a token."""
    per = EXPERTS // RANKS
    recv = []
    for d in range(RANKS):
        rows, ids, ws = [], [], []
        for g in range(RANKS * tokens):
            here = [e >= 0 and e // per == d for e in idx[g]]
            if any(here):
                rows.append(x[g])
                ids.append([e - d * per if h else -1 for e, h in zip(idx[g], here)])
                ws.append([wk if h else 0.0 for wk, h in zip(w[g], here)])
        recv.append((np.reshape(rows, (-1, x.shape[1])), np.reshape(ids, (-1, idx.shape[1])),
                     np.reshape(ws, (-1, idx.shape[1]))))
    ranks = np.array([len({e // per for e in row if e >= 0}) for row in idx])
    return recv, 2 * x * ranks[:, None]


def _dispatch_combine(transport="padded", **kw):
    def f(x, i, w):
        d = ep.ep_dispatch(x, i, w, num_experts=EXPERTS, axis_name="ep", transport=transport, **kw)
        y = ep.ep_combine(d.x * 2, d.handle, weighted=transport == "low_latency", return_weights=True)
        return d.x, d.topk_idx, d.topk_weights, d.num_recv, d.num_dropped, y.x, y.topk_weights
    return f


def _check_normal(out, x, idx, w, tokens):
    rx, ri, rw, nr, nd, comb, cw = out
    recv, want = _normal_reference(x.astype(np.float32), idx.astype(np.int64), w.astype(np.float32), tokens)
    for d, (rows, ids, ws) in enumerate(recv):
        n = len(rows)
        assert int(nr[d]) == n and int(nd[d]) == 0
        np.testing.assert_array_equal(rx[d, :n].astype(np.float32), rows)
        assert (rx[d, n:] == 0).all() and (ri[d, n:] == -1).all()
        np.testing.assert_array_equal(ri[d, :n], ids)
        np.testing.assert_array_equal(rw[d, :n].astype(np.float32), ws.astype(rw.dtype).astype(np.float32))
    np.testing.assert_allclose(comb.reshape(x.shape).astype(np.float32), want, rtol=1e-2 if x.dtype != np.float32
                               else 1e-6)
    return cw


@pytest.mark.parametrize("id_dtype", [np.uint8, np.uint16, np.uint32, np.int8, np.int16, np.int64])
def test_any_integer_id_dtype_matches_numpy(rng, id_dtype):
    """Traced unsigned ids used to fail the run-time range check on every entry (compared against -1 as
    unsigned); every integer dtype now routes as the numpy reference says."""
    tokens, hidden, k = 5, 16, 2
    x = rng.standard_normal((RANKS * tokens, hidden)).astype(np.float32)
    idx = np.stack([rng.permutation(EXPERTS)[:k] for _ in range(RANKS * tokens)]).astype(id_dtype)
    if np.issubdtype(id_dtype, np.signedinteger):
        idx[::3, 1] = -1
    w = rng.random(idx.shape).astype(np.float32)
    cw = _check_normal(_run(_dispatch_combine(), x, idx, w), x, idx, w, tokens)
    np.testing.assert_array_equal(cw.reshape(idx.shape), np.where(idx.astype(np.int64) >= 0, w, 0))


@pytest.mark.parametrize("x_dtype, w_dtype", [(jnp.bfloat16, np.float32), (np.float16, jnp.bfloat16),
                                              (np.float32, np.float16)])
def test_repeated_experts_and_payload_dtypes_match_numpy(rng, x_dtype, w_dtype):
    """A row naming one expert twice (normal mode: one copy per rank, both ids local) and bf16/f16 payloads and
    weights; combined weights keep the weights' dtype and sum a token's copies."""
    tokens, hidden, k = 6, 24, 3
    x = rng.standard_normal((RANKS * tokens, hidden)).astype(x_dtype)
    idx = rng.integers(-1, EXPERTS, (RANKS * tokens, k)).astype(np.int32)
    idx[:, 1] = idx[:, 0]
    w = rng.random(idx.shape).astype(w_dtype)
    cw = _check_normal(_run(_dispatch_combine(), x, idx, w), x, idx, w, tokens)
    assert cw.dtype == np.dtype(w_dtype)
    np.testing.assert_array_equal(cw.reshape(idx.shape), np.where(idx >= 0, w, 0).astype(w_dtype))


def test_low_latency_repeated_expert_with_default_capacity_raises_instead_of_dropping(rng):
    """Low latency sends one copy per (token, k): a row repeating an expert can put more than T copies on one
    (source, expert) pair. With capacity=None (T) they used to be dropped silently (num_dropped > 0, combine
    missing them) although drop=False; now the overflow is checked like any capacity overflow."""
    tokens, hidden = 4, 8
    x = rng.standard_normal((RANKS * tokens, hidden)).astype(np.float32)
    idx = np.full((RANKS * tokens, 2), 5, np.int32)  # every token picks expert 5 twice: 2T copies a pair
    w = rng.random(idx.shape).astype(np.float32)
    with pytest.raises(Exception, match=r"num_dropped=16: expected 0, capacity=4 overflowed.*repeat"):
        _run(_dispatch_combine("low_latency"), x, idx, w)
    out = _run(_dispatch_combine("low_latency", drop=True), x, idx, w)  # drop=True: counted, as documented
    assert out[4].tolist() == [tokens] * RANKS
    with pytest.raises(ValueError, match=r"^capacity=4: expected .*repeat"):  # concrete ids: before any work
        ep.ep_dispatch(jnp.asarray(x[:tokens]), jnp.asarray(idx[:tokens]), num_experts=EXPERTS, axis_name=None,
                       transport="low_latency")


def test_low_latency_distinct_ids_default_capacity_has_no_drops(rng):
    """Distinct ids with capacity=None still never overflow, and weighted combine = sum_k w * 2x."""
    tokens, hidden = 5, 8
    x = rng.standard_normal((RANKS * tokens, hidden)).astype(np.float32)
    idx = np.stack([rng.permutation(EXPERTS)[:3] for _ in range(RANKS * tokens)]).astype(np.int32)
    idx[::4, 2] = -1
    w = rng.random(idx.shape).astype(np.float32)
    out = _run(_dispatch_combine("low_latency"), x, idx, w)
    assert (out[4] == 0).all()
    np.testing.assert_allclose(out[5].reshape(x.shape), 2 * x * np.where(idx >= 0, w, 0).sum(1, keepdims=True),
                               rtol=1e-6)


@pytest.mark.parametrize("transport", ["padded", "low_latency"])
def test_no_tokens_at_all(transport):
    """x [0, H] on every rank (traced ids): nothing received, combine gives [0, H]; it used to raise a
    ZeroDivisionError from the run-time check's reshape."""
    x, idx = np.zeros((0, 16), np.float32), np.zeros((0, 2), np.int32)

    def f(x, i):
        d = ep.ep_dispatch(x, i, num_experts=EXPERTS, axis_name="ep", transport=transport)
        return d.num_recv, ep.ep_combine(d.x, d.handle)
    num_recv, y = _run(f, x, idx)
    assert y.shape == (RANKS, 0, 16) and (num_recv == 0).all()
