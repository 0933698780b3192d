"""Storage runtime throughput, every figure a ratio to a raw-I/O baseline measured in the same run on the same disk.

Baselines are plain os calls on the same files: sequential read in 8 MiB preadv calls, random preads of the
record size, write + fsync. "Cold" runs drop the files from the page cache first (fsync, then posix_fadvise
DONTNEED). Figure and baseline runs alternate three times; the ratio reported is the median of the per-pair
ratios, which keeps a shared machine's load drifts out of it. Figures and targets:
  block-shuffle loading (Loader defaults, 8 KiB token rows,  >= 0.8 x sequential read of the same shards
    cold, 4x the data set; timed from the first batch)
  random 64 KiB records (SampleStore.read, batches of 16)     >= 0.7 x raw random 64 KiB preads
  4 KiB records, batched reader vs grain per-record map       >= 5 x (both warm: measures per-record overhead)
  checkpoint save (TrainCheckpointer, 8 float32 arrays, 4x)   >= 0.8 x write + fsync; blocking time <= 50 ms
  KV store, 32-page (2.25 MiB) prefixes of 72 KiB MLA pages,  >= 0.8 x sequential read of the slot file
    cold: one request per match_prefix call, and 8 per match_prefixes call (a server admitting a batch)
  seekax's shard format vs ArrayRecord (grain's ArrayRecordDataSource, group_size 1) on the same 4 KiB records,
    warm: random batches of 256 and contiguous 512 KiB batches (why seekax keeps its own format)
Every SampleStore read checks its records' CRC-32 (verify_reads=True, the default); a context row gives the
512 KiB block-shuffle figure with the checks off.
plus context rows: what the disk itself gives for the same access pattern (raw random reads of one block, of
one 2.25 MiB prefix, at 1 or 4 threads), so a figure can be judged against the device's own limit.

  .venv/bin/python benchmarks/storage.py [--quick] [--json OUT.json] [--dir DIR]
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, parser  # noqa: E402

MiB = 1 << 20


def drop_cache(paths) -> None:
    """Evict the files' pages from the page cache (they are clean: written and fsynced)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def files_under(d) -> list[str]:
    return [str(p) for p in Path(d).rglob("*") if p.is_file()]


def timed(fn, repeat: int = 3, before=None) -> float:
    """Best of `repeat` wall times of fn() (before() runs untimed ahead of each)."""
    best = float("inf")
    for _ in range(repeat):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def paired(figure, baseline, files, repeats: int = 3) -> tuple[float, float, float]:
    """Alternate cold runs of figure() and baseline() (the page cache dropped before each); each returns bytes
    (or items) done, or (amount, seconds) when it times its own steady-state part. Returns (median figure rate,
    median baseline rate, median of the per-pair ratios): pairing keeps a shared machine's load drifts out of
    the ratio."""
    figs, bases = [], []
    for _ in range(repeats):
        for fn, acc in ((figure, figs), (baseline, bases)):
            drop_cache(files)
            t0 = time.perf_counter()
            amount = fn()
            if isinstance(amount, tuple):  # (amount, seconds): fn timed its own steady-state part
                acc.append(amount[0] / amount[1])
            else:
                acc.append(amount / (time.perf_counter() - t0))
    ratios = [f / b for f, b in zip(figs, bases)]
    return statistics.median(figs), statistics.median(bases), statistics.median(ratios)


# -- raw I/O baselines (plain os calls on the same files) -----------------------------------------------------------
def seq_read(paths) -> int:
    """Read files front to back in 8 MiB preadv calls; returns bytes read."""
    buf = bytearray(8 * MiB)
    total = 0
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        size, off = os.fstat(fd).st_size, 0
        while off < size:
            off += os.preadv(fd, [buf], off)
        os.close(fd)
        total += size
    return total


def random_reads(path: str, block: int, offsets, threads: int = 1) -> int:
    """pread `block` bytes at each offset (in `threads` threads, split evenly); returns bytes read."""
    fd = os.open(path, os.O_RDONLY)

    def part(offs):
        buf = bytearray(block)
        for o in offs:
            os.preadv(fd, [buf], int(o))
    if threads == 1:
        part(offsets)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(part, np.array_split(np.asarray(offsets), threads)))
    os.close(fd)
    return len(offsets) * block


