"""Stub clients for tests: set rules by hand, touch no network.

.. code-block:: python

    client = SyncStubHeksherClient()
    client.set_as_main()
    client[cache_size].rules = 20                                   # a plain value
    client[cache_size].rules = [Rule({"user": "alice"}, 30), Rule({}, 10)]

The ``rules`` property round-trips, so ``monkeypatch.setattr(client[s], "rules", v)``
and ``unittest.mock.patch.object`` restore the previous rules afterwards.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from unittest.mock import AsyncMock, MagicMock

from heksher_shm._model.resolve import compile_rules
from heksher_shm._process import main as _main
from heksher_shm.clients._context import AsyncMainContext, SyncMainContext
from heksher_shm.clients._defaults import ContextDefaults
from heksher_shm.setting import Setting, _ContextView, _State

__all__ = ["AsyncStubHeksherClient", "Rule", "SettingPatcher", "SyncStubHeksherClient"]

T = TypeVar("T")


@dataclass
class Rule(Generic[T]):
    """A stub rule: exact-match conditions and the value they give."""

    match_conditions: Mapping[str, str]
    value: T


@dataclass(frozen=True)
class _Saved:
    """The rules a setting had, as returned by the ``rules`` getter (to be set back)."""

    state: _State


class SettingPatcher(Generic[T]):
    """``client[setting]``: read or replace a setting's stub rules through :attr:`rules`."""

    def __init__(self, setting: Setting[T], client: _StubClient) -> None:
        self.setting = setting
        self.client = client
        self._original = setting._state

    @property
    def rules(self) -> Any:
        """The setting's current rules (opaque; assign it back to restore them)."""
        return _Saved(self.setting._state)

    @rules.deleter
    def rules(self) -> None:
        # unittest.mock.patch undoes a patch of a class-level attribute by
        # deleting it: go back to the rules this patcher first saw.
        self.setting._set_state(self._original)

    @rules.setter
    def rules(self, value: T | Collection[Rule[T]] | _Saved) -> None:
        if isinstance(value, _Saved):
            self.setting._set_state(value.state)
            return
        if (
            isinstance(value, Collection)
            and not isinstance(value, (str, bytes, Mapping))
            and value
            and all(isinstance(r, Rule) for r in value)
        ):
            rules: Collection[Rule[Any]] = value
        else:
            rules = [Rule({}, value)]
        compiled = compile_rules(
            self.setting.configurable_features,
            [(list(rule.match_conditions.items()), rule.value) for rule in rules],
        )
        self.setting._install_state(self.client, compiled)


class _StubClient(ContextDefaults):
    """What both stub clients share."""

    _is_stub = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self._context_features: tuple[str, ...] = ()

    def __getitem__(self, setting: Setting[T]) -> SettingPatcher[T]:
        return SettingPatcher(setting, self)

    def patch(self, setting: Setting[T], value: T | Collection[Rule[T]]) -> Any:
        """Set a setting's rules; returns a context manager that restores them.

        Deprecated: assign ``client[setting].rules`` instead.
        """
        warnings.warn(
            "patch() is deprecated, assign client[setting].rules instead", DeprecationWarning, stacklevel=2
        )
        patcher = self[setting]
        previous = patcher.rules
        patcher.rules = value

        @contextmanager
        def restore() -> Iterator[None]:
            try:
                yield
            finally:
                patcher.rules = previous

        return restore()

    def track_contexts(self, **context_values: Any) -> None:
        """Does nothing: stub rules are all used."""

    def _context_view(self) -> _ContextView:
        return _ContextView(self._const_defaults, tuple(self._var_defaults.items()), None, _no_warning)

    def _watch(self) -> tuple[Any, list[int]]:
        return (0, 0, 0), [0]  # stub rules never go stale

    def _refresh(self, setting: Setting[Any]) -> None:
        pass

    def _setting_added(self, setting: Setting[Any]) -> None:
        _main.declared([setting])  # nothing to declare: held weakly at once, as heksher 0.2.2's stubs do

    def _become_main(self) -> None:
        _main.declared(_main.set_main(self))

    def _replaced_as_main(self) -> None:
        pass


class SyncStubHeksherClient(SyncMainContext, _StubClient):
    """A stand-in for :class:`~heksher_shm.ThreadHeksherClient` in tests; takes and ignores any arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.reload = MagicMock()
        self.close = MagicMock()
        self.ping = MagicMock()

    def set_as_main(self) -> None:
        """Become the main client."""
        self._become_main()


class AsyncStubHeksherClient(AsyncMainContext, _StubClient):
    """A stand-in for :class:`~heksher_shm.AsyncHeksherClient` in tests; takes and ignores any arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.reload = AsyncMock()
        self.aclose = AsyncMock()
        self.close = AsyncMock()
        self.ping = AsyncMock()

    async def set_as_main(self) -> None:
        """Become the main client."""
        self._become_main()


def _no_warning(feature: str, value: str) -> None:
    """Stubs track everything: nothing to warn about."""
