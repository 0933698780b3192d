"""Serving a user's own prompts: prompt ids in any array form give the same tokens, anything that is not a 1-D
sequence of integer ids in the vocabulary is a ValueError naming the prompt, a prompt or token budget beyond the
model's context is refused before any cache is allocated, and bad sampling or generator settings are named."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from seekax.models.checkpoint import load_checkpoint
from seekax.models.generate import Generator, SamplingConfig

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "models")
NAME = "v3_qlora_grouped"                                   # vocab 320, max_position_embeddings 256
PROMPTS = [[0, 43, 301, 304, 288], [0, 292, 308, 78, 289, 5, 6, 7, 8, 9, 10], [0, 1]]
SAMPLING = SamplingConfig(max_new_tokens=4)


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(os.path.join(DATA, NAME), dtype=np.float32, progress=False)


@pytest.fixture(scope="module")
def gen(model):
    cfg, params = model
    return Generator(params, cfg, max_batch=3, max_seq_len=32, page_size=4, backend="xla", cache_dtype=jnp.float32)


def test_prompts_as_arrays_pages_and_repeated_calls_give_the_same_tokens(model, gen):
    """numpy / jax arrays and tuples are prompts like lists; a max_seq_len that is not a multiple of the page size,
    fewer slots than prompts and a second call (fresh caches) change nothing."""
    cfg, params = model
    want = gen.generate(PROMPTS, SAMPLING, eos_ids=()).output_ids
    assert gen.generate([np.asarray(p, np.int32) for p in PROMPTS], SAMPLING, eos_ids=()).output_ids == want
    assert gen.generate([jnp.asarray(p) for p in PROMPTS], SAMPLING, eos_ids=[]).output_ids == want
    assert gen.generate(tuple(tuple(p) for p in PROMPTS), SAMPLING, eos_ids=()).output_ids == want
    odd = Generator(params, cfg, max_batch=2, max_seq_len=19, page_size=8, backend="xla", cache_dtype=jnp.float32)
    assert odd.generate(PROMPTS, SAMPLING, eos_ids=()).output_ids == want
    stop = want[0][1]
    first = gen.generate(PROMPTS, SAMPLING, eos_ids=[stop]).output_ids
    assert first[0] == want[0][:2]                                              # stops at the listed EOS id


@pytest.mark.parametrize("prompts, match", [
    ([[0.0, 43.7, 301.2]], r"prompts\[0\].*integer token ids"),                 # was truncated to [0, 43, 301]
    ([np.asarray([0.0, 43.7])], r"prompts\[0\].*integer token ids"),
    ([[True, False]], r"prompts\[0\].*integer token ids"),
    ([0, 43, 301], r"prompts\[0\]=0: expected a 1-D sequence"),                 # one prompt, not a list of prompts
    (["hello"], r"prompts\[0\]='hello': expected a 1-D sequence"),              # text: encode it first
    ([[0, 1], [[2, 3]]], r"prompts\[1\].*1-D sequence"),
    ([[0, 320]], r"prompts\[0\].*vocab=320"),                                   # out of vocabulary: never clamped
    ([[0, -1]], r"prompts\[0\].*vocab=320"),
    ([[]], r"prompts\[0\]=\[\]: expected at least one token"),
])
def test_prompts_that_are_not_token_ids_are_named(gen, prompts, match):
    with pytest.raises(ValueError, match=match):
        gen.generate(prompts, SAMPLING, eos_ids=())


def test_prompt_longer_than_max_seq_len_names_the_prompt(gen):
    with pytest.raises(ValueError, match=r"prompts='prompts\[1\] of 40 tokens': expected each prompt shorter than "
                                         r"max_seq_len=32"):
        gen.generate([[1, 2], [1] * 40], SAMPLING, eos_ids=())
    with pytest.raises(ValueError, match=r"max_new_tokens=4: expected <= max_seq_len - len\(prompts\[0\]\) = 2"):
        gen.generate([[1] * 30], SAMPLING, eos_ids=())


def test_context_beyond_max_position_embeddings_is_refused_before_allocating(model):
    """A huge --max-new-tokens allocated caches for prompt + budget and died out of memory (19 GB for 1e8 on this
    model); beyond the model's max_position_embeddings is now a ValueError before any allocation."""
    cfg, params = model
    big = Generator(params, cfg, max_batch=1, max_seq_len=10 ** 8, page_size=64, backend="xla")
    with pytest.raises(ValueError, match=r"max_new_tokens=99999990: expected <= the model's max_position_embeddings"
                                         r" - len\(prompts\[0\]\) = 253"):
        big.generate([[0, 1, 2]], SamplingConfig(max_new_tokens=10 ** 8 - 10), eos_ids=())
    with pytest.raises(ValueError, match=r"prompts='prompts\[0\] of 300 tokens': expected "
                                         r"each prompt shorter than the model's max_position_embeddings=256"):
        big.generate([[1] * 300], SAMPLING, eos_ids=())


