"""A checkpoint directory's tokenizer: `tokenizer.json` through Hugging Face `tokenizers` (its own
normaliser, pre-tokeniser, model and post-processor), and the chat template of `tokenizer_config.json`
rendered with jinja2 the way transformers renders it."""

from __future__ import annotations

import json
import os

from seekax.ir.validate import fail


class Tokenizer:
    """encode(text) adds what the post-processor adds (e.g. BOS); decode skips special tokens by default."""

    def __init__(self, model_dir: str | os.PathLike):
        from tokenizers import Tokenizer as HfTokenizer

        d = os.fspath(model_dir)
        path = os.path.join(d, "tokenizer.json")
        if not os.path.isfile(path):
            raise fail("model_dir", d, "a directory with a tokenizer.json")
        self._tok = HfTokenizer.from_file(path)
        cfg_path = os.path.join(d, "tokenizer_config.json")
        self.config: dict = {}
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                self.config = json.load(f)
        self.chat_template = self.config.get("chat_template")
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self._tok.token_to_id(self.eos_token)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """Render messages [{"role", "content"}] with the directory's chat template (jinja2, sandboxed,
        trim_blocks and lstrip_blocks, as transformers does)."""
        if not self.chat_template:
            raise fail("chat_template", None, "a chat_template in tokenizer_config.json (needed for --chat)")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The rendered template, encoded without the post-processor's specials (the template has them)."""
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


def _token_text(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok
