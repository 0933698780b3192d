"""Expert placement: which logical expert each physical expert slot holds, per MoE layer (EPLB's output).

Three views of one mapping, with the shapes and meaning of DeepSeek's EPLB:
  phy2log: [layers, replicas]          logical expert held by each physical slot
  log2phy: [layers, experts, maxcnt]   physical slots of each logical expert, -1 padded
  logcnt:  [layers, experts]           number of replicas of each logical expert
Physical slots are laid out GPU-major: GPU g holds slots [g*R/P, (g+1)*R/P).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from seekax.ir.validate import check_int, fail


def _int_array(name: str, value: Any, ndim: int) -> np.ndarray:
    try:
        array = np.asarray(value)
    except Exception:  # noqa: BLE001 - anything not array-like
        raise fail(name, type(value).__name__, "an integer array") from None
    if array.dtype == object or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise fail(f"{name}.dtype", str(array.dtype), "an integer dtype")
    if array.ndim != ndim:
        raise fail(f"{name}.shape", array.shape, f"{ndim} dimensions")
    array = array.astype(np.int64, copy=True)
    array.flags.writeable = False
    return array


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class ExpertPlacement:
    """A validated per-layer expert placement (see the module docstring for the three views)."""

    phy2log: np.ndarray  # [layers, replicas] int64
    log2phy: np.ndarray  # [layers, experts, maxcnt] int64, -1 padded
    logcnt: np.ndarray  # [layers, experts] int64

    def __post_init__(self) -> None:
        phy2log = _int_array("phy2log", self.phy2log, 2)
        log2phy = _int_array("log2phy", self.log2phy, 3)
        logcnt = _int_array("logcnt", self.logcnt, 2)
        object.__setattr__(self, "phy2log", phy2log)
        object.__setattr__(self, "log2phy", log2phy)
        object.__setattr__(self, "logcnt", logcnt)
        layers, replicas = phy2log.shape
        if layers < 1 or replicas < 1:
            raise fail("phy2log.shape", phy2log.shape, "at least one layer and one physical slot")
        if logcnt.shape[0] != layers or logcnt.shape[1] < 1:
            raise fail("logcnt.shape", logcnt.shape, f"({layers}, experts>=1) to match phy2log")
        experts = logcnt.shape[1]
        if log2phy.shape[:2] != (layers, experts) or log2phy.shape[2] < 1:
            raise fail("log2phy.shape", log2phy.shape, f"({layers}, {experts}, maxcnt>=1) to match logcnt")
        if phy2log.min() < 0 or phy2log.max() >= experts:
            raise fail("phy2log", f"values in [{phy2log.min()}, {phy2log.max()}]", f"logical ids in [0, {experts})")
        counts = np.stack([np.bincount(row, minlength=experts) for row in phy2log])  # [L, E]
        if not np.array_equal(counts, logcnt):
            layer, expert = np.argwhere(counts != logcnt)[0]
            raise fail(f"logcnt[{layer}, {expert}]", int(logcnt[layer, expert]),
                       f"{int(counts[layer, expert])}, the number of slots phy2log gives that expert")
        if logcnt.min() < 1:
            layer, expert = np.argwhere(logcnt < 1)[0]
            raise fail(f"logcnt[{layer}, {expert}]", int(logcnt[layer, expert]), "at least one replica per expert")
        if logcnt.max() > log2phy.shape[2]:
            raise fail("log2phy.shape", log2phy.shape, f"maxcnt >= {int(logcnt.max())}, the largest logcnt")
        # log2phy[l, e, :logcnt[l, e]] are distinct slots holding e; the rest is -1.
        rank = np.arange(log2phy.shape[2])
        used = rank[None, None, :] < logcnt[:, :, None]  # [L, E, maxcnt]
        if np.any(log2phy[~used] != -1):
            layer, expert, r = np.argwhere(~used & (log2phy != -1))[0]
            raise fail(f"log2phy[{layer}, {expert}, {r}]", int(log2phy[layer, expert, r]), "-1 padding past logcnt")
        slots = np.where(used, log2phy, 0)
        if np.any(used & ((slots < 0) | (slots >= replicas))):
            layer, expert, r = np.argwhere(used & ((slots < 0) | (slots >= replicas)))[0]
            raise fail(f"log2phy[{layer}, {expert}, {r}]", int(log2phy[layer, expert, r]), f"a slot in [0, {replicas})")
        owner = np.take_along_axis(phy2log, slots.reshape(layers, -1), axis=1).reshape(slots.shape)
        expert_ids = np.arange(experts)[None, :, None]
        if np.any(used & (owner != expert_ids)):
            layer, expert, r = np.argwhere(used & (owner != expert_ids))[0]
            raise fail(f"log2phy[{layer}, {expert}, {r}]", int(log2phy[layer, expert, r]),
                       f"a slot whose phy2log is {expert}")
        for layer in range(layers):  # each slot listed once (counts already match, so this is a permutation)
            listed = log2phy[layer][used[layer]]
            if np.unique(listed).size != replicas:
                raise fail(f"log2phy[{layer}]", "a repeated slot", "every physical slot listed exactly once")

    # ---- sizes ----------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_replicas(self) -> int:
        """Physical expert slots per layer (R)."""
        return int(self.phy2log.shape[1])

    @property
    def num_logical(self) -> int:
        """Logical experts per layer (E)."""
        return int(self.logcnt.shape[1])

    @property
    def max_replicas(self) -> int:
        """Width of log2phy's last axis (maxcnt)."""
        return int(self.log2phy.shape[2])

    def slots_per_gpu(self, num_gpus: int) -> int:
        """R / P, the physical slots each GPU holds."""
        num_gpus = check_int("num_gpus", num_gpus, min_value=1)
        if self.num_replicas % num_gpus:
            raise fail("num_gpus", num_gpus, f"a divisor of num_replicas={self.num_replicas}")
        return self.num_replicas // num_gpus

    # ---- derived quantities -----------------------------------------------------------------------------------
    def slot_loads(self, weight: Any) -> np.ndarray:
        """weight: [layers, experts] load per logical expert -> [layers, replicas] load per slot (float64).

        A logical expert's load is split evenly across its replicas.
        """
        weight = np.asarray(weight, dtype=np.float64)
        if weight.shape != self.logcnt.shape:
            raise fail("weight.shape", weight.shape, f"{self.logcnt.shape} (layers, experts)")
        per_replica = weight / self.logcnt  # [L, E]
        return np.take_along_axis(per_replica, self.phy2log, axis=1)

    def gpu_loads(self, weight: Any, num_gpus: int) -> np.ndarray:
        """weight: [layers, experts] -> [layers, num_gpus] total load on each GPU (float64)."""
        per_gpu = self.slots_per_gpu(num_gpus)
        return self.slot_loads(weight).reshape(self.num_layers, num_gpus, per_gpu).sum(-1)

    def balance(self, weight: Any, num_gpus: int) -> np.ndarray:
        """[layers] max / mean GPU load (1.0 is perfect; a layer with no load counts as 1.0)."""
        loads = self.gpu_loads(weight, num_gpus)
        mean = loads.mean(-1)
        return np.where(mean > 0, loads.max(-1) / np.where(mean > 0, mean, 1.0), 1.0)

    def layer(self, index: int) -> ExpertPlacement:
        """The placement of one layer, as a 1-layer placement."""
        index = check_int("index", index, min_value=-self.num_layers)
        if index >= self.num_layers:
            raise fail("index", index, f"a layer index < {self.num_layers}")
        sl = slice(index, index + 1) if index != -1 else slice(-1, None)
        return ExpertPlacement(phy2log=self.phy2log[sl], log2phy=self.log2phy[sl], logcnt=self.logcnt[sl])

    def padded(self, maxcnt: int) -> ExpertPlacement:
        """The same placement with log2phy padded (with -1) to width `maxcnt`: a fixed shape for jit."""
        maxcnt = check_int("maxcnt", maxcnt, min_value=1)
        if maxcnt < int(self.logcnt.max()):
            raise fail("maxcnt", maxcnt, f">= {int(self.logcnt.max())}, the largest logcnt")
        out = np.full((self.num_layers, self.num_logical, maxcnt), -1, np.int64)
        keep = min(maxcnt, self.max_replicas)
        out[:, :, :keep] = self.log2phy[:, :, :keep]
        return ExpertPlacement(phy2log=self.phy2log, log2phy=out, logcnt=self.logcnt)

    # ---- constructors and conversions ------------------------------------------------------------------------
    @classmethod
    def identity(cls, num_layers: int, num_experts: int, num_replicas: int | None = None) -> ExpertPlacement:
        """Slot i holds expert i (no replication); with num_replicas > num_experts, slot i holds i % num_experts."""
        num_layers = check_int("num_layers", num_layers, min_value=1)
        num_experts = check_int("num_experts", num_experts, min_value=1)
        num_replicas = num_experts if num_replicas is None else check_int("num_replicas", num_replicas,
                                                                          min_value=num_experts)
        phy2log = np.tile(np.arange(num_replicas) % num_experts, (num_layers, 1))
        return cls.from_phy2log(phy2log, num_experts)

    @classmethod
    def from_phy2log(cls, phy2log: Any, num_experts: int) -> ExpertPlacement:
        """Build log2phy (slots in ascending order, width max logcnt) and logcnt from phy2log [layers, replicas]."""
        num_experts = check_int("num_experts", num_experts, min_value=1)
        phy2log = _int_array("phy2log", phy2log, 2)
        if phy2log.size and (phy2log.min() < 0 or phy2log.max() >= num_experts):
            raise fail("phy2log", f"values in [{phy2log.min()}, {phy2log.max()}]", f"ids in [0, {num_experts})")
        layers, replicas = phy2log.shape
        logcnt = np.stack([np.bincount(row, minlength=num_experts) for row in phy2log])
        maxcnt = max(int(logcnt.max()), 1)
        order = np.argsort(phy2log, axis=1, kind="stable")  # slots grouped by expert, ascending within
        sorted_log = np.take_along_axis(phy2log, order, axis=1)
        start = np.concatenate([np.zeros((layers, 1), np.int64), np.cumsum(logcnt, 1)[:, :-1]], axis=1)
        rank = np.arange(replicas)[None, :] - np.take_along_axis(start, sorted_log, axis=1)
        log2phy = np.full((layers, num_experts, maxcnt), -1, np.int64)
        log2phy[np.arange(layers)[:, None], sorted_log, rank] = order
        return cls(phy2log=phy2log, log2phy=log2phy, logcnt=logcnt)

    @classmethod
    def from_tuple(cls, arrays: tuple[Any, Any, Any]) -> ExpertPlacement:
        """From the original EPLB's return value `(phy2log, log2phy, logcnt)`."""
        phy2log, log2phy, logcnt = arrays
        return cls(phy2log=phy2log, log2phy=log2phy, logcnt=logcnt)

    def to_tuple(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The original EPLB's return value `(phy2log, log2phy, logcnt)`."""
        return self.phy2log, self.log2phy, self.logcnt

    def to_dict(self) -> dict[str, Any]:
        return {"phy2log": self.phy2log.tolist(), "log2phy": self.log2phy.tolist(), "logcnt": self.logcnt.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpertPlacement:
        if not isinstance(data, dict):
            raise fail("data", type(data).__name__, "a dict with phy2log, log2phy, logcnt")
        missing = [k for k in ("phy2log", "log2phy", "logcnt") if k not in data]
        if missing:
            raise fail("data", sorted(data), f"keys phy2log, log2phy, logcnt (missing {missing})")
        return cls(phy2log=data["phy2log"], log2phy=data["log2phy"], logcnt=data["logcnt"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ExpertPlacement:
        return cls.from_dict(json.loads(text))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExpertPlacement):
            return NotImplemented
        return all(np.array_equal(a, b) for a, b in zip(self.to_tuple(), other.to_tuple()))

    __hash__ = None  # arrays: compare with ==, do not hash

    def __repr__(self) -> str:
        return (f"ExpertPlacement(layers={self.num_layers}, replicas={self.num_replicas}, "
                f"experts={self.num_logical}, maxcnt={self.max_replicas})")
