"""Fault injection over every store kind: writers SIGKILLed at durable steps, bits flipped in every file kind, a
full disk (RLIMIT_FSIZE). Every outcome is classified and counted:
  torn reads                 a store or step that opens as whole but returns fewer/partial records
  silent wrong bytes         a read that returns values other than those written, without an error
  lost acknowledged writes   a write whose call returned, missing afterwards (and not evicted by design)
  raw exceptions             anything but the stores' own typed errors (CorruptStoreError, IncompleteStoreError,
                             StorageFullError, CorruptCheckpointError, a ValueError naming an argument)
All four must be 0; each kind prints its counts (`pytest -s` shows them).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pytest

from seekax.storage.atomic import StorageFullError
from seekax.storage.sample_store import CorruptStoreError, IncompleteStoreError, SampleStore

ROOT = Path(__file__).resolve().parents[2]
TYPED = (CorruptStoreError, IncompleteStoreError, StorageFullError, ValueError)


@dataclass
class Counts:
    scenarios: int = 0
    torn_reads: int = 0
    silent_wrong_bytes: int = 0
    lost_acknowledged_writes: int = 0
    raw_exceptions: int = 0

    def line(self, kind):
        return f"fault injection [{kind}]: " + ", ".join(f"{f.name.replace('_', ' ')} {getattr(self, f.name)}"
                                                          for f in fields(self))


def run(code, *args, timeout=120):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def flip(path: Path, rng):
    data = bytearray(path.read_bytes())
    if not data:
        return
    data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
    path.write_bytes(bytes(data))


def classify(c: Counts, fn, check):
    """Run a read; typed error: detected. Otherwise `check(result)` says 'ok', 'torn' or 'wrong'."""
    try:
        result = fn()
    except TYPED:
        return "refused"
    except Exception:  # noqa: BLE001 - counted, printed by the caller's assert
        c.raw_exceptions += 1
        return "raw"
    verdict = check(result)
    c.torn_reads += verdict == "torn"
    c.silent_wrong_bytes += verdict == "wrong"
    return verdict


# -- sample stores (tokens and bytes) -----------------------------------------------------------------------------
N, SEQ = 600, 32


def expected(kind):
    if kind == "tokens":
        return np.arange(N * SEQ, dtype=np.int32).reshape(N, SEQ)
    return [bytes([i % 251]) * (i % 97) + i.to_bytes(4, "little") for i in range(N)]


SAMPLE_CHILD = textwrap.dedent("""
    import os, resource, signal, sys
    sys.path.insert(0, "tests/storage")
    from kill_points import KillPoint
    from test_fault_injection import N, SEQ, expected
    from seekax.storage import atomic, sample_writer
    kind, path, kill_at, fsize = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if fsize:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))
    kill = KillPoint(kill_at)
    hook = kill.wrap
    for mod in (atomic.os, sample_writer.os):
        mod.fsync, mod.replace = hook(os.fsync), hook(os.replace)
    data = expected(kind)
    try:
        args = dict(seq_len=SEQ) if kind == "tokens" else dict(kind="bytes")
        with sample_writer.SampleStoreWriter(path, shard_bytes=6000, overwrite=True, **args) as w:
            if kind == "tokens":
                for i in range(0, N, 70):
                    w.write(data[i:i + 70])
            else:
                w.write_many(data)
    except atomic.StorageFullError as e:
        print("FULL", e)
        sys.exit(3)
    print("acked", kill.calls)
