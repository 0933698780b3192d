"""Tokenizers for packing text into token stores, and the identity a store records so a loader can refuse data
tokenised with another vocabulary.

`ByteTokenizer`: UTF-8 bytes 0..255, EOS 256 (the demo's default; no vocabulary file needed).
`HFTokenizer(path)`: a Hugging Face `tokenizer.json` (the `tokenizers` library, part of the `[data]` extra), e.g.
DeepSeek-V3's 129,280-id vocabulary; ids are packed as int32, so any id below 2**31 fits.

Identity: {"kind", "name", "sha256" (of the tokenizer.json bytes, or of the byte scheme's description),
"vocab_size", "eos_id"}. Two tokenizers are the same when kind, sha256 and eos_id agree.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np

from seekax.ir.validate import fail
from seekax.storage.extras import require_data_extra

BYTE_SCHEME = b"seekax byte tokenizer v1: utf-8 bytes are ids 0-255, end of document is 256"
EOS_CANDIDATES = ("<\uff5cend\u2581of\u2581sentence\uff5c>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
INT32_MAX = (1 << 31) - 1


class Tokenizer(Protocol):
    eos_id: int
    vocab_size: int

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...

    def identity(self) -> dict: ...


class ByteTokenizer:
    eos_id, vocab_size = 256, 257

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) for t in texts]

    def identity(self) -> dict:
        return {"kind": "bytes", "name": "seekax-bytes", "sha256": hashlib.sha256(BYTE_SCHEME).hexdigest(),
                "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class HFTokenizer:
    """A Hugging Face `tokenizer.json`. `eos_token`: the token that ends a document (default: the first of
    EOS_CANDIDATES the vocabulary has, e.g. DeepSeek's <｜end▁of▁sentence｜>)."""

    def __init__(self, path: str | os.PathLike, *, eos_token: str | None = None):
        require_data_extra("tokenizers", feature="a tokenizer.json tokenizer")
        import tokenizers

        path = Path(path)
        if not path.is_file():
            raise fail("tokenizer", str(path), "an existing tokenizer.json file")
        raw = path.read_bytes()
        try:
            self._tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - the Rust side raises its own exception type
            raise fail("tokenizer", str(path), f"a Hugging Face tokenizer.json ({e})") from None
        self.path, self.sha256 = path, hashlib.sha256(raw).hexdigest()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        names = [eos_token] if eos_token is not None else list(EOS_CANDIDATES)
        ids = [(n, self._tok.token_to_id(n)) for n in names]
        found = [(n, i) for n, i in ids if i is not None]
        if not found:
            raise fail("eos_token", eos_token if eos_token is not None else "(automatic)",
                       f"a token of {path.name}'s vocabulary that ends a document (tried {names})")
        self.eos_token, self.eos_id = found[0]
        if self.vocab_size - 1 > INT32_MAX:
            raise fail("tokenizer", str(path), f"a vocabulary whose ids fit int32 (it has {self.vocab_size})")

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch_fast(texts,
                                                                                       add_special_tokens=False)]

    def identity(self) -> dict:
        return {"kind": "hf", "name": self.path.name, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "eos_token": self.eos_token}


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str | None = None, eos_token: str | None = None) -> ByteTokenizer | HFTokenizer:
    """The byte tokenizer when `path` is None, else the tokenizer.json at `path` (cached per process: the
    data-preparation workers load it once)."""
    if path is None:
        if eos_token is not None:
            raise fail("eos_token", eos_token, "None with the byte tokenizer (its EOS is id 256)")
        return ByteTokenizer()
    return HFTokenizer(path, eos_token=eos_token)


def same_tokenizer(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("kind", "sha256", "eos_id"))


def check_store_tokenizer(store_metadata: dict, tokenizer: ByteTokenizer | HFTokenizer) -> None:
    """Raise ValueError unless the store's recorded tokenizer is `tokenizer`."""
    have = store_metadata.get("tokenizer")
    want = tokenizer.identity()
    if not isinstance(have, dict):
        raise fail("tokenizer", want["name"], f"the tokenizer the store was packed with, but the store records "
                                              f"none ({have!r}); repack it with this tokenizer")
    if not same_tokenizer(have, want):
        raise fail("tokenizer", f"{want['name']} (sha256 {want['sha256'][:12]}, eos {want['eos_id']})",
                   f"the tokenizer the store was packed with: {have.get('name')} (sha256 "
                   f"{str(have.get('sha256'))[:12]}, eos {have.get('eos_id')}); token ids of different "
                   "vocabularies do not mean the same text")


def pack_ids(docs: Iterable[np.ndarray], eos_id: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Token-id documents -> (rows [n, seq_len] int32, leftover tail [< seq_len] int32): each document is
    followed by `eos_id`, the stream is cut into rows, the short tail is returned separately."""
    parts = []
    eos = np.asarray([eos_id], np.int32)
    for d in docs:
        parts.append(np.asarray(d, dtype=np.int32))
        parts.append(eos)
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    n = len(stream) // seq_len
    return stream[:n * seq_len].reshape(n, seq_len), stream[n * seq_len:]
