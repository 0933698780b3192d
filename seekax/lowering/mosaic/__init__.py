"""seekax.lowering.mosaic."""
