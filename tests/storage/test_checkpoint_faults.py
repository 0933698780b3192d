"""Checkpoint faults: a kill during retention's deletion never leaves a listed step that cannot be restored; a
save failing on a full disk is reported once and poisons nothing; a loader state orbax cannot write is refused
at the call. The children run a real TrainCheckpointer (jax on CPU) and are killed or limited for real."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from seekax.storage.checkpoint import TRASH, CorruptCheckpointError, TrainCheckpointer

ROOT = Path(__file__).resolve().parents[2]


def state(step):
    """The arrays of `step`: every step's values differ, so a restore shows which step it read."""
    return {"w": jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64) + step}, {"m": jnp.full((64, 64), step)}


def run_child(code, *args):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})


# Saves steps 0 and 1, then 2 with max_to_keep=2 (so step 0 is deleted), SIGKILLed at the k-th file unlink of
# that deletion (wherever it happens: orbax's thread, or the checkpointer's purge).
RETENTION = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, "tests/storage")
    from test_checkpoint_faults import state
    from seekax.storage.checkpoint import TrainCheckpointer
    d, kill_at = sys.argv[1], int(sys.argv[2])
    ck = TrainCheckpointer(d, max_to_keep=2)
    for s in (0, 1):
        m, o = state(s)
        ck.save(s, model=m, opt_state=o, loader_state={"step": s})
        ck.wait()
        print("acked", s, flush=True)
    calls, real = [0], os.unlink
    def unlink(*a, **k):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    os.unlink = unlink
    m, o = state(2)
    ck.save(2, model=m, opt_state=o, loader_state={"step": 2})
    ck.wait()
    print("acked", 2, flush=True)
    print("unlinks", calls[0], flush=True)
""")


def check_listed_steps_restore(d, must_list):
    """Every listed step restores to its own values, and the steps in `must_list` are listed."""
    with TrainCheckpointer(d, max_to_keep=2) as ck:
        listed = ck.all_steps()
        for s in listed:
            m, o = state(s)
            got_m, got_o, loader = ck.restore(s, model_target=m, opt_target=o)
            np.testing.assert_array_equal(np.asarray(got_m["w"]), np.asarray(m["w"]))
            np.testing.assert_array_equal(np.asarray(got_o["m"]), np.asarray(o["m"]))
            assert loader == {"step": s}
    assert set(must_list) <= set(listed), (listed, must_list)
    assert not (Path(d) / TRASH).exists() or not list((Path(d) / TRASH).iterdir())  # purged


def test_kill_during_retention_deletion(tmp_path):
    full = run_child(RETENTION, tmp_path / "ref", 0)
    assert full.returncode == 0, full.stderr[-3000:]
    unlinks = int(full.stdout.split()[-1])
    assert unlinks >= 3
    for k in (2, unlinks // 2):
        d = tmp_path / f"k{k}"
        r = run_child(RETENTION, d, k)
        assert r.returncode == -9, (k, r.returncode, r.stderr[-3000:])
        acked = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("acked")]
        check_listed_steps_restore(d, {1, max(acked)})  # step 1 is kept; so is the newest acknowledged


# Step 0 saved; the file size limit makes step 1's background writes fail; the space is freed; then restore,
# wait, save and close must each do their job (the failure reported once, as StorageFullError).
FULL = textwrap.dedent("""
    import json, resource, signal, sys, time
    sys.path.insert(0, "tests/storage")
    from test_checkpoint_faults import state
    from seekax.storage.atomic import StorageFullError
    from seekax.storage.checkpoint import TrainCheckpointer
    out = {}
    def attempt(name, fn):
        try:
            fn()
            out[name] = "ok"
        except StorageFullError as e:
            out[name] = "StorageFullError: " + str(e)[:200]
        except Exception as e:
            out[name] = f"{type(e).__name__}: {str(e)[:200]}"
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    ck = TrainCheckpointer(sys.argv[1], max_to_keep=5)
    m0, o0 = state(0)
    ck.save(0, model=m0, opt_state=o0, loader_state={"step": 0})
    ck.wait()
    def fail_in_background(step):
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        m, o = state(step)
        ck.save(step, model=m, opt_state=o, loader_state={"step": step})
        while ck._manager.is_saving_in_progress():
            time.sleep(0.05)
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space is freed
    fail_in_background(1)
    attempt("restore_after_failure", lambda: ck.restore(0, model_target=m0, opt_target=o0))
    attempt("wait_reports", ck.wait)
    attempt("wait_again", ck.wait)
    m2, o2 = state(2)
    attempt("save_2", lambda: (ck.save(2, model=m2, opt_state=o2, loader_state={"step": 2}), ck.wait()))
    fail_in_background(3)
    m4, o4 = state(4)
    attempt("save_4_reports", lambda: ck.save(4, model=m4, opt_state=o4, loader_state={"step": 4}))
    attempt("save_4_again", lambda: (ck.save(4, model=m4, opt_state=o4, loader_state={"step": 4}), ck.wait()))
    attempt("restore_4", lambda: ck.restore(4, model_target=m4, opt_target=o4))
    out["steps"] = ck.all_steps()
    attempt("close", ck.close)
    print(json.dumps(out))
