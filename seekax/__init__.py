"""seekax: DeepSeek's open-sourced AI infrastructure, rebuilt for JAX.

Packages, lowest first; each may import only the packages after its arrow (tests/test_layers.py checks):
  ir         specs, tilings, schedule IR, expert placement, validation helpers   -> (none)
  schedules  pipeline schedule generators, passes, visualiser; EPLB's algorithm  -> ir
  storage    sample store, loader, checkpoints, KV-cache store, data prep        -> ir
  lowering   Mosaic GPU kernels, plain-JAX references, backend choice            -> ir
  testing    comparators, interpret mode, cross-lowering                         -> ir, lowering
  ops        public jit-able ops (FP8 GEMM, MLA decode, EP dispatch, ...)        -> ir, lowering
  layers     MLA attention, MoE, EPLB runtime, the pipelined train step          -> ir, lowering, ops, schedules
  models     whole models built from layers                                      -> the above but testing
  demo       the end-to-end demo                                                 -> the above but testing
  cli        the `seekax` command                                                -> everything
"""

__version__ = "0.1.0"
