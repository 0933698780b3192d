"""A Hugging Face safetensors checkpoint directory read tensor by tensor.

The index (`model.safetensors.index.json`, or every `*.safetensors` file when there is none) and each
file's JSON header are parsed up front, so names, shapes and dtypes can be checked before any data is
read; `read(name)` then reads exactly one tensor's bytes into a fresh numpy array (bf16 and e4m3 through
ml_dtypes, which the `safetensors` package's numpy reader does not cover).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import mmap
import os
import struct
import threading

import ml_dtypes
import numpy as np

from seekax.ir.validate import fail

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
          "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v).name: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
HUGE = 4 << 20   # arrays at least this large are backed by transparent huge pages where the kernel allows


def empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array. Large ones are anonymous mappings advised to use huge pages: a
    checkpoint load writes every byte of its params once, and 4 KiB page faults would dominate that copy."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes < HUGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(shape, dtype)
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(m, dtype).reshape(shape)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str          # safetensors' name: "BF16", "F8_E4M3", ...
    shape: tuple[int, ...]
    start: int          # absolute byte offset in the file
    nbytes: int


def read_header(path: str) -> dict[str, TensorInfo]:
    """The tensors of one .safetensors file (8-byte little-endian header length, JSON header, data). The header
    is checked against the file: its length, each tensor's byte range against its shape and dtype, and the
    data's end against the file's size (a truncated download fails here, before any tensor is read)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise fail("checkpoint file", path, "a safetensors file (8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise fail("checkpoint file", path, f"a safetensors file: its header of {n} bytes does not fit in the "
                       f"file of {size} bytes (not safetensors, or truncated)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise fail("checkpoint file", path, f"a safetensors JSON header ({e})") from None
    if not isinstance(header, dict):
        raise fail("checkpoint file", path, f"a safetensors JSON header (an object, not {type(header).__name__})")
    out, data_end = {}, 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise fail(f"checkpoint tensor {name!r} in {path}", meta, "a header entry with dtype, shape and "
                       "data_offsets [begin, end]") from None
        if dtype in DTYPES:
            want = int(np.prod(shape)) * np.dtype(DTYPES[dtype]).itemsize
            if end - begin != want:
                raise fail(f"checkpoint tensor {name!r} in {path}", f"{end - begin} bytes",
                           f"{shape} {dtype} = {want} bytes (header's data_offsets {[begin, end]})")
        out[name] = TensorInfo(file=path, dtype=dtype, shape=shape, start=8 + n + begin, nbytes=end - begin)
        data_end = max(data_end, 8 + n + end)
    if data_end > size:
        raise fail("checkpoint file", path, f"{data_end} bytes (its header puts tensor data to byte {data_end}), "
                   f"has {size}: truncated (an interrupted download?)")
    return out


def read_json(path: str) -> dict:
    """A JSON object file (config.json, the index, tokenizer_config.json); a malformed one is a ValueError
    naming the file, not a bare JSONDecodeError."""
    with open(path, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except ValueError as e:
            raise fail("JSON file", path, f"valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise fail("JSON file", path, f"a JSON object, not {type(d).__name__}")
    return d


class SafetensorsDir:
    """All tensors of a checkpoint directory, by name; one open file handle per shard. `read` is thread-safe
    (positional reads)."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = os.fspath(model_dir)
        index = os.path.join(self.dir, INDEX)
        if os.path.isfile(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise fail(f"{index} weight_map", weight_map, "a dict of tensor name -> shard file")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.dir, "*.safetensors")))
            weight_map = None
        if not files:
            raise fail("model_dir", self.dir, f"a directory with {INDEX} or *.safetensors files")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = os.path.join(self.dir, name)
            if not os.path.isfile(path):
                raise fail(f"{INDEX} shard", name, f"a file in {self.dir}")
            self.tensors.update(read_header(path))
        if weight_map is not None:
            for name, file in weight_map.items():
                if name not in self.tensors:
                    raise fail(f"checkpoint tensor {name!r}", "missing", f"in {file}, where {INDEX} puts it")
        self._handles: dict[str, object] = {}
        self._lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """One tensor in its stored dtype, read now into `out` (a C-contiguous array of its shape and dtype,
        e.g. one expert's row of a stacked leaf) or into a new array."""
        info = self.tensors[name]
        if info.dtype not in DTYPES:
            raise fail(f"checkpoint tensor {name!r} dtype", info.dtype, f"one of {sorted(DTYPES)}")
        if out is None:
            out = empty(info.shape, DTYPES[info.dtype])
        elif out.dtype != DTYPES[info.dtype] or tuple(out.shape) != info.shape or not out.flags.c_contiguous:
            raise fail("out", f"{out.dtype}{tuple(out.shape)}", f"a C-contiguous {info.dtype}{info.shape} array")
        with self._lock:                                  # reads may come from several threads
            f = self._handles.get(info.file)
            if f is None:
                f = self._handles[info.file] = open(info.file, "rb", buffering=0)
        view, got = memoryview(out.reshape(-1).view(np.uint8)), 0
        while got < info.nbytes:
            k = os.preadv(f.fileno(), [view[got:]], info.start + got)
            if not k:
                raise fail(f"checkpoint tensor {name!r}", f"{got} of {info.nbytes} bytes", "the whole tensor "
                           f"(file {info.file} truncated)")
            got += k
        return out

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
