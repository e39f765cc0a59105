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
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar
from unittest.mock import AsyncMock, MagicMock

from heksher_shm._model.resolve import compile_rules
from heksher_shm._process import main as _main
from heksher_shm._process.main import LiveSetting
from heksher_shm.clients._contexts import Contexts
from heksher_shm.setting import Setting, _ContextView, _State

__all__ = ["AsyncStubHeksherClient", "Rule", "SettingPatcher", "SyncStubHeksherClient"]

T = TypeVar("T")
S = TypeVar("S", bound="SyncStubHeksherClient")
A = TypeVar("A", bound="AsyncStubHeksherClient")

_STUB_GENERATION = 0
"""The one generation of stub rules: their states are current for it, and it is all that is ever
published, so stub rules never go stale."""


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
        self.setting._install_state(self.client._feed, compiled, None, _STUB_GENERATION)


class _StubFeed:
    """What feeds a stub client's settings (``heksher_shm.setting._Feed``): rules set by hand, never stale."""

    published: Sequence[int] = (_STUB_GENERATION,)

    def __init__(self, contexts: Contexts) -> None:
        self._contexts = contexts

    def context_view(self) -> _ContextView:
        return self._contexts.view()

    def refresh(self, setting: Setting[Any]) -> None:
        pass  # never called: stub rules never go stale


class _StubClient:
    """What both stub clients share."""

    _is_stub = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._context_features: tuple[str, ...] = ()
        self._contexts = Contexts(tracking=False)
        self._feed = _StubFeed(self._contexts)

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

    def set_defaults(self, **kwargs: str | ContextVar[str]) -> None:
        """Set default context feature values: a string, or a :class:`~contextvars.ContextVar` read per call.

        Raises:
            ValueError: a feature already has a default.
            TypeError: a value is neither a string nor a context variable.
        """
        self._contexts.add_defaults(kwargs, self._context_features)

    def track_contexts(self, **context_values: Any) -> None:
        """Does nothing: stub rules are all used."""

    # -- for the integrations (heksher_shm.openfeature), as on the real clients --------------------------

    def _context_view(self) -> _ContextView:
        return self._contexts.view()

    @property
    def _defaults_version(self) -> int:
        return self._contexts.version

    def _feeds(self, setting: Setting[Any]) -> bool:
        return setting._state.feed is self._feed

    def _snapshot_source(self) -> None:
        return None  # stub rules live in the settings, not in a snapshot

    # -- becoming main (heksher_shm._process.main.MainClient) ------------------------------------------------

    def _setting_added(self, setting: LiveSetting) -> None:
        _main.declared([setting])  # nothing to declare: held weakly at once, as heksher 0.2.2's stubs do

    def _become_main(self) -> None:
        _main.declared(_main.set_main(self))

    def _replaced_as_main(self) -> None:
        pass


class SyncStubHeksherClient(_StubClient):
    """A stand-in for :class:`~heksher_shm.ThreadHeksherClient` in tests; takes and ignores any arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.reload = MagicMock()
        self.close = MagicMock()
        self.ping = MagicMock()

    def __enter__(self: S) -> S:
        # ``with client:`` makes the client main on entry and closes it on exit.
        self.set_as_main()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def set_as_main(self) -> None:
        """Become the main client."""
        self._become_main()


class AsyncStubHeksherClient(_StubClient):
    """A stand-in for :class:`~heksher_shm.AsyncHeksherClient` in tests; takes and ignores any arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.reload = AsyncMock()
        self.aclose = AsyncMock()
        self.close = AsyncMock()
        self.ping = AsyncMock()

    async def __aenter__(self: A) -> A:
        # ``async with client:`` makes the client main on entry and closes it on exit.
        await self.set_as_main()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def set_as_main(self) -> None:
        """Become the main client."""
        self._become_main()
