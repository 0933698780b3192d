"""seekax.schedules."""
