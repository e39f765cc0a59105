"""The followers' registry: how each process's wishes reach whichever process leads.

Every process attached to a segment keeps one file in the segment's registry
directory (``<segment path>.d/``)::

    <segment>.d/                         0700, owned by this user
        <token>.reg                      one Registration per live process, 0600
        <token>.<term>.ack               the answer of term <term>'s leader to its latest request, 0600
        <token>.<n>.bell                 a client's doorbell socket (heksher_shm._shm.bell)
        .<token>.<hex>.tmp               a write in progress (named after the writer)

where ``<token>`` is the process's identity as
:func:`~heksher_shm._shm.identity.token` spells it:
``<pid>-<start µs>-<PID namespace>`` (without the namespace part where it is
unknown).

A file holds one JSON-encoded :class:`Registration`: the setting
declarations the process needs, the context values it tracks, and a
``reload_seq`` it bumps to ask the leader to query the service now. The
leader calls :meth:`Registry.scan` when something changed (the segment's
registry counter says so) or now and then to notice dead processes.

Rules the code below keeps:

* **Atomic replacement.** A file is written under a temporary name with
  ``O_EXCL | O_NOFOLLOW`` and renamed over the old one, so a reader sees the
  old content or the new, never a mix; nothing is modified in place.
* **Liveness by identity.** The file name carries the owner's
  :class:`~heksher_shm._shm.identity.ProcessIdentity`; a scan deletes the
  files (and stale temporary files) of processes that are gone or whose PID
  was reused, which are the two known traps about registrations.
* **Only within one PID namespace.** A PID means nothing in another PID
  namespace (two containers sharing a folder), so a scan never judges, and
  never deletes, the file of a process of another namespace: its
  registration is kept and honoured. If that process dies without
  withdrawing it (``SIGKILL``), it stays until a scan in the owner's own
  namespace removes it, or someone deletes the file; meanwhile leaders keep
  declaring its settings and querying its tracked contexts, which costs a
  little work and is otherwise harmless.
* **Hostile files are skipped, never trusted.** Symlinks, FIFOs and other
  non-regular files, files owned by another user, files over
  :data:`MAX_REGISTRATION_BYTES` and undecodable content are reported in
  :attr:`ScanResult.rejected` and logged once; a scan never raises for them
  and never blocks on them.
* **Cheap repeats.** Decoded files are cached by ``(inode, mtime, size)``.
  File timestamps tick coarsely (a few ms), so two writes within one tick
  can leave equal stamps: the "racy git" problem. Stamps younger than
  :data:`_RACY_WINDOW_NS` are therefore never trusted, by the cache or by
  :meth:`Registry.changed`, until they have aged.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from heksher_shm._shm import files
from heksher_shm._shm.identity import (
    ProcessIdentity,
    current_identity,
    in_this_pid_namespace,
    is_alive,
    token,
)
from heksher_shm._shm.registration import (
    Registration,
    decode_registration,
    encode_registration,
    validate_registration,
)
from heksher_shm._shm.registry_names import (
    ACK_RE,
    BELL_RE,
    ENTRY_RE,
    TEMP_RE,
    ack_name,
    bell_name,
    entry_name,
    entry_owner,
    identity_from,
    older_answers,
    registry_directory,
)
from heksher_shm.exceptions import SegmentError

__all__ = [
    "MAX_REGISTRATION_BYTES",
    "Registry",
    "Rejection",
    "ScanResult",
    "bell_name",
    "entry_owner",
    "registry_directory",
]

logger = logging.getLogger("heksher_shm.registry")


MAX_REGISTRATION_BYTES = 1 << 20
"""Largest registration file a scan reads (1 MiB); larger ones are rejected unread."""

# How long a file or directory timestamp must have aged before it is trusted
# to change whenever the content does (see the module docstring). Filesystems
# with whole-second timestamps (their mtime_ns is a multiple of 10**9) need
# more than a second.
_RACY_WINDOW_NS = 100_000_000
_RACY_WINDOW_COARSE_NS = 2_100_000_000

MAX_ACK_BYTES = 4096
"""Largest acknowledgement file read (an Ack is a few dozen bytes, its error text at most a few KiB)."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Rejection(msgspec.Struct, frozen=True):
    """A registry entry a scan skipped: its file name and why."""

    name: str
    reason: str


class ScanResult(msgspec.Struct, frozen=True):
    """What :meth:`Registry.scan` found.

    Attributes:
        registrations: valid registrations of live processes, by (pid, create_time).
        rejected: entries skipped as unusable, with reasons.
        dead: file names of processes found dead (deleted when the scan prunes).
        bells: file names of the doorbells of live processes (registered or not).
    """

    registrations: tuple[Registration, ...]
    rejected: tuple[Rejection, ...]
    dead: tuple[str, ...]
    bells: tuple[str, ...] = ()