def test_generate_command_with_a_huge_token_budget_names_the_flag(capsys):
    from seekax.cli.main import main

    argv = ["generate", "--model", os.path.join(DATA, NAME), "--prompt", "hi", "--max-new-tokens", "100000000",
            "--backend", "xla"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "argument --max-new-tokens: expected <= the model's max_position_embeddings" in err, err
    assert main(argv[:4] + ["x " * 300, "--backend", "xla"]) == 2                  # a prompt beyond the context
    err = capsys.readouterr().err
    assert "argument --prompt: expected each prompt shorter than the model's max_position_embeddings=256" in err, err


def test_generate_command_with_an_empty_prompt_and_no_bos_names_the_flag(tmp_path, capsys):
    """A tokenizer that adds no BOS encodes "" to no token at all: a usage error naming --prompt, not a traceback."""
    import shutil

    from seekax.cli.main import main

    model = tmp_path / "model"
    shutil.copytree(os.path.join(DATA, NAME), model)
    with open(model / "tokenizer.json") as f:
        tok = json.load(f)
    tok["post_processor"] = None
    with open(model / "tokenizer.json", "w") as f:
        json.dump(tok, f)
    assert main(["generate", "--model", str(model), "--prompt", "hi", "--prompt", "", "--backend", "xla"]) == 2
    err = capsys.readouterr().err
    assert "argument --prompt: expected text that encodes to at least one token" in err, err


@pytest.mark.parametrize("kwargs, match", [
    (dict(seed="a"), "^seed='a'"),
    (dict(seed=1.5), "^seed=1.5"),
    (dict(temperature=float("inf")), "^temperature=inf"),
    (dict(temperature=True), "^temperature=True"),
    (dict(top_p=float("nan")), "^top_p=nan"),
])
def test_bad_sampling_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_bad_generator_settings_are_named(model, gen):
    cfg, params = model
    with pytest.raises(ValueError, match="^min_bucket=0"):                      # looped forever in _bucket
        Generator(params, cfg, min_bucket=0)
    with pytest.raises(ValueError, match="^backend='cuda'"):
        Generator(params, cfg, backend="cuda")
    with pytest.raises(ValueError, match="^eos_ids=28"):
        gen.generate(PROMPTS, SAMPLING, eos_ids=28)
    with pytest.raises(ValueError, match="^sampling="):
        gen.generate(PROMPTS, {"max_new_tokens": 4})


def test_sampled_tokens_are_each_requests_own_whatever_the_batch(model):
    """Token n of request r draws with key(seed, r, n): the same seed gives every request the same tokens with
    1, 2 or 4 slots (requests then share steps with different neighbours, or wait); another seed changes them."""
    cfg, params = model
    prompts = [[0, 43, 301], [0, 7, 8, 9, 10], [0, 12], [0, 5, 5, 5]]
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, seed=3)
    runs = [Generator(params, cfg, max_batch=b, max_seq_len=32, page_size=8, backend="xla")
            .generate(prompts, sampling, eos_ids=()).output_ids for b in (1, 2, 4)]
    assert runs[0] == runs[1] == runs[2]
    other = Generator(params, cfg, max_batch=4, max_seq_len=32, page_size=8, backend="xla").generate(
        prompts, SamplingConfig(max_new_tokens=6, temperature=1.0, seed=4), eos_ids=()).output_ids
    assert other != runs[0]
