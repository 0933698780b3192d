"""DeepSeek-V2/V3 Multi-head Latent Attention with absorbed projections over a `PagedLatentCache`.

Per token the cache holds one latent row [c_kv (kv_lora, RMS-normed) | k_pe (rope, rotated)], 576 channels
in DeepSeek-V3. Decode folds W_UK into the query (q_lat = q_nope W_UK^T, [heads, kv_lora]) so attention
runs over the shared latent with `mla_decode` (FlashMLA), then applies W_UV and W_O. Prefill (XLA) runs
the unabsorbed form: the cached latents are up-projected to per-head K/V and attended densely, causal.
Both see the same cache, so a prompt prefilled and then decoded token by token equals full causal
attention. RoPE on the decoupled `qk_rope` channels: DeepSeek's interleaved pairs (or halves), optionally
YaRN-scaled (`YarnScaling`: scaled frequencies, cos/sin scaled by the attention factor, softmax scale by
mscale^2). Weights are float [in, out] matrices or `Fp8Weight`s ([out, in] e4m3 + 128x128 block scales).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from seekax.ir.validate import check_int, fail
from seekax.layers.linear import as_float, in_out_shape, linear
from seekax.ops.mla import mla_decode


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class YarnScaling:
    """YaRN context extension as DeepSeek configures it (`rope_scaling` / `rope_parameters` of type "yarn").
    attention_factor None: mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set, else
    mscale(factor). mscale_all_dim also multiplies the softmax scale by mscale(factor, mscale_all_dim)^2."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if not (isinstance(self.factor, (int, float)) and self.factor > 0):
            raise fail("factor", self.factor, "a positive number")
        check_int("original_max_position_embeddings", self.original_max_position_embeddings, min_value=1)

    def inv_freq(self, dim: int, theta: float) -> np.ndarray:
        """[dim/2] float64 frequencies: interpolated below the correction range, extrapolated above it."""
        pos_freqs = theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (self.factor * pos_freqs)

        def correction_dim(rotations):
            return dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
                2 * math.log(theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        keep = 1 - ramp                                                   # 1: extrapolate (high frequencies)
        return interpolation * (1 - keep) + extrapolation * keep

    def cos_sin_factor(self) -> float:
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor, self.mscale_all_dim)
        return _yarn_mscale(self.factor)

    def softmax_factor(self) -> float:
        return _yarn_mscale(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class MlaConfig:
    """Shapes of one MLA layer. q_lora = 0: queries projected straight from the hidden state.
    rope_interleave: rotary pairs are adjacent channels (DeepSeek's layout) rather than the two halves."""

    hidden: int
    heads: int
    kv_lora: int = 512
    q_lora: int = 1536
    qk_nope: int = 128
    qk_rope: int = 64
    v_head: int = 128
    rope_theta: float = 10000.0
    eps: float = 1e-6
    rope_interleave: bool = True
    yarn: YarnScaling | None = None

    def __post_init__(self):
        for name in ("hidden", "heads", "kv_lora", "qk_nope", "v_head"):
            check_int(name, getattr(self, name), min_value=1)
        check_int("q_lora", self.q_lora, min_value=0)
        check_int("qk_rope", self.qk_rope, min_value=2, multiple_of=2)
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise fail("rope_theta", self.rope_theta, "a positive number")
        if self.yarn is not None and not isinstance(self.yarn, YarnScaling):
            raise fail("yarn", type(self.yarn).__name__, "a YarnScaling or None")

    @property
    def latent_dim(self) -> int:
        return self.kv_lora + self.qk_rope

    @property
    def softmax_scale(self) -> float:
        """1/sqrt of the unabsorbed head dim (not of 576), times YaRN's mscale^2."""
        scale = 1.0 / math.sqrt(self.qk_nope + self.qk_rope)
        return scale * (self.yarn.softmax_factor() if self.yarn else 1.0)

    def inv_freq(self) -> np.ndarray:
        """[qk_rope/2] float32 rotary frequencies."""
        r = self.qk_rope
        if self.yarn is not None:
            return self.yarn.inv_freq(r, self.rope_theta).astype(np.float32)
        return (1.0 / (self.rope_theta ** (np.arange(0, r, 2, dtype=np.float32) / r))).astype(np.float32)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """The expected parameter shapes, matrices as (in, out)."""
        h, qk = self.heads, self.qk_nope + self.qk_rope
        want = {"wkv_a": (self.hidden, self.kv_lora + self.qk_rope), "kv_norm": (self.kv_lora,),
                "wkv_b": (self.kv_lora, h * (self.qk_nope + self.v_head)), "wo": (h * self.v_head, self.hidden)}
        if self.q_lora:
            want.update(wq_a=(self.hidden, self.q_lora), q_norm=(self.q_lora,), wq_b=(self.q_lora, h * qk))
        else:
            want["wq"] = (self.hidden, h * qk)
        return want

    @classmethod
    def deepseek_v3(cls) -> "MlaConfig":
        return cls(hidden=7168, heads=128, kv_lora=512, q_lora=1536, qk_nope=128, qk_rope=64, v_head=128)

    @classmethod
    def small(cls) -> "MlaConfig":
        """A demo-sized layer (XLA decode path: latent 48 is not the kernel's 576)."""
        return cls(hidden=64, heads=4, kv_lora=32, q_lora=0, qk_nope=16, qk_rope=16, v_head=16)


def init_mla_params(key, config: MlaConfig, dtype=jnp.float32) -> dict:
    """Weights as [in, out] matrices, scaled 1/sqrt(in); norms start at 1."""
    shapes = config.param_shapes()
    ks = iter(jax.random.split(key, len(shapes)))
    p = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            p[name] = jnp.ones(shape, dtype)
        else:
            p[name] = (jax.random.normal(next(ks), shape, jnp.float32) / math.sqrt(shape[0])).astype(dtype)
    return p


def validate_mla_params(params, config: MlaConfig) -> None:
    """Every parameter present with its (in, out) shape; raises ValueError naming the first that is not."""
    if not isinstance(params, dict):
        raise fail("params", type(params).__name__, "a dict of MLA weights")
    for name, shape in config.param_shapes().items():
        if name not in params:
            raise fail(f"params[{name!r}]", "missing", f"a weight of shape {shape} (keys given: {sorted(params)})")
        w = params[name]
        got = in_out_shape(w) if len(shape) == 2 and getattr(w, "ndim", None) == 2 else tuple(getattr(w, "shape", ()))
        if got != shape:
            raise fail(f"params[{name!r}].shape", got, f"{shape} from the config" if len(shape) == 1 else
                       f"(in, out) = {shape} from the config")


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
        _check_num_new(num_new, t)
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


def _check_num_new(num_new, t: int, *, decode: bool = False) -> None:
    """num_new: integer counts in [0, T] (0 or T in decode mode), checked when concrete (under jit: trusted).
    A count above T marks never-written slots as cached, a negative one shortens the sequence."""
    if num_new is None:
        return
    dtype = getattr(num_new, "dtype", None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.integer):
        raise fail("num_new.dtype", np.dtype(dtype).name, "an integer dtype (int32 counts)")
    if isinstance(num_new, jax.core.Tracer):
        return
    n = np.asarray(num_new)
    if n.size and (n.min() < 0 or n.max() > t):
        raise fail("num_new", n.tolist(), f"counts in [0, T={t}] (tokens of x that are real)")
    if decode and np.any((n != 0) & (n != t)):
        raise fail("num_new", n.tolist(), f"0 or T={t} in decode mode (prefill takes ragged counts)")


def _rms_norm(x, w, eps):
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * inv * w.astype(jnp.float32)).astype(x.dtype)


