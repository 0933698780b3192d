"""Serving a DeepSeek model: continuous batching over paged latent caches.

A fixed number of slots (the batch) share one `PagedLatentCache` per layer. Waiting requests take free
slots and are prefilled together in one call (prompts of different lengths padded to a bucket, each row's
real length passed as `num_new`); then every active slot decodes one token a step (`mla_decode`, the
FlashMLA kernel at DeepSeek's dimensions on Hopper). A finished sequence (EOS or its token budget) frees
its pages and its slot; the next waiting request takes it. Shapes never change with the requests, so
nothing recompiles after the first prefill of each bucket and the first decode step. With a
`KVPageStore`, whole prompt pages already stored are copied into the cache instead of being recomputed,
and each prompt's pages are stored after its prefill (prefix reuse across requests and runs).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from seekax.ir.validate import check_choice, check_int, fail, is_real_number
from seekax.layers.linear import cdiv
from seekax.layers.mla import PagedLatentCache
from seekax.models.deepseek import init_caches, serve_step
from seekax.models.deepseek_config import DeepseekConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """temperature 0: greedy. Otherwise softmax(logits / temperature) restricted to the smallest set of
    tokens whose probability reaches top_p (nucleus sampling)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        check_int("max_new_tokens", self.max_new_tokens, min_value=1)
        check_int("seed", self.seed, min_value=None)
        if not (is_real_number(self.temperature) and 0 <= self.temperature < math.inf):
            raise fail("temperature", self.temperature, "a finite number >= 0 (0: greedy)")
        if not (is_real_number(self.top_p) and 0 < self.top_p <= 1):
            raise fail("top_p", self.top_p, "a number in (0, 1]")


def check_prompts(prompts, vocab: int) -> list[list[int]]:
    """Prompts as lists of ids: each a non-empty 1-D sequence (list, tuple, numpy or jax array) of integer ids
    in [0, vocab). Float ids would be truncated and ids out of range clamped by the embedding gather, silently."""
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
        raise fail("prompts", type(prompts).__name__, "a list of prompts, each a sequence of token ids")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not hasattr(p, "__len__"):
            raise fail(f"prompts[{i}]", p, "a 1-D sequence of token ids (prompts is a list of prompts; encode "
                       "text with the tokenizer first)")
        a = np.asarray(p)
        if a.ndim != 1:
            raise fail(f"prompts[{i}]", f"shape {a.shape}", "a 1-D sequence of token ids")
        if a.size == 0:
            raise fail(f"prompts[{i}]", [], "at least one token")
        if a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
            raise fail(f"prompts[{i}]", f"dtype {a.dtype}", "integer token ids")
        if a.max() >= vocab or a.min() < 0:
            raise fail(f"prompts[{i}]", f"ids in [{a.min()}, {a.max()}]", f"ids in [0, vocab={vocab})")
        out.append(a.tolist())
    return out


@dataclasses.dataclass
class GenerateResult:
    output_ids: list[list[int]]        # per request, the generated ids (EOS included when generated)
    seconds: float                     # wall time of the whole call
    new_tokens: int
    prefix_tokens_reused: int          # prompt tokens taken from the KV store instead of prefilled

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits [B, V] float32 -> token ids [B] int32: argmax where temperature is 0, else nucleus sampling.
    key: one key for the batch, or [B] keys, one per row (what makes a request's draws its own)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    probs = jax.nn.softmax(scaled, axis=-1)
    order = jnp.argsort(-probs, axis=-1)
    sorted_p = jnp.take_along_axis(probs, order, axis=-1)
    keep_sorted = (jnp.cumsum(sorted_p, axis=-1) - sorted_p) < top_p               # always keeps the best token
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    masked = jnp.where(keep, scaled, -jnp.inf)
    if jnp.ndim(key) == 1:
        drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row))(key, masked).astype(jnp.int32)
    else:
        drawn = jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


