"""What a segment's readers hand out: verified heads, blob copies, and views of the header.

Plain values, no I/O; :mod:`~heksher_shm._shm.reading` makes them.
"""

from __future__ import annotations

import pathlib
import zlib
from dataclasses import dataclass
from typing import NamedTuple

from heksher_shm.exceptions import SegmentCorruptedError

__all__ = ["BlobCopy", "HeadRead", "HeaderStatus", "SlotInfo"]


class HeadRead(NamedTuple):
    """A verified copy of a snapshot's head."""

    generation: int
    """The generation the head belongs to; pass it to :meth:`Segment.read_blobs`."""
    head: bytes
    """The head bytes exactly as given to :meth:`Segment.publish`."""
    blob_count: int
    """How many blobs the snapshot holds."""
    term: int = 0
    """The term (fencing token) of the leader that published it (0: published outside any term)."""


class BlobCopy(NamedTuple):
    """A blob copied out of a snapshot (see :meth:`Segment.copy_blobs`), not yet checked."""

    data: memoryview
    crc: int
    """The checksum the snapshot's table gives for it."""
    number: int
    """Its index in the snapshot."""
    where: str
    """The segment file and generation it came from, for the error message."""

    def verified(self) -> memoryview:
        """The blob's bytes; raises :class:`SegmentCorruptedError` if they fail their checksum."""
        if zlib.crc32(self.data) != self.crc:
            raise SegmentCorruptedError(f"{self.where}: checksum mismatch in blob {self.number}")
        return self.data


@dataclass(frozen=True)
class SlotInfo:
    """What a slot descriptor says (for observability; not verified against the data)."""

    index: int
    generation: int
    offset: int
    capacity: int
    length: int
    blob_count: int
    published_at: float | None
    term: int = 0
    """The term of the leader that published the slot."""


@dataclass(frozen=True)
class HeaderStatus:
    """A consistent view of a segment's header, for status displays and staleness checks.

    Time fields are epoch seconds, ``None`` meaning "never", except ``progress``
    and ``promise``, which are ``time.monotonic()`` seconds. Leader and error
    fields are ``None`` (and ``status_available`` is false) when the status
    block could not be read consistently, which happens when a writer died in
    the middle of updating it; the next writer update repairs it.
    """

    path: pathlib.Path
    file_size: int
    formatted: bool
    header_problem: str | None
    """Why the header is unusable (``None`` when it is fine)."""
    format_version: int | None
    generation: int
    current_slot: int | None
    slots: tuple[SlotInfo, ...]
    progress: float | None
    """When the leader last showed progress (monotonic seconds)."""
    promise: float | None
    """When the leader promised to show progress again at the latest (monotonic seconds)."""
    registry_seq: int
    status_available: bool
    leader_pid: int | None
    leader_create_time: float | None
    leader_pidns: int
    last_update_ok: float | None
    last_error: str | None
    last_error_time: float | None
    error_count: int
    term: int = 0
    """The fencing token: the term of the leader that may publish now (0: no term began)."""
    adopted: int = 0
    """The generation that was current when the term began (readable although an older term
    published it); 0: none."""
    leader_changes: int = 0
    """How many terms began (since the header was last formatted)."""
    updates_ok: int = 0
    """Successful updates from the service."""
    declarations_ok: int = 0
    """Declarations the service accepted."""
    declaration_failures: int = 0
    """Declarations that failed."""
    damage_reports: int = 0
    """Times a process found the published snapshot damaged and reported it to the leader."""
