"""Whole models built from seekax's layers. `tiny`: the demo's small DeepSeek-V3-style model."""
