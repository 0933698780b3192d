"""seekax.storage."""
