"""Evidence helpers shared by tests and benchmarks: comparators, interpret mode, cross-lowering."""

from seekax.testing.compare import assert_close as assert_close
from seekax.testing.compare import calc_diff as calc_diff
from seekax.testing.compare import poison as poison
from seekax.testing.compare import rel_err as rel_err
from seekax.testing.kernels import cross_lower as cross_lower
from seekax.testing.kernels import interpret_mode as interpret_mode
from seekax.testing.kernels import seed_from as seed_from

__all__ = ["assert_close", "calc_diff", "cross_lower", "interpret_mode", "poison", "rel_err", "seed_from"]
