"""jit-able ops and layers a model author imports, the tiny model, and the CLI.

Exports load lazily (`seekax.runtime.fp8_linear` imports `seekax.runtime.fp8` on first use), so importing
the CLI does not import jax before `seekax demo` has set up its host devices.
"""

_EXPORTS = {
    "seekax.runtime.matmul": ("matmul_nt",),
    "seekax.runtime.fp8": ("quantize_fp8", "dequantize_fp8", "fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous",
                           "m_grouped_fp8_gemm_nt_masked", "k_grouped_fp8_gemm_tn_contiguous", "fp8_linear"),
    "seekax.runtime.mla": ("mla_decode", "mla_metadata"),
    "seekax.runtime.mla_attention": ("MlaConfig", "PagedLatentCache", "init_mla_params", "mla_attention"),
    "seekax.runtime.ep": ("dispatch_layout", "ep_dispatch", "ep_combine"),
    "seekax.runtime.moe": ("MoeConfig", "init_moe_params", "moe_layer", "moe_reference"),
    "seekax.runtime.eplb_runtime": ("LoadWindow", "MigrationPlan", "rebalance", "migrate_expert_weights"),
    "seekax.runtime.replica_routing": ("route_to_replicas",),
    "seekax.runtime.pipeline_step": ("pipeline_train_step", "pipeline_value_and_grad", "make_pipeline_train_step"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'seekax.runtime' has no attribute {name!r}")
