"""seekax: DeepSeek's open-sourced AI infrastructure, rebuilt for JAX.

Layers (dependency direction, checked by tests/test_layers.py):
  ir        what to compute (specs, tilings, schedule IR, expert placement); depends on nothing of ours
  schedules pipeline schedules and EPLB            -> ir
  lowering  Pallas/Mosaic GPU kernels, XLA refs    -> ir
  storage   samples, checkpoints, KV cache, prep   -> ir
  runtime   jit-able ops, layers, model, CLI       -> everything
"""

__version__ = "0.1.0"
