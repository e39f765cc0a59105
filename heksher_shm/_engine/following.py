"""The follower's side of the engine: sleep until something happened, then apply, report, judge."""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from typing import Any

from heksher_shm._engine import policy
from heksher_shm._engine.core import EngineCore
from heksher_shm._engine.effects import Apply, Effect, Report, Wait
from heksher_shm._engine.ports import Host
from heksher_shm.exceptions import LeaderUpdateError

__all__ = ["Following"]

logger = logging.getLogger("heksher_shm.engine")


class Following(EngineCore):
    """How a follower waits, reports, and replaces a leader that stopped making progress."""

    def _follow_once(self) -> Generator[Effect, Any, None]:
        """One wake of a follower: apply, report, judge the leader, then sleep until something happens."""
        host = self.host
        assert host is not None, "alone in the process, a client always leads"
        self._seized_token = 0  # a seized lock that did not lead (lost again) left a stale one
        if self.transport.generation() != self.applied_generation():
            yield Apply(blocking=False)
        yield from self._report_marks()
        self._housekeep()
        leader, exit_fd, gone = host.watch()
        now = time.monotonic()
        deadline = self._stuck_deadline(host)
        if leader is not None and not gone and deadline is not None and now >= deadline:
            if self._replace_stuck_leader(host, leader):
                return  # the run loop leads with the seized lock
            deadline = None
        elif self._stuck.active and deadline is not None and now < deadline:
            self._stuck.resolved("it shows progress again")
        fds = (host.bell_fd(),) if exit_fd is None else (host.bell_fd(), exit_fd)
        if gone:
            # The leader exited and someone else took the lock before us: its ring is on the way.
            timeout = policy.SUCCESSOR_WAIT
        elif deadline is not None:
            timeout = max(0.0, deadline - now) + 0.01
        else:
            timeout = self.update_interval  # nobody to watch (no leader yet, or no pidfd): look again
        if exit_fd is None and not gone:
            timeout = min(timeout, self.update_interval)
        fired = yield Wait(timeout, fds)
        host.drain()
        if exit_fd is not None and exit_fd in fired:
            host.leader_exited()

    def _stuck_deadline(self, host: Host) -> float | None:
        """When the leader counts as stuck if it shows no progress before: its promise, or a ring of
        ours it left unanswered, plus :data:`UNRESPONSIVE_AFTER`. None: no promise to judge by."""
        progress, promise = self.transport.liveness()
        deadline = promise + policy.UNRESPONSIVE_AFTER if promise > 0 else None
        rang = host.rang_at
        if rang:
            if progress >= rang:
                host.rang_at = 0.0  # answered
            else:
                answer_by = rang + policy.UNRESPONSIVE_AFTER
                deadline = answer_by if deadline is None else min(deadline, answer_by)
        return deadline

    def _replace_stuck_leader(self, host: Host, leader: tuple[int, float]) -> bool:
        """Take over from a leader that holds the lock but makes no progress; True once this one leads."""
        if not host.takeover.try_acquire():
            return False  # another process is replacing it; its ring will tell
        try:
            progress_before = self.transport.liveness()[0]
            # Judged under the takeover lock, again: the leader may have resumed, or been replaced.
            watched, _, gone = host.watch()
            deadline = self._stuck_deadline(host)
            if watched != leader or gone or deadline is None or time.monotonic() < deadline:
                return False
            self._stuck.failed(
                f"pid {leader[0]} showed no progress for "
                f"{time.monotonic() - progress_before:.1f} s; this process replaces it",
                leader_pid=leader[0],
            )
            if not self.lock.seize():
                return False
            # Fence the stopped leader at once: from now on it cannot publish, nor readers take what
            # it publishes anyway.
            self._seized_token = self.transport.begin_term()
            now = time.monotonic()
            # Before anyone else judges the old leader again: the segment shows progress from here on.
            self.transport.beat(now, now + policy.BUSY_PROMISE)
            host.rang_at = 0.0
            self._stuck.resolved("replaced")
            return True
        finally:
            host.takeover.release()

    def _report_marks(self) -> Generator[Effect, Any, None]:
        """Report the leader's update results (seen in the segment header) to this process's callbacks."""
        marks = self.transport.update_marks()
        previous, self._marks = self._marks, marks
        if previous is None or marks == previous:
            return
        ok_time, errors, message = marks
        if errors != previous[1]:
            yield Report(LeaderUpdateError(message or "the leader's update failed"))
        elif ok_time != previous[0]:
            yield Report(None)

    # -- leading ----------------------------------------------------------------------------------------