class Generator:
    """Continuous-batching generation for one model. Construct once (params moved to the device, steps
    compiled on first use) and call `generate` with any number of prompts."""

    def __init__(self, params: dict, cfg: DeepseekConfig, *, max_batch: int = 8, max_seq_len: int = 512,
                 page_size: int = 64, cache_dtype=None, backend: str = "auto", kv_store=None, min_bucket: int = 16):
        check_int("max_batch", max_batch, min_value=1)
        check_int("max_seq_len", max_seq_len, min_value=2)
        check_int("page_size", page_size, min_value=1)
        check_int("min_bucket", min_bucket, min_value=1)
        check_choice("backend", backend, ("auto", "mosaic", "interpret", "xla"))
        self.cfg, self.backend, self.kv = cfg, backend, kv_store
        self.batch, self.max_seq_len, self.page, self.min_bucket = max_batch, max_seq_len, page_size, min_bucket
        if cache_dtype is None:
            cache_dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
        self.cache_dtype = jnp.dtype(cache_dtype)
        if kv_store is not None and tuple(kv_store.page_shape) != (page_size, cfg.num_layers, cfg.mla.latent_dim):
            raise fail("kv_store.page_shape", tuple(kv_store.page_shape),
                       f"(page_size, layers, latent) = {(page_size, cfg.num_layers, cfg.mla.latent_dim)}")
        self.params = jax.device_put(params)
        self.max_pages = cdiv(max_seq_len, page_size)
        self._step = jax.jit(self._step_fn, static_argnames=("mode",), donate_argnums=(2,))
        self._free = jax.jit(lambda caches, done: [c.free_sequences(done) for c in caches], donate_argnums=(0,))
        self._write = jax.jit(lambda caches, lat, n: [c.append(lat[:, :, i], n) for i, c in enumerate(caches)],
                              donate_argnums=(0,))

    def new_caches(self) -> list[PagedLatentCache]:
        return init_caches(self.cfg, batch=self.batch, num_pages=self.batch * self.max_pages,
                           max_pages=self.max_pages, page_size=self.page, dtype=self.cache_dtype)

    def _step_fn(self, params, tokens, caches, num_new, key, temperature, top_p, *, mode):
        logits, caches, _ = serve_step(params, tokens, caches, self.cfg, mode=mode, num_new=num_new,
                                       backend=self.backend)
        last = jnp.take_along_axis(logits, jnp.maximum(num_new - 1, 0)[:, None, None], axis=1)[:, 0]  # [B, V]
        base, request, position = key           # token `position` of request `request` draws with its own key,
        keys = jax.vmap(lambda r, n: jax.random.fold_in(jax.random.fold_in(base, r), n))(request, position)
        return sample(last, keys, temperature, top_p), caches  # whatever batch or slot the request runs in

    def _bucket(self, n: int) -> int:
        b = self.min_bucket
        while b < n:
            b *= 2
        return min(b, self.max_seq_len)

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig = SamplingConfig(), *,
                 eos_ids: tuple[int, ...] | None = None) -> GenerateResult:
        """Generate for every prompt (token ids); at most `max_batch` run at once, the rest wait for a slot.
        A prompt plus its token budget must fit max_seq_len and the model's max_position_embeddings."""
        if not isinstance(sampling, SamplingConfig):
            raise fail("sampling", type(sampling).__name__, "a SamplingConfig")
        eos = self._eos_set(eos_ids)
        prompts = check_prompts(prompts, self.cfg.vocab)
        max_pos = self.cfg.max_position_embeddings
        limit, what = ((self.max_seq_len, "max_seq_len") if self.max_seq_len <= max_pos
                       else (max_pos, "the model's max_position_embeddings"))
        for i, p in enumerate(prompts):
            if len(p) >= limit:
                raise fail("prompts", f"prompts[{i}] of {len(p)} tokens",
                           f"each prompt shorter than {what}={limit} tokens (room for a new token)")
            if len(p) + sampling.max_new_tokens > limit:
                raise fail("max_new_tokens", sampling.max_new_tokens,
                           f"<= {what} - len(prompts[{i}]) = {limit - len(p)}")
        t0 = time.perf_counter()
        caches = self.new_caches()
        base_key = jax.random.key(sampling.seed)
        temp = jnp.float32(sampling.temperature)
        top_p = jnp.float32(sampling.top_p)
        waiting = collections.deque(range(len(prompts)))
        slot_req: list[int | None] = [None] * self.batch
        outputs: list[list[int]] = [[] for _ in prompts]
        last = np.zeros((self.batch,), np.int32)
        reused = 0
        while waiting or any(r is not None for r in slot_req):
            admitted = []
            for s in range(self.batch):
                if slot_req[s] is None and waiting:
                    slot_req[s] = waiting.popleft()
                    admitted.append(s)
            request = np.array([-1 if r is None else r for r in slot_req], np.int32)       # [B]
            position = np.array([0 if r is None else len(outputs[r]) for r in slot_req], np.int32)
            sub = (base_key, jnp.asarray(request), jnp.asarray(position))
            if admitted:
                caches, starts = self._reuse_prefixes(caches, admitted, slot_req, prompts)
                reused += sum(starts.values())
                rest = {s: prompts[slot_req[s]][starts[s]:] for s in admitted}
                t = self._bucket(max(len(r) for r in rest.values()))
                tokens = np.zeros((self.batch, t), np.int32)
                num_new = np.zeros((self.batch,), np.int32)
                for s, r in rest.items():
                    tokens[s, :len(r)] = r
                    num_new[s] = len(r)
                nxt, caches = self._step(self.params, jnp.asarray(tokens), caches, jnp.asarray(num_new), sub, temp,
                                         top_p, mode="prefill")
                if self.kv is not None:
                    self._store_prompts(caches, admitted, slot_req, prompts)
                active = np.isin(np.arange(self.batch), admitted)
            else:
                active = np.array([r is not None for r in slot_req])
                nxt, caches = self._step(self.params, jnp.asarray(last[:, None]), caches,
                                         jnp.asarray(active.astype(np.int32)), sub, temp, top_p, mode="decode")
            nxt = np.asarray(nxt)
            done = np.zeros((self.batch,), bool)
            for s in np.flatnonzero(active):
                out = outputs[slot_req[s]]
                out.append(int(nxt[s]))
                last[s] = nxt[s]
                if int(nxt[s]) in eos or len(out) >= sampling.max_new_tokens:
                    done[s] = True
            if done.any():
                caches = self._free(caches, jnp.asarray(done))
                for s in np.flatnonzero(done):
                    slot_req[s] = None
        jax.block_until_ready(caches)
        return GenerateResult(output_ids=outputs, seconds=time.perf_counter() - t0,
                              new_tokens=sum(len(o) for o in outputs), prefix_tokens_reused=reused)

    def _eos_set(self, eos_ids) -> set[int]:
        """The ids that end a sequence: the config's by default, else a sequence of integers (maybe empty)."""
        if eos_ids is None:
            return set(self.cfg.eos_ids)
        try:
            a = None if isinstance(eos_ids, (str, bytes)) else np.asarray(list(eos_ids))
        except TypeError:
            a = None
        if a is None or a.ndim != 1 or (a.size and (a.dtype == bool or not np.issubdtype(a.dtype, np.integer))):
            raise fail("eos_ids", eos_ids, "a sequence of integer token ids (empty: no EOS), or None (the config's)")
        return set(a.tolist())

    # ------------------------------------------------------------------------------------------- KV store
    def _reuse_prefixes(self, caches, admitted, slot_req, prompts):
        """Copy each admitted prompt's stored whole pages into its slot; returns (caches, {slot: tokens})."""
        starts = {s: 0 for s in admitted}
        if self.kv is None:
            return caches, starts
        found = self.kv.match_prefixes([prompts[slot_req[s]] for s in admitted])
        longest = 0
        for s, (n, _) in zip(admitted, found):
            n = min(n, len(prompts[slot_req[s]]) - 1) // self.page * self.page     # keep >= 1 token to prefill
            starts[s] = n
            longest = max(longest, n)
        if not longest:
            return caches, starts
        lat = np.zeros((self.batch, longest, self.cfg.num_layers, self.cfg.mla.latent_dim), np.float32)
        for s, (_, pages) in zip(admitted, found):
            n = starts[s]
            if n:
                lat[s, :n] = np.asarray(pages[: n // self.page], np.float32).reshape(n, *lat.shape[2:])
        num = np.array([starts.get(s, 0) for s in range(self.batch)], np.int32)
        return self._write(caches, jnp.asarray(lat, self.cache_dtype), jnp.asarray(num)), starts

    def _store_prompts(self, caches, admitted, slot_req, prompts):
        """Put each admitted prompt's whole pages (all layers) into the KV store."""
        tables = np.asarray(caches[0].block_table)
        for s in admitted:
            ids = prompts[slot_req[s]]
            full = len(ids) // self.page
            if not full:
                continue
            rows = jnp.asarray(tables[s, :full])
            pages = np.stack([np.asarray(c.pages[rows, :, 0]) for c in caches], axis=2)  # [full, page, L, latent]
            self.kv.put_pages(ids[: full * self.page], pages.astype(self.kv.dtype))


class DirectoryGenerator:
    """A Hugging Face checkpoint directory ready to serve: its tokenizer, its params (float weights cast to
    `dtype`, or quantised to FP8 with `quantize`) and `Generator`s sized per call. What `seekax generate` runs.

    dtype "auto": bfloat16 on a GPU, float32 elsewhere (FP8 weights stay FP8). kv_store: a `KVPageStore`
    folder for prompt-prefix reuse (pages of `page_size` tokens), kept open until `close()`."""

    def __init__(self, model_dir, *, dtype: str = "auto", quantize: bool = False, kv_store=None,
                 max_batch: int = 8, page_size: int = 64, backend: str = "auto", progress: bool = False):
        import ml_dtypes

        from seekax.models.checkpoint import load_checkpoint
        from seekax.models.deepseek_config import load_config
        from seekax.models.tokenizer import Tokenizer

        check_choice("dtype", dtype, ("auto", "float32", "bfloat16"))
        check_int("max_batch", max_batch, min_value=1)
        self.model_dir, self.max_batch, self.page, self.backend = model_dir, max_batch, page_size, backend
        cfg = load_config(model_dir)
        self.tokenizer = Tokenizer(model_dir)
        if dtype == "auto":
            dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
        self.dtype = dtype
        self.cfg, self.params = load_checkpoint(model_dir, cfg,
                                                dtype=ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32,
                                                quantize=quantize, mtp=False, progress=progress)
        self.kv = None
        if kv_store is not None:
            from seekax.storage.kv_store import KVPageStore

            self.kv = KVPageStore(kv_store, page_shape=(page_size, self.cfg.num_layers, self.cfg.mla.latent_dim),
                                  dtype=dtype, capacity_pages=4096)
        tok_eos = self.tokenizer.eos_id
        self.eos_ids = tuple(self.cfg.eos_ids or ((tok_eos,) if tok_eos is not None else ()))
        self._generators: dict[tuple[int, int], Generator] = {}

    def encode(self, texts: list[str], *, chat: bool = False) -> list[list[int]]:
        """Prompt ids as the directory's tokenizer.json encodes them (its post-processor adds BOS, say); with
        chat, each text becomes one user message rendered by the chat template."""
        tok = self.tokenizer
        return [tok.encode_chat([{"role": "user", "content": t}]) if chat else tok.encode(t) for t in texts]

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig = SamplingConfig()) -> GenerateResult:
        """Generate for prompt ids (continuous batching; the Generator for this batch and length is compiled
        once and reused by later calls of the same size)."""
        if not isinstance(sampling, SamplingConfig):
            raise fail("sampling", type(sampling).__name__, "a SamplingConfig")
        prompts = check_prompts(prompts, self.cfg.vocab)
        if not prompts:
            raise fail("prompts", [], "at least one prompt")
        longest = max(len(p) for p in prompts) + sampling.max_new_tokens
        key = (min(self.max_batch, len(prompts)), cdiv(longest, self.page) * self.page)
        gen = self._generators.get(key)
        if gen is None:
            gen = self._generators[key] = Generator(
                self.params, self.cfg, max_batch=key[0], max_seq_len=key[1], page_size=self.page,
                backend=self.backend, kv_store=self.kv, cache_dtype=self.dtype)
        return gen.generate(prompts, sampling, eos_ids=self.eos_ids)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def close(self) -> None:
        if self.kv is not None:
            self.kv.close()
            self.kv = None
