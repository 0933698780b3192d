"""Pipeline schedule generators (GPipe, 1F1B, ZB1P, interleaved 1F1B, DualPipe, DualPipeV), their passes and
visualisation, and EPLB expert placement. Pure Python/numpy; depends only on seekax.ir."""

from seekax.schedules.dualpipe import dualpipe as dualpipe
from seekax.schedules.dualpipev import dualpipev as dualpipev
from seekax.schedules.eplb import rebalance_experts as rebalance_experts
from seekax.schedules.eplb import rebalance_experts_tuple as rebalance_experts_tuple
from seekax.schedules.passes import add_p2p as add_p2p
from seekax.schedules.passes import split_all_backward as split_all_backward
from seekax.schedules.registry import GENERATORS as GENERATORS
from seekax.schedules.registry import make_schedule as make_schedule
