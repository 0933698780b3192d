"""Byte-level tokenizer and sequence packing for token stores (no vocabulary download needed); a real vocabulary
(`tokenizer.json`) packs through `tokenizer.HFTokenizer` with the same `pack`.

Token ids: 0..255 are UTF-8 bytes, 256 ends a document (EOS). Packing concatenates documents, each followed by
EOS, and cuts the stream into rows of `seq_len`; the tail shorter than a row is dropped (returned separately).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from seekax.ir.validate import check_int, fail
from seekax.storage.tokenizer import ByteTokenizer, pack_ids

EOS = 256
VOCAB_SIZE = 257


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of `text` as int32 token ids [len(bytes)]."""
    if not isinstance(text, str):
        raise fail("text", type(text).__name__, "a str")
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode(tokens) -> str:
    """Inverse of `encode` (EOS and other ids >= 256 become newlines)."""
    t = np.asarray(tokens)
    return bytes(np.where(t < 256, t, 10).astype(np.uint8)).decode("utf-8", errors="replace")


def pack(texts: Iterable[str], seq_len: int, tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    """Documents -> (rows [n, seq_len] int32, leftover tail [< seq_len] int32), tokenised by `tokenizer`
    (`tokenizer.ByteTokenizer` or `HFTokenizer`; None: bytes)."""
    seq_len = check_int("seq_len", seq_len, min_value=1)
    tokenizer = tokenizer or ByteTokenizer()
    texts = [t for t in texts if t is not None]
    for t in texts:
        if not isinstance(t, str):
            raise fail("text", type(t).__name__, "a str")
    return pack_ids(tokenizer.encode_batch(texts), tokenizer.eos_id, seq_len)
