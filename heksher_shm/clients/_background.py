"""Where a client meets the engine (:mod:`heksher_shm._engine`): :class:`Background`.

Everything the clients take from the engine is built or wired here, besides
the driver's hooks, which each client's runner gives
(:mod:`heksher_shm.clients.thread_client`, :mod:`heksher_shm.clients.async_client`):

* the engine itself, over its context (the client's configuration, the
  system clock, the book of errors it reported); rebuilt when the client
  joins its host or is forked. The host it works on is the link's
  (:attr:`heksher_shm.clients._link.HostLink.host`), handed to the driver;
* the client's answer to the engine's ``Housekeep`` effect at each wake: the
  registration written or restored, the doorbell, a replaced segment file.
"""

from __future__ import annotations

import logging
import random
import time

from heksher_shm._engine.context import Context, ErrorBook
from heksher_shm._engine.engine import Engine
from heksher_shm._engine.local import LocalHost
from heksher_shm._engine.shared import SharedHost
from heksher_shm.clients._feed import SettingsFeed
from heksher_shm.clients._link import HostLink
from heksher_shm.clients._registration import RegistrationWriter

__all__ = ["Background"]

logger = logging.getLogger("heksher_shm.client")


class _SystemClock:
    """The engine's clock in a real process."""

    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)


_SYSTEM_CLOCK = _SystemClock()


class Background:
    """A client's engine, and what it asks of the client besides its driver's hooks.

    Args:
        link: where the engine's host is.
        feed: the settings a replaced segment file is reinstalled for.
        registration: this process's wishes, and their upkeep.
        errors: where the engine keeps the exceptions it reported, by id.
        service_url: the service the engine queries (for its log).
        update_interval: seconds between two regular queries.
        context_features: the client's context features.
    """

    def __init__(
        self,
        link: HostLink,
        feed: SettingsFeed,
        registration: RegistrationWriter,
        errors: ErrorBook,
        *,
        service_url: str,
        update_interval: float,
        context_features: tuple[str, ...],
    ) -> None:
        self._link = link
        self._feed = feed
        self._registration = registration
        self._errors = errors
        self._service_url = service_url
        self._update_interval = update_interval
        self.engine = self._build(context_features)
        """The engine the client's runner drives."""

    @property
    def host(self) -> LocalHost | SharedHost:
        """The host the engine's effects are performed on (the link's, as it is now)."""
        return self._link.host

    def rebuild(self, context_features: tuple[str, ...]) -> Engine:
        """A new engine for what the link holds now (it joined its host's segment, or this is a forked
        child); the runner drives the new one from its next start."""
        closed = self.engine.closed
        self.engine = self._build(context_features)
        self.engine.closed = closed
        return self.engine

    def renew_locks(self) -> None:
        """New locks for the feed and the registration: in a forked child (a thread of the parent may
        have held the old ones) and after gevent patched the process (the old ones are the kernel's, and
        a greenlet that switched while holding one would block every other greenlet)."""
        self._feed.renew_lock()
        self._registration.renew_lock()

    def _build(self, context_features: tuple[str, ...]) -> Engine:
        ctx = Context(
            update_interval=self._update_interval,
            context_features=context_features,
            shared=self._link.joined,
            clock=_SYSTEM_CLOCK,
            rng=random.Random(),
            errors=self._errors,
            service_url=self._service_url,
        )
        return Engine(ctx)

    def housekeep(self) -> bool:
        """The client's chores at each wake of its engine (the ``Housekeep`` effect): write the
        registration if settings were added, move to a replaced segment file, and put back a vanished
        doorbell or registration. Returns whether the segment file was replaced (and reopened)."""
        registration = self._registration
        registration.flush()
        if not registration.defended:
            return False
        replaced = self._link.segment_replaced()
        if replaced:
            # Between the engine's steps: the old mapping stays valid for whoever still reads it.
            self._feed.move_to(self._link.reopen())
            self._feed.reinstall_all()  # states watch the new file's generation word
        self._link.ensure_bell()
        registration.ensure_registered()
        return replaced
