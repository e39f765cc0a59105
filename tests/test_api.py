"""The public surface: exports complete, documented, and where heksher 0.2.2 users look for them."""

from __future__ import annotations

import importlib
import inspect

import pytest

import heksher_shm

PUBLIC_MODULES = [
    "heksher_shm",
    "heksher_shm.clients",
    "heksher_shm.clients.async_client",
    "heksher_shm.clients.thread_client",
    "heksher_shm.clients.stub",
    "heksher_shm.exceptions",
    "heksher_shm.setting",
    "heksher_shm.setting_types",
    "heksher_shm.setting_type",
    "heksher_shm.status",
    "heksher_shm.testing",
    "heksher_shm.openfeature",
    "heksher_shm.metrics",
]


def test_top_level_exports() -> None:
    assert set(heksher_shm.__all__) == {
        "AsyncHeksherClient",
        "ThreadHeksherClient",
        "Setting",
        "TRACK_ALL",
        "SettingType",
        "HeksherEnum",
        "HeksherFlags",
        "HeksherSequence",
        "HeksherMapping",
        "__version__",
    }
    for name in heksher_shm.__all__:
        assert hasattr(heksher_shm, name), name


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_exports_exist_and_are_documented(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert module.__doc__, f"{module_name} has no docstring"
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{module_name} has no __all__"
    for name in exported:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"{module_name}.{name} has no docstring"


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_no_public_name_left_out_of_all(module_name: str) -> None:
    module = importlib.import_module(module_name)
    defined_here = {
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", None) == module_name
    }
    assert defined_here <= set(module.__all__), defined_here - set(module.__all__)


def test_heksher_0_2_2_import_paths() -> None:
    from heksher_shm.clients.async_client import AsyncHeksherClient
    from heksher_shm.clients.stub import AsyncStubHeksherClient, Rule, SyncStubHeksherClient
    from heksher_shm.clients.thread_client import ThreadHeksherClient
    from heksher_shm.exceptions import NoMatchError
    from heksher_shm.setting import Setting
    from heksher_shm.setting_type import HeksherEnum, setting_type

    assert AsyncHeksherClient is heksher_shm.AsyncHeksherClient
    assert ThreadHeksherClient is heksher_shm.ThreadHeksherClient
    assert Setting is heksher_shm.Setting
    assert HeksherEnum is heksher_shm.HeksherEnum
    assert issubclass(NoMatchError, Exception)
    assert callable(setting_type)
    assert {AsyncStubHeksherClient, SyncStubHeksherClient, Rule}
