"""What a process asks of whoever leads: :class:`RegistrationWriter`.

The process's registration (:mod:`heksher_shm._shm.registration`) carries its
declarations, the context values it tracks, and its request numbers; the
main client writes it, bumps the segment's registry counter, and rings the
leader. Alone (``shared=False``) the same wish is read in process
(:class:`~heksher_shm._engine.local.LocalHost`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Literal

from heksher_shm._engine.host import Wish
from heksher_shm._model.protocol import DeclarationBody
from heksher_shm._shm.identity import current_identity
from heksher_shm._shm.registration import Registration
from heksher_shm.clients._contexts import Contexts
from heksher_shm.clients._feed import SettingsFeed
from heksher_shm.clients._link import HostLink
from heksher_shm.exceptions import SegmentError

__all__ = ["RegistrationWriter", "request_numbers"]

logger = logging.getLogger("heksher_shm.client")


class _RequestNumbers:
    """This process's request numbers (``reload_seq``), shared by all its clients.

    The leader answers requests per process (one registration per process),
    so a client that becomes main after another must number its requests
    after the other's: else the answers the earlier client got would count as
    answers to the new one's requests.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.latest = 0
        """The last number given out (a new client starts its registration there: never backwards)."""

    def next(self) -> int:
        with self._lock:
            self.latest += 1
            return self.latest


request_numbers = _RequestNumbers()


class RegistrationWriter:
    """Writes this process's registration while its client is main, and rings the leader.

    Args:
        feed: the settings whose declarations are registered.
        contexts: the tracked values registered.
        link: where the registration is written (or, alone, kept in process).
        kind: the client's kind, recorded for ``heksher-shm status``.
        wake: wakes the client's background loop.
        leading: whether the client leads its host now (a leader need not ring itself).
    """

    def __init__(
        self,
        feed: SettingsFeed,
        contexts: Contexts,
        link: HostLink,
        kind: Literal["async", "thread"],
        *,
        wake: Callable[[], None],
        leading: Callable[[], bool],
    ) -> None:
        self._feed = feed
        self._contexts = contexts
        self._link = link
        self._kind = kind
        self._wake = wake
        self._leading = leading
        self.main = False
        """Whether this client is the process's main client: only it writes, defends and removes the
        process's registration."""
        self.closed = False
        """Set when the client closes: nothing is written from then on."""
        self.reload_seq = request_numbers.latest
        """The number of this process's latest request."""
        self.query_seq = 0
        """The number of its latest request that needs a fresh query (a ``reload()``)."""
        self._dirty = False
        """A setting was added since the registration was written: the background loop writes it."""
        self._registered = b""
        """What this process last wrote as its registration (empty until set_as_main writes it)."""
        # Held while the registration is computed and written, from set_as_main/reload/track_contexts
        # and from the background loop's housekeeping: the last write carries the latest wish.
        self._lock = threading.Lock()

    def wish(self) -> Wish:
        """What this process asks for now, as the engine reads it (alone in the process)."""
        declarations: dict[str, DeclarationBody] = {}
        for setting in list(self._feed.settings):
            declarations.setdefault(setting._digest, setting._declaration_body())
        tracked = self._contexts.tracked_lists()
        return Wish(self._link.key, declarations, tracked, self.reload_seq, self.query_seq)

    def request(self, query: bool = True) -> int:
        """A new request to the leader: a fresh query (``reload``), or only declarations and a covering
        snapshot (``set_as_main``, ``track_contexts``). Returns its number, to wait for."""
        self.reload_seq = request_numbers.next()
        if query:
            self.query_seq = self.reload_seq
        self.changed()
        return self.reload_seq

    def setting_added(self) -> None:
        """A setting was created: written by the background loop at its next wake (a thousand settings
        made one by one after set_as_main cost one registration write, not a thousand growing ones)."""
        self._dirty = True
        self._wake()

    def changed(self) -> None:
        """Tell whoever leads what this process wants now: write the registration, then ring."""
        parts = self._link.parts
        if parts is None:
            self._dirty = False
            self._link.local_host.touch()
        elif not self.closed:
            with self._lock:
                self._dirty = False
                identity = current_identity()
                declarations = {s._digest: s._declaration_json for s in list(self._feed.settings)}
                self._registered = parts.registry.write(
                    Registration(
                        pid=identity.pid,
                        create_time=identity.create_time,
                        pidns=identity.pidns,
                        kind=self._kind,
                        declarations=list(declarations.values()),
                        tracked=self._contexts.tracked_lists(),
                        reload_seq=self.reload_seq,
                        query_seq=self.query_seq,
                    )
                )
            # The file first, then the counter, then the bell: a leader that sees either sees the file.
            parts.segment.bump_registry_seq()
            if not self._leading():
                self._link.ring_leader()
        self._wake()

    def flush(self) -> None:
        """From the background loop: write the registration if settings were added since."""
        if self._dirty and self.main:
            self.changed()

    @property
    def defended(self) -> bool:
        """Whether this client keeps the process's registration in place (it is main, and open)."""
        return self.main and not self.closed and self._link.joined

    def ensure_registered(self) -> None:
        """Write the registration again if it vanished (a leader that wrongly judged this process dead
        may have pruned it; someone may have cleaned the folder)."""
        parts = self._link.parts
        if parts is None or not self.defended:
            return
        # Not before set_as_main has registered (it does so once the current snapshot is applied).
        # Judged under the lock: a write by another thread must not look like damage.
        with self._lock:
            intact = not self._registered or parts.registry.holds(current_identity(), self._registered)
        if not intact:
            logger.warning("this process's registration was missing or damaged; registering again")
            self.changed()

    def stop(self) -> None:
        """Another client of this process became main: the registration is the new one's now (this one
        stops writing it, defending it, and removing it on close)."""
        with self._lock:
            self.main = False
            self._registered = b""

    def withdraw(self) -> None:
        """On close (after :attr:`closed` was set): take this process's registration away (a replaced main
        client's is the new one's)."""
        parts = self._link.parts
        if parts is not None and self.main:
            try:
                parts.registry.remove()
                parts.segment.bump_registry_seq()
            except (OSError, SegmentError):
                logger.warning("could not remove this process's registration", exc_info=True)

    def renew_lock(self) -> None:
        """A new lock (see :meth:`heksher_shm.clients._background.Background.renew_locks`)."""
        self._lock = threading.Lock()
