"""Storage runtime throughput, every figure a ratio to a raw-I/O baseline measured in the same run on the same disk.

Baselines (plain os.pread/os.write on one file): sequential read with the page cache dropped
(posix_fadvise DONTNEED after fsync), random 4 KiB and 64 KiB reads (cache dropped), write + fsync.
Figures and targets (issue 8):
  block-shuffle loading (Loader, 8 KiB token rows, cold)   >= 0.8 x sequential read
  random 64 KiB records (SampleStore.read, cold)           >= 0.7 x raw random 64 KiB reads
  4 KiB records, batched reader vs grain per-record map    >= 5 x (both warm: this measures per-record overhead)
  checkpoint blocking time (TrainCheckpointer.save)        <= 50 ms;  save throughput >= 0.8 x write + fsync
  KV store, 32-page prefix (72 KiB pages, cold)            >= 0.8 x sequential read

  .venv/bin/python benchmarks/storage.py [--quick] [--json OUT.json] [--dir DIR]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
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


# -- baselines ----------------------------------------------------------------------------------------------------
def raw_write_fsync(path: str, nbytes: int) -> float:
    buf = np.random.default_rng(0).integers(0, 256, size=8 * MiB, dtype=np.uint8).tobytes()

    def run():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for _ in range(nbytes // len(buf)):
            os.write(fd, buf)
        os.fsync(fd)
        os.close(fd)
    return nbytes / timed(run, repeat=2)


def raw_seq_read(path: str) -> float:
    size = os.path.getsize(path)

    def run():
        fd = os.open(path, os.O_RDONLY)
        buf = bytearray(8 * MiB)
        off = 0
        while off < size:
            off += os.preadv(fd, [buf], off)
        os.close(fd)
    return size / timed(run, before=lambda: drop_cache([path]))


def raw_random_read(path: str, block: int, count: int, seed: int = 0) -> float:
    size = os.path.getsize(path)
    offs = np.random.default_rng(seed).integers(0, size // block, size=count) * block

    def run():
        fd = os.open(path, os.O_RDONLY)
        buf = bytearray(block)
        for o in offs.tolist():
            os.preadv(fd, [buf], o)
        os.close(fd)
    return count * block / timed(run, before=lambda: drop_cache([path]))


# -- figures ------------------------------------------------------------------------------------------------------
def store_figures(root: Path, total: int, quick: bool) -> dict:
    from seekax.storage.loader import Loader, LoaderConfig
    from seekax.storage.sample_store import SampleStore, write_token_store

    out = {}
    rng = np.random.default_rng(1)
    # block-shuffle loading of packed int32 token rows (seq_len 2048 = 8 KiB)
    seqs = rng.integers(0, 129280, size=(total // 8192, 2048), dtype=np.int32)
    write_token_store(root / "tok", seqs, shard_bytes=64 * MiB)
    del seqs
    cfg = LoaderConfig(global_batch_size=64, shuffle="block", block_records=64, num_epochs=1, prefetch=4)

    def load_all():
        for _ in Loader(root / "tok", cfg):
            pass
    t = timed(load_all, repeat=2, before=lambda: drop_cache(files_under(root / "tok")))
    bpe = (total // 8192) // 64
    out["block_shuffle"] = bpe * 64 * 8192 / t

    # random 64 KiB records (uint8 rows of 65536), batches of 16 in a random permutation
    n64 = total // 65536
    write_token_store(root / "r64", rng.integers(0, 256, size=(n64, 65536), dtype=np.uint8), shard_bytes=64 * MiB)
    count = min(n64, 512 if quick else 2048)
    order = rng.permutation(n64)[:count]
    with SampleStore(root / "r64") as store:
        def read64():
            for i in range(0, count, 16):
                store.read(order[i:i + 16])
        out["random_64k"] = count * 65536 / timed(read64, before=lambda: drop_cache(files_under(root / "r64")))
    out["random_64k_count"] = count

    # 4 KiB records: batched sorted reads vs grain's per-record MapDataset pipeline (both warm cache)
    import grain

    n4 = min(total // 4096, 16384)
    write_token_store(root / "r4", rng.integers(0, 256, size=(n4, 4096), dtype=np.uint8))
    with SampleStore(root / "r4") as store:
        perm = rng.permutation(n4)
        batch = 256

        def batched():
            for i in range(0, n4 - batch + 1, batch):
                store.read(perm[i:i + batch])
        fd = store._fds[0]

        class PerRecord:
            def __len__(self):
                return n4

            def __getitem__(self, i):
                return np.frombuffer(os.pread(fd, 4096, int(i) * 4096), dtype=np.uint8)

        def per_record():
            ds = grain.MapDataset.source(PerRecord()).shuffle(seed=0).batch(batch, drop_remainder=True)
            for _ in ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)):
                pass
        batched()  # warm the cache
        nb = (n4 // batch) * batch
        out["records4k_batched"] = nb / timed(batched)
        out["records4k_grain"] = nb / timed(per_record, repeat=2)
    return out


def checkpoint_figures(root: Path, total: int) -> dict:
    import jax
    import jax.numpy as jnp

    from seekax.storage.checkpoint import TrainCheckpointer

    n = total // 4 // 8  # 8 float32 arrays, `total` bytes in all (model 4 + optimizer 4)
    side = int(np.sqrt(n))
    model = {f"w{i}": jnp.asarray(np.random.default_rng(i).standard_normal((side, side), np.float32)) for i in range(4)}
    opt = {f"m{i}": model[f"w{i}"] * 0.5 for i in range(4)}
    jax.block_until_ready((model, opt))
    nbytes = sum(x.nbytes for x in jax.tree.leaves((model, opt)))
    blocking, totals = [], []
    with TrainCheckpointer(root / "ckpt", max_to_keep=2) as ckpt:
        ckpt.save(0, model=model, opt_state=opt, loader_state={"step": 0})  # warm-up (orbax set-up)
        ckpt.wait()
        for step in (1, 2, 3):
            t0 = time.perf_counter()
            r = ckpt.save(step, model=model, opt_state=opt, loader_state={"step": step})
            ckpt.wait()
            totals.append(time.perf_counter() - t0)
            blocking.append(r.blocking_seconds)
    return {"ckpt_blocking_s": min(blocking), "ckpt_save": nbytes / min(totals), "ckpt_bytes": nbytes}


def kv_figures(root: Path, total: int) -> dict:
    import ml_dtypes

    from seekax.storage.kv_store import KVPageStore

    page_bytes = 64 * 576 * 2
    seqs = max(4, total // (32 * page_bytes))
    rng = np.random.default_rng(2)
    kv = KVPageStore(root / "kv", capacity_pages=seqs * 32)
    prompts = [rng.integers(0, 129280, size=32 * 64) for _ in range(seqs)]
    for p in prompts:
        kv.put_pages(p, rng.standard_normal((32, 64, 576), np.float32).astype(ml_dtypes.bfloat16))
    order = rng.permutation(seqs)

    def match_all():
        for i in order:
            n, _ = kv.match_prefix(prompts[i])
            assert n == 32 * 64
    t = timed(match_all, before=lambda: drop_cache(files_under(root / "kv")))
    kv.close()
    return {"kv_32_pages": seqs * 32 * page_bytes / t, "kv_seqs": seqs}


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    args = p.parse_args()
    total = (32 if args.quick else 256) * MiB
    root = Path(tempfile.mkdtemp(prefix="seekax-bench-", dir=args.dir))
    try:
        raw = str(root / "raw.bin")
        base = {"write_fsync": raw_write_fsync(raw, total)}
        base["seq_read"] = raw_seq_read(raw)
        base["rand_4k"] = raw_random_read(raw, 4096, 2048 if args.quick else 8192)
        base["rand_64k"] = raw_random_read(raw, 65536, 512 if args.quick else 2048)
        os.unlink(raw)
        fig = store_figures(root, total, args.quick)
        fig.update(checkpoint_figures(root, total))
        fig.update(kv_figures(root, total))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def row(name, value, unit, baseline, base_value, target, higher=True):
        ratio = value / base_value if base_value else float("nan")
        ok = ratio >= target if higher else value <= target
        return {"figure": name, "value": value, "unit": unit, "baseline": baseline, "baseline_value": base_value,
                "ratio": ratio, "target": f"{'>=' if higher else '<='} {target}", "ok": ok}

    mbs = lambda x: x / MiB  # noqa: E731
    rows = [
        row("block-shuffle loading", mbs(fig["block_shuffle"]), "MiB/s", "seq read (cold)", mbs(base["seq_read"]), 0.8),
        row("random 64 KiB records", mbs(fig["random_64k"]), "MiB/s", "raw random 64 KiB (cold)",
            mbs(base["rand_64k"]), 0.7),
        row("4 KiB records batched", fig["records4k_batched"], "rec/s", "grain per-record (warm)",
            fig["records4k_grain"], 5.0),
        row("checkpoint save", mbs(fig["ckpt_save"]), "MiB/s", "write+fsync", mbs(base["write_fsync"]), 0.8),
        {**row("checkpoint blocking", fig["ckpt_blocking_s"] * 1e3, "ms", "-", 0, 50.0, higher=False),
         "ratio": float("nan")},
        row("KV 32-page prefix", mbs(fig["kv_32_pages"]), "MiB/s", "seq read (cold)", mbs(base["seq_read"]), 0.8),
    ]
    print(f"disk baselines ({total // MiB} MiB in {root.parent}): seq read {mbs(base['seq_read']):.0f} MiB/s, "
          f"random 4 KiB {mbs(base['rand_4k']):.1f} MiB/s, random 64 KiB {mbs(base['rand_64k']):.0f} MiB/s, "
          f"write+fsync {mbs(base['write_fsync']):.0f} MiB/s")
    emit("storage", rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
