"""`pl.run_state` over a WGMMA accumulator in Mosaic GPU's CPU interpreter, so interpret mode runs a kernel's
in-place accumulation (`pl.run_state(mma)(plgpu.ACC.init(acc))`) exactly as written for the GPU.

JAX 0.11.2's interpreter (`jax._src.pallas.mosaic_gpu.interpret.jaxpr_interpret`) has no rule for run_state (a
TODO there): it binds the primitive eagerly, and the wgmma inside has no CPU lowering. On the GPU, run_state with
one accumulator means: registers initialised from a value, the body's wgmma accumulating into them, all wgmma
awaited, the registers read back. `enable()` rewrites each such run_state, before the interpreter walks a jaxpr,
into parts the interpreter runs: the body on a fresh (zeroed) accumulator under `pl.run_scoped`, read back, plus
the initial value. The interpreter's wgmma computes acc + A @ B in f32, so with one wgmma per run_state this is
bitwise what an in-place accumulation gives (x + (0 + AB) = x + AB); with more it differs only in f32 summation
order. The initial value is added in registers rather than stored into the accumulator because the race detector
keeps per-register-buffer records across CTAs while their ids restart per CTA (a JAX TODO), which reports stores
into accumulators as races. Only jaxprs holding run_state change, and those could not be interpreted before;
compiled kernels are untouched.
"""

from __future__ import annotations

from typing import Any

import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
from jax._src import api_util
from jax._src import core as jax_core
from jax._src import linear_util as lu
from jax._src.interpreters import partial_eval as pe
from jax._src.pallas.mosaic_gpu import core as gpu_core
from jax._src.pallas.mosaic_gpu import primitives as gpu_primitives
from jax._src.pallas.mosaic_gpu.interpret import jaxpr_interpret
from jax._src.state import discharge
from jax._src.state import types as state_types

_MARK = "_seekax_interprets_run_state"


def _sub(names: dict, atom):
    """`atom` renamed through `names` (literals and unnamed variables unchanged)."""
    return names.get(atom, atom) if isinstance(atom, jax_core.Var) else atom


def _as_run_scoped(eqn) -> tuple[list, dict]:
    """One run_state eqn -> (eqns doing the same through run_scoped, {ref outvar: the ref it passes through}).
    Its body's invars: refs it closes over (passed through unchanged) and exactly one initialised accumulator."""
    body = eqn.params["jaxpr"]
    accs = [i for i, v in enumerate(body.invars) if isinstance(v.aval, gpu_core.WGMMAAbstractAccumulatorRef)]
    if len(accs) != 1 or not all(eqn.params["is_initialized"]) or body.constvars:
        raise NotImplementedError(f"interpreting run_state needs exactly one initialised WGMMA accumulator and no "
                                  f"constants; got accumulators at {accs} of {len(body.invars)} operands")
    (k,) = accs
    acc = body.invars[k]
    if any(acc in e.invars and (e.primitive is not gpu_primitives.wgmma_ref_p or acc in e.invars[1:])
           for e in body.eqns):
        raise NotImplementedError("interpreting run_state: its body may only accumulate into the accumulator "
                                  "with wgmma (no reads, stores or nested uses)")
    inner = acc.aval.inner_aval                                              # [m, n] f32
    # Values the body closes over (indices, scalars) are refs inside it; it only reads them, so take them as values.
    values = [i != k and not isinstance(v.aval, state_types.AbstractRef) for i, v in enumerate(eqn.invars)]
    pure = discharge.discharge_state(body, should_discharge=values)

    def replacement(*args):
        def scoped(acc_ref):
            jax_core.eval_jaxpr(pure, [], *args[:k], acc_ref, *args[k + 1:])           # wgmma into zeros
            return acc_ref[...]                                                        # await, read back
        return [args[k] + pl.run_scoped(scoped, plgpu.ACC(inner.shape, inner.dtype))]

    in_avals = [v.aval for v in eqn.invars]
    debug = api_util.debug_info("interpret run_state", replacement, tuple(in_avals), {})
    traced, _, consts = pe.trace_to_jaxpr_dynamic(lu.wrap_init(replacement, debug_info=debug), in_avals)
    if consts or traced.constvars:
        raise NotImplementedError("interpreting run_state: its rewrite captured constants")
    rename = dict(zip(traced.invars, eqn.invars))
    rename[traced.outvars[0]] = eqn.outvars[k]
    eqns = [e.replace(invars=[_sub(rename, a) for a in e.invars], outvars=[_sub(rename, a) for a in e.outvars])
            for e in traced.eqns]
    passed = {o: i for j, (o, i) in enumerate(zip(eqn.outvars, eqn.invars)) if j != k}
    return eqns, passed


def rewrite(jaxpr) -> Any:
    """`jaxpr` with each top-level run_state over an accumulator replaced by its run_scoped form (nested jaxprs are
    rewritten when the interpreter reaches them); the same object when it holds none."""
    if not any(e.primitive is discharge.run_state_p for e in jaxpr.eqns):
        return jaxpr
    eqns, alias = [], {}
    for e in jaxpr.eqns:
        e = e.replace(invars=[_sub(alias, a) for a in e.invars])
        if e.primitive is discharge.run_state_p:
            new, passed = _as_run_scoped(e)
            eqns.extend(new)
            alias.update(passed)
        else:
            eqns.append(e)
    return jaxpr.replace(eqns=eqns, outvars=[_sub(alias, a) for a in jaxpr.outvars])


def enable() -> None:
    """Let the GPU interpreter run run_state over a WGMMA accumulator (idempotent; affects interpretation only)."""
    cls = jaxpr_interpret.JaxprInterpreter
    if getattr(cls.interpret, _MARK, False):
        return
    original = cls.interpret

    def interpret(self, jaxpr, token, *args):
        return original(self, rewrite(jaxpr), token, *args)

    setattr(interpret, _MARK, True)
    cls.interpret = interpret
