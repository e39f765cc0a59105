"""``heksher-shm clean``: remove the files of segments that no live process uses.

A segment's files, all in the shared folder (see :mod:`heksher_shm._engine.shared`)::

    <name>.seg        the segment          <name>.lock        the election lock
    <name>.takeover   the takeover lock    <name>.seg.d/      registrations and doorbells
    .<name>.lock.<pid>.<hex>, .<name>.takeover.<pid>.<hex>    a takeover's new lock file, left by a
                                                                process killed in the middle of it

A segment is *in use*, and nothing of it is touched, when someone holds its
election or takeover lock (tried with ``flock`` without waiting), or its
registry folder holds an entry of a live process or of a process of another
PID namespace (whose liveness cannot be judged from here), or (only when
there is no lock file to try) its header names a live leader. Otherwise all
of it goes: the registry folder's entries and the folder, the segment, the
takeover lock, and last the election lock, removed while this command holds
it, so that no process can be elected on it in the meantime. Files it does
not recognise are left alone, and so is every file the file policy refuses
(another user's, a symbolic link, loosened modes): such a segment is
reported and not judged.

A process that opened a segment a moment before it was removed (starting
right then) notices at its next wake: it reopens the segment at its path and
registers again, as after any removal.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from heksher_shm._engine.shared import SEGMENT_NAME
from heksher_shm._shm import files
from heksher_shm._shm.folder import ENV_SHM_DIR, resolve_shm_dir, shm_dir_path
from heksher_shm._shm.identity import ProcessIdentity, in_this_pid_namespace, is_alive
from heksher_shm._shm.layout import HEADER_SIZE
from heksher_shm._shm.registry import entry_owner
from heksher_shm._shm.segment import Segment
from heksher_shm.cli.common import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNHEALTHY,
    EXIT_UNREADABLE,
    EXIT_USAGE,
    CliError,
)
from heksher_shm.exceptions import SegmentError

__all__ = ["Leftover", "find_segments", "run_clean"]

_SUFFIXES = (".seg.d", ".seg", ".lock", ".takeover")
_SEIZE_TEMP = re.compile(r"\.(.+)\.(lock|takeover)\.[0-9]+\.[0-9a-f]+")


@dataclass
class Leftover:
    """One segment's files, as ``clean`` found and judged them."""

    name: str
    paths: list[Path] = field(default_factory=list)
    """Its files in the shared folder (the registry folder's entries not listed)."""
    in_use: str | None = None
    """Why it is kept (in use), or None."""
    refused: str | None = None
    """Why it was not judged (a file the file policy refuses), or None."""
    entries: int = 0
    """Entries of its registry folder."""
    failed: str | None = None
    """What could not be removed, or None."""


def find_segments(directory: Path) -> list[Leftover]:
    """Every segment name that has a file in *directory*, with its files (nothing judged yet)."""
    found: dict[str, Leftover] = {}
    with os.scandir(directory) as it:
        names = sorted(entry.name for entry in it)
    for file_name in names:
        segment = _segment_of(file_name)
        if segment is not None and SEGMENT_NAME.fullmatch(segment):
            found.setdefault(segment, Leftover(segment)).paths.append(directory / file_name)
    return [found[name] for name in sorted(found)]


def _segment_of(file_name: str) -> str | None:
    temp = _SEIZE_TEMP.fullmatch(file_name)
    if temp is not None:
        return temp[1]
    for suffix in _SUFFIXES:
        if file_name.endswith(suffix) and len(file_name) > len(suffix):
            return file_name[: -len(suffix)]
    return None


def run_clean(dir_arg: str | None, name: str | None, dry_run: bool) -> int:
    """``heksher-shm clean``: remove (or with ``dry_run``, list) the segments no live process uses.

    Returns the highest exit code among the segments: 0 removed or listed (or
    nothing to do), 1 a removal failed, 4 a segment not judged (a file the
    file policy refuses).
    """
    directory = _folder(dir_arg)
    if directory is None:
        return EXIT_OK
    leftovers = find_segments(directory)
    if name is not None:
        name = name.removesuffix(".seg")
        if not SEGMENT_NAME.fullmatch(name):
            raise CliError(f"{name!r} is not a segment name (as `status` lists them)", EXIT_USAGE)
        leftovers = [left for left in leftovers if left.name == name]
        if not leftovers:
            raise CliError(f"no files of a segment named {name!r} in {directory}", EXIT_NOT_FOUND)
    code = EXIT_OK
    removed = kept = 0
    for left in leftovers:
        with _judged(left):
            if left.refused is None and left.in_use is None and not dry_run:
                _remove(left)
        if left.refused is not None:
            print(f"skipped {left.name}: {left.refused}; left alone")
            code = max(code, EXIT_UNREADABLE)
        elif left.in_use is not None:
            print(f"kept {left.name}: in use ({left.in_use})")
            kept += 1
        elif left.failed is not None:
            print(f"failed {left.name}: {left.failed}")
            code = max(code, EXIT_UNHEALTHY)
        else:
            print(f"{'would remove' if dry_run else 'removed'} {left.name}: {_listing(left)}")
            removed += 1
    verb = "would remove" if dry_run else "removed"
    print(f"{verb} {removed} unused segment{'s' * (removed != 1)}, kept {kept} in use, in {directory}")
    return code


