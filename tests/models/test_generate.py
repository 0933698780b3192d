"""Serving: greedy tokens equal transformers' `generate` on the same directories (golden.json); continuous
batching with fewer slots than prompts equals each prompt alone; KV-store prefix reuse changes nothing but
the work done; sampling; the tokenizer and chat template as transformers applies them; `seekax generate`."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seekax.models.checkpoint import load_checkpoint
from seekax.models.generate import Generator, SamplingConfig, sample
from seekax.models.tokenizer import Tokenizer

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "models")


def _golden(name):
    with open(os.path.join(DATA, name, "golden.json")) as f:
        return json.load(f)


def _generator(name, **kw):
    cfg, params = load_checkpoint(os.path.join(DATA, name), dtype=np.float32, progress=False)
    return cfg, Generator(params, cfg, backend="xla", cache_dtype=jnp.float32, **kw)


@pytest.mark.parametrize("name", ["v3_qlora_grouped", "v2_lite"])
def test_greedy_tokens_equal_transformers_generate(name):
    g = _golden(name)
    tok = Tokenizer(os.path.join(DATA, name))
    prompts = [tok.encode(r["prompt"]) for r in g["generate"]]
    assert prompts == [r["prompt_ids"] for r in g["generate"]]                   # tokenizer.json + post-processor
    _, gen = _generator(name, max_batch=2, max_seq_len=32, page_size=4)           # 3 prompts through 2 slots
    out = gen.generate(prompts, SamplingConfig(max_new_tokens=g["max_new_tokens"]), eos_ids=(tok.eos_id,))
    assert out.output_ids == [r["output_ids"] for r in g["generate"]]
    assert out.new_tokens == sum(len(o) for o in out.output_ids) and out.tokens_per_s > 0


def test_kv_store_prefix_reuse_gives_the_same_tokens(tmp_path):
    from seekax.storage.kv_store import KVPageStore

    name = "v3_yarn_tied"
    cfg, _ = load_checkpoint(os.path.join(DATA, name), progress=False)
    rng = np.random.default_rng(0)
    shared = rng.integers(2, cfg.vocab, 9).tolist()
    prompts = [shared + [5, 6], shared + [7], shared[:3]]
    _, plain = _generator(name, max_batch=3, max_seq_len=24, page_size=4)
    want = plain.generate(prompts, SamplingConfig(max_new_tokens=5), eos_ids=())
    store = KVPageStore(tmp_path / "kv", page_shape=(4, cfg.num_layers, cfg.mla.latent_dim), dtype="float32",
                        capacity_pages=64)
    _, gen = _generator(name, max_batch=1, max_seq_len=24, page_size=4, kv_store=store)
    got = gen.generate(prompts, SamplingConfig(max_new_tokens=5), eos_ids=())
    assert got.output_ids == want.output_ids
    assert got.prefix_tokens_reused == 8               # the second request: the first's 2 whole pages (the third
                                                       # has no whole page)
    again = gen.generate(prompts[:1], SamplingConfig(max_new_tokens=5), eos_ids=())
    assert again.output_ids == want.output_ids[:1] and again.prefix_tokens_reused == 8
    store.close()


def test_sampling_keeps_the_nucleus_and_is_greedy_at_zero_temperature():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.key(0)
    drawn = np.asarray(sample(logits, keys, jnp.float32(1.0), jnp.float32(0.7)))
    assert set(drawn.tolist()) == {0, 1}                                          # 0.5 + 0.3 reaches 0.7
    assert abs((drawn == 0).mean() - 0.5 / 0.8) < 0.03
    assert np.asarray(sample(logits[:2], keys, jnp.float32(0.0), jnp.float32(0.1))).tolist() == [0, 0]
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)


def test_chat_template_renders_as_transformers_does():
    name = "v3_qlora_grouped"
    tok = Tokenizer(os.path.join(DATA, name))
    assert tok.apply_chat_template([{"role": "user", "content": "Hello"}]) == _golden(name)["chat_hello"]
    ids = tok.encode_chat([{"role": "user", "content": "Hello"}])
    assert ids.count(tok.encode("")[0]) == 1                                     # one BOS: the template's


def test_generate_command_json(capsys):
    from seekax.cli.main import main

    name = "v2_group_limited"
    g = _golden(name)
    argv = ["generate", "--model", os.path.join(DATA, name), "--max-new-tokens", str(g["max_new_tokens"]),
            "--json", "--backend", "xla"]
    for r in g["generate"]:
        argv += ["--prompt", r["prompt"]]
    assert main(argv) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["output_ids"] for r in lines] == [r["output_ids"] for r in g["generate"]]
    assert [r["prompt_ids"] for r in lines] == [r["prompt_ids"] for r in g["generate"]]
    tok = Tokenizer(os.path.join(DATA, name))
    assert lines[0]["text"] == tok.decode(g["generate"][0]["output_ids"])
    assert "tokens/s" in captured.err


def test_generate_command_errors_name_the_flag(capsys):
    from seekax.cli.main import main

    assert main(["generate", "--model", os.path.join(DATA, "v2_lite"), "--prompt", "hi", "--top-p", "2"]) == 2
    assert "--top-p" in capsys.readouterr().err
    assert main(["generate", "--model", "/nonexistent", "--prompt", "hi"]) == 2
    assert "--model" in capsys.readouterr().err


def test_directory_generator_reuses_its_compiled_generator_and_the_kv_store(tmp_path):
    """What `seekax generate` and the demo run: the same greedy tokens as transformers; a second call of the same
    batch and length reuses the compiled Generator and takes the prompts' whole pages from the KV store."""
    from seekax.models.generate import DirectoryGenerator

    name = "v3_qlora_grouped"
    g = _golden(name)
    gen = DirectoryGenerator(os.path.join(DATA, name), kv_store=tmp_path / "kv", page_size=4, backend="xla")
    try:
        prompts = gen.encode([r["prompt"] for r in g["generate"]])
        assert prompts == [r["prompt_ids"] for r in g["generate"]]
        sampling = SamplingConfig(max_new_tokens=g["max_new_tokens"])
        first = gen.generate(prompts, sampling)
        second = gen.generate(prompts, sampling)
        assert len(gen._generators) == 1                                   # one compiled Generator for both
        assert first.output_ids == second.output_ids == [r["output_ids"] for r in g["generate"]]
        assert first.prefix_tokens_reused == 0 and second.prefix_tokens_reused > 0
    finally:
        gen.close()
    with pytest.raises(ValueError, match="dtype='float16'"):
        DirectoryGenerator(os.path.join(DATA, name), dtype="float16")
