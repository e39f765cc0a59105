"""The process's live settings and its main client.

Settings register here on creation. The main client is the one that declares
them and feeds them rules; until one exists, settings wait here and are
handed over when a client becomes main.

As in ``heksher`` 0.2.2, a new setting is held *strongly* until it has been
declared, so a script may create settings in a loop without keeping them and
they are still declared; after that it is held weakly, and a setting nobody
keeps is garbage collected and no longer updated. This module is the only
owner of those strong references: the main client calls :func:`declared`
for the settings whose declaration the leader has settled (the outcome is in
a snapshot the client applied), and clients keep settings weakly.

This module sits below :mod:`heksher_shm.setting` and never imports it: what
it needs of a setting and of a client is spelled out as protocols
(:class:`LiveSetting`, :class:`MainClient`), and the clients, which know
settings, narrow what it hands back.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable
from typing import Protocol

__all__ = [
    "LiveSetting",
    "MainClient",
    "current",
    "declared",
    "live_settings",
    "register",
    "reset",
    "set_main",
    "undeclared",
]

logger = logging.getLogger("heksher_shm.main")


class LiveSetting(Protocol):
    """What this module needs from a setting (a :class:`heksher_shm.Setting`): its place in creation
    order. Settings are kept by identity."""

    @property
    def _order(self) -> int: ...


class MainClient(Protocol):
    """What this module needs from a client that becomes main."""

    _context_features: tuple[str, ...]
    _is_stub: bool

    def _setting_added(self, setting: LiveSetting) -> None: ...

    def _replaced_as_main(self) -> None: ...


_lock = threading.RLock()
_settings: weakref.WeakSet[LiveSetting] = weakref.WeakSet()
_undeclared: set[LiveSetting] = set()
"""The strong references: settings whose declaration is not settled yet."""
_main: MainClient | None = None


def register(setting: LiveSetting) -> None:
    """Hold *setting* (strongly until :func:`declared`) and hand it to the main client, if there is one."""
    with _lock:
        _settings.add(setting)
        _undeclared.add(setting)
        main = _main
    if main is not None:
        main._setting_added(setting)


def undeclared() -> list[LiveSetting]:
    """The settings still held strongly, waiting for their declaration to be settled."""
    with _lock:
        return list(_undeclared)


def declared(settings: Iterable[LiveSetting]) -> None:
    """Stop holding *settings* strongly: their declarations are settled (succeeded, or failed for good).

    The main client calls this after applying a snapshot whose head holds
    the leader's outcome for their declarations. From then on a setting
    lives only as long as the application keeps it. Settings not held
    strongly (any more) are ignored.
    """
    with _lock:
        _undeclared.difference_update(settings)


def live_settings() -> list[LiveSetting]:
    """Every live setting of the process, in creation order."""
    with _lock:
        settings = list(_settings)
    return sorted(settings, key=lambda s: s._order)


def current() -> MainClient | None:
    """The main client, if any."""
    return _main


def set_main(client: MainClient) -> list[LiveSetting]:
    """Make *client* the main client; returns the live settings it now serves.

    Raises:
        RuntimeError: the previous main client (a real one) has other context features.
    """
    global _main
    with _lock:
        previous = _main
        if previous is not None and previous is not client:
            if (
                not previous._is_stub
                and not client._is_stub
                and previous._context_features != client._context_features
            ):
                raise RuntimeError(
                    "new main heksher client has different context features, "
                    f"previous: {list(previous._context_features)}, new: {list(client._context_features)}"
                )
            logger.warning("switching main heksher clients! this is NOT recommended (unless this is a test)")
            previous._replaced_as_main()
        _main = client
        return live_settings()


def reset() -> None:
    """Forget the main client and every setting: a fresh process's state, for tests and doc examples."""
    global _main
    with _lock:
        _main = None
        _settings.clear()
        _undeclared.clear()


def _reset_after_fork() -> None:
    """In a forked child (called by :mod:`heksher_shm._process.fork`): a new lock (a parent's thread
    may hold it)."""
    global _lock
    _lock = threading.RLock()
