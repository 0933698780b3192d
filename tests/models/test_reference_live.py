"""The live comparison with Hugging Face transformers: fresh random weights and tokens (a seed of its own),
the reference run in a subprocess by scripts/make_model_goldens.py, seekax compared against its outputs.

Runs where torch and transformers import in this interpreter, or where SEEKAX_REF_PYTHON names one that
has them (e.g. `SEEKAX_REF_PYTHON=.venv-ref/bin/python pytest -m reference tests/models`); skipped elsewhere.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seekax.models.checkpoint import load_checkpoint
from seekax.models.deepseek import forward
from seekax.models.generate import Generator, SamplingConfig
from seekax.models.tokenizer import Tokenizer
from seekax.testing import calc_diff, rel_err

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SCRIPT = os.path.join(ROOT, "scripts", "make_model_goldens.py")


def _ref_python():
    env = os.environ.get("SEEKAX_REF_PYTHON")
    if env:
        return env
    if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
        return sys.executable
    return None


pytestmark = [pytest.mark.reference,
              pytest.mark.skipif(_ref_python() is None, reason="needs torch + transformers (or SEEKAX_REF_PYTHON)")]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    out = tmp_path_factory.mktemp("goldens")
    seed = int(os.environ.get("SEEKAX_REF_SEED", "7"))
    subprocess.run([_ref_python(), SCRIPT, str(out), "--seed", str(seed)], check=True, capture_output=True)
    return out


@pytest.mark.parametrize("name", ["v3_qlora_grouped", "v3_yarn_tied", "v2_lite", "v2_group_limited", "v3_fp8"])
def test_live_logits_experts_and_greedy_tokens(fresh, name):
    d = os.path.join(fresh, name)
    cfg, params = load_checkpoint(d, dtype=np.float32, progress=False)
    g = np.load(os.path.join(d, "golden.npz"))
    logits, experts = jax.jit(lambda p, t: forward(p, t, cfg, backend="xla"))(params, jnp.asarray(g["tokens"]))
    if name == "v3_fp8":
        assert calc_diff(logits, g["logits"]) < 1e-3
    else:
        assert rel_err(logits, g["logits"]) <= 1e-5
    for k, idx in experts.items():
        np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), g[f"experts_{k}"], err_msg=f"layer {k}")
    if name == "v3_fp8":
        return                                                  # FP8 activations: greedy ties are not comparable
    with open(os.path.join(d, "golden.json")) as f:
        gold = json.load(f)
    tok = Tokenizer(d)
    gen = Generator(params, cfg, max_batch=3, max_seq_len=32, page_size=8, backend="xla", cache_dtype=jnp.float32)
    out = gen.generate([tok.encode(r["prompt"]) for r in gold["generate"]],
                       SamplingConfig(max_new_tokens=gold["max_new_tokens"]), eos_ids=(tok.eos_id,))
    assert out.output_ids == [r["output_ids"] for r in gold["generate"]]
