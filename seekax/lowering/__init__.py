"""How specs become code: Mosaic GPU kernels (`mosaic/`), plain-JAX oracles (`reference/`),
schedule lowering to shard_map, EP collectives, and IR inspection."""
