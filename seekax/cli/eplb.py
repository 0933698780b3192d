"""`seekax eplb`: run EPLB on a per-expert load file and print the placement and per-GPU load before/after.

The load file is `.npy` ([layers, experts] or [experts]) or `.json` (a nested list, or an object with a
"weight" field such as a line of the reference cases). "Before" is the placement without EPLB: experts
placed contiguously, experts/GPUs per GPU (when the experts do not divide over the GPUs: slot i holds
expert i % experts).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from seekax.ir.placement import ExpertPlacement
from seekax.ir.validate import fail
from seekax.schedules.eplb import check_rebalance_args, policy, rebalance_experts

# Library parameter -> the flag's dest, for errors that name the flag.
PARAMS = {"weight": "weights", "num_replicas": "replicas", "num_groups": "groups", "num_nodes": "nodes",
          "num_gpus": "gpus"}


def load_weights(path: str) -> np.ndarray:
    """Read [layers, experts] loads from .npy or .json; a single row [experts] becomes one layer."""
    file = Path(path)
    if not file.is_file():
        raise fail("weights", path, "an existing .npy or .json file")
    if file.suffix not in (".npy", ".json"):
        raise fail("weights", path, "a file ending in .npy or .json")
    try:
        if file.suffix == ".npy":
            weight = np.load(file, allow_pickle=False)
        else:
            data = json.loads(file.read_text())
            data = data.get("weight") if isinstance(data, dict) else data
            weight = np.asarray(data) if isinstance(data, list) else None
    except (OSError, ValueError, KeyError) as e:
        raise fail("weights", path, f"a readable {file.suffix} file of loads ({type(e).__name__}: {e})") from None
    if weight is None:  # an object without "weight", a number, null: no loads in it
        raise fail("weights", path, "a JSON list of loads, or an object with the list at $.weight")
    return weight[None] if weight.ndim == 1 else weight


def baseline_gpu_loads(weight: np.ndarray, num_gpus: int, num_replicas: int) -> np.ndarray:
    """[layers, gpus] loads without EPLB (see the module docstring)."""
    layers, experts = weight.shape
    if experts % num_gpus == 0:
        return weight.reshape(layers, num_gpus, experts // num_gpus).sum(-1).astype(np.float64)
    return ExpertPlacement.identity(layers, experts, num_replicas).gpu_loads(weight, num_gpus)


def _balance(loads: np.ndarray) -> np.ndarray:
    mean = loads.mean(-1)
    return np.where(mean > 0, loads.max(-1) / np.where(mean > 0, mean, 1.0), 1.0)


def register(sub) -> None:
    p = sub.add_parser("eplb", help="expert-parallel load balancing: placement and per-GPU load before/after",
                       description=__doc__, params=PARAMS)
    p.add_argument("--weights", required=True, help="per-expert loads, FILE.npy or FILE.json, [layers, experts]")
    p.add_argument("--replicas", type=int, required=True, help="physical expert slots per layer (R)")
    p.add_argument("--groups", type=int, default=1, help="expert groups (hierarchical when groups %% nodes == 0)")
    p.add_argument("--nodes", type=int, default=1, help="server nodes")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in all (R must be a multiple)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--save", default=None,
                   help="also write the placement as JSON to this file (missing folders are created)")
    p.set_defaults(func=run)


def run(args) -> int:
    weight = load_weights(args.weights)
    check_rebalance_args(weight, args.replicas, args.groups, args.nodes, args.gpus)
    start = time.perf_counter()
    placement = rebalance_experts(weight, args.replicas, args.groups, args.nodes, args.gpus)
    seconds = time.perf_counter() - start
    before = baseline_gpu_loads(np.asarray(weight, np.float64), args.gpus, args.replicas)
    after = placement.gpu_loads(weight, args.gpus)
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(placement.to_json())
    result = {
        "policy": policy(args.groups, args.nodes),
        "num_layers": placement.num_layers, "num_logical": placement.num_logical,
        "num_replicas": placement.num_replicas, "num_gpus": args.gpus, "seconds": seconds,
        "balance_before": _balance(before).tolist(), "balance_after": _balance(after).tolist(),
        "gpu_loads_before": before.tolist(), "gpu_loads_after": after.tolist(),
        "placement": placement.to_dict(),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    per_gpu = placement.slots_per_gpu(args.gpus)
    print(f"EPLB {result['policy']}: {placement.num_layers} layers x {placement.num_logical} experts -> "
          f"{placement.num_replicas} slots on {args.gpus} GPUs ({per_gpu} per GPU), {seconds * 1e3:.1f} ms")
    for layer in range(placement.num_layers):
        print(f"layer {layer}: max/mean GPU load {result['balance_before'][layer]:.3f} -> "
              f"{result['balance_after'][layer]:.3f}")
        for gpu in range(args.gpus):
            experts = " ".join(str(e) for e in placement.phy2log[layer, gpu * per_gpu:(gpu + 1) * per_gpu])
            print(f"  gpu {gpu:3d}  load {before[layer, gpu]:12.1f} -> {after[layer, gpu]:12.1f}  experts {experts}")
    print(f"mean max/mean GPU load over layers: {np.mean(result['balance_before']):.3f} -> "
          f"{np.mean(result['balance_after']):.3f}")
    return 0
