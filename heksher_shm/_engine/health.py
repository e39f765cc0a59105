"""Failure policy: how long to wait after a failure, and how to say so in the log.

Two small pieces the engine uses for every kind of failure (queries,
declarations, an unresponsive leader, a damaged segment):

* :func:`backoff_delay`: the wait before the next attempt after *n* failures
  in a row: 0.5 s doubling, with "equal jitter" (half the step, plus a
  random part up to the other half), until the step reaches the update
  interval; from then on, between one and 1.25 update intervals. Full jitter
  would let an unlucky client retry at once, which is exactly what an
  overloaded service must not see; equal jitter still spreads a fleet's
  retries over half of each step. A persistent failure therefore costs at
  most one attempt per step, and once it lasts, fewer attempts than polling
  at the update interval would: a failing service never gets more load from
  a host than a healthy one.
* :class:`Trouble`: one warning when a state begins (naming what failed and
  where), one when it ends (how long it lasted, how many failures), and a
  summary every :data:`SUMMARY_INTERVAL` seconds while it lasts. Full
  tracebacks go to DEBUG, so a long outage costs a few lines a minute, not a
  traceback per attempt.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

__all__ = [
    "DESYNC_SPREAD",
    "DESYNC_WAVES",
    "FIRST_DELAY",
    "STEADY_SPREAD",
    "SUMMARY_INTERVAL",
    "Trouble",
    "backoff_delay",
    "error_text",
    "update_delay",
]

FIRST_DELAY = 0.5
"""Seconds to wait after the first failure; each further failure doubles it, up to the update interval."""

STEADY_SPREAD = 0.25
"""Once the step reached the update interval, each wait is the interval plus up to this fraction of it."""

SUMMARY_INTERVAL = 60.0
"""Seconds between two summaries of a trouble that lasts."""


def backoff_delay(failures: int, cap: float, rng: random.Random) -> float:
    """Seconds to wait after *failures* failures in a row (>= 1); *cap* is the update interval."""
    step = FIRST_DELAY * 2.0 ** min(max(failures, 1) - 1, 30)
    if step < cap:
        return step / 2 + rng.uniform(0.0, step / 2)
    return cap + rng.uniform(0.0, cap * STEADY_SPREAD)


class Trouble:
    """A state worth an operator's attention (the service failing, say), logged once per change.

    Args:
        logger: where to log.
        what: a short noun phrase for the messages: ``"the Heksher service is failing"``.
        now: the monotonic clock that times it.
        level: the level of the lines an operator sees (begins, summaries, ends).
        extra: fields added to every record (the service URL, the segment...).
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        now: Callable[[], float],
        level: int = logging.WARNING,
        **extra: Any,
    ) -> None:
        self._logger = logger
        self._now = now
        self._level = level
        self._what = what
        self._extra = extra
        self._since: float | None = None
        self._count = 0
        self._summarised_at = 0.0
        self._summarised_count = 0
        self.last: str | None = None
        """The description of the latest failure (``None`` while all is well)."""

    @property
    def active(self) -> bool:
        """Whether the trouble is going on."""
        return self._since is not None

    def failed(self, error: BaseException | str, **extra: Any) -> None:
        """Record one failure: a warning if the trouble starts, a summary now and then, else DEBUG."""
        now = self._now()
        text = error if isinstance(error, str) else error_text(error)
        self.last = text
        fields = {**self._extra, **extra, "error": text}
        exc_info = error if isinstance(error, BaseException) else None
        self._count += 1
        if self._since is None:
            self._since = self._summarised_at = now
            self._summarised_count = 0
            self._logger.log(self._level, "%s: %s", self._what, text, extra=fields)
            self._logger.debug("%s: details", self._what, exc_info=exc_info, extra=fields)
            return
        self._logger.debug("%s (again): %s", self._what, text, exc_info=exc_info, extra=fields)
        if now - self._summarised_at >= SUMMARY_INTERVAL:
            recent = self._count - self._summarised_count
            self._logger.log(
                self._level,
                "%s for %.0f s now (%d failures in the last %.0f s); latest: %s",
                self._what,
                now - self._since,
                recent,
                now - self._summarised_at,
                text,
                extra={**fields, "failures": self._count, "recent_failures": recent},
            )
            self._summarised_at = now
            self._summarised_count = self._count

    def resolved(self, how: str = "recovered") -> None:
        """The trouble is over (if it was going on): one warning saying how long it lasted."""
        if self._since is None:
            return
        lasted = self._now() - self._since
        self._logger.log(
            self._level,
            "%s no more: %s after %.1f s and %d failures",
            self._what,
            how,
            lasted,
            self._count,
            extra={**self._extra, "duration": lasted, "failures": self._count},
        )
        self._since = None
        self._count = 0
        self.last = None


def error_text(exc: BaseException) -> str:
    """``"TypeName: message"`` (the type alone when the message is empty)."""
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


DESYNC_SPREAD = 0.75
"""After a term's first successful update, and after the first success that ends a run of failures, the
next :data:`DESYNC_WAVES` updates each wait the interval times a factor drawn uniformly from
``1 ± DESYNC_SPREAD``; every other wait is the interval itself. Hosts that started together (a fleet's
deploy) or came back together (the end of an outage) all query at once that time; the draws spread
their next queries over 1.5 intervals, and the sum of three of them further (a few hosts in step also
end up more than an interval apart), so they do not stay in lockstep; on average they query as often
as they would without it."""

DESYNC_WAVES = 3
"""How many waits in a row are drawn (see :data:`DESYNC_SPREAD`): the spread's requirement is met within
three intervals."""


def update_delay(interval: float, rng: random.Random, desync: bool) -> float:
    """Seconds from a successful update to the next one (see :data:`DESYNC_SPREAD`)."""
    if not desync:
        return interval
    return interval * rng.uniform(1.0 - DESYNC_SPREAD, 1.0 + DESYNC_SPREAD)
