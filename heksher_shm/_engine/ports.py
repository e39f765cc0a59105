"""What the engine works with, as protocols: the transport, the lock, the wishes, the other processes.

The shared-memory transport (:mod:`heksher_shm._engine.shared`) and the
in-process one (:mod:`heksher_shm._engine.local`) implement them; so can a
test.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from heksher_shm._model import protocol as proto

__all__ = ["Blob", "HeadCopy", "Host", "Lock", "Transport", "Wish", "WishSource"]


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


class Blob(Protocol):
    """A blob taken from a snapshot to be decoded later (``Transport.copy_blobs``)."""

    def verified(self) -> bytes | memoryview:
        """Its bytes, checked; raises :class:`~heksher_shm.exceptions.SegmentCorruptedError` if damaged."""
        ...


class HeadCopy(Protocol):
    """A verified copy of a snapshot's head, as :meth:`Transport.read_head` returns it (the segment's
    :class:`~heksher_shm._shm.reading.HeadRead`, which the in-process transport returns too)."""

    @property
    def generation(self) -> int: ...

    @property
    def head(self) -> bytes: ...


class Transport(Protocol):
    """Where snapshots are published and read: the shared segment or an in-process stand-in."""

    @property
    def words(self) -> Any: ...

    def generation(self) -> int: ...

    def read_head(self) -> HeadCopy | None: ...

    def read_blobs(self, generation: int, indices: Sequence[int]) -> list[bytes] | None: ...

    def copy_blobs(self, generation: int, indices: Sequence[int]) -> Sequence[Blob] | None: ...

    def publish(self, head: bytes, blobs: Sequence[bytes]) -> int: ...

    def set_leader(self, pid: int, create_time: float, bell: int, pidns: int) -> None: ...

    def beat(self, progress: float, promise: float) -> None: ...

    def liveness(self) -> tuple[float, float]: ...

    def record_update_ok(self, when: float) -> None: ...

    def record_error(self, message: str, when: float) -> None: ...

    def update_marks(self) -> tuple[float, int, str | None]:
        """(time of the last successful update, count of errors, last error text)."""
        ...


class Lock(Protocol):
    """The leader election lock."""

    def try_acquire(self) -> bool: ...

    def release(self) -> None: ...

    def verify(self) -> bool: ...

    def seize(self) -> bool: ...

    @property
    def held(self) -> bool: ...


class WishSource(Protocol):
    """The registrations of every live process (the registry, or this process alone)."""

    def changed(self) -> bool:
        """Whether a registration may have changed since the last :meth:`wishes` (cheap)."""
        ...

    def wishes(self, prune: bool) -> list[Wish]:
        """Every live process's wish; *prune*: also look for dead processes (a full scan)."""
        ...

    @property
    def bells(self) -> Sequence[str]:
        """The doorbells of the live processes, as of the last :meth:`wishes`."""
        ...


class Host(Protocol):
    """The other processes of the host: doorbells, the leader's watch, the takeover lock."""

    @property
    def takeover(self) -> Lock:
        """Taken (without waiting) by the one process that replaces a stuck leader."""
        ...

    rang_at: float
    """When this process last rang the leader for something still unanswered (0.0: nothing)."""

    def bell_fd(self) -> int: ...

    def drain(self) -> None: ...

    def ring(self, bells: Iterable[str]) -> None:
        """Ring these doorbells (never this process's own)."""
        ...

    def watch(self) -> tuple[tuple[int, float] | None, int | None, bool]:
        """(the leader's identity from the status block or None, a descriptor readable once it exits
        or None, whether it is known to be gone)."""
        ...

    def leader_exited(self) -> None:
        """The watched descriptor fired: the leader process is gone."""
        ...
