"""The background life of every client, written once for both clients.

The loop is a generator that yields *effects* instead of doing I/O: send a
request (or a batch of them), run a piece of CPU-heavy work, wait until
woken or a deadline passes, apply the latest snapshot, report an update's
outcome. The thread client runs it in a thread, the async client in an
asyncio task; both drivers live side by side in :mod:`heksher_shm._engine.drivers`.
The declare/update logic therefore exists once.

Nothing here wakes up unless something happened. A client is one of:

* **follower**: sleeps until one of these: its doorbell rings (the leader
  updated, published or changed; see :mod:`heksher_shm._shm.bell`), the
  leader process exits (a pidfd becomes readable), its own process asks for
  something (``set_as_main``, ``reload``), or the leader's *promise* runs out
  (below). Then it applies a new snapshot if one is out, reports the
  leader's update results to this process's callbacks, and sleeps again.
  ``get()`` itself notices a new snapshot with one shared-memory read.
* **leader**: holds the election lock; declares every distinct declaration
  of the live processes (once per term, concurrently), queries the union of
  their settings and tracked contexts every ``update_interval`` (at once when
  a process asks for it), publishes, and rings the processes. Between two
  steps it sleeps until its next update is due or its bell rings.

**Liveness: busy is not dead.** Before it sleeps, the leader writes two
words into the segment on the host-wide monotonic clock: *progress* (now)
and *promise* (when it will show progress again: its next update). While it
works (a request in flight, a long decode) a helper re-promises every
:data:`BEAT_INTERVAL`. A process that rings the leader expects progress
within :data:`UNRESPONSIVE_AFTER` too. A leader that breaks its promise by
more than :data:`UNRESPONSIVE_AFTER` seconds has stopped making progress
(``SIGSTOP``, a debugger, a blocked event loop): the kernel still sees its
lock, so a follower *replaces* it (one at a time, under a takeover lock): it
puts a new lock file in place of the old one and leads. The stopped leader,
when it resumes, finds the lock file is no longer the one it holds before its
next publish and steps down. A slow service or a starved CPU never breaks a
promise by seconds, and a wall-clock step cannot (the clock is monotonic).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from heksher_shm._engine.effects import Effect
from heksher_shm._engine.following import Following
from heksher_shm._engine.leading import Leading
from heksher_shm._engine.term import LeaderLost

__all__ = ["Engine"]


class Engine(Following, Leading):
    """One client's background loop: a follower until it holds the lock, then a leader (see the
    module docstring). Constructed as :class:`~heksher_shm._engine.core.EngineCore`."""

    def run(self) -> Generator[Effect, Any, None]:
        """The whole background life of a client, until :attr:`closed` is set."""
        while not self.closed:
            if self._try_lead():
                try:
                    yield from self._lead()
                except LeaderLost:
                    pass
                finally:
                    self.leading = False
                    self.term = None
                    self._marks = None
                    if self.lock.held:
                        self.lock.release()
                    if self.host is not None:
                        self.host.ring(self.source.bells)  # the lock is free: whoever is first takes over
                continue
            yield from self._follow_once()
