"""The numbers the engine works by (quoted in docs/shared-cache.rst, which checks them)."""

from __future__ import annotations

__all__ = [
    "BEAT_INTERVAL",
    "BUSY_PROMISE",
    "DECLARE_ATTEMPTS",
    "DECLARE_CONCURRENCY",
    "DECLARE_RETRY_PAUSE",
    "SUCCESSOR_WAIT",
    "UNRESPONSIVE_AFTER",
    "VERIFY_INTERVAL",
]

VERIFY_INTERVAL = 2.0
"""Least seconds between a leader's checks that the segment still holds what it published (made when
it is awake anyway: at an update, or when rung)."""

BEAT_INTERVAL = 0.5
"""Seconds between a busy leader's re-promises (a request in flight, a long decode)."""

BUSY_PROMISE = 2 * BEAT_INTERVAL
"""How far ahead a busy leader promises its next sign of progress."""

UNRESPONSIVE_AFTER = 5.0
"""Seconds a leader may overrun its promise (or leave a ring unanswered) before it counts as stuck."""

SUCCESSOR_WAIT = 0.5
"""Seconds a follower waits for the new leader's ring after the leader exited and another process took
the lock, before it looks again (only in that moment)."""

DECLARE_CONCURRENCY = 12
"""Declarations in flight at once."""

DECLARE_ATTEMPTS = 3
"""Tries of one declaration in one run when the service answers 5xx or not at all (the service's
concurrent-declaration race answers 500, and a retry gets ``uptodate``)."""

DECLARE_RETRY_PAUSE = 0.2
"""Seconds (at most, jittered) between two tries of a declaration in one run."""
