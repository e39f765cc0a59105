"""What a shared segment holds and who serves it: the data behind ``heksher-shm status``.

.. code-block:: python

    from heksher_shm.status import list_segments, segment_status

    for path in list_segments():
        print(segment_status(path).verdict)

Reading status never creates, locks or repairs anything.

**The staleness bound.** Rules are *stale* when no update has succeeded for
longer than :func:`stale_after` seconds: by default two of the leader's update
intervals plus :data:`HEARTBEAT_STALE_AFTER` (a leader that misses two updates
in a row is past any backoff of a healthy one), or exactly
``HEKSHER_SHM_STALE_AFTER`` seconds when that environment variable is set.
This one bound turns ``heksher-shm status`` ``stale``, the metrics'
``heksher_shm_stale`` gauge (:mod:`heksher_shm.metrics`) and the OpenFeature
provider's ``STALE`` reason and event (:mod:`heksher_shm.openfeature`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from heksher_shm._engine.policy import UNRESPONSIVE_AFTER
from heksher_shm._model.snapshot import Head, decode_head
from heksher_shm._shm.identity import ProcessIdentity, describe_process
from heksher_shm._shm.registry import Registry, registry_directory
from heksher_shm._shm.segment import HeaderStatus, Segment, resolve_shm_dir
from heksher_shm.exceptions import SegmentError

__all__ = [
    "ENV_STALE_AFTER",
    "HEARTBEAT_STALE_AFTER",
    "STALE_INTERVALS",
    "ProcessInfo",
    "SegmentStatus",
    "header_damage",
    "list_segments",
    "segment_status",
    "stale_after",
]

logger = logging.getLogger("heksher_shm.status")

HEARTBEAT_STALE_AFTER = UNRESPONSIVE_AFTER
"""Seconds a leader may overrun its promise of progress before it counts as unresponsive."""

STALE_INTERVALS = 2
"""The default staleness bound, in update intervals (plus :data:`HEARTBEAT_STALE_AFTER`)."""

ENV_STALE_AFTER = "HEKSHER_SHM_STALE_AFTER"
"""Environment variable: the staleness bound in seconds, replacing the default (see :func:`stale_after`)."""

_refused_bound: str | None = None


def stale_after(update_interval: float | None) -> float | None:
    """Seconds without a successful update after which the rules are stale: the staleness bound.

    ``HEKSHER_SHM_STALE_AFTER`` (a positive number of seconds) when it is set,
    else :data:`STALE_INTERVALS` update intervals plus
    :data:`HEARTBEAT_STALE_AFTER` seconds: 125 s at the usual 60 s interval.
    ``None`` when neither is known (nothing published yet). A value of the
    variable that is not a positive number is refused with one warning naming
    it, and the default applies.

    Read where staleness is judged: by :func:`segment_status` (the ``stale``
    verdict), the metrics and the OpenFeature provider (at each wake-up, not
    per evaluation), so a changed variable applies to processes started after.
    """
    global _refused_bound
    text = os.environ.get(ENV_STALE_AFTER, "").strip()
    if text:
        try:
            bound = float(text)
        except ValueError:
            bound = math.nan
        if bound > 0 and math.isfinite(bound):
            return bound
        if _refused_bound != text:
            _refused_bound = text
            logger.warning(
                "%s=%r is not a positive number of seconds; using the default staleness bound "
                "(%d update intervals plus %g s)",
                ENV_STALE_AFTER,
                text,
                STALE_INTERVALS,
                HEARTBEAT_STALE_AFTER,
            )
    if not update_interval:
        return None
    return STALE_INTERVALS * update_interval + HEARTBEAT_STALE_AFTER


@dataclass(frozen=True)
class ProcessInfo:
    """A process: the leader, or one attached to the segment."""

    pid: int
    create_time: float
    alive: bool
    cmdline: str | None
    uptime: float | None
    kind: str | None = None


@dataclass(frozen=True)
class SegmentStatus:
    """One segment's state, as read at :attr:`read_at` (epoch seconds).

    ``verdict`` is ``"ok"``, ``"empty"`` (nothing published yet),
    ``"corrupted"`` (the file fails validation: ``problem`` says how; the
    next leader rewrites it), ``"leaderless"`` (no live leader), ``"unresponsive"`` (the leader
    broke its promise to show progress by more than :data:`HEARTBEAT_STALE_AFTER` seconds: stopped
    or wedged; a follower replaces it) or ``"stale"`` (no successful update for longer than
    :attr:`stale_after` seconds, the staleness bound of :func:`~heksher_shm.status.stale_after`);
    ``healthy`` is true only for ``"ok"``.

    ``heartbeat_age`` is the time since the leader last showed progress (it
    sleeps between updates, so this grows up to an update interval on a
    healthy quiet host); ``overdue`` is how far past its promised next sign of
    progress it is (``None`` or negative: not overdue).

    ``generation`` is ``None`` when the header itself is corrupted (its prefix fails validation, or
    no slot descriptor carries the generation its generation word names): whatever number that word
    then holds is not a generation.
    """

    path: str
    name: str
    read_at: float
    generation: int | None
    leader: ProcessInfo | None
    heartbeat_age: float | None
    overdue: float | None
    last_update_ok: float | None
    last_update_age: float | None
    last_error: str | None
    last_error_time: float | None
    error_count: int
    update_interval: float | None
    published: float | None
    settings: int
    rules: int
    processes: list[ProcessInfo] = field(default_factory=list)
    verdict: str = "ok"
    problem: str | None = None
    stale_after: float | None = None
    """The staleness bound applied (:func:`~heksher_shm.status.stale_after`); None: not known."""
    snapshot_bytes: int = 0
    """Bytes of the current snapshot in the segment (its blob table, head and blobs)."""
    header: HeaderStatus | None = field(default=None, repr=False, compare=False)
    """The header as read (every counter it holds, for the metrics); not part of ``status --json``."""

    @property
    def healthy(self) -> bool:
        """Whether the segment is served and fresh."""
        return self.verdict == "ok"

    @property
    def idle(self) -> bool:
        """Whether no live process uses the segment: no live leader and no live process attached.

        An idle segment was left over by processes that have exited (its verdict is then
        ``"leaderless"``, or ``"empty"`` if they published nothing).
        """
        return (self.leader is None or not self.leader.alive) and not self.processes


def list_segments(shm_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The segment files in the shared folder (``HEKSHER_SHM_DIR`` or the default), sorted."""
    directory = resolve_shm_dir(shm_dir)
    return sorted(p for p in directory.glob("*.seg") if p.is_file() and not p.is_symlink())


