"""Pipeline schedule generators (GPipe, 1F1B, ZB1P, interleaved 1F1B, DualPipe, DualPipeV), their passes and
visualisation, and EPLB expert placement. Pure Python/numpy; depends only on seekax.ir.

Generators by name: `make_schedule("dualpipev", 4, 10)` (kind, ranks, micro-batches) (or import the generator from its
module, e.g. `seekax.schedules.dualpipev.dualpipev`); no export shares a submodule's name."""

from seekax.schedules.eplb import rebalance_experts as rebalance_experts
from seekax.schedules.eplb import rebalance_experts_tuple as rebalance_experts_tuple
from seekax.schedules.passes import add_p2p as add_p2p
from seekax.schedules.passes import split_all_backward as split_all_backward
from seekax.schedules.registry import GENERATORS as GENERATORS
from seekax.schedules.registry import make_schedule as make_schedule

__all__ = ["GENERATORS", "add_p2p", "make_schedule", "rebalance_experts", "rebalance_experts_tuple",
           "split_all_backward"]
