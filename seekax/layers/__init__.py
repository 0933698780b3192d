"""Model building blocks over seekax's ops: MLA attention with a paged latent cache, the MoE layer,
EPLB's runtime side (load window, rebalance, weight migration), and the pipelined train step."""

from seekax.layers.eplb import LoadWindow as LoadWindow
from seekax.layers.eplb import MigrationPlan as MigrationPlan
from seekax.layers.eplb import migrate_expert_weights as migrate_expert_weights
from seekax.layers.eplb import rebalance as rebalance
from seekax.layers.mla import MlaConfig as MlaConfig
from seekax.layers.mla import PagedLatentCache as PagedLatentCache
from seekax.layers.mla import init_mla_params as init_mla_params
from seekax.layers.mla import mla_attention as mla_attention
from seekax.layers.moe import MoeConfig as MoeConfig
from seekax.layers.moe import init_moe_params as init_moe_params
from seekax.layers.moe import moe_layer as moe_layer
from seekax.layers.moe import moe_reference as moe_reference
from seekax.layers.pipeline import Stage as Stage
from seekax.layers.pipeline import SubStep as SubStep
from seekax.layers.pipeline import make_pipeline_train_step as make_pipeline_train_step
from seekax.layers.pipeline import make_pipeline_value_and_grad as make_pipeline_value_and_grad
from seekax.layers.pipeline import pipeline_train_step as pipeline_train_step
from seekax.layers.pipeline import pipeline_value_and_grad as pipeline_value_and_grad

__all__ = ["LoadWindow", "MigrationPlan", "MlaConfig", "MoeConfig", "PagedLatentCache", "Stage", "SubStep",
           "init_mla_params", "init_moe_params", "make_pipeline_train_step", "make_pipeline_value_and_grad",
           "migrate_expert_weights", "mla_attention", "moe_layer", "moe_reference", "pipeline_train_step",
           "pipeline_value_and_grad", "rebalance"]
