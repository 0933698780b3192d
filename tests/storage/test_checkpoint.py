"""Checkpoints: model + optimizer + loader state saved together (async), restored onto another sharding bit-exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from seekax.storage.checkpoint import TrainCheckpointer
from seekax.storage.loader import Loader, LoaderConfig
from seekax.storage.sample_store import write_token_store


def _state(rng, mesh, spec_w, spec_b):
    w = jax.device_put(jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16), NamedSharding(mesh, spec_w))
    b = jax.device_put(jnp.asarray(rng.standard_normal((32,)), jnp.float32), NamedSharding(mesh, spec_b))
    model = {"w": w, "b": b}
    count = jax.device_put(jnp.int32(7), NamedSharding(mesh, P()))
    opt = {"mu": jax.tree.map(lambda x: x * 0.5, model), "count": count}
    return model, opt


def _bits(x):
    return np.asarray(x).view(np.uint8 if np.asarray(x).dtype.itemsize == 1 else f"u{np.asarray(x).dtype.itemsize}")


def test_save_restore_other_sharding_bit_exact(tmp_path, rng):
    seqs = rng.integers(0, 1000, size=(256, 16)).astype(np.int32)
    write_token_store(tmp_path / "data", seqs)
    loader = Loader(tmp_path / "data", LoaderConfig(global_batch_size=16, seed=4))
    for _ in range(5):
        next(loader)
    mesh_a = jax.make_mesh((8,), ("data",))
    model, opt = _state(rng, mesh_a, P("data", None), P("data"))
    with TrainCheckpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:
        res = ckpt.save(5, model=model, opt_state=opt, loader_state=loader.get_state())
        assert res.saved and res.blocking_seconds >= 0
        expected_next = [next(loader) for _ in range(3)]
        ckpt.wait()
        assert ckpt.latest_step() == 5
    # a different mesh shape and partitioning at restore time
    mesh_b = jax.make_mesh((2, 4), ("x", "y"))
    target = lambda tree, specs: jax.tree.map(  # noqa: E731
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh_b, s)), tree, specs)
    model_t = target(model, {"w": P("y", "x"), "b": P(None)})
    opt_t = target(opt, {"mu": {"w": P(None, "y"), "b": P("x")}, "count": P()})
    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        m2, o2, loader_state = ckpt.restore(model_target=model_t, opt_target=opt_t)
    leaves = zip(jax.tree.leaves((m2, o2)), jax.tree.leaves((model, opt)), jax.tree.leaves((model_t, opt_t)))
    for got, want, tgt in leaves:
        assert got.sharding == tgt.sharding and got.dtype == want.dtype
        np.testing.assert_array_equal(_bits(got), _bits(want))
    resumed = Loader(tmp_path / "data", LoaderConfig(global_batch_size=16, seed=4))
    resumed.set_state(loader_state)
    for want in expected_next:
        np.testing.assert_array_equal(next(resumed), want)


def test_keeps_last_and_skips_by_interval(tmp_path, rng):
    mesh = jax.make_mesh((8,), ("data",))
    model, opt = _state(rng, mesh, P(), P())
    with TrainCheckpointer(tmp_path / "c", max_to_keep=2, save_interval_steps=2) as ckpt:
        saved = [ckpt.save(s, model=model, opt_state=opt).saved for s in range(5)]
        ckpt.wait()
        assert saved == [True, False, True, False, True]
        assert ckpt.all_steps() == [2, 4]
        with pytest.raises(ValueError, match="step=3"):
            ckpt.restore(3, model_target=model, opt_target=opt)


def test_bad_input(tmp_path, rng):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(ValueError, match="directory=.*existing file"):
        TrainCheckpointer(f)
    with TrainCheckpointer(tmp_path / "empty") as ckpt:
        with pytest.raises(ValueError, match="directory=.*at least one checkpoint"):
            ckpt.restore(model_target={}, opt_target={})
        with pytest.raises(ValueError, match="loader_state"):
            ckpt.save(0, model={"a": jnp.ones(3)}, opt_state={"b": jnp.ones(2)}, loader_state=[1])
        with pytest.raises(ValueError, match="opt_state="):
            ckpt.save(0, model={"a": jnp.ones(3)}, opt_state={})
        with pytest.raises(ValueError, match="model leaf=.str"):
            ckpt.save(0, model={"a": "weights"}, opt_state={"b": jnp.ones(3)})
        ckpt.save(0, model={"a": jnp.ones(3)}, opt_state={"b": jnp.ones(2)})
        with pytest.raises(ValueError, match="target leaf"):
            ckpt.restore(model_target={"a": np.ones(3)}, opt_target={"b": jnp.ones(2)})