def _rotate(x, positions, inv_freq, factor: float, interleave: bool):
    """x [B, T, (H,) r] rotated at positions [B, T] by inv_freq [r/2]; cos/sin scaled by `factor`.
    interleave: pairs (x[2i], x[2i+1]), output interleaved; else pairs (x[i], x[i + r/2]), output as halves."""
    r = x.shape[-1]
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, T, r/2]
    if x.ndim == 4:
        ang = ang[:, :, None, :]                                                     # [B, T, 1, r/2]
    cos, sin = jnp.cos(ang) * factor, jnp.sin(ang) * factor
    x32 = x.astype(jnp.float32)
    a, b = (x32[..., 0::2], x32[..., 1::2]) if interleave else (x32[..., :r // 2], x32[..., r // 2:])
    ra, rb = a * cos - b * sin, b * cos + a * sin
    out = jnp.stack([ra, rb], axis=-1).reshape(x.shape) if interleave else jnp.concatenate([ra, rb], axis=-1)
    return out.astype(x.dtype)


def apply_rope(x, positions, theta: float):
    """x [..., T, (H,) rope] rotated as interleaved pairs (DeepSeek's complex view); positions [B, T]."""
    r = x.shape[-1]
    inv_freq = 1.0 / (theta ** (np.arange(0, r, 2, dtype=np.float32) / r))
    return _rotate(x, positions, inv_freq, 1.0, True)


def rope(x, positions, c: MlaConfig):
    """The layer's RoPE (interleaved or halves, YaRN when configured) on x [B, T, (H,) qk_rope]."""
    factor = c.yarn.cos_sin_factor() if c.yarn is not None else 1.0
    return _rotate(x, positions, c.inv_freq(), factor, c.rope_interleave)


def _project(params, x, positions, c: MlaConfig, backend: str = "auto"):
    """x [B, T, hidden] -> q_nope [B,T,H,nope], q_pe [B,T,H,rope], latent [B,T,kv_lora+rope]."""
    b, t, _ = x.shape
    if c.q_lora:
        q = linear(_rms_norm(linear(x, params["wq_a"], backend=backend), params["q_norm"], c.eps), params["wq_b"],
                   backend=backend)
    else:
        q = linear(x, params["wq"], backend=backend)
    q = q.reshape(b, t, c.heads, c.qk_nope + c.qk_rope)
    q_nope, q_pe = q[..., :c.qk_nope], rope(q[..., c.qk_nope:], positions, c)
    kv = linear(x, params["wkv_a"], backend=backend)                                  # [B, T, kv_lora + rope]
    c_kv = _rms_norm(kv[..., :c.kv_lora], params["kv_norm"], c.eps)
    k_pe = rope(kv[..., c.kv_lora:], positions, c)
    return q_nope, q_pe, jnp.concatenate([c_kv, k_pe], axis=-1)


def _split_wkv_b(params, c: MlaConfig, dtype=None):
    """W_UK [kv_lora, H, nope], W_UV [kv_lora, H, v] (FP8 weights dequantised: they are folded, not GEMMs)."""
    w = params["wkv_b"]
    w = as_float(w, dtype or jnp.float32) if dtype is not None or not isinstance(w, jax.Array) else w
    w = w.reshape(c.kv_lora, c.heads, c.qk_nope + c.v_head)
    return w[..., :c.qk_nope], w[..., c.qk_nope:]


def _attend_dense(q_nope, q_pe, lat, allowed, params, c: MlaConfig, out_dtype):
    """Unabsorbed attention in float32: q [B,T,H,*], latents lat [B,S,latent], allowed [B,T,S] -> [B,T,H,v]."""
    w_uk, w_uv = _split_wkv_b(params, c, jnp.float32)
    lat = lat.astype(jnp.float32)
    k_nope = jnp.einsum("bsc,chn->bshn", lat[..., :c.kv_lora], w_uk)                  # [B, S, H, nope]
    v = jnp.einsum("bsc,chv->bshv", lat[..., :c.kv_lora], w_uv)                       # [B, S, H, v]
    s = (jnp.einsum("bthn,bshn->bhts", q_nope.astype(jnp.float32), k_nope)
         + jnp.einsum("bthr,bsr->bhts", q_pe.astype(jnp.float32), lat[..., c.kv_lora:])) * c.softmax_scale
    p = jax.nn.softmax(jnp.where(allowed[:, None], s, -jnp.inf), axis=-1)             # [B, H, T, S]
    p = jnp.where(allowed[:, None], p, 0.0)                                           # no visible key: 0, not NaN
    return jnp.einsum("bhts,bshv->bthv", p, v).astype(out_dtype)                      # [B, T, H, v]


def mla_forward(params: dict, x: jax.Array, *, config: MlaConfig, positions: jax.Array | None = None,
                backend: str = "auto") -> jax.Array:
    """Causal MLA over whole sequences without a cache (training, reference forward): x [B, S, hidden] ->
    [B, S, hidden]; positions [B, S] default 0..S-1. The unabsorbed form `mla_attention`'s prefill runs."""
    c = config
    _check_x(x, c)
    validate_mla_params(params, c)
    b, s, _ = x.shape
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)) if positions is None else positions
    q_nope, q_pe, lat = _project(params, x, pos, c, backend)
    allowed = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool)), (b, s, s))
    o = _attend_dense(q_nope, q_pe, lat, allowed, params, c, x.dtype)
    return linear(o.reshape(b, s, c.heads * c.v_head), params["wo"], backend=backend)