""")


def test_failed_save_reported_once_then_everything_works(tmp_path):
    r = run_child(FULL, tmp_path / "c")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["restore_after_failure"] == "ok", out
    assert out["wait_reports"].startswith("StorageFullError: [Errno 28] checkpoint step 1"), out
    assert "no space left" in out["wait_reports"], out
    assert out["wait_again"] == "ok" and out["save_2"] == "ok", out
    assert out["save_4_reports"].startswith("StorageFullError: [Errno 28] checkpoint step 3"), out
    assert out["save_4_again"] == out["restore_4"] == out["close"] == "ok", out
    assert out["steps"] == [0, 2, 4]
    assert not list((tmp_path / "c").glob("*tmp*"))  # the failed steps' partial files are gone
    check_listed_steps_restore(tmp_path / "c", [0, 2, 4])


def test_unserialisable_loader_state_refused_at_the_call(tmp_path):
    m, o = state(0)
    with TrainCheckpointer(tmp_path / "c") as ck:
        for bad in ({"step": np.int64(3)}, {"rng": np.zeros(2)}, {"x": float("nan")}, {"s": {1, 2}}):
            with pytest.raises(ValueError, match="loader_state=.*JSON-serialisable"):
                ck.save(0, model=m, opt_state=o, loader_state=bad)
        assert ck.all_steps() == [] and not list((tmp_path / "c").glob("0*"))  # no work was started
        ck.save(0, model=m, opt_state=o, loader_state={"step": 3})
        ck.wait()
        assert ck.restore(model_target=m, opt_target=o)[2] == {"step": 3}


def test_flipped_bit_in_a_step_is_refused_at_restore(tmp_path, rng):
    with TrainCheckpointer(tmp_path / "c", max_to_keep=3) as ck:
        for s in (0, 1):
            m, o = state(s)
            ck.save(s, model=m, opt_state=o, loader_state={"step": s})
        ck.wait()
    files = sorted((p for p in (tmp_path / "c" / "1").rglob("*") if p.is_file() and p.stat().st_size > 4096),
                   key=lambda p: p.stat().st_size)
    victim = files[-1]  # the largest file: array data
    data = bytearray(victim.read_bytes())
    data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
    victim.write_bytes(bytes(data))
    with TrainCheckpointer(tmp_path / "c", max_to_keep=3) as ck:
        m, o = state(1)
        with pytest.raises(CorruptCheckpointError, match=f"checkpoint step 1: .*{victim.name} fails its checksum"):
            ck.restore(1, model_target=m, opt_target=o)
    check_listed_steps_restore_only(tmp_path / "c", [0])


def check_listed_steps_restore_only(d, steps):
    with TrainCheckpointer(d, max_to_keep=3) as ck:
        for s in steps:
            m, o = state(s)
            got_m, _, _ = ck.restore(s, model_target=m, opt_target=o)
            np.testing.assert_array_equal(np.asarray(got_m["w"]), np.asarray(m["w"]))


def test_manifest_write_failure_reported_once_step_still_restores(tmp_path, monkeypatch):
    import seekax.storage.checkpoint as checkpoint_module
    from seekax.storage.atomic import StorageFullError

    def full(step_dir):
        raise StorageFullError(28, "no space left while writing the manifest")
    m, o = state(0)
    with TrainCheckpointer(tmp_path / "c") as ck:
        monkeypatch.setattr(checkpoint_module, "write_manifest", full)
        ck.save(0, model=m, opt_state=o, loader_state={"step": 0})
        got, _, _ = ck.restore(0, model_target=m, opt_target=o)  # committed: restores (unchecked)
        np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(m["w"]))
        with pytest.raises(StorageFullError, match="manifest"):
            ck.wait()
        ck.wait()  # once
