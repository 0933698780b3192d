"""Real multi-process loading: 2 jax processes x 4 CPU devices (jax.distributed, gloo) each read only their rows
of every global batch and assemble one global jax.Array sharded over all 8 devices."""

import socket
import subprocess
import sys
import textwrap

import numpy as np

from seekax.storage.sample_store import write_token_store

CHILD = textwrap.dedent("""
    import os, sys
    pid, port, store = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from seekax.storage.loader import Loader, LoaderConfig
    from seekax.storage.order import BatchPlan
    from seekax.storage.sample_store import SampleStore
    mesh = jax.make_mesh((8,), ("data",))
    loader = Loader(store, LoaderConfig(global_batch_size=32, seed=3, num_epochs=1, readahead=0),
                    sharding=NamedSharding(mesh, P("data")))
    assert (loader.process_index, loader.process_count) == (pid, 2)
    seen = []
    real_read = loader.store._read_valid
    loader.store._read_valid = lambda idx: seen.append(np.asarray(idx).copy()) or real_read(idx)
    seqs = SampleStore(store).read(np.arange(256))
    plan = BatchPlan(num_records=256, global_batch_size=32, seed=3, num_epochs=1)
    total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))
    for step in range(3):
        arr = next(loader)
        want = seqs[plan.batch_indices(step)]
        assert arr.shape == (32, 16) and len(arr.addressable_shards) == 4
        for sh in arr.addressable_shards:
            np.testing.assert_array_equal(np.asarray(sh.data), want[sh.index])
        assert int(total(arr)) == int(want.sum())  # a collective across both processes
    mine = set(np.concatenate([plan.batch_indices(s, process_index=pid, process_count=2) for s in range(8)]).tolist())
    assert set(np.concatenate(seen).tolist()) <= mine  # this process read only its own rows
    print("OK", pid)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_four_devices_each(tmp_path, rng):
    write_token_store(tmp_path / "s", rng.integers(0, 1000, size=(256, 16)).astype(np.int32))
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(i), port, str(tmp_path / "s")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append((p.returncode, out, err[-3000:]))
    for i, (rc, out, err) in enumerate(outs):
        assert rc == 0 and f"OK {i}" in out, err
