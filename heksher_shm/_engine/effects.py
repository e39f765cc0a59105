"""The effects the engine yields, and that a driver performs.

The engine does no I/O (see :mod:`heksher_shm._engine.engine`): it yields an
effect and is sent back its result, or has its error thrown in. There are
three kinds:

* **service** effects: :class:`Call` and :class:`Calls` send HTTP requests,
  :class:`Digest` turns a query's answer into a snapshot, :class:`Compute`
  runs other CPU work (encoding a head);
* **client** effects, answered by the process's client: :class:`Apply` (the
  latest snapshot into the process's settings), :class:`Report` (the update
  callbacks), :class:`Housekeep`, and :class:`Wait`;
* **host** effects, one per operation on the host's shared files and
  processes (the election lock, the segment, the registry, the doorbells).
  Each is performed by calling one method of the :class:`~heksher_shm._engine.host.Host`
  the driver was given: its :meth:`HostEffect.perform`.

An effect with ``busy=True`` is slow work of a leader: while the driver
performs it, it keeps promising progress in the segment (every
:data:`~heksher_shm._engine.policy.BEAT_INTERVAL`), so that a leader waiting on
a slow service is never taken for a stuck one.

This module does no I/O.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from heksher_shm._model.snapshot import Ack

if TYPE_CHECKING:
    from heksher_shm._engine.host import Host

__all__ = [
    "Acknowledge",
    "Announce",
    "Apply",
    "Beat",
    "Call",
    "Calls",
    "Compute",
    "CountDeclarations",
    "DamageReports",
    "Digest",
    "Effect",
    "EndTakeover",
    "GiveUpLead",
    "HostEffect",
    "Housekeep",
    "KeepSnapshot",
    "KeepsLead",
    "LeaderExited",
    "LookAtLeader",
    "Publish",
    "ReadBlobs",
    "ReadHead",
    "ReadMarks",
    "RecordError",
    "RecordOk",
    "Report",
    "RestoreKept",
    "RingAll",
    "RingAnswered",
    "ScanWishes",
    "SeizeLead",
    "TakeLead",
    "TryTakeover",
    "Wait",
]


# -- the service ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """Send an HTTP request; the driver sends back the ``httpx.Response`` or throws its error."""

    method: str
    path: str
    params: Mapping[str, str] | None = None
    content: bytes | None = None
    headers: Mapping[str, str] | None = None
    busy: bool = False


@dataclass(frozen=True)
class Calls:
    """Send several requests, at most *limit* at a time over one connection pool.

    The driver sends back a list with, for each call in order, its
    ``httpx.Response`` or the exception it raised.
    """

    calls: Sequence[Call]
    limit: int
    busy: bool = False


@dataclass(frozen=True)
class Compute:
    """Run ``fn()``, pure CPU work (encoding a head), and send back its result (or throw its error).

    The asyncio driver runs it in a worker thread.
    """

    fn: Callable[[], Any]
    busy: bool = False


@dataclass(frozen=True)
class Digest:
    """Turn a query's answer (an ``httpx.Response`` with status 200) into snapshot entries and blobs.

    CPU-heavy for a big answer: the asyncio driver runs it in a worker thread.
    The driver sends back a :class:`~heksher_shm._engine.answers.Fresh` (or
    throws :class:`~heksher_shm.exceptions.HeksherProtocolError`).
    """

    response: Any
    queried: float
    """When the answer came (the engine's monotonic clock)."""
    busy: bool = False


# -- the client ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wait:
    """Sleep until woken or *timeout* seconds passed (``None``: until woken).

    What wakes it: this process (a setting added, ``reload()``, ``close()``),
    this client's doorbell (another process rang), or, when *leader_exit* is
    given, that handle (from :class:`LookAtLeader`) becoming readable: the
    leader process exited. The driver sends back whether *leader_exit* fired,
    having drained the doorbell.
    """

    timeout: float | None
    leader_exit: int | None = None


@dataclass(frozen=True)
class Apply:
    """Apply the latest published snapshot to this process's settings, under ``modification_lock``.

    Not *blocking*: skip it when ``modification_lock`` is taken (the next
    wake, or the next ``get()``, applies it), so that a process holding its
    lock never holds back the host's leader. With *report*, then report the
    update's outcome *error* (as :class:`Report`). Only after both does the
    driver wake this process's waiters (``set_as_main``, ``reload``), so that
    they return after the callbacks ran, as with heksher 0.2.2.
    """

    blocking: bool
    report: bool = False
    error: BaseException | None = None


@dataclass(frozen=True)
class Report:
    """Call ``on_update_ok()`` (``error`` is None) or ``on_update_error(error)``."""

    error: BaseException | None


@dataclass(frozen=True)
class Housekeep:
    """The client's chores at a wake: write its registration if settings were added, restore it and its
    doorbell if they vanished, move to a new segment file if the old one was replaced.

    The driver sends back whether the segment file was replaced (a leader then publishes into the
    new one).
    """


# -- the host ------------------------------------------------------------------------------------------------


class HostEffect(ABC):
    """An operation on the host: one call on the driver's :class:`~heksher_shm._engine.host.Host`.

    ``quick`` ones (a few aligned loads or stores in the segment's header)
    run on an event loop as they are; the others may touch files, and the
    asyncio driver runs them in a worker thread.
    """

    quick: ClassVar[bool] = False
    busy: bool = False

    @abstractmethod
    def perform(self, host: Host) -> Any:
        """Do it on *host*; returns the result the engine is sent."""


@dataclass(frozen=True)
class TakeLead(HostEffect):
    """Take the election lock if it is free; the new term (the fencing token), or ``None``."""

    def perform(self, host: Host) -> int | None:
        return host.take_lead()


@dataclass(frozen=True)
class KeepsLead(HostEffect):
    """Whether this process still holds the election lock and the lock file is still in place."""

    def perform(self, host: Host) -> bool:
        return host.keeps_lead()


@dataclass(frozen=True)
class GiveUpLead(HostEffect):
    """Release the election lock (nothing when not held)."""

    def perform(self, host: Host) -> None:
        host.give_up_lead()


@dataclass(frozen=True)
class TryTakeover(HostEffect):
    """Take the takeover lock without waiting (one process at a time replaces a stuck leader)."""

    def perform(self, host: Host) -> bool:
        return host.try_takeover()


@dataclass(frozen=True)
class EndTakeover(HostEffect):
    """Release the takeover lock."""

    def perform(self, host: Host) -> None:
        host.end_takeover()


@dataclass(frozen=True)
class SeizeLead(HostEffect):
    """Put a fresh lock file, held by this process, in place of a stuck leader's; the new term or None."""

    def perform(self, host: Host) -> int | None:
        return host.seize_lead()


@dataclass(frozen=True)
class Announce(HostEffect):
    """Record this process as the leader (identity and doorbell), for followers and ``status``."""

    def perform(self, host: Host) -> None:
        host.announce()


@dataclass(frozen=True)
class Beat(HostEffect):
    """Store the leader's liveness: progress at *progress*, more by *promise* (monotonic seconds)."""

    quick: ClassVar[bool] = True
    progress: float
    promise: float

    def perform(self, host: Host) -> None:
        host.beat(self.progress, self.promise)


@dataclass(frozen=True)
class LookAtLeader(HostEffect):
    """What a follower knows of the leader: a :class:`~heksher_shm._engine.host.LeaderSeen`."""

    def perform(self, host: Host) -> Any:
        return host.look_at_leader()


@dataclass(frozen=True)
class RingAnswered(HostEffect):
    """The leader showed progress since this process last rang it: stop expecting an answer."""

    quick: ClassVar[bool] = True

    def perform(self, host: Host) -> None:
        host.ring_answered()


@dataclass(frozen=True)
class LeaderExited(HostEffect):
    """The handle of :class:`Wait` fired: the leader process is gone."""

    def perform(self, host: Host) -> None:
        host.leader_exited()


@dataclass(frozen=True)
class ReadMarks(HostEffect):
    """The leader's update results in the segment: a :class:`~heksher_shm._engine.host.Marks`."""

    def perform(self, host: Host) -> Any:
        return host.read_marks()


@dataclass(frozen=True)
class Publish(HostEffect):
    """Publish a snapshot under fencing token *term*; its generation.

    Throws :class:`~heksher_shm.exceptions.SnapshotFencedError` when a newer
    term began (this process was replaced as leader), and
    :class:`~heksher_shm.exceptions.SegmentError` when it cannot be written.
    """

    head: bytes
    blobs: Sequence[bytes]
    term: int
    busy: bool = False

    def perform(self, host: Host) -> int:
        return host.publish(self.head, self.blobs, self.term)


@dataclass(frozen=True)
class KeepSnapshot(HostEffect):
    """Write the snapshot just published into the last-known-good file (nothing when there is none)."""

    head: bytes
    blobs: Sequence[bytes]
    busy: bool = False

    def perform(self, host: Host) -> None:
        host.keep_snapshot(self.head, self.blobs)


@dataclass(frozen=True)
class RestoreKept(HostEffect):
    """The last-known-good file's snapshot (a :class:`~heksher_shm._engine.host.Restored`), or ``None``
    when there is no file or it must not be served (the host says why, once)."""

    busy: bool = False

    def perform(self, host: Host) -> Any:
        return host.restore_kept()


@dataclass(frozen=True)
class ReadHead(HostEffect):
    """A verified copy of the current snapshot's head, or ``None`` when nothing is published."""

    busy: bool = False

    def perform(self, host: Host) -> Any:
        return host.read_head()


@dataclass(frozen=True)
class ReadBlobs(HostEffect):
    """Verified copies of blobs of snapshot *generation* (``None``: the snapshot changed meanwhile)."""

    generation: int
    indices: Sequence[int]
    busy: bool = False

    def perform(self, host: Host) -> list[bytes] | None:
        return host.read_blobs(self.generation, self.indices)


@dataclass(frozen=True)
class RecordOk(HostEffect):
    """Record a successful update at *when* (epoch seconds) in the segment."""

    when: float

    def perform(self, host: Host) -> None:
        host.record_ok(self.when)


@dataclass(frozen=True)
class RecordError(HostEffect):
    """Record a failed update in the segment: its description, at *when* (epoch seconds)."""

    message: str
    when: float

    def perform(self, host: Host) -> None:
        host.record_error(self.message, self.when)


@dataclass(frozen=True)
class CountDeclarations(HostEffect):
    """Add to the segment's counts of declarations that succeeded and failed."""

    ok: int
    failed: int

    def perform(self, host: Host) -> None:
        host.count_declarations(self.ok, self.failed)


@dataclass(frozen=True)
class ScanWishes(HostEffect):
    """Every live process's :class:`~heksher_shm._engine.host.Wish`, read again only when a registration
    changed; *prune*: look for dead processes too (a full scan)."""

    prune: bool
    busy: bool = False

    def perform(self, host: Host) -> Any:
        return host.scan_wishes(self.prune)


@dataclass(frozen=True)
class DamageReports(HostEffect):
    """The segment's damage report counter: processes that found the published snapshot damaged
    bump it before they ring the leader (one aligned load)."""

    quick: ClassVar[bool] = True

    def perform(self, host: Host) -> int:
        return host.damage_reports()


@dataclass(frozen=True)
class RingAll(HostEffect):
    """Ring the doorbell of every live process (as of the last scan), never this process's own."""

    def perform(self, host: Host) -> None:
        host.ring_all()


@dataclass(frozen=True)
class Acknowledge(HostEffect):
    """Answer processes' requests: write each one's :class:`~heksher_shm._model.snapshot.Ack` (keyed by
    the process's key) where it reads it, and ring it."""

    acks: Mapping[str, Ack]

    def perform(self, host: Host) -> None:
        host.acknowledge(self.acks)


Effect = Call | Calls | Compute | Digest | Wait | Apply | Report | Housekeep | HostEffect
