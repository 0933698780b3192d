"""`pl.run_state` over a WGMMA accumulator in the CPU interpreter (`lowering/mosaic/interpret_run_state.py`): the
in-place accumulation kernels write for the GPU (the MLA decode kernel's P V) runs unchanged when interpreted."""

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
import pytest

from seekax.lowering.mosaic import interpret_run_state
from seekax.lowering.mosaic.pipeline_common import swizzled
from seekax.testing import assert_close, cross_lower, interpret_mode

STEPS = 3


def _kernel(a_ref, b_ref, c_ref, out_ref, a_smem, b_smem, bar):
    """out = 2 c + sum_s A_s B_s: the accumulator seeded from a value, then one in-place wgmma per step, with B's
    slot chosen by a traced index (run_state closes over a scalar and two shared-memory refs, inside a loop)."""
    plgpu.copy_gmem_to_smem(a_ref, a_smem, bar.at[0])
    plgpu.copy_gmem_to_smem(b_ref, b_smem, bar.at[1])
    plgpu.barrier_wait(bar.at[0])
    plgpu.barrier_wait(bar.at[1])
    acc = plgpu.load(c_ref, layout=plgpu.Layout.WGMMA, optimized=False) * 2.0

    def step(s, acc):
        return pl.run_state(lambda r: plgpu.wgmma(r, a_smem.at[s], b_smem.at[s]))(plgpu.ACC.init(acc))

    out_ref[...] = jax.lax.fori_loop(0, STEPS, step, acc)


def _build():
    interpret_run_state.enable()
    tiles = swizzled(jnp.bfloat16, 64)
    return plgpu.kernel(
        _kernel, out_type=jax.ShapeDtypeStruct((64, 64), jnp.float32),
        scratch_types=[plgpu.SMEM((STEPS, 64, 64), jnp.bfloat16, transforms=tiles),
                       plgpu.SMEM((STEPS, 64, 64), jnp.bfloat16, transforms=tiles),
                       plgpu.Barrier(num_barriers=2)])


def test_run_state_accumulates_in_place(rng):
    a = jnp.asarray(rng.standard_normal((STEPS, 64, 64)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((STEPS, 64, 64)), jnp.bfloat16)
    c = jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)
    with interpret_mode(detect_races=True):
        out = _build()(a, b, c).block_until_ready()
    ref = 2 * np.asarray(c, np.float64) + np.einsum("smk,skn->mn", np.asarray(a, np.float64), np.asarray(b, np.float64))
    assert_close(out, ref, rtol=1e-5, atol=1e-4, name="out")          # f32 accumulation of exact bf16 products


def test_enable_is_idempotent_and_leaves_lowering_alone():
    interpret_run_state.enable()
    patched = interpret_run_state.jaxpr_interpret.JaxprInterpreter.interpret
    interpret_run_state.enable()
    assert interpret_run_state.jaxpr_interpret.JaxprInterpreter.interpret is patched     # wrapped once
    s = jax.ShapeDtypeStruct
    (report,) = cross_lower(_build(), s((STEPS, 64, 64), jnp.bfloat16), s((STEPS, 64, 64), jnp.bfloat16),
                            s((64, 64), jnp.float32)).reports
    assert report.wgmma == ("m64n64k16.f32.bf16.bf16",) and report.tma


def _two_accumulators(a_smem):
    zero = plgpu.layout_cast(jnp.zeros((64, 64), jnp.float32), plgpu.Layout.WGMMA)

    def both(refs):
        plgpu.wgmma(refs[0], a_smem, a_smem)
        plgpu.wgmma(refs[1], a_smem, a_smem)
    x, y = pl.run_state(both)((plgpu.ACC.init(zero), plgpu.ACC.init(zero)))
    return x + y


def _reads_its_accumulator(a_smem):
    zero = plgpu.layout_cast(jnp.zeros((64, 64), jnp.float32), plgpu.Layout.WGMMA)

    def read_then_mma(r):
        _ = r[...]                                   # a read of the accumulator inside the body
        plgpu.wgmma(r, a_smem, a_smem)
    return pl.run_state(read_then_mma)(plgpu.ACC.init(zero))


@pytest.mark.parametrize("use, match", [(_two_accumulators, "exactly one"),
                                        (_reads_its_accumulator, "only accumulate")])
def test_unsupported_run_state_is_refused(rng, use, match):
    """The rewrite covers one accumulator that the body only accumulates into; anything else raises
    NotImplementedError when interpreted instead of computing something else."""
    def kernel(a_ref, out_ref, a_smem, bar):
        plgpu.copy_gmem_to_smem(a_ref, a_smem, bar.at[0])
        plgpu.barrier_wait(bar.at[0])
        out_ref[...] = use(a_smem)

    interpret_run_state.enable()
    f = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((64, 64), jnp.float32),
                     scratch_types=[plgpu.SMEM((64, 64), jnp.bfloat16, transforms=swizzled(jnp.bfloat16, 64)),
                                    plgpu.Barrier(num_barriers=1)])
    with pytest.raises(NotImplementedError, match=match), interpret_mode(detect_races=False):
        f(jnp.asarray(rng.standard_normal((64, 64)), jnp.bfloat16)).block_until_ready()