def write_fsync(path: str, nbytes: int) -> int:
    buf = np.random.default_rng(0).integers(0, 256, size=8 * MiB, dtype=np.uint8).tobytes()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for _ in range(max(1, nbytes // len(buf))):
        os.write(fd, buf)
    os.fsync(fd)
    os.close(fd)
    return max(1, nbytes // len(buf)) * len(buf)


# -- figures ------------------------------------------------------------------------------------------------------
def shard_files(d) -> list[str]:
    return sorted(str(p) for p in Path(d).glob("shard-*.data"))


def loader_rows(root: Path, total: int, rows: list) -> None:
    from seekax.storage.loader import Loader, LoaderConfig
    from seekax.storage.sample_store import SampleStoreWriter

    rng = np.random.default_rng(1)
    with SampleStoreWriter(root / "tok", kind="tokens", seq_len=2048, dtype="int32", shard_bytes=64 * MiB) as w:
        for _ in range(4 * total // (64 * MiB)):  # 4x the other sets: runs of ~1 s keep startup and noise out
            w.write(rng.integers(0, 129280, size=(64 * MiB // 8192, 2048), dtype=np.int32))
    for block in (64, 256):
        cfg = LoaderConfig(global_batch_size=64, shuffle="block", block_records=block, num_epochs=1)  # defaults

        def load():  # timed from the first batch request: opening the store and grain's setup read no data
            loader, n = Loader(root / "tok", cfg), 0
            t0 = time.perf_counter()
            for b in loader:
                n += b.nbytes
            return n, time.perf_counter() - t0
        f, b, r = paired(load, lambda: seq_read(shard_files(root / "tok")), files_under(root / "tok"), repeats=5)
        rows.append(row(f"block-shuffle loading, {block * 8} KiB blocks", f / MiB, "MiB/s", "seq read of the shards",
                        b / MiB, r, ">= 0.8", r >= 0.8))
        if block == 64:  # what the read checks cost: the same figure without them
            def load_unchecked():
                loader, n = Loader(root / "tok", cfg, verify_reads=False), 0
                t0 = time.perf_counter()
                for b in loader:
                    n += b.nbytes
                return n, time.perf_counter() - t0
            f0, b0, r0 = paired(load_unchecked, lambda: seq_read(shard_files(root / "tok")), files_under(root / "tok"))
            rows.append(row("  (context) the same, read checks off", f0 / MiB, "MiB/s", "seq read of the shards",
                            b0 / MiB, r0, "-", "-"))
        first = shard_files(root / "tok")[0]
        blk = block * 8192
        offs = np.random.default_rng(5).permutation(os.path.getsize(first) // blk) * blk
        f2, b2, r2 = paired(lambda: random_reads(first, blk, offs, 4), lambda: seq_read([first]), [first])
        rows.append(row(f"  (context) raw random {block * 8} KiB reads, 4 threads", f2 / MiB, "MiB/s",
                        "seq read of the shard", b2 / MiB, r2, "-", "-"))


def random64_rows(root: Path, total: int, rows: list) -> None:
    from seekax.storage.sample_store import SampleStore, write_token_store

    rng = np.random.default_rng(2)
    n64 = total // 65536
    write_token_store(root / "r64", rng.integers(0, 256, size=(n64, 65536), dtype=np.uint8), shard_bytes=total)
    count = min(n64, 2048)  # all 512 records of a --quick set
    order = rng.permutation(n64)[:count]
    with SampleStore(root / "r64") as store:
        def read64():
            for i in range(0, count, 16):
                store.read(order[i:i + 16])
            return count * 65536
        raw = lambda: random_reads(shard_files(root / "r64")[0], 65536, order * 65536)  # noqa: E731
        f, b, r = paired(read64, raw, files_under(root / "r64"))
    rows.append(row("random 64 KiB records (batches of 16)", f / MiB, "MiB/s", "raw random 64 KiB preads", b / MiB,
                    r, ">= 0.7", r >= 0.7))


def records4k_rows(root: Path, total: int, rows: list) -> None:
    """Batched sorted reads vs grain's per-record MapDataset pipeline, both on a warm cache: per-record cost."""
    import grain

    from seekax.storage.sample_store import SampleStore, write_token_store

    rng = np.random.default_rng(3)
    n4 = min(total // 4096, 16384)
    write_token_store(root / "r4", rng.integers(0, 256, size=(n4, 4096), dtype=np.uint8))
    batch = 256
    with SampleStore(root / "r4") as store:
        perm = rng.permutation(n4)
        fd = store._fds[0]

        def batched():
            for i in range(0, n4 - batch + 1, batch):
                store.read(perm[i:i + batch])

        class PerRecord:
            def __len__(self):
                return n4

            def __getitem__(self, i):
                return np.frombuffer(os.pread(fd, 4096, int(i) * 4096), dtype=np.uint8)

        def per_record():
            ds = grain.MapDataset.source(PerRecord()).shuffle(seed=0).batch(batch, drop_remainder=True)
            for _ in ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)):
                pass
        batched()  # warm the page cache
        nb = (n4 // batch) * batch
        f, b = nb / timed(batched), nb / timed(per_record, repeat=2)
    rows.append(row("4 KiB records, batched reader (warm)", f, "rec/s", "grain per-record map (warm)", b, f / b,
                    ">= 5", f / b >= 5))


def checkpoint_rows(root: Path, total: int, rows: list) -> None:
    import jax
    import jax.numpy as jnp

    from seekax.storage.checkpoint import TrainCheckpointer

    # 8 float32 arrays (model 4 + optimizer 4), 4x `total` bytes in all: orbax's fixed cost per save (~0.1-0.3 s:
    # metadata, OCDBT commit, directory fsyncs) would otherwise dominate a 256 MiB save on a fast disk; real
    # training states are GBs to TBs.
    side = int(np.sqrt(4 * total // 4 // 8))
    model = {f"w{i}": jnp.asarray(np.random.default_rng(i).standard_normal((side, side), np.float32))
             for i in range(4)}
    opt = {f"m{i}": model[f"w{i}"] * 0.5 for i in range(4)}
    jax.block_until_ready((model, opt))
    nbytes = sum(x.nbytes for x in jax.tree.leaves((model, opt)))
    blocking = []
    with TrainCheckpointer(root / "ckpt", max_to_keep=None) as ckpt:
        ckpt.save(0, model=model, opt_state=opt, loader_state={"step": 0})  # warm-up (orbax set-up)
        ckpt.wait()
        step = [0]

        def save():
            step[0] += 1
            r = ckpt.save(step[0], model=model, opt_state=opt, loader_state={"step": step[0]})
            ckpt.wait()
            blocking.append(r.blocking_seconds)
            return nbytes
        f, b, r = paired(save, lambda: write_fsync(str(root / "raw-ckpt.bin"), nbytes), [])
    rows.append(row("checkpoint save (async, then wait)", f / MiB, "MiB/s", "write + fsync", b / MiB, r, ">= 0.8",
                    r >= 0.8))
    ms = statistics.median(blocking) * 1e3
    rows.append(row("checkpoint blocking time", ms, "ms", "-", float("nan"), float("nan"), "<= 50 ms", ms <= 50))


def kv_rows(root: Path, total: int, rows: list) -> None:
    import ml_dtypes

    from seekax.storage.kv_store import KVPageStore

    page_bytes = 64 * 576 * 2
    seqs = max(8, 4 * total // (32 * page_bytes))  # 4x, as the loader set: runs of ~1 s
    rng = np.random.default_rng(4)
    kv = KVPageStore(root / "kv", capacity_pages=seqs * 32)
    prompts = [rng.integers(0, 129280, size=32 * 64) for _ in range(seqs)]
    for p in prompts:
        kv.put_pages(p, rng.standard_normal((32, 64, 576), np.float32).astype(ml_dtypes.bfloat16))
    order = rng.permutation(seqs)

    def match_all(batch: int):
        for i in range(0, seqs, batch):
            for n, _ in kv.match_prefixes([prompts[j] for j in order[i:i + batch]]):
                assert n == 32 * 64
        return seqs * 32 * page_bytes
    slots = str(root / "kv" / "kv.slots")
    for batch in (1, 8):
        f, b, r = paired(lambda: match_all(batch), lambda: seq_read([slots]), files_under(root / "kv"), repeats=5)
        name = "one request per call" if batch == 1 else f"{batch} requests per call"
        rows.append(row(f"KV store, 32-page prefixes, {name}", f / MiB, "MiB/s",
                        "seq read of the slot file", b / MiB, r, ">= 0.8", r >= 0.8))
    for threads in (1, 4):
        raw = lambda: random_reads(slots, 32 * page_bytes, order * 32 * page_bytes, threads)  # noqa: E731
        f2, b2, r2 = paired(raw, lambda: seq_read([slots]), files_under(root / "kv"))
        rows.append(row(f"  (context) raw random 2.25 MiB reads, {threads} thread(s)", f2 / MiB, "MiB/s",
                        "seq read of the slot file", b2 / MiB, r2, "-", "-"))
    kv.close()


def arrayrecord_rows(root: Path, total: int, rows: list) -> None:
    """The same records read through seekax's reader (checked) and grain's ArrayRecordDataSource, warm."""
    import grain

    from seekax.storage.arrayrecord import export_array_record
    from seekax.storage.sample_store import SampleStore, write_token_store

    rng = np.random.default_rng(6)
    n4 = min(total // 4096, 16384)
    write_token_store(root / "ar4", rng.integers(0, 256, size=(n4, 4096), dtype=np.uint8))
    (ar_file,) = export_array_record(root / "ar4", root / "ar4.array_record")
    ar = grain.sources.ArrayRecordDataSource([ar_file])
    with SampleStore(root / "ar4") as store:
        perm = rng.permutation(n4)
        random_batches = [perm[i:i + 256] for i in range(0, n4 - 255, 256)]
        starts = rng.permutation(n4 // 128) * 128
        block_batches = [np.arange(s, s + 128) for s in starts]
        for name, batches in (("random batches of 256", random_batches), ("contiguous 512 KiB batches", block_batches)):
            def ours():
                for b in batches:
                    store.read(b)

            def theirs():
                for b in batches:
                    ar.__getitems__(b.tolist())
            ours()
            theirs()  # warm the page cache and both readers
            recs = sum(len(b) for b in batches)
            f, b = recs / timed(ours), recs / timed(theirs)
            rows.append(row(f"4 KiB records, {name}: seekax store (warm)", f, "rec/s", "ArrayRecord (warm)", b, f / b,
                            "-", "-"))


FIGURES = {"loader": loader_rows, "random64": random64_rows, "records4k": records4k_rows,  # fn(root, total, rows)
           "checkpoint": checkpoint_rows, "kv": kv_rows, "arrayrecord": arrayrecord_rows}


def row(name, value, unit, baseline, base_value, ratio, target, ok) -> dict:
    return {"figure": name, "value": value, "unit": unit, "baseline": baseline, "baseline_value": base_value,
            "ratio": ratio, "target": target, "ok": ok}


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    p.add_argument("--only", default=",".join(FIGURES), help=f"comma-separated subset of {','.join(FIGURES)}")
    args = p.parse_args()
    only = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = [f for f in only if f not in FIGURES]
    if unknown or not only:
        p.error(f"--only {args.only!r}: expected a comma-separated subset of {','.join(FIGURES)}")
    total = (32 if args.quick else 256) * MiB
    root = Path(tempfile.mkdtemp(prefix="seekax-bench-", dir=args.dir))
    rows: list[dict] = []
    try:
        for name in FIGURES:
            if name in only:
                FIGURES[name](root, total, rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{total // MiB} MiB per data set in {root.parent} (block-shuffle, checkpoint and KV sets: 4x); cold = "
          "page cache dropped (posix_fadvise DONTNEED) before every run; ratios are medians of 3 (loader, KV: 5) "
          "alternating figure/baseline pairs")
    emit("storage", rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
