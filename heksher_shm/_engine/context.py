"""What every part of one client's engine shares: its settings, its clock, its log of troubles.

This module does no I/O.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

from heksher_shm._engine.health import Trouble, error_text
from heksher_shm._engine.host import Clock
from heksher_shm._model.snapshot import Outcome

__all__ = ["Context", "ErrorBook"]

logger = logging.getLogger("heksher_shm.engine")


class ErrorBook:
    """The exceptions this process's leader reported, by id, so its own process can raise the very one.

    An id names the process (its pid): another process that finds it in the
    segment cannot mistake it for one of its own. The last :data:`KEPT`
    are kept.
    """

    KEPT = 100

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._count = 0
        self._errors: dict[str, BaseException] = {}

    def remember(self, exc: BaseException) -> str:
        """Keep *exc*; its id."""
        self._count += 1
        key = f"{self._pid}.{self._count}"
        self._errors[key] = exc
        self._errors.pop(f"{self._pid}.{self._count - self.KEPT}", None)
        return key

    def get(self, key: str) -> BaseException | None:
        """The exception kept under *key*, if it is one of this process's."""
        return self._errors.get(key)


class Context:
    """One client's engine: its configuration, its ports, and its troubles (logged once per change).

    Args:
        update_interval: seconds between two regular queries.
        context_features: the client's context features, used for ordering
            when the service's cannot be fetched.
        shared: whether other processes share the host (rings are sent, and a
            leader never waits for its own process's ``modification_lock``).
        clock: the time.
        rng: the randomness of backoffs and jitters (seeded in a simulation).
        errors: where the leader keeps the exceptions it reported.
        service_url: for log messages.
    """

    def __init__(
        self,
        *,
        update_interval: float,
        context_features: Sequence[str],
        shared: bool,
        clock: Clock,
        rng: random.Random,
        errors: ErrorBook,
        service_url: str = "",
    ) -> None:
        self.update_interval = update_interval
        self.context_features = list(context_features)
        self.shared = shared
        self.clock = clock
        self.rng = rng
        self.errors = errors
        now = clock.monotonic
        self.service = Trouble(logger, "the Heksher service is failing", now, service_url=service_url)
        self.declaring = Trouble(logger, "declaring settings fails", now, service_url=service_url)
        self.stuck = Trouble(logger, "the leader is not making progress", now)
        self.publishing = Trouble(logger, "publishing snapshots fails; the previous one stays", now)

    def failed(self, name: str, status: int, exc: BaseException) -> Outcome:
        """The outcome of a declaration that failed with *exc* (kept, for its own process to raise)."""
        return Outcome(name, None, status, error_text(exc), None, self.errors.remember(exc))
