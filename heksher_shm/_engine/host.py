"""The ports of the engine: the host it runs on, and the clock it reads.

The engine reaches the host only by yielding host effects
(:mod:`heksher_shm._engine.effects`), which a driver performs by calling one
method of a :class:`Host`. Two hosts implement it: the shared one
(:class:`heksher_shm._engine.shared.SharedHost`: the segment, the election
lock, the registry and the doorbells of the processes of a host) and the
in-process one (:class:`heksher_shm._engine.local.LocalHost`, ``shared=False``).
The deterministic simulation in the tests implements it a third time over a
simulated host.

This module does no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from heksher_shm._model import protocol as proto
from heksher_shm._model.snapshot import Ack

__all__ = ["Clock", "HeadCopy", "Host", "LeaderSeen", "Marks", "Restored", "Wish"]


class Clock(Protocol):
    """Where the engine reads the time."""

    def monotonic(self) -> float:
        """Seconds on the host-wide monotonic clock (what liveness and timers use)."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch (what the segment records for people to read)."""
        ...


@dataclass(frozen=True)
class Wish:
    """One live process's registration, as the leader needs it.

    ``declarations`` is keyed by :func:`~heksher_shm._model.protocol.declaration_digest`
    (computed once per registration, not per use). ``reload_seq`` numbers the
    process's requests; ``query_seq`` is the latest request that needs a fresh
    query (a ``reload()``), where other requests (``set_as_main``) only need
    their declarations made and a snapshot that covers them.
    """

    key: str
    declarations: Mapping[str, proto.DeclarationBody]
    tracked: Mapping[str, str | Sequence[str]]
    reload_seq: int
    query_seq: int = 0


class HeadCopy(Protocol):
    """A verified copy of a snapshot's head."""

    @property
    def generation(self) -> int: ...

    @property
    def head(self) -> bytes: ...


class LeaderSeen(NamedTuple):
    """What a follower knows of the leader at a glance."""

    leader: tuple[int, float] | None
    """(pid, start time) of the recorded leader; None when none is recorded (or unreadable)."""
    exit_handle: int | None
    """A handle that becomes readable once the leader exits (None: it cannot be watched)."""
    gone: bool
    """The leader exited lately and another process took the lock: its ring is on the way."""
    progress: float
    """When the leader last showed progress (monotonic seconds, 0.0: never)."""
    promise: float
    """When it promised to show progress again at the latest (monotonic seconds, 0.0: never)."""
    rang_at: float
    """When this process last rang the leader for something still unanswered (0.0: nothing)."""


class Marks(NamedTuple):
    """The leader's update results as the segment records them."""

    ok_time: float
    """When the last successful update was recorded (epoch seconds, 0.0: never)."""
    errors: int
    """How many failed updates were recorded (only grows)."""
    message: str | None
    """The last failure's description."""


class Restored(NamedTuple):
    """A snapshot read back from the last-known-good file."""

    head: bytes
    blobs: list[bytes]
    where: str
    """The file, for the log."""


class Host(Protocol):
    """The operations of the host the engine's effects stand for (one method per host effect)."""

    # -- the election ---------------------------------------------------------------------------------

    def take_lead(self) -> int | None:
        """Take the election lock if free and begin a term: its number (the fencing token), else None."""
        ...

    def keeps_lead(self) -> bool:
        """Whether the lock is still held and its file still in place."""
        ...

    def give_up_lead(self) -> None:
        """Release the election lock."""
        ...

    def try_takeover(self) -> bool:
        """Take the takeover lock without waiting."""
        ...

    def end_takeover(self) -> None:
        """Release the takeover lock."""
        ...

    def seize_lead(self) -> int | None:
        """Replace a stuck leader's lock file by one this process holds and begin a term: its number."""
        ...

    def announce(self) -> None:
        """Record this process as the leader."""
        ...

    # -- the leader's liveness, as followers see it -----------------------------------------------------

    def beat(self, progress: float, promise: float) -> None:
        """Store the leader's liveness words."""
        ...

    def look_at_leader(self) -> LeaderSeen:
        """The recorded leader, a handle to watch its exit, its liveness, and this process's ring."""
        ...

    def ring_answered(self) -> None:
        """Forget this process's unanswered ring."""
        ...

    def leader_exited(self) -> None:
        """The exit handle fired."""
        ...

    def read_marks(self) -> Marks:
        """The leader's update results."""
        ...

    # -- the segment ----------------------------------------------------------------------------------

    def publish(self, head: bytes, blobs: Sequence[bytes], term: int) -> int:
        """Publish a snapshot under fencing token *term*; its generation."""
        ...

    def read_head(self) -> HeadCopy | None:
        """The current snapshot's verified head, or None."""
        ...

    def read_blobs(self, generation: int, indices: Sequence[int]) -> list[bytes] | None:
        """Verified blobs of snapshot *generation*, or None if it is not current any more."""
        ...

    def keep_snapshot(self, head: bytes, blobs: Sequence[bytes]) -> None:
        """Write this snapshot into the last-known-good file, if the client has one."""
        ...

    def restore_kept(self) -> Restored | None:
        """The last-known-good file's snapshot, if there is a usable one."""
        ...

    def record_ok(self, when: float) -> None:
        """Record a successful update."""
        ...

    def record_error(self, message: str, when: float) -> None:
        """Record a failed update."""
        ...

    def count_declarations(self, ok: int, failed: int) -> None:
        """Add to the declaration counters."""
        ...

    def damage_reports(self) -> int:
        """How many times processes reported the published snapshot damaged (a counter that only
        moves: the leader compares it with what it saw last)."""
        ...

    # -- the other processes --------------------------------------------------------------------------

    def scan_wishes(self, prune: bool) -> list[Wish]:
        """Every live process's wish (the same list object while no registration changed)."""
        ...

    def ring_all(self) -> None:
        """Ring every live process's doorbell but this one's."""
        ...

    def acknowledge(self, acks: Mapping[str, Ack]) -> None:
        """Write these acknowledgements where their processes read them, and ring those processes."""
        ...

    # -- for the drivers: what Wait waits on ----------------------------------------------------------

    def bell_fd(self) -> int | None:
        """This client's doorbell descriptor (None: nobody else can ring it)."""
        ...

    def drain(self) -> None:
        """Empty the doorbell after a wake."""
        ...
