"""Exceptions raised by heksher_shm."""

from __future__ import annotations

import httpx

__all__ = [
    "HeksherProtocolError",
    "HeksherShmError",
    "LeaderUpdateError",
    "NoMatchError",
    "SegmentCorruptedError",
    "SegmentError",
    "SnapshotFencedError",
]


class HeksherShmError(Exception):
    """Base class for errors specific to heksher_shm."""


class NoMatchError(Exception):
    """No rule matched a context.

    Kept for code written for heksher 0.2.2, which exported it; heksher_shm
    resolves without raising it (``get()`` falls back to the defaults).
    """


class HeksherProtocolError(HeksherShmError):
    """The Heksher service answered with a status or body the client cannot use.

    The message names the endpoint, the HTTP status and what was wrong.
    """

    def __init__(self, endpoint: str, status: int, problem: str, content: bytes = b"") -> None:
        self.endpoint = endpoint
        self.status = status
        self.problem = problem
        self.content = content
        super().__init__(f"{endpoint} answered {status}: {problem}")


class LeaderUpdateError(HeksherShmError, httpx.HTTPError):
    """The leader (maybe another process) reported that an update or a declaration failed.

    Also a subclass of :class:`httpx.HTTPError`, so code written for heksher
    0.2.2 that catches HTTP errors from ``set_as_main()`` or ``reload()``
    keeps working in followers. The message carries the leader's description
    of the error; in the leader's own process the original exception is
    raised instead.
    """


class SegmentError(HeksherShmError):
    """A shared-memory segment or one of its helper files cannot be used safely.

    Raised for files owned by another user, symlinks, wrong file types,
    corrupted headers and similar; the message names the path and the reason.
    """


class SegmentCorruptedError(SegmentError):
    """A segment's header, slot descriptor, blob table or blob failed validation.

    Raised by readers when a check keeps failing while the generation word
    stays the same (so it is not a publish in progress). The next publish by
    the elected writer repairs the segment.
    """


class SnapshotFencedError(SegmentError):
    """A snapshot belongs to a leader that was replaced (its fencing token is older than the segment's).

    Each leader takes a new *term* (a fencing token that only grows) when it
    takes the election lock, and every snapshot carries the term that
    published it. A leader that was stopped (``SIGSTOP``, a frozen VM) and
    replaced may still try to publish when it resumes:

    * the stale leader's ``publish`` raises this, naming both terms
      ("... term 5 was replaced by term 6; not publishing"), and publishes
      nothing; it steps down;
    * a reader that finds such a snapshot published anyway (the leader's own
      check and its store are not one atomic step) raises this instead of
      returning it, naming the generation and both terms. Clients treat it
      as a damaged snapshot: they keep the rules they have, and the current
      leader publishes again.
    """
