"""DeepSeek-V3 Multi-head Latent Attention with absorbed projections over a `PagedLatentCache`.

Per token the cache holds one latent row [c_kv (kv_lora, RMS-normed) | k_pe (rope, rotated)], 576 channels
in DeepSeek-V3. Decode folds W_UK into the query (q_lat = q_nope W_UK^T, [heads, kv_lora]) so attention
runs over the shared latent with `mla_decode` (FlashMLA), then applies W_UV and W_O. Prefill (XLA) runs
the unabsorbed form: the cached latents are up-projected to per-head K/V and attended densely, causal.
Both see the same cache, so a prompt prefilled and then decoded token by token equals full causal
attention. RoPE: DeepSeek's interleaved pairs on the decoupled `qk_rope` channels.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from seekax.ir.validate import check_int, fail
from seekax.ops.mla import mla_decode


@dataclasses.dataclass(frozen=True, kw_only=True)
class MlaConfig:
    """Shapes of one MLA layer. q_lora = 0: queries projected straight from the hidden state."""

    hidden: int
    heads: int
    kv_lora: int = 512
    q_lora: int = 1536
    qk_nope: int = 128
    qk_rope: int = 64
    v_head: int = 128
    rope_theta: float = 10000.0
    eps: float = 1e-6

    def __post_init__(self):
        for name in ("hidden", "heads", "kv_lora", "qk_nope", "v_head"):
            check_int(name, getattr(self, name), min_value=1)
        check_int("q_lora", self.q_lora, min_value=0)
        check_int("qk_rope", self.qk_rope, min_value=2, multiple_of=2)

    @property
    def latent_dim(self) -> int:
        return self.kv_lora + self.qk_rope

    @property
    def softmax_scale(self) -> float:
        return 1.0 / math.sqrt(self.qk_nope + self.qk_rope)  # of the unabsorbed head dim, not of 576

    @classmethod
    def deepseek_v3(cls) -> "MlaConfig":
        return cls(hidden=7168, heads=128, kv_lora=512, q_lora=1536, qk_nope=128, qk_rope=64, v_head=128)

    @classmethod
    def small(cls) -> "MlaConfig":
        """A demo-sized layer (XLA decode path: latent 48 is not the kernel's 576)."""
        return cls(hidden=64, heads=4, kv_lora=32, q_lora=0, qk_nope=16, qk_rope=16, v_head=16)


def init_mla_params(key, config: MlaConfig, dtype=jnp.float32) -> dict:
    """Weights as [in, out] matrices, scaled 1/sqrt(in); norms start at 1."""
    c = config
    ks = iter(jax.random.split(key, 6))

    def dense(n_in, n_out):
        return (jax.random.normal(next(ks), (n_in, n_out), jnp.float32) / math.sqrt(n_in)).astype(dtype)

    qk = c.qk_nope + c.qk_rope
    p = {"wkv_a": dense(c.hidden, c.kv_lora + c.qk_rope), "kv_norm": jnp.ones((c.kv_lora,), dtype),
         "wkv_b": dense(c.kv_lora, c.heads * (c.qk_nope + c.v_head)), "wo": dense(c.heads * c.v_head, c.hidden)}
    if c.q_lora:
        p.update(wq_a=dense(c.hidden, c.q_lora), q_norm=jnp.ones((c.q_lora,), dtype),
                 wq_b=dense(c.q_lora, c.heads * qk))
    else:
        p["wq"] = dense(c.hidden, c.heads * qk)
    return p


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedLatentCache:
    """Paged latent KV cache: pages [num_pages, page, 1, latent], block_table [B, max_pages] int32,
    seq_lens [B] int32, free [num_pages] bool. Functional updates; every method is jit-able. Out of
    pages: eager calls raise ValueError; under jit the tokens that found no page are dropped."""

    pages: jax.Array
    block_table: jax.Array
    seq_lens: jax.Array
    free: jax.Array

    @classmethod
    def create(cls, *, batch: int, num_pages: int, max_pages: int, latent_dim: int, page_size: int = 64,
               dtype=jnp.bfloat16) -> "PagedLatentCache":
        for name, v in (("batch", batch), ("num_pages", num_pages), ("max_pages", max_pages),
                        ("latent_dim", latent_dim), ("page_size", page_size)):
            check_int(name, v, min_value=1)
        return cls(pages=jnp.zeros((num_pages, page_size, 1, latent_dim), dtype),
                   block_table=jnp.zeros((batch, max_pages), jnp.int32),
                   seq_lens=jnp.zeros((batch,), jnp.int32), free=jnp.ones((num_pages,), bool))

    @property
    def page_size(self) -> int:
        return self.pages.shape[1]

    def append(self, latents, num_new=None) -> "PagedLatentCache":
        """Write latents [B, T, latent] at each sequence's end (the first num_new[b] of them; default all),
        taking fresh pages from the free list as sequences cross page boundaries."""
        b, t, d = latents.shape
        if d != self.pages.shape[-1] or b != self.seq_lens.shape[0]:
            raise fail("latents.shape", tuple(latents.shape),
                       f"[batch={self.seq_lens.shape[0]}, T, {self.pages.shape[-1]}]")
        page, num_pages, max_pages = self.page_size, self.pages.shape[0], self.block_table.shape[1]
        n = jnp.full((b,), t, jnp.int32) if num_new is None else jnp.asarray(num_new, jnp.int32)
        have = -(-self.seq_lens // page)                                         # [B] pages in use
        need = -(-(self.seq_lens + n) // page) - have                             # [B] new pages
        first = jnp.cumsum(need) - need                                           # [B] rank in the free list
        free_ids = jnp.nonzero(self.free, size=num_pages, fill_value=num_pages)[0]  # [num_pages]
        k = jnp.arange(-(-t // page) + 1, dtype=jnp.int32)                        # [K] new-page slots
        take = k[None] < need[:, None]                                            # [B, K]
        ids = free_ids[jnp.clip(first[:, None] + k[None], 0, num_pages - 1)]      # [B, K]
        ids = jnp.where(take & (first[:, None] + k[None] < num_pages), ids, num_pages)  # num_pages: none left
        col = jnp.where(take, have[:, None] + k[None], max_pages)                 # [B, K]
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], col.shape)
        table = self.block_table.at[rows, col].set(ids.astype(jnp.int32), mode="drop")
        free = self.free.at[jnp.where(take, ids, num_pages)].set(False, mode="drop")
        pos = self.seq_lens[:, None] + jnp.arange(t, dtype=jnp.int32)[None]      # [B, T]
        pg = jnp.take_along_axis(table, jnp.clip(pos // page, 0, max_pages - 1), axis=1)  # [B, T]
        ok = (jnp.arange(t)[None] < n[:, None]) & (pos // page < max_pages) & (pg < num_pages)
        pages = self.pages.at[jnp.where(ok, pg, num_pages), pos % page, 0].set(
            latents.astype(self.pages.dtype), mode="drop")
        self._check_capacity(need, ids, take, n)
        lens = jnp.minimum(self.seq_lens + n, max_pages * page)
        return PagedLatentCache(pages=pages, block_table=table, seq_lens=lens, free=free)

    def _check_capacity(self, need, ids, take, n):
        """Eager calls only: a clear error when pages or block-table columns run out."""
        try:
            short = bool(jnp.any(take & (ids >= self.pages.shape[0])))
            over = bool(jnp.any(self.seq_lens + n > self.block_table.shape[1] * self.page_size))
        except jax.errors.ConcretizationTypeError:
            return  # under jit: dropped, see the class docstring
        if over:
            raise fail("cache.block_table.shape", tuple(self.block_table.shape),
                       f"room for seq_lens + new tokens = {(self.seq_lens + n).tolist()}")
        if short:
            raise fail("cache.free", int(self.free.sum()), f"at least {int(need.sum())} free pages to append")

    def free_sequences(self, done) -> "PagedLatentCache":
        """Return the pages of sequences where done [B] bool is set to the free list; their length becomes 0."""
        done = jnp.asarray(done, bool)
        page, num_pages = self.page_size, self.pages.shape[0]
        used = jnp.arange(self.block_table.shape[1])[None] * page < self.seq_lens[:, None]  # [B, max_pages]
        release = used & done[:, None]
        free = self.free.at[jnp.where(release, self.block_table, num_pages)].set(True, mode="drop")
        return PagedLatentCache(pages=self.pages, block_table=jnp.where(done[:, None], 0, self.block_table),
                                seq_lens=jnp.where(done, 0, self.seq_lens), free=free)


def _rms_norm(x, w, eps):
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * inv * w.astype(jnp.float32)).astype(x.dtype)


def apply_rope(x, positions, theta: float):
    """x [..., T, (H,) rope] rotated as interleaved pairs (DeepSeek's complex view); positions [B, T]."""
    r = x.shape[-1]
    freqs = 1.0 / (theta ** (jnp.arange(0, r, 2, dtype=jnp.float32) / r))          # [r/2]
    ang = positions.astype(jnp.float32)[..., None] * freqs                          # [B, T, r/2]
    if x.ndim == 4:
        ang = ang[:, :, None, :]                                                     # [B, T, 1, r/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x32 = x.astype(jnp.float32)
    xr, xi = x32[..., 0::2], x32[..., 1::2]
    out = jnp.stack([xr * cos - xi * sin, xr * sin + xi * cos], axis=-1)            # [..., r/2, 2]
    return out.reshape(x.shape).astype(x.dtype)


def _project(params, x, positions, c: MlaConfig):
    """x [B, T, hidden] -> q_nope [B,T,H,nope], q_pe [B,T,H,rope], latent [B,T,kv_lora+rope]."""
    b, t, _ = x.shape
    if c.q_lora:
        q = _rms_norm(x @ params["wq_a"], params["q_norm"], c.eps) @ params["wq_b"]
    else:
        q = x @ params["wq"]
    q = q.reshape(b, t, c.heads, c.qk_nope + c.qk_rope)
    q_nope, q_pe = q[..., :c.qk_nope], apply_rope(q[..., c.qk_nope:], positions, c.rope_theta)
    kv = x @ params["wkv_a"]                                                          # [B, T, kv_lora + rope]
    c_kv = _rms_norm(kv[..., :c.kv_lora], params["kv_norm"], c.eps)
    k_pe = apply_rope(kv[..., c.kv_lora:], positions, c.rope_theta)
    return q_nope, q_pe, jnp.concatenate([c_kv, k_pe], axis=-1)


def _split_wkv_b(params, c: MlaConfig):
    w = params["wkv_b"].reshape(c.kv_lora, c.heads, c.qk_nope + c.v_head)
    return w[..., :c.qk_nope], w[..., c.qk_nope:]                                      # W_UK, W_UV: [kv_lora, H, *]


def mla_attention(params: dict, x: jax.Array, cache: PagedLatentCache, *, config: MlaConfig, mode: str = "decode",
                  backend: str = "auto") -> tuple[jax.Array, PagedLatentCache]:
    """x [B, T, hidden] are the next T tokens of every sequence: append their latents to the cache and
    attend causally over everything cached. mode "decode": absorbed, `mla_decode` (T = 1, or a few
    tokens for multi-token prediction); "prefill": unabsorbed dense attention in XLA (long T).
    Returns (y [B, T, hidden], the updated cache)."""
    c = config
    if mode not in ("decode", "prefill"):
        raise fail("mode", mode, "'decode' or 'prefill'")
    if getattr(x, "ndim", None) != 3 or x.shape[-1] != c.hidden:
        raise fail("x.shape", getattr(x, "shape", None), f"[batch, T, hidden={c.hidden}]")
    if cache.pages.shape[-1] != c.latent_dim:
        raise fail("cache.pages.shape", tuple(cache.pages.shape), f"latent dim {c.latent_dim} = kv_lora + qk_rope")
    b, t, _ = x.shape
    positions = cache.seq_lens[:, None] + jnp.arange(t, dtype=jnp.int32)[None]       # [B, T]
    q_nope, q_pe, latent = _project(params, x, positions, c)
    cache = cache.append(latent)
    w_uk, w_uv = _split_wkv_b(params, c)
    if mode == "decode":
        q_lat = jnp.einsum("bthn,chn->bthc", q_nope, w_uk)                            # [B, T, H, kv_lora]
        q_full = jnp.concatenate([q_lat, q_pe], axis=-1).astype(cache.pages.dtype)      # [B, T, H, latent]
        o_lat, _ = mla_decode(q_full, cache.pages, cache.block_table, cache.seq_lens, v_dim=c.kv_lora,
                              softmax_scale=c.softmax_scale, causal=True, backend=backend)  # [B, T, H, kv_lora]
        o = jnp.einsum("bthc,chv->bthv", o_lat.astype(x.dtype), w_uv)                  # [B, T, H, v_head]
    else:
        from seekax.lowering.reference.mla_decode import gather_pages, key_limits

        lat = gather_pages(cache.pages, cache.block_table, cache.seq_lens).astype(jnp.float32)  # [B, S, latent]
        k_nope = jnp.einsum("bsc,chn->bshn", lat[..., :c.kv_lora], w_uk.astype(jnp.float32))  # [B, S, H, nope]
        v = jnp.einsum("bsc,chv->bshv", lat[..., :c.kv_lora], w_uv.astype(jnp.float32))        # [B, S, H, v]
        s = (jnp.einsum("bthn,bshn->bhts", q_nope.astype(jnp.float32), k_nope)
             + jnp.einsum("bthr,bsr->bhts", q_pe.astype(jnp.float32), lat[..., c.kv_lora:])) * c.softmax_scale
        allowed = jnp.arange(lat.shape[1])[None, None] < key_limits(cache.seq_lens, t, True)[..., None]  # [B, T, S]
        p = jax.nn.softmax(jnp.where(allowed[:, None], s, -jnp.inf), axis=-1)         # [B, H, T, S]
        o = jnp.einsum("bhts,bshv->bthv", p, v).astype(x.dtype)                        # [B, T, H, v]
    return o.reshape(b, t, c.heads * c.v_head) @ params["wo"], cache
