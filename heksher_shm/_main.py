"""The process's live settings and its main client.

Settings register here on creation and are held weakly. The main client is
the one that declares them and feeds them rules; until one exists, settings
wait here and are handed over when a client becomes main.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from heksher_shm.setting import Setting

__all__ = ["current", "live_settings", "register", "set_main"]

logger = logging.getLogger("heksher_shm.main")


class MainClient(Protocol):
    """What this module needs from a client that becomes main."""

    _context_features: tuple[str, ...]
    _is_stub: bool

    def _setting_added(self, setting: Setting[Any]) -> None: ...


_lock = threading.RLock()
_settings: weakref.WeakSet[Setting[Any]] = weakref.WeakSet()
_main: MainClient | None = None


def register(setting: Setting[Any]) -> None:
    """Hold *setting* (weakly) and hand it to the main client, if there is one."""
    with _lock:
        _settings.add(setting)
        main = _main
    if main is not None:
        main._setting_added(setting)


def live_settings() -> list[Setting[Any]]:
    """Every live setting of the process, in creation order."""
    with _lock:
        settings = list(_settings)
    return sorted(settings, key=lambda s: s._order)


def current() -> MainClient | None:
    """The main client, if any."""
    return _main


def set_main(client: MainClient) -> list[Setting[Any]]:
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
        _main = client
        return live_settings()


def _reset_after_fork() -> None:
    """In a forked child (called by :mod:`heksher_shm._fork`): a new lock (a parent's thread may hold it)."""
    global _lock
    _lock = threading.RLock()


def clear_main(client: MainClient) -> None:
    """Forget *client* as the main client (used when it closes before becoming main for good)."""
    global _main
    with _lock:
        if _main is client:
            _main = None