def _is_racy(mtime_ns: int, now_ns: int) -> bool:
    window = _RACY_WINDOW_COARSE_NS if mtime_ns % 1_000_000_000 == 0 else _RACY_WINDOW_NS
    # abs(): a clock stepped backwards must not make every stamp look fresh forever.
    return abs(now_ns - mtime_ns) < window


class _Cached(msgspec.Struct, frozen=True):
    key: tuple[int, int, int, int, int]  # inode, mtime_ns, size, mode, uid
    outcome: Registration | str  # the registration, or why it was rejected


@dataclass
class _Scan:
    # One scan's inputs and findings.
    dir_fd: int
    now_ns: int
    prune: bool
    cache: dict[str, _Cached] = field(default_factory=dict)
    registrations: list[Registration] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    bells: list[str] = field(default_factory=list)


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode, st.st_uid)


class Registry:
    """One segment's registry directory: followers write their wishes, the leader scans them.

    The directory is created ``0700`` if missing. An existing one must be a
    real directory (not a symlink) owned by this user, or
    :class:`~heksher_shm.exceptions.SegmentError` is raised; its mode is
    tightened to ``0700``. Every operation opens the directory afresh and then
    works relative to that descriptor, so nothing here follows a symlink or
    keeps a descriptor across ``fork()``.

    Args:
        directory: the registry directory, usually :func:`registry_directory`.
        alive: liveness test used by :meth:`scan` (injectable for tests).
        identity: returns the calling process's identity; names temporary
            files so a scan can clean up after a writer that died mid-write.
        max_bytes: largest file :meth:`scan` reads, and :meth:`write` writes.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        alive: Callable[[ProcessIdentity], bool] = is_alive,
        identity: Callable[[], ProcessIdentity] = current_identity,
        max_bytes: int = MAX_REGISTRATION_BYTES,
    ) -> None:
        self._directory = Path(directory)
        self._alive = alive
        self._identity = identity
        self._max_bytes = max_bytes
        # Replaced wholesale, never mutated, so concurrent scans (and a fork
        # in the middle of one) only ever see a complete mapping.
        self._cache: dict[str, _Cached] = {}
        self._logged: dict[str, tuple[int, int, int, int, int]] = {}
        self._stamp: tuple[int, int] | None = None
        os.close(self._open_directory())

    @property
    def directory(self) -> Path:
        """The registry directory."""
        return self._directory

    def path_for(self, identity: ProcessIdentity) -> Path:
        """Return the path of the registry file of the process ``identity``."""
        return self._directory / entry_name(identity)

    # -- the follower's side --------------------------------------------------

    def write(self, registration: Registration) -> bytes:
        """Publish ``registration`` atomically, replacing the process's previous one.

        The file is named after ``registration``'s identity (normally this
        process's); ``updated`` is set to the current time. Returns the bytes
        written (see :meth:`holds`).

        Raises:
            ValueError: the registration is invalid (see
                :func:`validate_registration`) or larger than ``max_bytes``.
            SegmentError: the registry directory cannot be used safely, or the
                file cannot be written (the message names it).
        """
        problem = validate_registration(registration)
        if problem is not None:
            raise ValueError(f"invalid registration: {problem}")
        data = encode_registration(msgspec.structs.replace(registration, updated=time.time()))
        if len(data) > self._max_bytes:
            raise ValueError(f"registration is {len(data)} bytes, over the limit of {self._max_bytes}")
        self._replace(entry_name(registration.identity), data, "registration file")
        return data

    def holds(self, identity: ProcessIdentity, data: bytes) -> bool:
        """Whether the registry file of ``identity`` holds exactly ``data`` (never follows a symlink)."""
        return self._read(self.path_for(identity), len(data) + 1) == data

    def remove(self, identity: ProcessIdentity | None = None) -> None:
        """Delete the registry file of ``identity`` (default: this process), and its answers."""
        owner = self._identity() if identity is None else identity
        dir_fd = self._open_directory()
        try:
            with os.scandir(dir_fd) as it:
                answers = [e.name for e in it if (m := ACK_RE.fullmatch(e.name)) and m[1] == token(owner)]
            for name in (entry_name(owner), *answers):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)

    def write_ack(self, key: str, term: int, data: bytes) -> None:
        """The leader's side: replace term *term*'s answer to the process whose token is *key* (raises
        :class:`SegmentError`, naming the file, if it cannot be written). The term is in the name, so a
        replaced leader's late answer never hides its successor's: each process reads the answer of the
        segment's current term."""
        self._replace(ack_name(key, term), data, "acknowledgement file")

    def read_ack(self, identity: ProcessIdentity, term: int) -> bytes | None:
        """Term *term*'s answer to ``identity`` (None: none, or unreadable)."""
        return self._read(self._directory / ack_name(token(identity), term), MAX_ACK_BYTES)

    def _read(self, path: Path, limit: int) -> bytes | None:
        """A regular file's first *limit* bytes (never follows a symlink); None if it cannot be read."""
        try:
            fd = os.open(path, _READ_FLAGS)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            return _read_at_most(fd, limit)
        except OSError:
            return None
        finally:
            os.close(fd)

    def _replace(self, final: str, data: bytes, what: str) -> None:
        """Write *data* atomically as *final*: a reader sees the old content or the new, never a mix."""
        # Named after the writer: if it dies before the rename, a scan knows the file is abandoned.
        temp = f".{token(self._identity())}.{secrets.token_hex(8)}.tmp"
        dir_fd = self._open_directory()
        try:
            fd = os.open(temp, _TEMP_FLAGS, 0o600, dir_fd=dir_fd)
            try:
                with open(fd, "wb", closefd=True) as file:
                    file.write(data)
                # No fsync: these describe running processes; none of it outlives the machine anyway.
                os.replace(temp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=dir_fd)
                raise
        except OSError as exc:
            raise SegmentError(
                f"{what} {self._directory / final}: cannot write it: {exc.strerror or exc}"
            ) from exc
        finally:
            os.close(dir_fd)

    # -- the leader's side ----------------------------------------------------

    def changed(self) -> bool:
        """Whether the registry may have changed since the last :meth:`scan` (one ``lstat``; a diagnostic:
        the leader follows the segment's registry counter instead). Every write renames a file in and
        every removal unlinks one, both touching the directory's mtime; a recent mtime counts as a
        change until it has aged (racy git), so this errs towards ``True``."""
        stamp = self._stamp
        if stamp is None:
            return True
        try:
            st = os.lstat(self._directory)
        except OSError:
            return True
        return (st.st_ino, st.st_mtime_ns) != stamp

    def scan(self, *, prune: bool = True, term: int = 0) -> ScanResult:
        """Read every registration; delete those of dead processes when ``prune``, and answers written
        under a term older than *term* (the segment's current one: no process reads them).

        Never raises for a bad entry: unusable files are skipped and listed in
        :attr:`ScanResult.rejected`, and logged once per version of the file.
        Stale temporary files of dead writers are deleted too (when
        ``prune``). Unchanged files are not read again: their registrations
        come back as the very same objects as in the previous scan, so treat
        them as read-only.

        Raises:
            SegmentError: the registry directory itself cannot be used safely.
        """
        dir_fd = self._open_directory()
        try:
            now_ns = time.time_ns()
            st = os.fstat(dir_fd)
            stamp = None if _is_racy(st.st_mtime_ns, now_ns) else (st.st_ino, st.st_mtime_ns)
            with os.scandir(dir_fd) as it:
                names = sorted(entry.name for entry in it)
            found = _Scan(dir_fd=dir_fd, now_ns=now_ns, prune=prune)
            if prune:
                for name in older_answers(names, term):  # a process reads only the current term's
                    self._unlink(dir_fd, name)
            for name in names:
                self._scan_one(found, name)
        finally:
            os.close(dir_fd)
        self._cache = found.cache
        present = set(names)
        self._logged = {name: key for name, key in self._logged.items() if name in present}
        self._stamp = stamp
        registrations = sorted(found.registrations, key=lambda reg: (reg.pid, reg.create_time))
        return ScanResult(
            tuple(registrations), tuple(found.rejected), tuple(found.dead), tuple(sorted(found.bells))
        )

    # -- internals ------------------------------------------------------------

    def _scan_one(self, found: _Scan, name: str) -> None:
        dir_fd = found.dir_fd
        helper = TEMP_RE.fullmatch(name) or BELL_RE.fullmatch(name) or ACK_RE.fullmatch(name)
        if helper is not None:
            # A write in progress, a doorbell or an answer: nothing to read, but gone with its process.
            if not self._judged_alive(identity_from(helper)):
                found.dead.append(name)
                if found.prune:
                    self._unlink(dir_fd, name)
            elif name.endswith(".bell"):
                found.bells.append(name)
            return
        entry = ENTRY_RE.fullmatch(name)
        if entry is None:
            self._reject(found, name, None, "unexpected file name")
            return
        owner = identity_from(entry)
        if not self._judged_alive(owner):
            found.dead.append(name)
            if found.prune:
                self._unlink(dir_fd, name)
            return
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return  # removed since the listing
        key = _stat_key(st)
        cached = self._cache.get(name)
        if cached is not None and cached.key == key:
            outcome = cached.outcome
        else:
            read = self._load(dir_fd, name, st, owner)
            if read is None:
                return  # removed since the listing
            key, outcome = read
        # Only an aged stamp identifies a version of the file (racy git).
        if not _is_racy(key[1], found.now_ns):
            found.cache[name] = _Cached(key, outcome)
        if isinstance(outcome, str):
            self._reject(found, name, key, outcome)
        else:
            found.registrations.append(outcome)

    def _judged_alive(self, identity: ProcessIdentity) -> bool:
        # A PID of another namespace names another process here, or none: never judged (and
        # never pruned); see the module docstring.
        return not in_this_pid_namespace(identity) or self._alive(identity)

    def _load(
        self, dir_fd: int, name: str, st: os.stat_result, owner: ProcessIdentity
    ) -> tuple[tuple[int, int, int, int, int], Registration | str] | None:
        # Judge by lstat first, so that a FIFO or a device is never opened at all.
        problem = self._refuse(st)
        if problem is not None:
            return _stat_key(st), problem
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as error:
            if error.errno == errno.ELOOP:
                return _stat_key(st), "a symbolic link"
            return _stat_key(st), f"cannot open: {error.strerror}"
        try:
            # Replaced between the lstat and the open? Judge what was opened.
            st = os.fstat(fd)
            problem = self._refuse(st)
            if problem is not None:
                return _stat_key(st), problem
            data = _read_at_most(fd, self._max_bytes + 1)
        except OSError as error:
            return _stat_key(st), f"cannot read: {error.strerror}"
        finally:
            os.close(fd)
        key = _stat_key(st)
        if len(data) > self._max_bytes:
            return key, f"too large (over {self._max_bytes} bytes)"
        try:
            registration = decode_registration(data)
        except msgspec.DecodeError as error:
            return key, f"not a valid registration: {error}"
        problem = validate_registration(registration)
        if problem is not None:
            return key, f"not a valid registration: {problem}"
        if entry_name(registration.identity) != name:
            return key, f"names process {token(registration.identity)}, not the file's owner {token(owner)}"
        return key, registration

    def _refuse(self, st: os.stat_result) -> str | None:
        problem = files.file_problem(st)
        if problem is not None:
            return problem
        if st.st_size > self._max_bytes:
            return f"too large ({st.st_size} bytes, limit {self._max_bytes})"
        return None

    def _reject(
        self, found: _Scan, name: str, key: tuple[int, int, int, int, int] | None, reason: str
    ) -> None:
        found.rejected.append(Rejection(name, reason))
        stamp = key if key is not None else (0, 0, 0, 0, 0)
        if self._logged.get(name) == stamp:
            return  # already reported this version of the file
        self._logged = {**self._logged, name: stamp}
        path = self._directory / name
        logger.warning(
            "skipping registry entry %s: %s",
            path,
            reason,
            extra={"heksher_shm_path": str(path), "heksher_shm_reason": reason},
        )

    def _unlink(self, dir_fd: int, name: str) -> None:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return
        except OSError as error:
            path = self._directory / name
            logger.warning(
                "cannot remove the registry entry %s of a dead process: %s",
                path,
                error.strerror,
                extra={"heksher_shm_path": str(path), "heksher_shm_reason": error.strerror},
            )
            return
        logger.debug("removed the registry entry %s of a dead process", self._directory / name)

    def _open_directory(self) -> int:
        path = self._directory
        fd = None
        for _ in range(3):
            try:
                fd = os.open(path, _DIR_FLAGS)
                break
            except FileNotFoundError:
                try:
                    os.mkdir(path, 0o700)
                except FileExistsError:
                    pass  # created concurrently; open it
                except OSError as error:
                    reason = error.strerror
                    raise SegmentError(f"{path}: cannot create the registry directory: {reason}") from error
            except OSError as error:
                reason = (
                    "it is a symbolic link"
                    if error.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path)
                    else error.strerror
                )
                raise SegmentError(f"{path}: cannot use the registry directory: {reason}") from error
        if fd is None:
            raise SegmentError(f"{path}: cannot use the registry directory: it keeps disappearing")
        try:
            st = os.fstat(fd)
            problem, tighten = files.directory_problem(st, ours=True)
            if problem is not None:
                raise SegmentError(f"registry folder {path}: {problem}")
            if tighten or stat.S_IMODE(st.st_mode) != 0o700:
                # Also repairs a restrictive umask at mkdir time.
                os.fchmod(fd, 0o700)
        except BaseException:
            os.close(fd)
            raise
        return fd


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, min(limit - size, 1 << 16))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
