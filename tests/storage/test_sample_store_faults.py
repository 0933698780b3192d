"""Fault injection: a writer SIGKILLed at random points, a full disk (RLIMIT_FSIZE). Each case: seconds."""

import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from seekax.storage.sample_store import MANIFEST, CorruptStoreError, IncompleteStoreError, SampleStore

N, SEQ = 2000, 32

# The child writes a store of N x SEQ int32 (value = row * SEQ + col) in small shards. With KILL_AT=k it SIGKILLs
# itself at the k-th durable step (fsync or rename), i.e. exactly between two steps of the publish protocol.
CHILD = textwrap.dedent("""
    import os, signal, sys, resource
    import numpy as np
    kill_at, fsize = int(sys.argv[2]), int(sys.argv[3])
    if fsize:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    from seekax.storage import atomic, sample_store
    sys.path.insert(0, %r)
    from kill_points import KillPoint
    kill = KillPoint(kill_at)
    hook = kill.wrap
    for mod in (atomic.os, sample_store.os):
        mod.fsync, mod.replace = hook(os.fsync), hook(os.replace)
    data = np.arange(%d * %d, dtype=np.int32).reshape(%d, %d)
    try:
        with sample_store.SampleStoreWriter(sys.argv[1], seq_len=%d, shard_bytes=%d * 4 * 300,
                                            overwrite=True) as w:
            for i in range(0, len(data), 100):
                w.write(data[i:i + 100])
    except atomic.StorageFullError as e:
        print("FULL:", e)
        sys.exit(3)
    print("steps", kill.calls)
""") % (str(pathlib.Path(__file__).resolve().parent), N, SEQ, N, SEQ, SEQ, SEQ)


def _run_child(path, kill_at=0, fsize=0):
    return subprocess.run([sys.executable, "-c", CHILD, str(path), str(kill_at), str(fsize)],
                          capture_output=True, text=True, timeout=60)


def _check_whole_or_refused(path):
    """Either the store refuses to open (incomplete/torn, naming why) or it is whole and correct."""
    try:
        store = SampleStore(path)
    except (IncompleteStoreError, CorruptStoreError) as e:
        return str(e)
    assert store.verify() == []
    np.testing.assert_array_equal(store.read(np.arange(N)), np.arange(N * SEQ, dtype=np.int32).reshape(N, SEQ))
    return None


def test_writer_killed_at_every_step_kind(tmp_path, rng):
    full = _run_child(tmp_path / "ref")
    assert full.returncode == 0, full.stderr
    steps = int(full.stdout.split()[-1])  # fsyncs + renames of one complete write
    assert _check_whole_or_refused(tmp_path / "ref") is None
    kill_points = sorted(set(rng.integers(1, steps + 1, size=5).tolist()) | {steps - 1, steps})
    for k in kill_points:
        path = tmp_path / f"k{k}"
        r = _run_child(path, kill_at=k)
        assert r.returncode == -signal.SIGKILL, (k, r.returncode, r.stderr)
        reason = _check_whole_or_refused(path)
        # the manifest's rename is among the last steps: before it the store must read as incomplete
        if not (path / MANIFEST).exists():
            assert reason and "incomplete" in reason, (k, reason)


def test_writer_killed_at_random_times(tmp_path, rng):
    for i in range(3):
        path = tmp_path / f"t{i}"
        p = subprocess.Popen([sys.executable, "-c", CHILD, str(path), "0", "0"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(float(rng.uniform(0.1, 0.4)))  # the child needs ~0.2-0.4 s in all
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        if path.exists():
            _check_whole_or_refused(path)


def test_full_disk_clear_error_no_manifest(tmp_path):
    r = _run_child(tmp_path / "full", fsize=20_000)  # RLIMIT_FSIZE is per file; shards are ~38 KB
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    assert "no space left" in r.stdout and "nothing was published" in r.stdout
    assert not (tmp_path / "full" / MANIFEST).exists()
    assert not [p for p in (tmp_path / "full").iterdir() if ".tmp-" in p.name]
    with pytest.raises(IncompleteStoreError):
        SampleStore(tmp_path / "full")
