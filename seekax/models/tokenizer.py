"""A checkpoint directory's tokenizer: `tokenizer.json` through Hugging Face `tokenizers` (its own
normaliser, pre-tokeniser, model and post-processor), and the chat template of `tokenizer_config.json`
rendered with jinja2 the way transformers renders it."""

from __future__ import annotations

import os

from seekax.ir.validate import fail
from seekax.models.safetensors_dir import read_json

# tokenizer classes whose post-processor transformers builds from add_bos_token / add_eos_token (DeepSeek's).
LLAMA_CLASSES = ("LlamaTokenizerFast", "LlamaTokenizer")


class Tokenizer:
    """encode(text) adds what the post-processor adds (e.g. BOS; for LlamaTokenizerFast configs what add_bos_token /
    add_eos_token ask for, as transformers does); decode skips special tokens by default."""

    def __init__(self, model_dir: str | os.PathLike):
        from tokenizers import Tokenizer as HfTokenizer

        d = os.fspath(model_dir)
        path = os.path.join(d, "tokenizer.json")
        if not os.path.isfile(path):
            raise fail("model_dir", d, "a directory with a tokenizer.json")
        self._tok = HfTokenizer.from_file(path)
        cfg_path = os.path.join(d, "tokenizer_config.json")
        self.config: dict = read_json(cfg_path) if os.path.isfile(cfg_path) else {}
        self.chat_template = _chat_template(d, self.config)
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self._prefix: list[int] = []
        self._suffix: list[int] = []
        if self.config.get("tokenizer_class") in LLAMA_CLASSES:
            # transformers rebuilds these classes' post-processor from add_bos_token / add_eos_token, whatever
            # tokenizer.json holds: add what tokenizer.json's own post-processor leaves out.
            plain = self._tok.encode("", add_special_tokens=True).ids
            bos, eos = self._id(self.bos_token), self.eos_id
            if self.config.get("add_bos_token", True) and bos is not None and plain[:1] != [bos]:
                self._prefix = [bos]
            if self.config.get("add_eos_token", False) and eos is not None and plain[-1:] != [eos]:
                self._suffix = [eos]

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def eos_id(self) -> int | None:
        return self._id(self.eos_token)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            ids = self._prefix + ids + self._suffix
        return ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """Render messages [{"role", "content"}] with the directory's chat template (jinja2, sandboxed,
        trim_blocks and lstrip_blocks, as transformers does)."""
        if not self.chat_template:
            raise fail("chat_template", None, "a chat_template in tokenizer_config.json or a chat_template.jinja "
                       "(needed for --chat)")
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


def _chat_template(d: str, config: dict) -> str | None:
    """The template as transformers finds it: `chat_template.jinja` (what transformers >= 4.47 saves) before
    tokenizer_config.json's `chat_template`, which may also be a list of named templates ("default" used)."""
    path = os.path.join(d, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    t = config.get("chat_template")
    if isinstance(t, list):
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        if "default" not in named:
            raise fail("tokenizer_config.json['chat_template']", sorted(named), "a template named 'default'")
        return named["default"]
    return t


def _token_text(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok
