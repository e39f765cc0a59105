"""Joining a host's shared cache: where its files are, and the engine's view of them.

One *segment* serves every process on the host that uses the same service
URL and context features (or the same explicit ``segment_name``)::

    <shm dir>/                  HEKSHER_SHM_DIR, else /dev/shm/heksher_shm-<uid>, else <tmp>/...
        <name>.seg                  the memory-mapped snapshot (heksher_shm._shm.segment)
        <name>.lock                 the election lock (heksher_shm._shm.election)
        <name>.takeover             taken while a stuck leader is replaced (one process at a time)
        <name>.seg.d/               one registration, acknowledgement and doorbell per live process
                                    (heksher_shm._shm.registry, heksher_shm._shm.bell)

:class:`SharedHost` is the engine's host over these files (the
:class:`heksher_shm._engine.host.Host` its effects stand for).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from heksher_shm._engine.host import LeaderSeen, Marks, Restored, Wish
from heksher_shm._engine.keeping import Keeper
from heksher_shm._model.protocol import DeclarationBody, declaration_digest
from heksher_shm._model.snapshot import FORMAT as SNAPSHOT_FORMAT
from heksher_shm._model.snapshot import Ack, decode_ack, encode_ack
from heksher_shm._shm import files
from heksher_shm._shm.bell import Bell, ring
from heksher_shm._shm.election import LeaderLock
from heksher_shm._shm.identity import (
    ProcessIdentity,
    current_identity,
    in_this_pid_namespace,
    is_alive,
    token,
)
from heksher_shm._shm.lastgood import KeptFile
from heksher_shm._shm.layout import FORMAT_VERSION
from heksher_shm._shm.reading import HeadRead
from heksher_shm._shm.registration import Registration
from heksher_shm._shm.registry import Registry, bell_name, registry_directory
from heksher_shm._shm.segment import Segment, resolve_shm_dir
from heksher_shm.exceptions import SegmentError

__all__ = [
    "SEGMENT_NAME",
    "Neighbours",
    "RegistrySource",
    "SharedHost",
    "SharedParts",
    "default_segment_name",
    "open_shared",
    "wish_key",
]

logger = logging.getLogger("heksher_shm.shared")

SEGMENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
"""What a segment name may look like: it becomes part of file names."""


def default_segment_name(service_url: str, context_features: Sequence[str]) -> str:
    """The segment shared by every client of this service URL and these context features.

    The formats of the segment and the snapshot are part of the name, so two
    incompatible versions of heksher_shm on one host never read each other's
    files: each has its own segment (and its own leader).
    """
    key = f"{service_url.rstrip('/')}\n{','.join(context_features)}\n{FORMAT_VERSION}.{SNAPSHOT_FORMAT}"
    return "heksher-" + hashlib.sha256(key.encode()).hexdigest()[:20]


def wish_key(identity: ProcessIdentity) -> str:
    """How a process is named in acknowledgements: its token (PID reuse and namespace safe)."""
    return token(identity)


@dataclass(frozen=True)
class SharedParts:
    """The files of one segment, opened."""

    directory: Path
    name: str
    segment: Segment
    lock: LeaderLock
    registry: Registry


def open_shared(
    service_url: str,
    context_features: Sequence[str],
    *,
    shm_dir: str | None,
    segment_name: str | None,
) -> SharedParts:
    """Open (creating as needed) the segment for this service and features.

    Raises:
        ValueError: *segment_name* is not a usable name.
        heksher_shm.exceptions.SegmentError: a file or folder is not safe to use
            (another user's, a symlink, the wrong kind of file...).
    """
    if segment_name is None:
        segment_name = default_segment_name(service_url, context_features)
    elif not SEGMENT_NAME.fullmatch(segment_name):
        raise ValueError(f"segment_name must match {SEGMENT_NAME.pattern}, got {segment_name!r}")
    directory = resolve_shm_dir(shm_dir)
    segment_path = directory / f"{segment_name}.seg"
    lock_path = directory / f"{segment_name}.lock"
    _check_lock_file(lock_path)
    lock = LeaderLock(lock_path)
    registry = Registry(registry_directory(segment_path))
    segment = Segment.open(segment_path)
    return SharedParts(directory, segment_name, segment, lock, registry)


def _check_lock_file(path: Path) -> None:
    """Refuse an impostor lock file now, with a clear error, rather than in the background loop."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    files.refuse_file("leader lock file", path, st)


_declaration_decoder = msgspec.json.Decoder(DeclarationBody)


class RegistrySource:
    """Every live process's wishes, read from the registry when it changed (or to prune the dead).

    "Changed" is the segment's registry counter, which every process bumps
    after writing its registration (see
    :meth:`~heksher_shm._shm.segment.Segment.bump_registry_seq`): looking costs
    one shared-memory read, and a scan reads only the files that changed.
    """

    def __init__(self, registry: Registry, segment: Segment) -> None:
        self._registry = registry
        self._segment = segment
        self._wishes: list[Wish] | None = None
        self._by_registration: dict[int, tuple[Registration, Wish]] = {}
        self._decoded: dict[bytes, tuple[str, DeclarationBody]] = {}
        self._seq = -1
        self.bells: tuple[str, ...] = ()

    def replace_segment(self, segment: Segment) -> None:
        """Watch the counter of another segment file (the old one was replaced)."""
        self._segment = segment
        self._seq = -1

    def changed(self) -> bool:
        return self._wishes is None or self._segment.registry_seq() != self._seq

    def wishes(self, prune: bool) -> list[Wish]:
        if not prune and not self.changed():
            assert self._wishes is not None
            return self._wishes
        self._seq = self._segment.registry_seq()  # before the scan: a later bump means a later file
        result = self._registry.scan(term=self._segment.term())
        self.bells = result.bells
        wishes = []
        by_registration: dict[int, tuple[Registration, Wish]] = {}
        # Processes of one application declare the same settings: each distinct declaration is
        # decoded once, not once per process (16 workers x 1,000 settings: 1,000 decodes).
        known: dict[bytes, tuple[str, DeclarationBody]] = {}
        for registration in result.registrations:
            cached = self._by_registration.get(id(registration))
            if cached is not None and cached[0] is registration:
                wish = cached[1]
            else:
                wish = _wish_of(registration, self._decoded, known)
            by_registration[id(registration)] = (registration, wish)
            wishes.append(wish)
        self._by_registration = by_registration
        if prune:  # now and then, forget the declarations no live process holds any more
            for registration, _ in by_registration.values():
                for raw in registration.declarations:
                    key = bytes(raw)
                    if key not in known and key in self._decoded:
                        known[key] = self._decoded[key]
            self._decoded = known
        else:
            self._decoded.update(known)
        self._wishes = wishes
        return wishes


_logged_malformed: set[tuple[int, bytes]] = set()


def _wish_of(
    registration: Registration,
    earlier: dict[bytes, tuple[str, DeclarationBody]],
    known: dict[bytes, tuple[str, DeclarationBody]],
) -> Wish:
    """The engine's view of a registration: declarations decoded and keyed by digest.

    A declaration decoded by this scan (in *known*) or the previous one (in
    *earlier*) is not decoded again; what this one decodes or reuses is added
    to *known*.
    """
    declarations: dict[str, DeclarationBody] = {}
    for raw in registration.declarations:
        key = bytes(raw)
        found = known.get(key) or earlier.get(key)
        if found is not None:
            known[key] = found
            declarations.setdefault(*found)
            continue
        try:
            body = _declaration_decoder.decode(raw)
        except msgspec.DecodeError as e:
            seen = (registration.pid, bytes(raw))
            if seen not in _logged_malformed and len(_logged_malformed) < 1024:  # once each
                _logged_malformed.add(seen)
                logger.warning(
                    "skipping a malformed declaration in a registration",
                    extra={"pid": registration.pid, "problem": str(e)},
                )
            continue
        found = known[key] = (declaration_digest(body), body)
        declarations.setdefault(*found)
    return Wish(
        wish_key(registration.identity),
        declarations,
        dict(registration.tracked),
        registration.reload_seq,
        registration.query_seq,
    )


GONE_PATIENCE = 2.0
"""Seconds a follower keeps looking for a new leader after the old one exited, before it stops expecting
one soon (the status block may name a process this one cannot watch: another PID namespace)."""


class Neighbours:
    """The engine's view of the host's other processes (:class:`heksher_shm._engine.Host`).

    Holds this client's doorbell, rings others', watches the leader process
    through a pidfd (readable once it exits, so a follower needs no polling
    to take over), and the takeover lock used to replace a stuck leader.
    """

    def __init__(self, parts: SharedParts, key: str, bell: int) -> None:
        self._parts = parts
        self._key = key
        self.bell_number = bell
        identity = current_identity()
        self._bell = Bell(parts.registry.directory, bell_name(identity, bell))
        self._takeover = LeaderLock(parts.directory / f"{parts.name}.takeover")
        self.rang_at = 0.0
        self._watched: tuple[int, float] | None = None
        self._exit_fd: int | None = None
        self._gone_since: float | None = None

    @property
    def takeover(self) -> LeaderLock:
        return self._takeover

    def replace_parts(self, parts: SharedParts) -> None:
        """Use another segment file from now on (the bell and the registry stay)."""
        self._parts = parts
        self._forget_watch()

    def bell_fd(self) -> int:
        return self._bell.fileno()

    def drain(self) -> None:
        self._bell.drain()

    def ring(self, bells: Iterable[str]) -> None:
        directory = self._parts.registry.directory
        own = self._bell.path.name
        for name in bells:
            if name != own:
                ring(directory, name)

    def ensure_bell(self) -> None:
        """Bind the doorbell again if its socket file vanished (someone cleaned the folder)."""
        if not self._bell.present():
            logger.warning(
                "this process's doorbell was removed; listening again", extra={"path": str(self._bell.path)}
            )
            self._bell.close()
            self._bell = Bell(self._parts.registry.directory, self._bell.path.name)

    def ring_leader(self) -> bool:
        """Ring the recorded leader's bell (a request is waiting in the registry); False if there is none."""
        leader = self._parts.segment.leader()
        if leader is None or not leader[3]:
            return False
        pid, create_time, pidns, number = leader
        if not self.rang_at:
            self.rang_at = time.monotonic()
        return ring(
            self._parts.registry.directory, bell_name(ProcessIdentity(pid, create_time, pidns), number)
        )

    def watch(self) -> tuple[tuple[int, float] | None, int | None, bool]:
        leader = self._parts.segment.leader()
        identity = None if leader is None else (leader[0], leader[1])
        if identity != self._watched:
            self._forget_watch()
            self._watched = identity
            if leader is not None:
                process = ProcessIdentity(leader[0], leader[1], leader[2])
                if in_this_pid_namespace(process):
                    self._exit_fd, gone = _watch_process(process)
                    if gone:
                        self._gone_since = time.monotonic()
                # else: a leader in another PID namespace cannot be watched: judged by its promises
        gone = self._gone_since is not None
        if gone and time.monotonic() - (self._gone_since or 0.0) > GONE_PATIENCE:
            return identity, None, False  # nobody new came: stop expecting one; judge by promises
        return identity, self._exit_fd, gone

    def leader_exited(self) -> None:
        fd, self._exit_fd = self._exit_fd, None
        if fd is not None:
            os.close(fd)
        self._gone_since = time.monotonic()

    def _forget_watch(self) -> None:
        fd, self._exit_fd = self._exit_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._watched = None
        self._gone_since = None

    def close(self) -> None:
        """Stop listening (the bell's socket file goes) and watching."""
        self._forget_watch()
        self._bell.close()

    def forget_inherited(self) -> None:
        """In a forked child: drop the parent's descriptors, touch none of its files."""
        fd, self._exit_fd = self._exit_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._bell.forget_inherited()


def _watch_process(identity: ProcessIdentity) -> tuple[int | None, bool]:
    """(a descriptor readable once *identity* exits or None if it cannot be watched, whether it is
    gone already)."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:  # pragma: no cover - Python or kernel without pidfds
        return None, not is_alive(identity)
    try:
        fd = pidfd_open(identity.pid)
    except ProcessLookupError:
        return None, True
    except OSError:  # ENOSYS (an old kernel), EPERM...: judge by promises only
        return None, not is_alive(identity)
    # Opened after the leader was recorded: the pid may belong to a newer process by now.
    if not is_alive(identity):
        os.close(fd)
        return None, True
    os.set_inheritable(fd, False)
    return fd, False


class SharedHost:
    """The engine's host when the processes of a host share a segment (see
    :class:`heksher_shm._engine.host.Host`: one method per host effect).

    Args:
        parts: the segment's files, opened.
        neighbours: this client's doorbell and its view of the other processes.
        identity: this process.
        kept: the last-known-good file, if the client has one.
    """

    def __init__(
        self,
        parts: SharedParts,
        neighbours: Neighbours,
        identity: ProcessIdentity,
        kept: KeptFile | None = None,
    ) -> None:
        self._parts = parts
        self.neighbours = neighbours
        self.source = RegistrySource(parts.registry, parts.segment)
        self._identity = identity
        self._keeper = Keeper(kept)
        self._ack_failed = False

    @property
    def segment(self) -> Segment:
        """The segment file this host publishes to and reads from."""
        return self._parts.segment

    def replace_parts(self, parts: SharedParts) -> None:
        """Use another segment file from now on (the old one was removed or replaced)."""
        self._parts = parts
        self.source.replace_segment(parts.segment)
        self.neighbours.replace_parts(parts)

    # -- the election ---------------------------------------------------------------------------------

    def take_lead(self) -> int | None:
        lock = self._parts.lock
        if not lock.try_acquire():
            return None
        return self._begin_term()

    def keeps_lead(self) -> bool:
        return self._parts.lock.verify()

    def give_up_lead(self) -> None:
        lock = self._parts.lock
        if lock.held:
            lock.release()

    def try_takeover(self) -> bool:
        return self.neighbours.takeover.try_acquire()

    def end_takeover(self) -> None:
        self.neighbours.takeover.release()

    def seize_lead(self) -> int | None:
        if not self._parts.lock.seize():
            return None
        return self._begin_term()

    def _begin_term(self) -> int:
        """Under the lock just taken: the next fencing token (a lock this process cannot use is let go)."""
        try:
            return self._parts.segment.begin_term()
        except BaseException:
            self._parts.lock.release()
            raise

    def announce(self) -> None:
        identity = self._identity
        self._parts.segment.set_leader(
            identity.pid, identity.create_time, self.neighbours.bell_number, identity.pidns
        )

    # -- liveness -------------------------------------------------------------------------------------

    def beat(self, progress: float, promise: float) -> None:
        self._parts.segment.beat(progress, promise)

    def look_at_leader(self) -> LeaderSeen:
        leader, exit_fd, gone = self.neighbours.watch()
        progress, promise = self._parts.segment.liveness()
        return LeaderSeen(leader, exit_fd, gone, progress, promise, self.neighbours.rang_at)

    def ring_answered(self) -> None:
        self.neighbours.rang_at = 0.0

    def leader_exited(self) -> None:
        self.neighbours.leader_exited()

    def read_marks(self) -> Marks:
        return Marks(*self._parts.segment.update_marks())

    # -- the segment ----------------------------------------------------------------------------------

    def publish(self, head: bytes, blobs: Sequence[bytes], term: int) -> int:
        return self._parts.segment.publish(head, blobs, term)

    def read_head(self) -> HeadRead | None:
        return self._parts.segment.read_head()

    def read_blobs(self, generation: int, indices: Sequence[int]) -> list[bytes] | None:
        return self._parts.segment.read_blobs(generation, indices)

    def keep_snapshot(self, head: bytes, blobs: Sequence[bytes]) -> None:
        self._keeper.keep(head, blobs)

    def restore_kept(self) -> Restored | None:
        return self._keeper.restore()

    def record_ok(self, when: float) -> None:
        self._parts.segment.record_update_ok(when)

    def record_error(self, message: str, when: float) -> None:
        self._parts.segment.record_error(message, when)

    def count_declarations(self, ok: int, failed: int) -> None:
        self._parts.segment.count_declarations(ok, failed)

    def damage_reports(self) -> int:
        return self._parts.segment.damage_reports()

    # -- the other processes --------------------------------------------------------------------------

    def scan_wishes(self, prune: bool) -> list[Wish]:
        return self.source.wishes(prune)

    def ring_all(self) -> None:
        self.neighbours.ring(self.source.bells)

    def acknowledge(self, acks: Mapping[str, Ack]) -> None:
        registry = self._parts.registry
        for key, ack in acks.items():
            try:
                registry.write_ack(key, ack.term, encode_ack(ack))
            except SegmentError:
                # That process waits for its answer until startup_timeout, and says so; its
                # next request is answered again. Said once here, not per process.
                if not self._ack_failed:
                    self._ack_failed = True
                    logger.exception("cannot write an acknowledgement; the process waits in vain")
        self.neighbours.ring(bell for bell in self.source.bells if bell.split(".", 1)[0] in acks)

    def read_ack(self) -> Ack | None:
        """The current term's answer to this process's latest request (None: none yet, or unreadable)."""
        data = self._parts.registry.read_ack(self._identity, self._parts.segment.term())
        if not data:
            return None
        try:
            return decode_ack(data)
        except msgspec.DecodeError:
            return None

    # -- for the drivers ------------------------------------------------------------------------------

    def bell_fd(self) -> int:
        return self.neighbours.bell_fd()

    def drain(self) -> None:
        self.neighbours.drain()