def _check_x(x, c: MlaConfig):
    if getattr(x, "ndim", None) != 3 or x.shape[-1] != c.hidden:
        raise fail("x.shape", getattr(x, "shape", None), f"[batch, T, hidden={c.hidden}]")


def validate_mla_attention(params, x, cache: PagedLatentCache, config: MlaConfig, mode: str, num_new) -> None:
    """Everything `mla_attention` needs, checked before any compute."""
    c = config
    if not isinstance(c, MlaConfig):
        raise fail("config", type(c).__name__, "an MlaConfig")
    if mode not in ("decode", "prefill"):
        raise fail("mode", mode, "'decode' or 'prefill'")
    _check_x(x, c)
    validate_mla_params(params, c)
    if not isinstance(cache, PagedLatentCache):
        raise fail("cache", type(cache).__name__, "a PagedLatentCache")
    if cache.pages.shape[-1] != c.latent_dim:
        raise fail("cache.pages.shape", tuple(cache.pages.shape), f"latent dim {c.latent_dim} = kv_lora + qk_rope")
    if x.shape[0] != cache.seq_lens.shape[0]:
        raise fail("x.shape", tuple(x.shape), f"batch {cache.seq_lens.shape[0]} matching the cache's "
                   f"(cache.seq_lens.shape={tuple(cache.seq_lens.shape)})")
    if num_new is not None and tuple(getattr(num_new, "shape", ())) != (x.shape[0],):
        raise fail("num_new.shape", getattr(num_new, "shape", None), f"[batch={x.shape[0]}]")
    _check_num_new(num_new, x.shape[1], decode=mode == "decode")


