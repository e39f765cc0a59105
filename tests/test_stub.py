"""Stub clients: rules set by hand, no network."""

from __future__ import annotations

import gc
import weakref
from contextvars import ContextVar
from unittest.mock import AsyncMock, MagicMock, patch

import pytest

import heksher_shm as heksher
from heksher_shm.clients.stub import AsyncStubHeksherClient, Rule, SyncStubHeksherClient


def test_sync_stub_values() -> None:
    setting = heksher.Setting("stubbed", int, ["user", "theme"], default_value=1)
    with SyncStubHeksherClient("ignored", 1, ["whatever"], anything=True) as client:
        assert setting.get(user="a", theme="b") == 1
        client[setting].rules = 5
        assert setting.get(user="a", theme="b") == 5
        client[setting].rules = [Rule({"user": "alice"}, 10), Rule({"theme": "dark"}, 20), Rule({}, 0)]
        assert setting.get(user="alice", theme="light") == 10
        assert setting.get(user="alice", theme="dark") == 20
        assert setting.get(user="bob", theme="light") == 0
        assert isinstance(client.reload, MagicMock)
        assert isinstance(client.ping, MagicMock)
    client.close.assert_called_once()


def test_stub_restores_with_monkeypatch(monkeypatch: pytest.MonkeyPatch) -> None:
    setting = heksher.Setting("patched", str, ["user"], default_value="default")
    client = SyncStubHeksherClient()
    client.set_as_main()
    client[setting].rules = "original"
    with monkeypatch.context() as m:
        m.setattr(client[setting], "rules", "patched")
        assert setting.get(user="x") == "patched"
    assert setting.get(user="x") == "original"


def test_stub_restores_with_mock_patch() -> None:
    setting = heksher.Setting("mocked", str, ["user"], default_value="default")
    client = SyncStubHeksherClient()
    client.set_as_main()
    with patch.object(client[setting], "rules", "patched"):
        assert setting.get(user="x") == "patched"
    assert setting.get(user="x") == "default"


def test_stub_patch_is_deprecated() -> None:
    setting = heksher.Setting("old_patch", int, ["user"], default_value=1)
    client = SyncStubHeksherClient()
    client.set_as_main()
    with pytest.warns(DeprecationWarning, match="rules"), client.patch(setting, 3):
        assert setting.get(user="a") == 3
    assert setting.get(user="a") == 1


def test_stub_defaults() -> None:
    setting = heksher.Setting("stub_defaults", int, ["user", "theme"], default_value=0)
    user: ContextVar[str] = ContextVar("user")
    client = SyncStubHeksherClient()
    client.set_as_main()
    client.set_defaults(theme="dark", user=user)
    client[setting].rules = [Rule({"theme": "dark", "user": "alice"}, 7)]
    token = user.set("alice")
    try:
        assert setting.get() == 7
    finally:
        user.reset(token)
    with pytest.raises(ValueError):
        client.set_defaults(theme="light")


async def test_async_stub() -> None:
    setting = heksher.Setting("async_stubbed", int, ["user"], default_value=1)
    async with AsyncStubHeksherClient() as client:
        client[setting].rules = [Rule({"user": "alice"}, 2)]
        assert setting.get(user="alice") == 2
        assert setting.get(user="bob") == 1
        await client.reload()
        assert isinstance(client.reload, AsyncMock)
    client.aclose.assert_awaited_once()


def test_stub_main_holds_settings_weakly() -> None:
    """A stub declares nothing, so it holds nothing, as heksher 0.2.2's stubs: a test's settings do not
    pile up in the process."""
    before = weakref.ref(heksher.Setting("stub_before", int, ["user"], 0))
    SyncStubHeksherClient().set_as_main()
    after = weakref.ref(heksher.Setting("stub_after", int, ["user"], 0))
    gc.collect()
    assert before() is None
    assert after() is None