def _process(identity: ProcessIdentity, kind: str | None = None) -> ProcessInfo:
    described = describe_process(identity)
    return ProcessInfo(
        identity.pid,
        identity.create_time,
        described["alive"],
        described["cmdline"],
        described["uptime"],
        kind,
    )


_UNFORMATTED = "not formatted"
"""The header problem of a file that no leader has formatted yet (all zeros)."""


def header_damage(header: HeaderStatus) -> str | None:
    """Why a segment's header is corrupted, or ``None`` when it is sound or simply not formatted yet.

    A header is corrupted when its fixed prefix fails validation (bad magic, another format version,
    a wrong size), when it is unformatted but its generation word is not zero, or when no slot
    descriptor carries the generation its generation word names. Its fields are then noise: the
    generation word included.
    """
    problem = header.header_problem
    if problem is not None:
        if problem != _UNFORMATTED:
            return problem
        return f"{problem}, yet the generation word is not zero" if header.generation else None
    if header.generation and header.current_slot is None:
        return "no slot descriptor carries the generation the generation word names"
    return None


def segment_status(path: str | os.PathLike[str] | None) -> SegmentStatus:
    """Read one segment's status.

    Raises:
        SegmentError: the file is missing, or not safe to read (another user's,
            a symlink, not a regular file...).
    """
    if path is None:
        raise SegmentError("this client has not joined a shared segment (shared=False, or not main yet)")
    path = Path(path)
    now = time.time()
    segment = Segment.open(path, create=False)
    try:
        header = segment.status()
        head: Head | None = None
        # An unformatted file (nothing published yet) is empty, not corrupted.
        damage = header_damage(header)
        problem = None if damage is None else f"the header is corrupted: {damage}"
        if damage is None:
            try:
                read = segment.read_head()
                head = decode_head(read.head) if read is not None else None
            except (SegmentError, ValueError) as e:
                problem = str(e)
    finally:
        segment.close()
    processes: list[ProcessInfo] = []
    registry_path = registry_directory(path)
    if registry_path.is_dir():
        scan = Registry(registry_path).scan(prune=False)
        processes = [_process(r.identity, r.kind) for r in scan.registrations]
    leader = None
    if header.leader_pid is not None and header.leader_create_time is not None:
        identity = ProcessIdentity(header.leader_pid, header.leader_create_time, header.leader_pidns)
        kind = next((p.kind for p in processes if p.pid == identity.pid), None)  # the header has no kind
        leader = _process(identity, kind)
    mono = time.monotonic()
    heartbeat_age = None if header.progress is None else max(0.0, mono - header.progress)
    overdue = None if header.promise is None else mono - header.promise
    last_ok_age = None if header.last_update_ok is None else max(0.0, now - header.last_update_ok)
    interval = head.update_interval if head is not None and head.update_interval else None
    bound = stale_after(interval)
    if problem is not None:
        verdict = "corrupted"
    elif head is None:
        verdict = "empty"
    elif leader is None or not leader.alive:
        verdict = "leaderless"
    elif overdue is None or overdue > HEARTBEAT_STALE_AFTER:
        verdict = "unresponsive"
    elif bound is not None and (last_ok_age is None or last_ok_age > bound):
        verdict = "stale"
    else:
        verdict = "ok"
    return SegmentStatus(
        path=str(path),
        name=path.name.removesuffix(".seg"),
        read_at=now,
        generation=None if damage is not None else header.generation,
        leader=leader,
        heartbeat_age=heartbeat_age,
        overdue=overdue,
        last_update_ok=header.last_update_ok,
        last_update_age=last_ok_age,
        last_error=header.last_error,
        last_error_time=header.last_error_time,
        error_count=header.error_count,
        update_interval=interval,
        published=head.published if head is not None else None,
        settings=len(head.settings) if head is not None else 0,
        rules=sum(e.rule_count for e in head.settings) if head is not None else 0,
        processes=[p for p in processes if p.alive],
        verdict=verdict,
        problem=problem,
        stale_after=bound,
        snapshot_bytes=next((s.length for s in header.slots if s.index == header.current_slot), 0),
        header=header,
    )
