"""Flat buffers for pytrees of different shapes: how one pipeline buffer holds any stage's parameters or any
boundary's activation.

A `TreeLayout` places every leaf of one pytree in a flat vector per *key* (the dtype for activations, the
dtype and the mesh axes it is split over, for parameters); a `FlatLayout` is a family of tree layouts that share buffer
sizes (the largest member per key), so one SPMD buffer row can hold whichever member a rank needs in a tick.
Packing ravels, concatenates and zero-pads; unpacking slices and reshapes (both static). Leading dims before
the flat axis pass through, so `[slots, size]` buffers pack and unpack whole.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers the bfloat16 and float8 dtype names with numpy)
import numpy as np


@dataclasses.dataclass(frozen=True)
class LeafSlot:
    """One leaf: its buffer key, offset and size in that buffer, and its shape and dtype.
    skip: the leaf has no place in the buffers (an integer leaf of a cotangent layout: its cotangent is float0)."""

    key: Hashable
    offset: int
    shape: tuple[int, ...]
    dtype: Any
    skip: bool = False
    data_shape: tuple[int, ...] | None = None  # a typed PRNG key leaf: the shape of its key data (uint32)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape if self.data_shape is None else self.data_shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class TreeLayout:
    """Where each leaf of one pytree lives; `sizes` are this tree's own sizes per key (no padding)."""

    treedef: Any
    leaves: tuple[LeafSlot, ...]
    sizes: dict

    @staticmethod
    def of(tree: Any, key_of: Callable[[Any, Any], Hashable | None]) -> "TreeLayout":
        """Lay out `tree` (leaves with .shape and .dtype). key_of(path, leaf) -> buffer key, or None to leave
        the leaf out (it unpacks as float0 zeros)."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        sizes: dict[Hashable, int] = {}
        slots = []
        for path, leaf in flat:
            shape = tuple(int(d) for d in leaf.shape)
            dtype = leaf.dtype if _is_prng_key(leaf.dtype) else np.dtype(leaf.dtype)
            key = key_of(path, leaf)
            if key is None:
                slots.append(LeafSlot(key=None, offset=0, shape=shape, dtype=dtype, skip=True))
                continue
            off = sizes.get(key, 0)
            data = tuple(_key_data(shape, dtype).shape) if _is_prng_key(dtype) else None
            slots.append(LeafSlot(key=key, offset=off, shape=shape, dtype=dtype, data_shape=data))
            sizes[key] = off + slots[-1].size
        return TreeLayout(treedef=treedef, leaves=tuple(slots), sizes=sizes)

    def pack(self, tree: Any, sizes: dict, lead: tuple[int, ...] = ()) -> dict:
        """tree (leaves [*lead, *shape]) -> {key: [*lead, sizes[key]]}, zero-padded; keys without leaves here
        are all zeros."""
        leaves = self.treedef.flatten_up_to(tree)
        parts: dict[Hashable, list] = {k: [] for k in sizes}
        for slot, leaf in zip(self.leaves, leaves):
            if slot.data_shape is not None:  # a key travels as its key data
                parts[slot.key].append(jnp.reshape(jax.random.key_data(leaf), lead + (slot.size,)))
            elif not slot.skip:
                parts[slot.key].append(jnp.reshape(leaf, lead + (slot.size,)).astype(slot.dtype))
        out = {}
        for k, size in sizes.items():
            used = self.sizes.get(k, 0)
            dtype = _key_dtype(k)
            chunks = parts[k] + ([jnp.zeros(lead + (size - used,), dtype)] if size > used else [])
            out[k] = chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks, axis=-1)
        return out

    def add_into(self, bufs: dict, index: Any, tree: Any) -> dict:
        """bufs {key: [n, size]} with each leaf of `tree` added into its slice of row `index` (a traced int)."""
        out = dict(bufs)
        for slot, leaf in zip(self.leaves, self.treedef.flatten_up_to(tree)):
            if slot.skip:
                continue
            buf = out[slot.key]
            piece = jnp.reshape(leaf, (1, slot.size)).astype(buf.dtype)
            start = (index, slot.offset)
            cur = jax.lax.dynamic_slice(buf, start, (1, slot.size))
            out[slot.key] = jax.lax.dynamic_update_slice(buf, cur + piece, start)
        return out

    def unpack(self, flat: dict, lead: tuple[int, ...] = ()) -> Any:
        """{key: [*lead, size]} -> the tree (leaves [*lead, *shape]); skipped leaves come back as float0 zeros."""
        leaves = []
        for slot in self.leaves:
            if slot.skip:
                leaves.append(np.zeros(lead + slot.shape, jax.dtypes.float0))
                continue
            buf = flat[slot.key]
            if slot.offset == 0 and buf.shape[-1] == slot.size:
                piece = buf
            else:
                piece = jax.lax.slice_in_dim(buf, slot.offset, slot.offset + slot.size, axis=buf.ndim - 1)
            if slot.data_shape is not None:
                # KeyTy._impl: the PRNG implementation of a typed key dtype (no public getter from a dtype)
                piece = jax.random.wrap_key_data(jnp.reshape(piece, lead + slot.data_shape), impl=slot.dtype._impl)
            leaves.append(jnp.reshape(piece, lead + slot.shape))
        return self.treedef.unflatten(leaves)


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """Tree layouts that share one set of buffers: sizes[key] = the largest member's use of that key."""

    members: tuple[TreeLayout, ...]
    sizes: dict

    @staticmethod
    def of(layouts: Sequence[TreeLayout]) -> "FlatLayout":
        sizes: dict[Hashable, int] = {}
        for lay in layouts:
            for k, v in lay.sizes.items():
                sizes[k] = max(sizes.get(k, 0), v)
        return FlatLayout(members=tuple(layouts), sizes=dict(sorted(sizes.items(), key=lambda kv: str(kv[0]))))

    def pack(self, i: int, tree: Any, lead: tuple[int, ...] = ()) -> dict:
        return self.members[i].pack(tree, self.sizes, lead)

    def unpack(self, i: int, flat: dict, lead: tuple[int, ...] = ()) -> Any:
        return self.members[i].unpack(flat, lead)

    def zeros(self, lead: tuple[int, ...]) -> dict:
        return {k: jnp.zeros(lead + (n,), _key_dtype(k)) for k, n in self.sizes.items()}


def dtype_key(path, leaf) -> str:
    """Activation buffers: one per dtype (keyed by name: pytree dict keys must sort). Typed PRNG keys (dropout
    keys riding with the activation) go in the buffer of their key data's dtype."""
    if _is_prng_key(leaf.dtype):
        return np.dtype(_key_data(tuple(leaf.shape), leaf.dtype).dtype).name
    return np.dtype(leaf.dtype).name


def float_key(path, leaf) -> str | None:
    """Cotangent buffers: one per floating dtype; integer and boolean leaves carry no cotangent."""
    return np.dtype(leaf.dtype).name if jnp.issubdtype(leaf.dtype, jnp.inexact) else None


def _is_prng_key(dtype: Any) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_data(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    """Shape and dtype of the key data of a typed PRNG key array."""
    return jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))


def _key_dtype(key: Hashable) -> np.dtype:
    """A key is a dtype name or has one (`.dtype`)."""
    return np.dtype(key if isinstance(key, str) else key.dtype)
