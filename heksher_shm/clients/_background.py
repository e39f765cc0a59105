"""Where a client meets the engine (:mod:`heksher_shm._engine`): :class:`Background`.

Everything the clients take from the engine is built or wired here, besides
the driver's hooks, which each client's runner gives
(:mod:`heksher_shm.clients.thread_client`, :mod:`heksher_shm.clients.async_client`):

* the engine itself, over what the client's link holds: the in-process
  transport, lock and wish, or the host's segment, election lock, registry
  and doorbells; rebuilt when the client joins its host or is forked;
* what the engine asks of the client between effects: the generation its
  settings reflect (it applies a newer one), and housekeeping at each wake
  (the registration written or restored, the doorbell, a replaced segment
  file).
"""

from __future__ import annotations

import logging
import os

from heksher_shm._engine.engine import Engine
from heksher_shm._engine.local import LocalLock
from heksher_shm._engine.shared import RegistrySource
from heksher_shm._shm.identity import current_identity
from heksher_shm.clients._feed import SettingsFeed
from heksher_shm.clients._link import HostLink
from heksher_shm.clients._registration import RegistrationWriter

__all__ = ["Background"]

logger = logging.getLogger("heksher_shm.client")


class Background:
    """A client's engine, and what it asks of the client besides its driver's hooks.

    Args:
        link: where the engine publishes and watches.
        feed: the settings whose applied generation the engine compares.
        registration: this process's wishes, and their upkeep.
        errors: where the engine keeps the exceptions it reported, by id.
        service_url: the service the engine queries (for its log).
        update_interval: seconds between two regular queries.
    """

    def __init__(
        self,
        link: HostLink,
        feed: SettingsFeed,
        registration: RegistrationWriter,
        errors: dict[str, BaseException],
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

    def rebuild(self, context_features: tuple[str, ...]) -> Engine:
        """A new engine over what the link holds now (it joined its host's segment, or this is a forked
        child); the runner drives the new one from its next start."""
        closed = self.engine.closed
        self.engine = self._build(context_features)
        self.engine.closed = closed
        return self.engine

    def _build(self, context_features: tuple[str, ...]) -> Engine:
        link = self._link
        parts, neighbours = link.parts, link.neighbours
        if parts is None or neighbours is None:
            engine = Engine(
                transport=link.transport,
                lock=LocalLock(),
                source=self._registration.local_source,
                update_interval=self._update_interval,
                context_features=context_features,
                identity=(os.getpid(), 0.0, 0),
                errors=self._errors,
                housekeeping=self._registration.flush,
                service_url=self._service_url,
            )
        else:
            identity = current_identity()
            engine = Engine(
                transport=parts.segment,
                lock=parts.lock,
                source=RegistrySource(parts.registry, parts.segment),
                update_interval=self._update_interval,
                context_features=context_features,
                identity=(identity.pid, identity.create_time, identity.pidns),
                errors=self._errors,
                key=link.key,
                host=neighbours,
                bell=neighbours.bell_number,
                housekeeping=self.housekeep,
                service_url=self._service_url,
            )
        feed = self._feed
        engine.applied_generation = lambda: feed.applied
        return engine

    def housekeep(self) -> None:
        """At each wake of a joined client's engine: write the registration if settings were added,
        move to a replaced segment file, and put back a vanished doorbell or registration."""
        registration = self._registration
        registration.flush()
        if not registration.defended:
            return
        if self._link.segment_replaced():
            # Between the engine's steps: the old mapping stays valid for whoever still reads it.
            segment = self._link.reopen()
            self.engine.replace_transport(segment)
            source = self.engine.source
            if isinstance(source, RegistrySource):
                source.replace_segment(segment)
            self._feed.move_to(segment)
            self._feed.reinstall_all()  # states watch the new file's generation word
        self._link.ensure_bell()
        registration.ensure_registered()
