"""A follower: sleep until something happened, then apply, report, and judge the leader.

This module does no I/O: it yields effects.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from typing import Any

from heksher_shm._engine import policy
from heksher_shm._engine.context import Context
from heksher_shm._engine.effects import (
    Apply,
    Beat,
    Effect,
    EndTakeover,
    Housekeep,
    LeaderExited,
    LookAtLeader,
    ReadMarks,
    Report,
    RingAnswered,
    SeizeLead,
    TryTakeover,
    Wait,
)
from heksher_shm._engine.health import error_text
from heksher_shm._engine.host import LeaderSeen, Marks
from heksher_shm.exceptions import LeaderUpdateError

__all__ = ["Follower"]

logger = logging.getLogger("heksher_shm.engine")


class Follower:
    """How a follower waits, reports the leader's updates, and replaces a leader that stopped making
    progress (see :mod:`heksher_shm._engine.engine`)."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self.marks: Marks | None = None
        """The leader's update results last seen (None: not yet, or this process just led)."""
        self.taking_over = False
        """Whether this process holds the takeover lock (released by the engine if it is closed then)."""

    def wake(self) -> Generator[Effect, Any, int | None]:
        """One wake: apply, report, judge the leader, then sleep until something happens.

        Returns the term this process seized from a stuck leader, or None.
        """
        ctx = self._ctx
        yield Apply(blocking=False)  # answered at once when nothing new was published
        yield from self._report_marks()
        yield Housekeep()
        seen: LeaderSeen = yield LookAtLeader()
        now = ctx.clock.monotonic()
        deadline = yield from self._stuck_deadline(seen)
        if seen.leader is not None and not seen.gone and deadline is not None and now >= deadline:
            term = yield from self._replace(seen.leader)
            if term is not None:
                return term  # the engine leads with the seized lock
            deadline = None
        elif ctx.stuck.active and deadline is not None and now < deadline:
            ctx.stuck.resolved("it shows progress again")
        if seen.gone:
            # The leader exited and someone else took the lock before us: its ring is on the way.
            timeout = policy.SUCCESSOR_WAIT
        elif deadline is not None:
            timeout = max(0.0, deadline - now) + 0.01
        else:
            timeout = ctx.update_interval  # nobody to watch (no leader yet, or no pidfd): look again
        if seen.exit_handle is None and not seen.gone:
            timeout = min(timeout, ctx.update_interval)
        if (yield Wait(timeout, seen.exit_handle)):
            yield LeaderExited()
        return None

    def _stuck_deadline(self, seen: LeaderSeen) -> Generator[Effect, Any, float | None]:
        """When the leader counts as stuck if it shows no progress before: its promise, or a ring of
        ours it left unanswered, plus :data:`UNRESPONSIVE_AFTER`. None: no promise to judge by."""
        deadline = seen.promise + policy.UNRESPONSIVE_AFTER if seen.promise > 0 else None
        if seen.rang_at:
            if seen.progress >= seen.rang_at:
                yield RingAnswered()
            else:
                answer_by = seen.rang_at + policy.UNRESPONSIVE_AFTER
                deadline = answer_by if deadline is None else min(deadline, answer_by)
        return deadline

    def _replace(self, leader: tuple[int, float]) -> Generator[Effect, Any, int | None]:
        """Take over from a leader that holds the lock but makes no progress; the new term, or None."""
        if not (yield TryTakeover()):
            return None  # another process is replacing it; its ring will tell
        self.taking_over = True
        try:
            term = yield from self._judge_and_seize(leader)
        except Exception as e:  # a lock file that cannot be made...: keep following, say why
            logger.warning("could not replace the stuck leader: %s", error_text(e))
            term = None
        except GeneratorExit:
            self.taking_over = False  # the driver released it (it took closing_effects() first)
            raise
        yield EndTakeover()
        self.taking_over = False
        return term

    def _judge_and_seize(self, leader: tuple[int, float]) -> Generator[Effect, Any, int | None]:
        ctx = self._ctx
        # Judged under the takeover lock, again: the leader may have resumed, or been replaced.
        seen: LeaderSeen = yield LookAtLeader()
        deadline = yield from self._stuck_deadline(seen)
        now = ctx.clock.monotonic()
        if seen.leader != leader or seen.gone or deadline is None or now < deadline:
            return None
        ctx.stuck.failed(
            f"pid {leader[0]} showed no progress for {now - seen.progress:.1f} s; this process replaces it",
            leader_pid=leader[0],
        )
        term: int | None = yield SeizeLead()
        if term is None:
            return None
        now = ctx.clock.monotonic()
        # Before anyone else judges the old leader again: the segment shows progress from here on.
        yield Beat(now, now + policy.BUSY_PROMISE)
        yield RingAnswered()
        ctx.stuck.resolved("replaced")
        return term

    def _report_marks(self) -> Generator[Effect, Any, None]:
        """Report the leader's update results (seen in the segment) to this process's callbacks."""
        marks: Marks = yield ReadMarks()
        previous, self.marks = self.marks, marks
        if previous is None or marks == previous:
            return
        if marks.errors != previous.errors:
            yield Report(LeaderUpdateError(marks.message or "the leader's update failed"))
        elif marks.ok_time != previous.ok_time:
            yield Report(None)