def mla_attention(params: dict, x: jax.Array, cache: PagedLatentCache, *, config: MlaConfig, mode: str = "decode",
                  num_new: jax.Array | None = None, backend: str = "auto") -> tuple[jax.Array, PagedLatentCache]:
    """x [B, T, hidden] are the next T tokens of every sequence: append their latents to the cache and
    attend causally over everything cached. mode "decode": absorbed, `mla_decode` (T = 1, or a few
    tokens for multi-token prediction); "prefill": unabsorbed dense attention in XLA (long T).
    num_new [B] int32: how many of the T tokens are real for each sequence (batched prefill of prompts of
    different lengths; the rest are padding, neither cached nor attended to; their outputs are meaningless).
    In decode mode each num_new[b] must be 0 or T. Returns (y [B, T, hidden], the updated cache)."""
    c = config
    validate_mla_attention(params, x, cache, c, mode, num_new)
    b, t, _ = x.shape
    old = cache.seq_lens                                                               # [B]
    n = jnp.full((b,), t, jnp.int32) if num_new is None else jnp.asarray(num_new, jnp.int32)
    positions = old[:, None] + jnp.arange(t, dtype=jnp.int32)[None]                   # [B, T]
    q_nope, q_pe, latent = _project(params, x, positions, c, backend)
    cache = cache.append(latent, None if num_new is None else n)
    if mode == "decode":
        w_uk, w_uv = _split_wkv_b(params, c, x.dtype)
        q_lat = jnp.einsum("bthn,chn->bthc", q_nope, w_uk)                            # [B, T, H, kv_lora]
        q_full = jnp.concatenate([q_lat, q_pe], axis=-1).astype(cache.pages.dtype)      # [B, T, H, latent]
        o_lat, _ = mla_decode(q_full, cache.pages, cache.block_table, cache.seq_lens, v_dim=c.kv_lora,
                              softmax_scale=c.softmax_scale, causal=True, backend=backend)  # [B, T, H, kv_lora]
        o = jnp.einsum("bthc,chv->bthv", o_lat.astype(x.dtype), w_uv)                  # [B, T, H, v_head]
    else:
        from seekax.lowering.reference.mla_decode import gather_pages

        lat = gather_pages(cache.pages, cache.block_table, cache.seq_lens)             # [B, S, latent]
        limit = jnp.minimum(old[:, None] + jnp.arange(t, dtype=jnp.int32)[None] + 1, cache.seq_lens[:, None])
        allowed = jnp.arange(lat.shape[1])[None, None] < limit[..., None]              # [B, T, S]
        o = _attend_dense(q_nope, q_pe, lat, allowed, params, c, x.dtype)              # [B, T, H, v]
    return linear(o.reshape(b, t, c.heads * c.v_head), params["wo"], backend=backend), cache
