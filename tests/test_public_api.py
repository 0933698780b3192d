"""The public names: each export is the documented kind, stays that kind, and never shares a submodule's name."""

import importlib
import inspect
import pkgutil

import pytest

# package -> {exported name: kind}; kind is "function", "class", or "namedtuple" (a class too).
PUBLIC = {
    "seekax.ops": {
        "matmul_nt": "function", "quantize_fp8": "function", "dequantize_fp8": "function",
        "fp8_gemm_nt": "function", "m_grouped_fp8_gemm_nt_contiguous": "function",
        "m_grouped_fp8_gemm_nt_masked": "function", "k_grouped_fp8_gemm_tn_contiguous": "function",
        "fp8_linear": "function", "grouped_fp8_linear": "function", "mla_decode": "function",
        "mla_decode_fp8": "function",
        "mla_decode_sparse": "function", "mla_decode_sparse_fp8": "function", "mla_metadata": "function",
        "MlaMetadata": "class", "dispatch_layout": "function", "ep_dispatch": "function",
        "ep_combine": "function", "Dispatched": "class", "DispatchHandle": "class",
        "route_to_replicas": "function",
    },
    "seekax.layers": {
        "MlaConfig": "class", "PagedLatentCache": "class", "init_mla_params": "function",
        "mla_attention": "function", "MoeConfig": "class", "init_moe_params": "function",
        "moe_layer": "function", "moe_reference": "function", "LoadWindow": "class", "MigrationPlan": "class",
        "rebalance": "function", "migrate_expert_weights": "function", "pipeline_train_step": "function",
        "pipeline_value_and_grad": "function", "make_pipeline_train_step": "function",
        "make_pipeline_value_and_grad": "function", "Stage": "class", "SubStep": "class",
    },
}
OTHER_PACKAGES = ["seekax.ir", "seekax.schedules", "seekax.storage", "seekax.testing"]


def _exported(mod) -> list[str]:
    """__all__ where the package declares it, else its public non-module attributes."""
    if hasattr(mod, "__all__"):
        return list(mod.__all__)
    return [n for n in dir(mod) if not n.startswith("_") and not inspect.ismodule(getattr(mod, n))]


def _kind_ok(obj, kind: str) -> bool:
    if kind == "class":
        return inspect.isclass(obj)
    # jax.custom_vjp and functools wrappers are callables that are not plain functions.
    return callable(obj) and not inspect.isclass(obj) and not inspect.ismodule(obj)


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_exports_are_the_documented_kind(package):
    mod = importlib.import_module(package)
    assert sorted(mod.__all__) == sorted(PUBLIC[package]), "__all__ and the documented exports differ"
    for name, kind in PUBLIC[package].items():
        obj = getattr(mod, name)
        assert _kind_ok(obj, kind), f"{package}.{name} is {type(obj).__name__}, documented as a {kind}"


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_exports_stay_what_they_are_after_submodules_load(package):
    mod = importlib.import_module(package)
    before = {name: getattr(mod, name) for name in mod.__all__}
    for info in pkgutil.iter_modules(mod.__path__):
        importlib.import_module(f"{package}.{info.name}")
    for name, obj in before.items():
        assert getattr(mod, name) is obj, f"{package}.{name} changed after importing the submodules"
    for name, kind in PUBLIC[package].items():
        assert _kind_ok(getattr(mod, name), kind)


@pytest.mark.parametrize("package", sorted(PUBLIC) + OTHER_PACKAGES)
def test_no_export_shares_a_submodule_name(package):
    mod = importlib.import_module(package)
    submodules = {info.name for info in pkgutil.iter_modules(mod.__path__)}
    names = set(_exported(mod))
    assert not (names & submodules), f"{package} exports names that are also submodules: {names & submodules}"


@pytest.mark.parametrize("package", sorted(PUBLIC) + OTHER_PACKAGES)
def test_exports_resolve(package):
    mod = importlib.import_module(package)
    for name in _exported(mod) + list(getattr(mod, "_LAZY", {})):
        assert not inspect.ismodule(getattr(mod, name)), f"{package}.{name} is a module"
    with pytest.raises(AttributeError):
        getattr(mod, "no_such_name")  # noqa: B009 - the lookup itself is under test


def test_the_kind_check_can_fail():
    import seekax.layers.mla as mla_module
    assert not _kind_ok(mla_module, "function")
    assert not _kind_ok(int, "function")
    assert not _kind_ok(len, "class")
