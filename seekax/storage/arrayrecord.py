"""ArrayRecord import and export, so stores move to and from the rest of the JAX data ecosystem (grain's
`ArrayRecordDataSource`, MaxText's ArrayRecord input pipeline).

Export writes one ArrayRecord record per store record: a token record's raw little-endian bytes (`seq_len`
elements of the store's dtype), a bytes record as it is. ArrayRecord files carry no schema, so a JSON sidecar
`<out>.seekax.json` records kind, dtype, seq_len, the files and the store's metadata (its tokenizer identity);
import reads it back when present. Each file is written under a temp name and renamed when complete; the
sidecar comes last. Import writes a store with the usual atomic writer; every exported record was checked
against its checksum on the way out.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np

from seekax.ir.validate import check_choice, check_int, fail
from seekax.storage.atomic import atomic_write_json, fsync_dir, tmp_name
from seekax.storage.sample_format import DTYPES, KINDS
from seekax.storage.sample_store import SampleStore, SampleStoreWriter

SIDECAR = ".seekax.json"
BATCH = 4096  # records per read or write call


def _module():
    from seekax.storage.extras import require_data_extra

    require_data_extra("array_record", feature="ArrayRecord import/export (it comes with grain)")
    from array_record.python import array_record_module

    return array_record_module


def export_array_record(store: str | os.PathLike | SampleStore, out: str | os.PathLike, *, num_shards: int = 1,
                        group_size: int = 1, overwrite: bool = False) -> list[str]:
    """Write the store's records to ArrayRecord file(s) at `out` (`out-00000-of-00004` for several shards, records
    split evenly in order). `group_size=1` keeps every record randomly readable. Returns the file paths."""
    ar = _module()
    num_shards = check_int("num_shards", num_shards, min_value=1)
    group_size = check_int("group_size", group_size, min_value=1)
    out = Path(out)
    names = [out] if num_shards == 1 else [out.with_name(f"{out.name}-{i:05d}-of-{num_shards:05d}")
                                           for i in range(num_shards)]
    sidecar = out.with_name(out.name + SIDECAR)
    existing = [str(p) for p in [*names, sidecar] if p.exists()]
    if existing and not overwrite:
        raise fail("out", str(out), f"a path with no ArrayRecord output yet (found {existing}; pass overwrite=True)")
    if not out.parent.is_dir():
        raise fail("out", str(out), "a file path in an existing directory")
    owned = not isinstance(store, SampleStore)
    src = SampleStore(store) if owned else store
    try:
        sidecar.unlink(missing_ok=True)  # unpublish first, as the store writer does
        bounds = np.linspace(0, len(src), num_shards + 1).astype(np.int64)
        for name, a, b in zip(names, bounds[:-1], bounds[1:]):
            tmp = tmp_name(name)
            w = ar.ArrayRecordWriter(str(tmp), f"group_size:{group_size}")
            try:
                for lo in range(int(a), int(b), BATCH):
                    recs = src.read(np.arange(lo, min(lo + BATCH, int(b))))
                    for r in recs:
                        w.write(r.tobytes() if isinstance(r, np.ndarray) else bytes(r))
                w.close()
                fd = os.open(tmp, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
                os.replace(tmp, name)
            except BaseException:
                if w.is_open():
                    w.close()
                tmp.unlink(missing_ok=True)
                raise
        fsync_dir(out.parent)
        atomic_write_json(sidecar, {"format": "seekax.array_record_export", "kind": src.kind,
                                    "dtype": src.dtype.name, "seq_len": src.seq_len, "num_records": len(src),
                                    "files": [p.name for p in names], "metadata": src.manifest.get("metadata", {})})
    finally:
        if owned:
            src.close()
    return [str(p) for p in names]


def _files(src) -> list[Path]:
    pats = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    files = sorted({Path(f) for p in pats for f in (glob.glob(str(p)) or [str(p)])})
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise fail("src", str(src), f"ArrayRecord files, a glob matching some, or a list of them (missing: {missing})")
    return files


def _sidecar(files: list[Path]) -> dict | None:
    """The export sidecar that lists exactly these files, if there is one next to them."""
    for p in files[0].parent.glob(f"*{SIDECAR}"):
        meta = json.loads(p.read_text())
        if sorted(meta.get("files", [])) == sorted(f.name for f in files) and all(f.parent == files[0].parent
                                                                                  for f in files):
            return meta
    return None


def import_array_record(src, dst: str | os.PathLike, *, kind: str | None = None, dtype: str | None = None,
                        seq_len: int | None = None, overwrite: bool = False, shard_bytes: int = 256 << 20) -> dict:
    """Read ArrayRecord file(s) `src` (a path, a glob or a list; read in sorted order) into a sample store at
    `dst`. kind/dtype/seq_len default to the export sidecar's, else to a bytes store; a tokens store needs every
    record to be exactly seq_len elements of dtype. Returns the store manifest."""
    ar = _module()
    files = _files(src)
    meta = _sidecar(files) or {}
    kind = check_choice("kind", kind if kind is not None else meta.get("kind", "bytes"), KINDS)
    metadata = {"source": "array_record", "files": [f.name for f in files]}
    if kind == "tokens":
        dtype = dtype if dtype is not None else meta.get("dtype")
        seq_len = seq_len if seq_len is not None else meta.get("seq_len")
        if dtype not in DTYPES:
            raise fail("dtype", dtype, f"one of {DTYPES} for kind='tokens' (no sidecar said which)")
        seq_len = check_int("seq_len", seq_len, min_value=1)
        record_bytes = seq_len * np.dtype(dtype).itemsize
        metadata.update({k: v for k, v in meta.get("metadata", {}).items() if k == "tokenizer"})
    writer_args = dict(kind=kind, overwrite=overwrite, shard_bytes=shard_bytes, metadata=metadata)
    if kind == "tokens":
        writer_args.update(seq_len=seq_len, dtype=dtype)
    with SampleStoreWriter(dst, **writer_args) as w:
        for f in files:
            try:
                r = ar.ArrayRecordReader(str(f))
                try:
                    n = r.num_records()
                    for lo in range(0, n, BATCH):
                        recs = r.read(lo, min(lo + BATCH, n))
                        if kind == "bytes":
                            w.write_many(recs)
                            continue
                        bad = next((i for i, x in enumerate(recs) if len(x) != record_bytes), None)
                        if bad is not None:
                            raise fail("src", f"{f.name} record {lo + bad} ({len(recs[bad])} bytes)",
                                       f"records of seq_len={seq_len} x {dtype} = {record_bytes} bytes")
                        w.write(np.frombuffer(b"".join(recs), dtype=dtype).reshape(len(recs), seq_len))
                finally:
                    r.close()
            except RuntimeError as e:  # array_record's C++ status: not an ArrayRecord file, a torn one, ...
                raise fail("src", str(f), f"an ArrayRecord file ({e})") from None
    return SampleStore(dst).manifest