""")


def check_sample_store(c: Counts, kind, path, acked, rng):
    want = expected(kind)

    def opened():
        return SampleStore(path)
    try:
        store = opened()
    except TYPED:
        c.lost_acknowledged_writes += acked
        return
    except Exception:  # noqa: BLE001
        c.raw_exceptions += 1
        return
    with store:
        def same(got, idx):
            if len(got) != len(idx):
                return "torn"
            ok = np.array_equal(got, want[idx]) if kind == "tokens" else got == [want[i] for i in idx]
            return "ok" if ok else "wrong"
        if len(store) != N:
            c.torn_reads += 1
        reads = [np.arange(N), np.arange(100, 350), rng.integers(0, N, size=80), np.asarray([int(rng.integers(N))])]
        for idx in reads:  # refused (a checksum failed) is right after a flip; wrong values never are
            classify(c, lambda idx=idx: store.read(idx), lambda got, idx=idx: same(got, idx))
        i = int(rng.integers(N))
        classify(c, lambda: store[i], lambda got: "ok" if (np.array_equal(got, want[i]) if kind == "tokens"
                                                           else got == want[i]) else "wrong")


def sample_store_faults(kind, tmp_path, rng, c: Counts):
    ref = run(SAMPLE_CHILD, kind, tmp_path / "ref", 0, 0)
    assert ref.returncode == 0, ref.stderr[-2000:]
    steps = int(ref.stdout.split()[-1])
    for k in sorted(set(rng.integers(1, steps + 1, size=5).tolist()) | {1, steps - 1, steps}):  # kill points
        r = run(SAMPLE_CHILD, kind, tmp_path / f"k{k}", k, 0)
        c.scenarios += 1
        if r.returncode not in (0, -signal.SIGKILL):
            c.raw_exceptions += 1
        check_sample_store(c, kind, tmp_path / f"k{k}", "acked" in r.stdout, rng)
    for limit in (2000, 9000, 30000):  # a full disk at three points of the write
        path = tmp_path / f"full{limit}"
        r = run(SAMPLE_CHILD, kind, path, 0, limit)
        c.scenarios += 1
        if r.returncode not in (0, 3):
            c.raw_exceptions += 1
        check_sample_store(c, kind, path, r.returncode == 0, rng)
        r = run(SAMPLE_CHILD, kind, path, 0, 0)  # space freed: the same call succeeds
        c.lost_acknowledged_writes += r.returncode != 0
        check_sample_store(c, kind, path, True, rng)
    names = sorted(p.name for p in (tmp_path / "ref").iterdir())
    for name in names:  # a flipped bit in every file: data, index, checksum table, manifest
        for j in range(3):
            path = tmp_path / f"flip-{name}-{j}"
            shutil.copytree(tmp_path / "ref", path)
            flip(path / name, rng)
            c.scenarios += 1
            check_sample_store(c, kind, path, False, rng)


# -- KV page store (slot files, tensorstore) --------------------------------------------------------------------
PAGES, CAP = 3, 30  # pages per put, capacity: the last 10 acknowledged puts must all be there

KV_CHILD = textwrap.dedent("""
    import os, resource, signal, sys
    import numpy as np
    sys.path.insert(0, "tests/storage")
    from kill_points import KillPoint
    from test_fault_injection import CAP, PAGES, kv_open, kv_pages, kv_tokens
    from seekax.storage import kv_tensorstore
    from seekax.storage.atomic import StorageFullError
    path, kill_at, fsize, puts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    kv = kv_open(path)
    kill = KillPoint(kill_at)
    hook = kill.wrap
    os.fsync, os.fdatasync, os.pwritev, os.write = (hook(os.fsync), hook(os.fdatasync), hook(os.pwritev),
                                                    hook(os.write))
    kv_tensorstore._value = hook(kv_tensorstore._value)  # tensorstore: between issuing a batch's page writes
    if fsize:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))
    for i in range(puts):
        try:
            kv.put_pages(kv_tokens(i), kv_pages(i))
            print("acked", i, flush=True)
        except StorageFullError:
            print("full", i, flush=True)
        if fsize and i == puts // 2:
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    kv.close()
    print("steps", kill.calls, flush=True)
