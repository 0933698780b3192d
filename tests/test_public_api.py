"""Every name the packages export resolves (the lazy runtime exports included)."""

import importlib

import pytest


@pytest.mark.parametrize("package", ["seekax.ir", "seekax.schedules", "seekax.storage", "seekax.runtime"])
def test_exports_resolve(package):
    mod = importlib.import_module(package)
    names = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
    for name in names + list(getattr(mod, "_LAZY", {})):
        assert getattr(mod, name) is not None, f"{package}.{name}"
    with pytest.raises(AttributeError):
        getattr(mod, "no_such_name")
