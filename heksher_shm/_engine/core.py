"""The engine's state and the steps both of its roles take (the roles are mixins over it)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence

from heksher_shm._engine import policy
from heksher_shm._engine.health import Trouble, describe
from heksher_shm._engine.ports import Host, Lock, Transport, Wish, WishSource
from heksher_shm._engine.term import Term
from heksher_shm._model.snapshot import Outcome

__all__ = ["EngineCore"]

logger = logging.getLogger("heksher_shm.engine")


class EngineCore:
    """The state of one client's background loop, and the few steps both roles take (see
    :mod:`heksher_shm._engine.engine`).

    Args:
        transport: where snapshots go.
        lock: the election lock.
        source: the live processes' wishes.
        update_interval: seconds between two regular queries.
        context_features: the client's context features, used for ordering
            when the service's cannot be fetched.
        identity: (pid, create_time, PID namespace) recorded as the leader.
        errors: where the leader keeps the exceptions it reported, by id, so
            that its own process can raise the original exception.
        key: this process's key among the wishes.
        host: the other processes (None when alone: ``shared=False``).
        bell: this client's doorbell number, recorded with its identity when it leads.
        housekeeping: called now and then while awake (the client re-registers
            if its registration vanished).
        service_url: for log messages.
    """

    def __init__(
        self,
        *,
        transport: Transport,
        lock: Lock,
        source: WishSource,
        update_interval: float,
        context_features: Sequence[str],
        identity: tuple[int, float, int],
        errors: dict[str, BaseException],
        key: str = "",
        host: Host | None = None,
        bell: int = 0,
        housekeeping: Callable[[], None] | None = None,
        service_url: str = "",
    ) -> None:
        self.transport = transport
        self.lock = lock
        self.source = source
        self.update_interval = update_interval
        self.context_features = list(context_features)
        self.identity = identity
        self.errors = errors
        self.key = key
        self.host = host
        self.bell = bell
        self.housekeeping = housekeeping
        self._lock_failed = False
        self._error_ids = 0
        self.closed = False
        self.leading = False
        self.term: Term | None = None
        self.applied_generation: Callable[[], int | None] = lambda: None
        """The generation of the snapshot applied to the client's settings (None: none)."""
        self._marks: tuple[float, int, str | None] | None = None
        self._wishes: list[Wish] = []
        self._service = Trouble(logger, "the Heksher service is failing", service_url=service_url)
        self._declaring = Trouble(logger, "declaring settings fails", service_url=service_url)
        self._stuck = Trouble(logger, "the leader is not making progress")
        self._publishing = Trouble(logger, "publishing snapshots fails; the previous one stays")

    # -- the loop ---------------------------------------------------------------------------------------

    def replace_transport(self, transport: Transport) -> None:
        """Publish to and watch another file from now on (the segment file was replaced)."""
        self.transport = transport
        self._marks = None
        if self.term is not None:
            self.term.transport = transport
            self.term.published = False  # the new file has nothing yet: publish at the next wake
            self.term.generation = 0
            self.term.next_update = 0.0

    def _try_lead(self) -> bool:
        try:
            return self.lock.try_acquire()
        except Exception:
            # An unusable lock file (replaced by a directory, another user's...):
            # keep following, keep serving; say so once.
            if not self._lock_failed:
                self._lock_failed = True
                logger.exception("cannot use the election lock; this process will not lead")
            return False

    def _housekeep(self) -> None:
        """At every wake (a few cheap checks: wakes are rare, and housekeeping needs no timer)."""
        if self.housekeeping is not None:
            try:
                self.housekeeping()
            except Exception:
                logger.exception("housekeeping failed")

    # -- following --------------------------------------------------------------------------------------

    def _remember(self, exc: BaseException) -> str:
        """Keep *exc* under a new id, so this process can raise the very exception it reported.

        The id names this process: another process that finds it in a
        snapshot cannot mistake it for one of its own.
        """
        self._error_ids += 1
        key = f"{os.getpid()}.{self._error_ids}"
        self.errors[key] = exc
        self.errors.pop(f"{os.getpid()}.{self._error_ids - 100}", None)
        return key

    def _failed(self, name: str, status: int, exc: BaseException) -> Outcome:
        return Outcome(name, None, status, describe(exc), None, self._remember(exc))

    def _busy_beat(self) -> None:
        """While the leader works: progress now, more within :data:`BUSY_PROMISE`."""
        term = self.term
        if term is not None and self.leading:
            now = time.monotonic()
            term.transport.beat(now, now + policy.BUSY_PROMISE)