def _folder(dir_arg: str | None) -> Path | None:
    """The folder to clean; None when the default one does not exist (nothing to clean)."""
    candidate, explicit = shm_dir_path(dir_arg or None)
    if not os.path.lexists(candidate):
        if not explicit:
            print(f"nothing to clean: {candidate} does not exist")
            return None
        source = "--dir" if dir_arg else ENV_SHM_DIR
        raise CliError(f"segment directory {candidate} ({source}) does not exist", EXIT_NOT_FOUND)
    try:
        return resolve_shm_dir(candidate)  # checks ownership, type and mode; creates nothing
    except SegmentError as e:
        raise CliError(str(e), EXIT_UNREADABLE) from None


def _listing(left: Leftover) -> str:
    parts = []
    for path in left.paths:
        if path.name.endswith(".seg.d"):
            parts.append(f"{path.name}/ ({left.entries} entr{'y' if left.entries == 1 else 'ies'})")
        else:
            parts.append(path.name)
    return ", ".join(parts)


@contextlib.contextmanager
def _judged(left: Leftover) -> Iterator[None]:
    """Judge *left* while holding its locks (when free), and keep holding them through the block."""
    held: list[int] = []
    try:
        left.refused = next(
            (f"{path} {problem}" for path in left.paths if (problem := _file_problem(path)) is not None), None
        )
        if left.refused is None:
            for path in left.paths:
                if path.name in (f"{left.name}.lock", f"{left.name}.takeover"):
                    free, fd = _try_lock(path)
                    if not free:
                        left.in_use = f"{path.name} is locked: its leader, or a takeover, holds it"
                        break
                    if fd is not None:
                        held.append(fd)
            else:
                locked = any(p.name == f"{left.name}.lock" for p in left.paths)
                left.in_use, left.refused = _users(left, locked)
        yield
    finally:
        for fd in held:
            os.close(fd)  # releases the flock (after the files were removed, when they were)


def _file_problem(path: Path) -> str | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if path.name.endswith(".seg.d"):
        problem, _ = files.directory_problem(st, ours=False)
        return problem
    return files.file_problem(st)


def _try_lock(path: Path) -> tuple[bool, int | None]:
    """(whether no one else holds a ``flock`` on *path*, a descriptor holding one now or None)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return True, None  # removed meanwhile: nothing to hold
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EACCES):
            return False, None
        raise
    return True, fd


def _users(left: Leftover, locked: bool) -> tuple[str | None, str | None]:
    """(who uses the segment, why it cannot be judged), with its locks held (*locked*: the election
    lock, which no leader can hold then): live processes or processes of another PID namespace
    attached, a live leader recorded when there is no lock file, an entry heksher_shm does not make."""
    segment = next((p for p in left.paths if p.name == f"{left.name}.seg"), None)
    # A leader leads while it holds the lock: a live one recorded in the header, with the lock free,
    # has closed its client (or stepped down and is attached, which the registry tells).
    if not locked and segment is not None and os.lstat(segment).st_size >= HEADER_SIZE:
        leader = _leader(segment)
        if leader is not None and (not in_this_pid_namespace(leader) or is_alive(leader)):
            return f"its leader, pid {leader.pid}, is alive", None
    registry = next((p for p in left.paths if p.name == f"{left.name}.seg.d"), None)
    if registry is None:
        return None, None
    try:
        with os.scandir(registry) as it:
            entries = sorted(entry.name for entry in it)
    except FileNotFoundError:
        return None, None
    left.entries = len(entries)
    live: set[int] = set()
    for entry in entries:
        owner = entry_owner(entry)
        if owner is None:
            return None, f"its registry folder holds {entry!r}, which heksher_shm does not make"
        if not in_this_pid_namespace(owner) or is_alive(owner):
            live.add(owner.pid)
    if not live:
        return None, None
    pids = sorted(live)
    shown = ", ".join(map(str, pids[:5])) + (" ..." if len(pids) > 5 else "")
    return f"{len(pids)} live process{'es' * (len(pids) != 1)} attached: pid {shown}", None


def _leader(path: Path) -> ProcessIdentity | None:
    """The leader the segment's header records; None when none is, or the header cannot be read."""
    try:
        segment = Segment.open(path, create=False)  # long enough: opening it changes nothing
    except SegmentError:
        return None
    try:
        recorded = segment.leader()
    finally:
        segment.close()
    return None if recorded is None else ProcessIdentity(recorded[0], recorded[1], recorded[2])


def _remove(left: Leftover) -> None:
    """Remove the segment's files, the election lock last (its flock is held by the caller)."""
    lock = f"{left.name}.lock"
    try:
        for path in sorted(left.paths, key=lambda p: p.name == lock):
            if path.name.endswith(".seg.d"):
                _remove_registry(path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
    except OSError as error:
        left.failed = f"cannot remove {error.filename or ''}: {error.strerror}"


def _remove_registry(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with os.scandir(fd) as it:
            names = [entry.name for entry in it]
        for name in names:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise OSError(errno.EISDIR, "a folder inside the registry folder", str(path / name))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(path)