""")


def kv_open(path, **kw):
    from seekax.storage.kv_store import KVPageStore

    return KVPageStore(path, page_shape=(16, 32), dtype="uint8", capacity_pages=CAP, **kw)


def kv_tokens(i):
    return np.arange(PAGES * 16) + 1000 * i


def kv_pages(i):
    return np.random.default_rng(i).integers(0, 256, size=(PAGES, 16, 32), dtype=np.uint8)


def kv_must_hold(stdout: str, killed: bool) -> list[int]:
    """The acknowledged puts the LRU policy keeps: every attempted put (acknowledged, refused for a full disk,
    or killed) first evicts the oldest put when the store is full; only acknowledged ones are added."""
    lines = [line.split() for line in stdout.splitlines() if line.startswith(("acked", "full"))]
    attempts = [(int(i), word == "acked") for word, i in lines]
    if killed:
        attempts.append((len(attempts), False))
    lru: list[int] = []
    for i, ok in attempts:
        if len(lru) == CAP // PAGES:
            lru.pop(0)
        if ok:
            lru.append(i)
    return lru


def check_kv(c: Counts, path, must, total):
    try:
        kv = kv_open(path)
    except TYPED:
        c.lost_acknowledged_writes += len(must)
        return
    except Exception:  # noqa: BLE001
        c.raw_exceptions += 1
        return
    with kv:
        for i in range(total):
            def check(res, i=i):
                n, got = res
                if n % 16 or got.shape[0] != n // 16:
                    return "torn"
                return "ok" if np.array_equal(got, kv_pages(i)[:n // 16]) else "wrong"
            verdict = classify(c, lambda i=i: kv.match_prefix(kv_tokens(i)), check)
            if i in must and (verdict != "ok" or kv.match_prefix(kv_tokens(i))[0] != PAGES * 16):
                c.lost_acknowledged_writes += 1


def kv_faults(kind, tmp_path, rng, c: Counts):
    url = (lambda name: str(tmp_path / name)) if kind == "kv-slots" else (lambda name: f"file://{tmp_path}/{name}/")
    puts = 16  # 48 pages through a 30-page store: evictions on the way
    ref = run(KV_CHILD, url("ref"), 0, 0, puts)
    assert ref.returncode == 0, ref.stderr[-2000:]
    steps = int(ref.stdout.split()[-1])
    for k in sorted(set(rng.integers(1, steps + 1, size=6).tolist()) | {steps // 2}):
        r = run(KV_CHILD, url(f"k{k}"), k, 0, puts)
        c.scenarios += 1
        if r.returncode not in (0, -signal.SIGKILL):
            c.raw_exceptions += 1
        check_kv(c, url(f"k{k}"), kv_must_hold(r.stdout, r.returncode != 0), puts)
    if kind == "kv-slots":  # the limit cuts into the preallocated slot file's writes and into the log
        for limit in (1500, 2500):
            r = run(KV_CHILD, url(f"full{limit}"), 0, limit, puts)
            c.scenarios += 1
            if r.returncode != 0:
                c.raw_exceptions += 1
            check_kv(c, url(f"full{limit}"), kv_must_hold(r.stdout, False), puts)
    else:
        r = run(KV_CHILD, url("full"), 0, 300, puts)  # no page file fits until the space is freed
        c.scenarios += 1
        if r.returncode != 0:
            c.raw_exceptions += 1
        check_kv(c, url("full"), kv_must_hold(r.stdout, False), puts)
    ref_dir = tmp_path / "ref"
    files = sorted(p for p in ref_dir.rglob("*") if p.is_file() and "meta" not in p.name and "lock" not in p.name)
    for j in range(12):  # flipped bits in the slot file and the log, or in page values and their names
        path = tmp_path / f"flip{j}"
        shutil.copytree(ref_dir, path)
        victim = path / files[j % len(files)].relative_to(ref_dir)
        if kind == "kv-tensorstore" and j % 2:  # a flipped bit in a page's name (its key or checksum)
            name = bytearray(victim.name.encode())
            pos = int(rng.integers(3, len(name)))
            name[pos] = ord("0123456789abcdef"[(int(chr(name[pos]), 16) ^ 1)]) if chr(name[pos]) in \
                "0123456789abcdef" else name[pos]
            victim.rename(victim.with_name(name.decode()))
        else:
            flip(victim, rng)
        c.scenarios += 1
        check_kv(c, url(f"flip{j}"), [], puts)


# -- checkpoints ------------------------------------------------------------------------------------------------
def checkpoint_faults(tmp_path, rng, c: Counts):
    from seekax.storage.checkpoint import TrainCheckpointer
    from test_checkpoint_faults import FULL, RETENTION, state

    def check(d, must):
        try:
            ck = TrainCheckpointer(d, max_to_keep=5)
        except Exception:  # noqa: BLE001
            c.raw_exceptions += 1
            return
        with ck:
            listed = ck.all_steps()
            c.lost_acknowledged_writes += len(set(must) - set(listed))
            for s in listed:
                m, o = state(s)

                def same(res, m=m, o=o, s=s):
                    gm, go, loader = res
                    ok = (np.array_equal(np.asarray(gm["w"]), np.asarray(m["w"])) and
                          np.array_equal(np.asarray(go["m"]), np.asarray(o["m"])) and loader.get("step") == s)
                    return "ok" if ok else "wrong"
                verdict = classify(c, lambda s=s, m=m, o=o: ck.restore(s, model_target=m, opt_target=o), same)
                if verdict == "refused" and s in must:
                    c.torn_reads += 1  # listed, acknowledged, never corrupted: it must restore
    ref = run(RETENTION, tmp_path / "ref", 0)
    assert ref.returncode == 0, ref.stderr[-2000:]
    unlinks = int(ref.stdout.split()[-1])
    for k in sorted({1, unlinks // 3, 2 * unlinks // 3}):  # kills during retention's deletion
        r = run(RETENTION, tmp_path / f"k{k}", k)
        c.scenarios += 1
        if r.returncode not in (0, -signal.SIGKILL):
            c.raw_exceptions += 1
        acked = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("acked")]
        check(tmp_path / f"k{k}", {1, max(acked)})
    r = run(FULL, tmp_path / "full")  # a full disk during two background saves
    c.scenarios += 1
    out = json.loads(r.stdout.splitlines()[-1]) if r.returncode == 0 else {}
    c.raw_exceptions += sum(1 for v in out.values() if isinstance(v, str) and v != "ok" and
                            not v.startswith("StorageFullError")) + (r.returncode != 0)
    check(tmp_path / "full", {0, 2, 4})
    steps = sorted(p for p in (tmp_path / "ref").iterdir() if p.name.isdigit())
    for j in range(8):  # flipped bits in a step's files (array data, metadata)
        path = tmp_path / f"flip{j}"
        shutil.copytree(tmp_path / "ref", path)
        files = sorted(p for p in (path / steps[-1].name).rglob("*") if p.is_file())
        flip(files[int(rng.integers(len(files)))], rng)
        c.scenarios += 1
        check(path, set())


KINDS = ["tokens", "bytes", "kv-slots", "kv-tensorstore", "checkpoint"]


@pytest.mark.parametrize("kind", KINDS)
def test_fault_injection(kind, tmp_path, rng):
    c = Counts()
    if kind in ("tokens", "bytes"):
        sample_store_faults(kind, tmp_path, rng, c)
    elif kind.startswith("kv"):
        kv_faults(kind, tmp_path, rng, c)
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        checkpoint_faults(tmp_path, rng, c)
    print(c.line(kind))
    assert c.scenarios > 10 and (c.torn_reads, c.silent_wrong_bytes, c.lost_acknowledged_writes,
                                 c.raw_exceptions) == (0, 0, 0, 0), c.line(kind)
