"""Where a client's snapshots live: :class:`HostLink`.

A client starts alone, on the in-process host (:mod:`heksher_shm._engine.local`);
with sharing on, ``set_as_main`` joins the host's segment
(:mod:`heksher_shm._engine.shared`): its files, this process's key among
their registrations, a doorbell of this client's own, and the engine's host
over them. The other parts of the client read what the link holds now, as it
changes (joined, moved to a replaced segment file, forked).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import logging
from collections.abc import Callable

from heksher_shm._engine.host import Wish
from heksher_shm._engine.local import LocalHost
from heksher_shm._engine.shared import Neighbours, SharedHost, SharedParts, open_shared, wish_key
from heksher_shm._shm.identity import current_identity
from heksher_shm._shm.lastgood import KeptFile
from heksher_shm._shm.segment import Segment
from heksher_shm.exceptions import SegmentError

__all__ = ["HostLink"]

logger = logging.getLogger("heksher_shm.client")

_bell_numbers = itertools.count(1)
"""Numbers this process's doorbells (one per client that joins a segment)."""


class HostLink:
    """A client's link to where snapshots are published: in this process, or the host's shared files.

    Args:
        wish: this process's wish as it is now (what the in-process host reads).
        shared: whether to join the host's segment at :meth:`join` (else
            the client stays alone, ``shared=False``).
        shm_dir: the folder of the shared files (None: the default one).
        segment_name: the segment's name (None: derived from the service URL
            and the context features).
        kept: the last-known-good file, if the client has one (both hosts keep and restore it).
    """

    def __init__(
        self,
        wish: Callable[[], Wish],
        *,
        shared: bool,
        shm_dir: str | None,
        segment_name: str | None,
        kept: KeptFile | None = None,
    ) -> None:
        self._shared = shared
        self._shm_dir = shm_dir
        self._segment_name = segment_name
        self._kept = kept
        self.unshared: str | None = None
        """Why the client serves without sharing although sharing is on (the host's folder or files
        could not be used), or None."""
        self.local_host = LocalHost(wish, kept)
        """The host of a client alone in its process: snapshots, answers and the lock kept in memory."""
        self.host: LocalHost | SharedHost = self.local_host
        """The engine's host: the in-process one, or the shared one once joined (and listening)."""
        self.transport: LocalHost | Segment = self.local_host
        """Where snapshots are read."""
        self.parts: SharedParts | None = None
        """The host's shared files, once joined."""
        self.neighbours: Neighbours | None = None
        """This client's doorbell and its view of the other processes, once joined (None again after
        a fork that could not listen)."""
        self.key = f"local-{id(self):x}"
        """This process's key among the registrations, and in the leader's acknowledgements."""

    @property
    def joined(self) -> bool:
        """Whether the client joined its host's segment."""
        return self.parts is not None

    def join(self, service_url: str, context_features: tuple[str, ...]) -> bool:
        """Open the host's segment (once, with sharing on); True when this call joined it.

        A folder or file that must not be used (another user's, loosened, a
        full disk, a read-only ``/dev/shm``) does not stop the application:
        the client stays alone, as ``shared=False`` would, and says so once at
        ERROR, with the fix (:attr:`unshared` says why).
        """
        if not self._shared or self.parts is not None or self.unshared is not None:
            return False
        try:
            parts = open_shared(
                service_url, context_features, shm_dir=self._shm_dir, segment_name=self._segment_name
            )
            identity = current_identity()
            neighbours = Neighbours(parts, wish_key(identity), next(_bell_numbers))
        except SegmentError as error:
            self.unshared = str(error)
            _say_unshared(self.unshared, _fix_for(error))
            return False
        self.key = wish_key(identity)
        self.neighbours = neighbours
        self.parts = parts
        self.host = SharedHost(parts, self.neighbours, identity, self._kept)
        self.transport = parts.segment
        return True

    def segment_replaced(self) -> bool:
        """Whether the segment file was removed or replaced since it was opened."""
        return self.parts is not None and self.parts.segment.is_replaced()

    def reopen(self) -> Segment:
        """The segment file was removed or replaced: move to the file now at its path, and return it.

        The old mapping stays valid for readers still holding it; new
        snapshots go to, and come from, the new file.
        """
        parts = self.parts
        assert parts is not None
        logger.warning(
            "the segment file was removed or replaced; reopening it", extra={"path": str(parts.segment.path)}
        )
        segment = Segment.open(parts.segment.path)
        self.parts = parts = dataclasses.replace(parts, segment=segment)
        self.transport = segment
        if isinstance(self.host, SharedHost):
            self.host.replace_parts(parts)
        return segment

    def ensure_bell(self) -> None:
        """Listen again if this client's doorbell vanished."""
        if self.neighbours is not None:
            self.neighbours.ensure_bell()

    def report_damage(self) -> None:
        """Count a damaged snapshot in the segment's header, for whoever leads (never raises: the report
        comes from a reader, which goes on with the rules it has)."""
        parts = self.parts
        # Closed meanwhile (the client closes, or the file was replaced): nobody to tell.
        if parts is not None:
            with contextlib.suppress(SegmentError):
                parts.segment.report_damage()

    def ring_leader(self) -> None:
        """Ring whoever leads (a request of this process waits in the registry)."""
        if self.neighbours is not None:
            self.neighbours.ring_leader()

    def close(self) -> None:
        """Stop listening (the doorbell goes); the segment stays for the others."""
        if self.neighbours is not None:
            self.neighbours.close()

    @property
    def passive(self) -> bool:
        """Joined, but not listening (a forked child that could not bind a doorbell): ``get()`` applies
        what the leader publishes; nothing runs in the background."""
        return self.parts is not None and self.neighbours is None

    def after_fork_in_child(self, listen: bool) -> None:
        """In a forked child: drop the parent's doorbell and leader watch (closed, never removed), take
        this process's key, and (when *listen*) a doorbell and a host of its own."""
        if self.neighbours is not None:
            self.neighbours.forget_inherited()
            self.neighbours = None
        self.host = self.local_host
        if self.parts is not None:
            identity = current_identity()
            self.key = wish_key(identity)
            if listen:
                try:
                    self.neighbours = Neighbours(self.parts, self.key, next(_bell_numbers))
                    self.host = SharedHost(self.parts, self.neighbours, identity, self._kept)
                except SegmentError:
                    logger.exception("cannot listen for the leader after fork; rules still come on get()")


_said_unshared: set[str] = set()


def _fix_for(error: SegmentError) -> str:
    """What to do about *error*, in words, by what the system said (its cause's errno)."""
    cause = error.__cause__
    code = cause.errno if isinstance(cause, OSError) else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "free space on that file system (df), or point HEKSHER_SHM_DIR (or shm_dir) at another"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "point HEKSHER_SHM_DIR (or shm_dir) at a private folder this user can write"
    return (
        "make that folder or file this user's own and private (or remove it: it is made again), or point "
        "HEKSHER_SHM_DIR (or shm_dir) at a private folder of this user's"
    )


def _say_unshared(problem: str, fix: str) -> None:
    """Once per process and problem, at ERROR: why this process polls on its own, and the fix."""
    if problem in _said_unshared or len(_said_unshared) > 64:
        return
    _said_unshared.add(problem)
    logger.error(
        "cannot share the host's rule cache: %s; this process serves its settings on its own, polling "
        "the service itself as heksher 0.2.2 does. To share again, %s, and restart the processes",
        problem,
        fix,
        extra={"problem": problem},
    )
