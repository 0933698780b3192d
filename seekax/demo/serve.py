"""Demo serving: batched greedy decode of the trained model over paged latent caches (one per layer), with
prompt prefixes reused from the KV-cache store. Requests of one batch share a prompt prefix; its pages are
written once into the cache and every sequence's block table points at them (prefix sharing, no copies)."""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from seekax.models import tiny as M
from seekax.layers.mla import PagedLatentCache


def share_prefix(cache: PagedLatentCache, latents: np.ndarray) -> PagedLatentCache:
    """An empty cache whose every sequence starts with the same whole pages `latents` [m, page, latent]:
    written once into pages [0, m), referenced by every row of the block table."""
    m, page, _ = latents.shape
    if m == 0:
        return cache
    b = cache.seq_lens.shape[0]
    pages = cache.pages.at[:m, :, 0].set(jnp.asarray(latents, cache.pages.dtype))
    table = cache.block_table.at[:, :m].set(jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (b, m)))
    return PagedLatentCache(pages=pages, block_table=table, seq_lens=jnp.full((b,), m * page, jnp.int32),
                            free=cache.free.at[:m].set(False))


def prefix_pages(caches: list[PagedLatentCache], row: int, num_pages: int) -> np.ndarray:
    """The first `num_pages` whole pages of sequence `row`, all layers: [num_pages, page, layers, latent]."""
    ids = np.asarray(caches[0].block_table[row, :num_pages])
    return np.stack([np.asarray(c.pages[jnp.asarray(ids), :, 0]) for c in caches], axis=2)


@dataclasses.dataclass
class ServeResult:
    tokens: np.ndarray          # [B, prompt + gen] int32
    logits: np.ndarray          # [B, gen, V] float32: the logits each generated token was chosen from
    decode_seconds: float
    prefill_seconds: float
    matched_tokens: int         # prompt tokens served from the KV store (per sequence)


class Server:
    """Greedy decoding with per-layer PagedLatentCaches and a KVPageStore for prompt prefixes."""

    def __init__(self, params, cfg: M.ModelConfig, *, kv_store=None, fp8_experts: bool = True,
                 num_pages: int = 64, max_pages: int = 8, backend: str = "auto"):
        self.params, self.cfg, self.kv = params, cfg, kv_store
        self.moe_cfg = dataclasses.replace(cfg.moe, fp8=fp8_experts)
        self.num_pages, self.max_pages = num_pages, max_pages
        step = functools.partial(M.decode_step, cfg=cfg, moe_cfg=self.moe_cfg, backend=backend)
        self._prefill = jax.jit(functools.partial(step, mode="prefill"))
        self._decode = jax.jit(functools.partial(step, mode="decode"))

    def empty_caches(self, batch: int) -> list[PagedLatentCache]:
        return [PagedLatentCache.create(batch=batch, num_pages=self.num_pages, max_pages=self.max_pages,
                                        latent_dim=self.cfg.mla.latent_dim, dtype=jnp.float32)
                for _ in range(self.cfg.num_layers)]

    def generate(self, prompts: np.ndarray, gen: int) -> ServeResult:
        """prompts [B, P] int32 sharing their whole stored pages -> greedy continuation of `gen` tokens."""
        b, plen = prompts.shape
        page = 64
        caches = self.empty_caches(b)
        matched = 0
        t0 = time.perf_counter()
        if self.kv is not None:
            matched, pages = self.kv.match_prefix(prompts[0])             # [m, page, L, latent]
            matched = min(matched, plen - 1)                              # keep >= 1 token to prefill
            pages = pages[: matched // page]
            matched = len(pages) * page
            caches = [share_prefix(c, pages[:, :, layer]) for layer, c in enumerate(caches)]
        logits, caches = self._prefill(self.params, jnp.asarray(prompts[:, matched:]), caches)
        if self.kv is not None:
            full = plen // page
            self.kv.put_pages(prompts[0], prefix_pages(caches, 0, full).astype(self.kv.dtype))
        jax.block_until_ready(logits)
        t1 = time.perf_counter()
        out, chosen = [prompts], []
        last = logits[:, -1]
        for _ in range(gen):
            chosen.append(np.asarray(last, np.float32))
            tok = jnp.argmax(last, axis=-1).astype(jnp.int32)[:, None]      # [B, 1]
            out.append(np.asarray(tok))
            logits, caches = self._decode(self.params, tok, caches)
            last = logits[:, -1]
        jax.block_until_ready(last)
        t2 = time.perf_counter()
        return ServeResult(tokens=np.concatenate(out, 1), logits=np.stack(chosen, 1), prefill_seconds=t1 - t0,
                           decode_seconds=t2 - t1, matched_tokens=matched)


def reference_generate(params, cfg: M.ModelConfig, prompts: np.ndarray, gen: int, *, fp8_experts: bool = True):
    """The XLA oracle: greedy decoding by recomputing the whole sequence each step with dense causal
    attention and no cache. -> (tokens [B, P + gen], logits [B, gen, V])."""
    moe_cfg = dataclasses.replace(cfg.moe, fp8=fp8_experts)
    mc = dataclasses.replace(cfg, moe=moe_cfg)

    @jax.jit
    def last_logits(params, tokens):
        return M.forward(params, tokens, mc)[0][:, -1]

    seq, chosen = np.asarray(prompts), []
    for _ in range(gen):
        lg = np.asarray(last_logits(params, jnp.asarray(seq)), np.float32)
        chosen.append(lg)
        seq = np.concatenate([seq, lg.argmax(-1)[:, None].astype(np.int32)], 1)
    return seq, np.stack(chosen, 1)


def host_params(params):
    """Replicated global arrays -> host numpy (works in every process of a multi-process run)."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), params)


def open_kv_store(path: Path, cfg: M.ModelConfig, capacity_pages: int = 256):
    from seekax.storage.kv_store import KVPageStore

    return KVPageStore(path, page_shape=(64, cfg.num_layers, cfg.mla.latent_dim), dtype="float32",
                       capacity_pages=capacity_pages)
