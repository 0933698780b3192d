"""Hugging Face DeepSeek checkpoints to seekax params and back.

`load_checkpoint(dir)` checks every tensor's presence, shape and dtype against the config (and, for FP8
weights, their `weight_scale_inv` block scales) from the headers alone, before reading any data; then it
streams tensor by tensor (a tqdm bar over bytes) into numpy leaves: peak memory is the params plus about
one tensor. Native FP8 weights (e4m3 + `weight_scale_inv` per 128x128 block, edge blocks partial) become
`Fp8Weight`s as stored: the FP8 GEMMs' B operand and scales, never dequantised. Which weights are FP8 is
read from the checkpoint itself. `quantize=True` turns a float checkpoint's linear weights into FP8 on load.
MoE layers whose dimensions the grouped FP8 GEMMs cannot tile (not multiples of 128) stay or become float.
With `ep_size > 1` only this EP rank's routed experts are read. `save_checkpoint` writes the same layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from seekax.ir.validate import fail
from seekax.layers.linear import Fp8Weight, cdiv
from seekax.models.deepseek_config import DeepseekConfig, load_config
from seekax.models.hf_names import TensorSpec, mtp_shared_copies, tensor_specs
from seekax.models.safetensors_dir import DTYPES, INDEX, NAMES, SafetensorsDir, empty

FLOAT_DTYPES = ("F32", "BF16", "F16")
FP8_DTYPE = "F8_E4M3"
BLOCK = 128


def scale_name(name: str) -> str:
    """`...weight` -> `...weight_scale_inv` (DeepSeek's FP8 layout)."""
    return name + "_scale_inv"


def _check(st: SafetensorsDir, spec: TensorSpec) -> bool:
    """Presence, shape and dtype of one tensor (and its scales when FP8); returns whether it is FP8."""
    info = st.tensors.get(spec.name)
    if info is None:
        raise fail(f"checkpoint tensor {spec.name!r}", "missing", f"shape {spec.shape} in {st.dir}")
    if info.shape != spec.shape:
        raise fail(f"checkpoint tensor {spec.name!r} shape", info.shape, f"{spec.shape} from config.json")
    if info.dtype == FP8_DTYPE:
        if not spec.fp8_ok:
            raise fail(f"checkpoint tensor {spec.name!r} dtype", info.dtype,
                       f"one of {FLOAT_DTYPES} (only linear weights may be FP8)")
        s = st.tensors.get(scale_name(spec.name))
        want = (cdiv(spec.shape[0], BLOCK), cdiv(spec.shape[1], BLOCK))
        if s is None:
            raise fail(f"checkpoint tensor {scale_name(spec.name)!r}", "missing",
                       f"float32 scales {want} for the FP8 weight {spec.name!r}")
        if s.shape != want:
            raise fail(f"checkpoint tensor {scale_name(spec.name)!r} shape", s.shape,
                       f"{want}: one scale per 128x128 block of {spec.shape} (edge blocks partial)")
        if s.dtype != "F32":
            raise fail(f"checkpoint tensor {scale_name(spec.name)!r} dtype", s.dtype, "F32")
        return True
    if info.dtype not in FLOAT_DTYPES:
        raise fail(f"checkpoint tensor {spec.name!r} dtype", info.dtype, f"one of {FLOAT_DTYPES + (FP8_DTYPE,)}")
    return False


def _set(tree: dict, path: tuple, value: Any) -> None:
    node = tree
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


def _get(tree: Any, path: tuple) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _skeleton(cfg: DeepseekConfig, mtp: bool) -> dict:
    params: dict = {"layers": [{"attn": {}, "mlp" if not cfg.is_moe(i) else "moe": {}}
                               for i in range(cfg.num_layers)]}
    if mtp:
        params["mtp"] = [{"layer": {"attn": {}, "mlp" if not cfg.is_moe(cfg.num_layers + k) else "moe": {}}}
                         for k in range(cfg.mtp_layers)]
    return params


def _quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q = Fp8Weight.quantize(jnp.asarray(w, jnp.float32))
    return np.asarray(q.weight), np.asarray(q.scale_inv)


def load_checkpoint(model_dir: str | os.PathLike, cfg: DeepseekConfig | None = None, *, dtype=None,
                    quantize: bool = False, ep_rank: int = 0, ep_size: int = 1, mtp: bool = True,
                    progress: bool = True, ep_ranks: int = 1) -> tuple[DeepseekConfig, dict]:
    """(config, params) from a Hugging Face DeepSeek-V2/V3 directory (config.json + safetensors).

    dtype: float weights cast to it (default: as stored; the router at least float32). quantize: float linear
    weights become 128x128 block FP8. ep_rank/ep_size: read routed experts [rank*E/ep, (rank+1)*E/ep) only
    (ep_ranks consecutive ranks from ep_rank: a process holding several EP ranks' devices).
    mtp: read the multi-token-prediction modules when the checkpoint has them. Leaves are numpy arrays (MLA
    matrices as transposed views of the stored [out, in] tensors).
    """
    cfg = cfg or load_config(model_dir)
    with SafetensorsDir(model_dir) as st:
        specs = tensor_specs(cfg, ep_rank=ep_rank, ep_size=ep_size, mtp=mtp, ep_ranks=ep_ranks)
        has_mtp = mtp and cfg.mtp_layers > 0 and f"model.layers.{cfg.num_layers}.eh_proj.weight" in st
        if not has_mtp:
            specs = [s for s in specs if s.path[0] != "mtp"]
        fp8 = {s.name: _check(st, s) for s in specs}                                  # all checks, no data yet
        if not cfg.moe.fp8_tileable:                                      # quantize=True leaves the MoE float
            specs = [dataclasses.replace(s, fp8_ok=False) if "moe" in s.path else s for s in specs]
        for path in {s.path for s in specs if s.kind == "expert"}:
            kinds = {fp8[s.name] for s in specs if s.path == path}
            if len(kinds) > 1:
                raise fail(f"routed experts {'.'.join(map(str, path))}", "some FP8, some not", "one dtype per layer")
        params = _skeleton(cfg, has_mtp)
        bar = _bar(sum(st.tensors[s.name].nbytes for s in specs), progress)
        _stream(st, specs, fp8, params, quantize, dtype, bar)
        bar.close()
    for layer in [*params["layers"], *[m["layer"] for m in params.get("mtp", [])]]:
        if "moe" in layer and "gate_bias" not in layer["moe"]:
            layer["moe"]["gate_bias"] = np.zeros((cfg.moe.num_experts,), np.float32)  # V2: no correction bias
        if "moe" in layer and not cfg.moe.fp8_tileable:
            layer["moe"] = _dequantize_moe(layer["moe"], dtype)
    return cfg, params


def _dequantize_moe(moe: dict, dtype) -> dict:
    """A MoE layer's FP8 weights (routed and shared) as float host arrays (`dtype`, default bfloat16): a native FP8
    checkpoint at dimensions the FP8 expert GEMMs cannot tile still loads and runs (its experts in float)."""
    from seekax.models.deepseek import dequantize_params

    return jax.tree.map(np.asarray, dequantize_params(moe, dtype or ml_dtypes.bfloat16))


def _stream(st: SafetensorsDir, specs: list[TensorSpec], fp8: dict, params: dict, quantize: bool, dtype, bar,
            workers: int = 4) -> None:
    """Read every tensor into params. Reads run on `workers` threads (positional reads release the GIL, so
    the copies out of the page cache and the first touch of fresh memory overlap); conversions and placement
    run here, in checkpoint order, with at most 2 * workers tensors in flight."""
    import collections
    from concurrent.futures import ThreadPoolExecutor

    stacks: dict[tuple, Any] = {}

    def fetch(s: TensorSpec, dest):
        if dest is not None:                                                   # straight into the params leaf
            st.read(s.name, out=dest[0])
            if fp8[s.name]:
                st.read(scale_name(s.name), out=dest[1])
            return None
        return st.read(s.name), (st.read(scale_name(s.name)) if fp8[s.name] else None)

    def finish(s: TensorSpec, got, buf):
        if s.kind == "expert":
            if got is not None:
                t, scale = _convert(got[0], None, s, quantize, dtype)
                buf[0][s.expert] = t
                if scale is not None:
                    buf[1][s.expert] = scale
            if s.expert == s.num_experts - 1:
                _set(params, s.path, buf[0] if buf[1] is None else Fp8Weight(weight=buf[0], scale_inv=buf[1]))
                del stacks[s.path]
        else:
            t, scale = _convert(got[0], got[1], s, quantize, dtype)
            if scale is None and s.kind == "transpose":
                t = t.T                                                        # a view: no second copy
            _set(params, s.path, t if scale is None else Fp8Weight(weight=t, scale_inv=scale))
        bar.update(st.tensors[s.name].nbytes)

    window: collections.deque = collections.deque()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for s in specs:
            direct = fp8[s.name] or (not (quantize and s.fp8_ok) and
                                     _cast_to(st.tensors[s.name].dtype, s, dtype) is None)
            buf, dest = None, None
            if s.kind == "expert":
                buf = stacks.get(s.path)
                if buf is None:
                    buf = stacks[s.path] = _expert_stack(st, s, fp8[s.name], quantize, dtype)
                if direct:
                    dest = (buf[0][s.expert], None if buf[1] is None else buf[1][s.expert])
            window.append((s, pool.submit(fetch, s, dest), buf))
            while len(window) > 2 * workers:
                w = window.popleft()
                finish(w[0], w[1].result(), w[2])
        while window:
            w = window.popleft()
            finish(w[0], w[1].result(), w[2])


def _cast_to(stored: str, spec: TensorSpec, dtype) -> np.dtype | None:
    """The dtype a float tensor becomes (None: kept as stored). `dtype` when given; the router's weight and
    bias never below float32 then (routing runs in it)."""
    if dtype is None:
        return None
    want = np.dtype(dtype)
    if spec.path[-1] in ("gate", "gate_bias") and want.itemsize < 4:
        want = np.dtype(np.float32)
    return None if want == np.dtype(DTYPES[stored]) else want


def _convert(t: np.ndarray, scale, spec: TensorSpec, quantize: bool, dtype):
    """(values, scales or None): FP8 as stored; float quantised (`quantize`, linear weights) or cast."""
    if scale is not None:
        return t, scale
    if quantize and spec.fp8_ok:
        return _quantize(t)
    want = _cast_to(NAMES[t.dtype.name], spec, dtype)
    return (t if want is None else t.astype(want)), None


def _expert_stack(st: SafetensorsDir, spec: TensorSpec, is_fp8: bool, quantize: bool, dtype):
    """The stacked leaf [E_local, ...] (and scales) one layer's routed experts are read into."""
    info = st.tensors[spec.name]
    n, k = spec.shape
    scales = (spec.num_experts, cdiv(n, BLOCK), cdiv(k, BLOCK))
    if is_fp8 or (quantize and spec.fp8_ok):
        return empty((spec.num_experts, *spec.shape), DTYPES[FP8_DTYPE]), np.empty(scales, np.float32)
    want = _cast_to(info.dtype, spec, dtype) or DTYPES[info.dtype]
    return empty((spec.num_experts, *spec.shape), want), None


def _bar(total: int, on: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not on, leave=False)


def load_checkpoint_to_mesh(model_dir: str | os.PathLike, mesh, *, ep_axis: str = "ep",
                            cfg: DeepseekConfig | None = None, dtype=None, quantize: bool = False, mtp: bool = True,
                            progress: bool = True) -> tuple[DeepseekConfig, dict]:
    """(config, params as global jax arrays on `mesh`): routed experts split over `ep_axis` (P(ep_axis)), the
    rest replicated. Each process reads only the routed experts of the EP ranks its devices hold (they must
    be a contiguous block of the axis, as `jax.make_mesh` lays processes out) and all other tensors."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if ep_axis not in mesh.axis_names:
        raise fail("ep_axis", ep_axis, f"one of the mesh's axes {mesh.axis_names}")
    ep = mesh.shape[ep_axis]
    by_rank = np.moveaxis(mesh.devices, mesh.axis_names.index(ep_axis), 0).reshape(ep, -1)
    mine = [r for r in range(ep) if any(d.process_index == jax.process_index() for d in by_rank[r])]
    if not mine or mine != list(range(mine[0], mine[-1] + 1)):
        raise fail("mesh", f"this process's EP ranks {mine}", f"a contiguous block of the {ep_axis!r} axis")
    cfg, params = load_checkpoint(model_dir, cfg, dtype=dtype, quantize=quantize, ep_rank=mine[0], ep_size=ep,
                                  ep_ranks=len(mine), mtp=mtp, progress=progress)
    e = cfg.moe.num_experts
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(ep_axis))

    def place(path, leaf):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if "moe" in names and any(n in ("w1", "w2", "w3") for n in names[names.index("moe") + 1:]):
            return jax.make_array_from_process_local_data(split, np.asarray(leaf), (e, *leaf.shape[1:]))
        return jax.device_put(np.asarray(leaf), replicated)

    return cfg, jax.tree_util.tree_map_with_path(place, params)


# ----------------------------------------------------------------------------------------------- saving
def _tensors_to_save(params: dict, cfg: DeepseekConfig, dtype):
    """(name, numpy array) in checkpoint order, one at a time; FP8 weights with their scales."""
    has_mtp = "mtp" in params
    for s in tensor_specs(cfg, mtp=has_mtp):
        leaf = _get(params, s.path)
        if s.kind == "expert":
            leaf = jax.tree.map(lambda a: np.asarray(a)[s.expert], leaf)
        if isinstance(leaf, Fp8Weight):
            yield s.name, np.asarray(leaf.weight)
            yield scale_name(s.name), np.asarray(leaf.scale_inv, np.float32)
            continue
        a = np.asarray(leaf)
        if s.kind == "transpose":
            a = np.ascontiguousarray(a.T)
        if dtype is not None and s.path[-1] not in ("gate_bias",):
            a = a.astype(np.dtype(dtype), copy=False)
        yield s.name, a
    if has_mtp:
        for name, path in mtp_shared_copies(cfg).items():
            a = np.asarray(_get(params, path))
            yield name, a if dtype is None else a.astype(np.dtype(dtype), copy=False)


def save_checkpoint(params: dict, cfg: DeepseekConfig, out_dir: str | os.PathLike, *, dtype=None,
                    shard_bytes: int = 4 << 30, progress: bool = True) -> None:
    """Write params as a Hugging Face directory: config.json (with `quantization_config` when any weight is
    FP8), sharded safetensors and `model.safetensors.index.json`. Full (not EP-sliced) params."""
    from safetensors.numpy import save_file

    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    sizes = _sizes(params, cfg, dtype)
    shards, cur, cur_bytes = [], [], 0
    for name, nbytes in sizes:
        if cur and cur_bytes + nbytes > shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += nbytes
    shards.append(cur)
    files = {n: f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, names in enumerate(shards) for n in names}
    bar = _bar(sum(b for _, b in sizes), progress)
    batch: dict[str, np.ndarray] = {}
    any_fp8 = False
    for name, a in _tensors_to_save(params, cfg, dtype):
        if a.dtype.name not in NAMES:
            raise fail(f"params tensor {name!r} dtype", a.dtype.name, f"one of {sorted(NAMES)}")
        any_fp8 |= a.dtype == DTYPES[FP8_DTYPE]
        batch[name] = a
        bar.update(a.nbytes)
        if name == shards[0][-1]:
            save_file(batch, os.path.join(out, files[name]), metadata={"format": "pt"})
            batch.clear()
            shards.pop(0)
    bar.close()
    index = {"metadata": {"total_size": sum(b for _, b in sizes)}, "weight_map": files}
    with open(os.path.join(out, INDEX), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    hf = dict(cfg.hf)
    if any_fp8:
        hf["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [BLOCK, BLOCK]}
    else:
        hf.pop("quantization_config", None)
    if dtype is not None:
        hf["torch_dtype"] = np.dtype(dtype).name
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2, sort_keys=True)


def _sizes(params: dict, cfg: DeepseekConfig, dtype) -> list[tuple[str, int]]:
    """(name, bytes) of every tensor `_tensors_to_save` yields, from shapes and dtypes alone."""
    out = []
    has_mtp = "mtp" in params
    for s in tensor_specs(cfg, mtp=has_mtp):
        leaf = _get(params, s.path)
        n = int(np.prod(s.shape))
        if isinstance(leaf, Fp8Weight):
            out += [(s.name, n), (scale_name(s.name), 4 * cdiv(s.shape[0], BLOCK) * cdiv(s.shape[1], BLOCK))]
            continue
        dt = np.dtype(dtype) if dtype is not None and s.path[-1] != "gate_bias" else np.dtype(leaf.dtype)
        out.append((s.name, n * dt.itemsize))
    if has_mtp:
        for name, path in mtp_shared_copies(cfg).items():
            leaf = _get(params, path)
            out.append((name, int(np.prod(leaf.shape)) * np.dtype(dtype or leaf.dtype).itemsize))
    return out
