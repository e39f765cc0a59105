"""The background life of every client, written once for both clients.

The engine is a generator that yields *effects* instead of doing I/O
(:mod:`heksher_shm._engine.effects`): send a request, digest an answer, take
a lock, publish a snapshot, ring the other processes, wait until woken or a
deadline passes, apply the latest snapshot, report an update's outcome. A
driver performs each effect and sends back its result: the thread client's
in a thread, the async client's in an asyncio task
(:mod:`heksher_shm._engine.drivers`), a test's against a simulated host. The
engine reads the time from a :class:`~heksher_shm._engine.host.Clock` it is
handed, and draws its jitter from a random generator it is handed, so that
the same inputs give the same effects: every interleaving of many processes
can be replayed (``tests/sim``).

Nothing here wakes up unless something happened. A client is one of:

* **follower** (:class:`~heksher_shm._engine.follower.Follower`): sleeps until
  its doorbell rings (the leader published, or answered a request), the
  leader process exits (a pidfd becomes readable), its own process asks for
  something (``set_as_main``, ``reload``), or the leader's *promise* runs out
  (below). Then it applies a new snapshot if one is out, reports the
  leader's update results to this process's callbacks, and sleeps again.
  ``get()`` itself notices a new snapshot with one shared-memory read.
* **leader** (:class:`~heksher_shm._engine.leader.Leader`, one per term):
  holds the election lock; declares every distinct declaration of the live
  processes (once per term, concurrently), queries the union of their
  settings and tracked contexts every ``update_interval`` (at once when a
  process asks for it), publishes, answers the processes' requests, and
  rings them. Between two steps it sleeps until its next update is due or its
  doorbell rings.

**Liveness: busy is not dead.** Before it sleeps, the leader writes two
words into the segment on the host-wide monotonic clock: *progress* (now)
and *promise* (when it will show progress again: its next update). While it
works (a request in flight, a long decode) its driver re-promises every
:data:`~heksher_shm._engine.policy.BEAT_INTERVAL`. A process that rings the
leader expects progress within :data:`~heksher_shm._engine.policy.UNRESPONSIVE_AFTER`
too. A leader that breaks its promise by more than that has stopped making
progress (``SIGSTOP``, a debugger, a blocked event loop): the kernel still
sees its lock, so a follower *replaces* it (one at a time, under a takeover
lock): it puts a new lock file in place of the old one and leads.

**Fencing.** Every term begins by taking a new fencing token (the term
number) in the segment, and every snapshot carries its term. A leader that
was replaced while it could not run may still publish when it resumes; its
snapshot carries an older term than the segment's, and every reader refuses
it, its own process included. Its next look at the lock makes it step down.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Generator
from typing import Any

from heksher_shm._engine.context import Context
from heksher_shm._engine.effects import Effect, EndTakeover, GiveUpLead, HostEffect, RingAll, TakeLead
from heksher_shm._engine.follower import Follower
from heksher_shm._engine.leader import Leader
from heksher_shm._engine.term import LeaderLost

__all__ = ["Engine"]

logger = logging.getLogger("heksher_shm.engine")


class Engine:
    """One client's background life: a follower until it holds the lock, then a leader for a term.

    Args:
        ctx: the configuration, the clock and the troubles it shares with its parts.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.follower = Follower(ctx)
        self.leader: Leader | None = None
        self.closed = False
        """Set by the client when it closes: the engine ends at its next wake."""
        self._lock_failed = False

    @property
    def leading(self) -> bool:
        """Whether this client leads its host now."""
        return self.leader is not None

    def run(self) -> Generator[Effect, Any, None]:
        """The whole background life of a client, until :attr:`closed` is set."""
        while not self.closed:
            term = yield from self._try_lead()
            if term is None:
                term = yield from self.follower.wake()
            if term is not None:
                yield from self._lead(term)

    def closing_effects(self) -> list[HostEffect]:
        """What the driver performs when it stops the engine between two effects (a client closed, a
        task cancelled): let go of the lock (whoever is first takes over) and of the takeover lock.
        Ask before closing the generator (closing it ends the term)."""
        effects: list[HostEffect] = []
        if self.follower.taking_over:
            effects.append(EndTakeover())
        if self.leader is not None:
            effects += [GiveUpLead(), RingAll()]
        return effects

    def _try_lead(self) -> Generator[Effect, Any, int | None]:
        try:
            term: int | None = yield TakeLead()
        except Exception:
            # An unusable lock file (replaced by a directory, another user's...):
            # keep following, keep serving; say so once.
            if not self._lock_failed:
                self._lock_failed = True
                logger.exception("cannot use the election lock; this process will not lead")
            return None
        return term

    def _lead(self, number: int) -> Generator[Effect, Any, None]:
        self.leader = Leader(self.ctx, number, lambda: self.closed)
        try:
            with contextlib.suppress(LeaderLost):
                yield from self.leader.run()
        finally:
            # Also when the driver stops the engine mid-term (it took closing_effects() first).
            self.leader = None
            self.follower.marks = None  # its own term's results are not news to report
        yield GiveUpLead()
        yield RingAll()  # the lock is free: whoever is first takes over
