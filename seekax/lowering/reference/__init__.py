"""seekax.lowering.reference."""
