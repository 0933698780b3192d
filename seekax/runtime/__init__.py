"""jit-able ops and layers a model author imports, the tiny model, and the CLI."""
