"""Loading a Hugging Face DeepSeek checkpoint (`seekax.models.checkpoint.load_checkpoint`) against a raw
sequential read of the same files, and its peak memory against the params plus one tensor.

A synthetic DeepSeek-V3-shaped checkpoint (random bytes, two sizes of layer; bf16, and native FP8 with
block scales) is written to a temporary folder. Each measurement runs in a fresh process, after one
untimed read of the files (both sides read from the page cache), raw and load runs interleaved, the fastest
of `--repeats` of each kept: `raw_s` reads every file front to back
in 64 MiB chunks into one reused buffer; `load_s` is `load_checkpoint` (headers checked, then tensor by
tensor into the params). `peak_extra_MB` is the loader process's peak RSS (VmHWM) minus its RSS just
before the call; `bound_MB` is the params' bytes plus the largest tensor's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
import numpy as np
mode, path = sys.argv[1], sys.argv[2]
def rss(field="VmRSS"):  # VmHWM: this process's peak (ru_maxrss would carry the parent's across exec)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field))
if mode == "raw":
    buf = bytearray(64 << 20); view = memoryview(buf)
    files = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))
    t = time.perf_counter(); n = 0
    for name in files:
        with open(os.path.join(path, name), "rb", buffering=0) as f:
            while True:
                k = f.readinto(view)
                if not k: break
                n += k
    print(json.dumps({"seconds": time.perf_counter() - t, "bytes": n}))
else:
    import jax
    import tqdm.auto  # imported by the loader's progress bar: module import time is not loading
    from seekax.models.checkpoint import load_checkpoint
    before = rss()
    t = time.perf_counter()
    cfg, params = load_checkpoint(path, progress=False)
    s = time.perf_counter() - t
    peak = rss("VmHWM")
    leaves = jax.tree.leaves(params)
    print(json.dumps({"seconds": s, "peak_extra": peak - before, "params": sum(a.nbytes for a in leaves)}))
"""


def write_checkpoint(path: str, *, hidden: int, layers: int, experts: int, moe_inter: int, fp8: bool) -> int:
    """A V3-shaped checkpoint of random bytes; returns its largest tensor's bytes."""
    from seekax.layers.linear import Fp8Weight
    from seekax.models.checkpoint import save_checkpoint
    from seekax.models.deepseek_config import from_hf_config
    from seekax.models.hf_names import tensor_specs

    hf = {"model_type": "deepseek_v3", "vocab_size": 32000, "hidden_size": hidden, "intermediate_size": 4 * hidden,
          "moe_intermediate_size": moe_inter, "num_hidden_layers": layers, "num_attention_heads": 16,
          "num_key_value_heads": 16, "n_shared_experts": 1, "n_routed_experts": experts, "kv_lora_rank": 512,
          "q_lora_rank": 768, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 1,
          "topk_group": 1, "num_experts_per_tok": 4, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0}
    cfg = from_hf_config(hf)
    rng = np.random.default_rng(0)
    params: dict = {"layers": [{"attn": {}, ("moe" if cfg.is_moe(i) else "mlp"): {}} for i in range(layers)]}
    stacks: dict = {}
    largest = 0
    for s in tensor_specs(cfg):
        shape = s.shape if s.kind != "transpose" else s.shape[::-1]
        lead = (s.num_experts,) if s.kind == "expert" else ()
        if s.kind == "expert" and s.path in stacks:
            continue
        if fp8 and s.fp8_ok:
            n, k = s.shape
            w = rng.integers(0, 126, (*lead, n, k), dtype=np.uint8).view("float8_e4m3fn")
            leaf = Fp8Weight(weight=w, scale_inv=np.ones((*lead, -(-n // 128), -(-k // 128)), np.float32))
        else:
            leaf = rng.integers(0, 1 << 14, (*lead, *shape), dtype=np.uint16).view("bfloat16")
        stacks[s.path] = True
        largest = max(largest, int(np.prod(s.shape)) * (1 if fp8 and s.fp8_ok else 2))
        node = params
        for key in s.path[:-1]:
            node = node[key]
        node[s.path[-1]] = leaf
    save_checkpoint(params, cfg, path, shard_bytes=1 << 30, progress=False)
    return largest


def child(mode: str, path: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", CHILD, mode, path], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--repeats", type=int, default=5, help="fresh-process runs of each side (the fastest counts)")
    args = p.parse_args()
    sizes = [dict(hidden=1024, layers=2, experts=8, moe_inter=256)] if args.quick else \
        [dict(hidden=2048, layers=3, experts=32, moe_inter=1024), dict(hidden=4096, layers=2, experts=32,
                                                                     moe_inter=1536)]
    rows = []
    for size in sizes:
        for fp8 in (False, True):
            with tempfile.TemporaryDirectory(dir=os.environ.get("SEEKAX_BENCH_TMP")) as tmp:
                largest = write_checkpoint(tmp, fp8=fp8, **size)
                child("raw", tmp)                                                   # warm the page cache
                runs = [(child("raw", tmp), child("load", tmp)) for _ in range(args.repeats)]   # interleaved
                raw = min((r for r, _ in runs), key=lambda r: r["seconds"])
                load = min((x for _, x in runs), key=lambda r: r["seconds"])
                bound = load["params"] + largest
                rows.append({"hidden": size["hidden"], "layers": size["layers"], "experts": size["experts"],
                             "dtype": "fp8" if fp8 else "bf16", "GB": raw["bytes"] / 1e9, "raw_s": raw["seconds"],
                             "load_s": load["seconds"], "load_vs_raw": raw["seconds"] / load["seconds"],
                             "raw_GBps": raw["bytes"] / raw["seconds"] / 1e9,
                             "peak_extra_MB": load["peak_extra"] / 1e6, "params_MB": load["params"] / 1e6,
                             "bound_MB": bound / 1e6, "peak_over_bound": load["peak_extra"] / bound})
                print(rows[-1], flush=True)
    emit("model_load", rows, args.json)


if __name__ == "__main__":
    main()
