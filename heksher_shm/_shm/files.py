"""One policy for every file and folder heksher_shm keeps on the host (design invariant 9).

The segment, the lock files, the registrations and the doorbells all live in
one per-user folder. What is refused, and what is repaired, is decided here
and only here:

**Files** (the segment, the lock files, registrations):

* never followed through a symbolic link: looked at with ``lstat`` first (so
  a device or FIFO planted in our place is never even opened), then opened
  with ``O_NOFOLLOW | O_NONBLOCK``, then checked again with ``fstat`` on the
  descriptor actually opened;
* must be regular files, owned by this user;
* must have no group or other permission bits. heksher_shm creates them
  ``0600`` whatever the umask; a file someone loosened is refused, naming
  the path, its mode and the fix, never silently changed: a file others
  could read or write is someone's mistake to hear about.

**Folders** (the folder of segments, a segment's registry folder):

* never a symbolic link; a directory, owned by this user;
* writable by group or others: refused (others could plant files);
* readable or searchable by group or others: tightened to ``0700`` when the
  folder is heksher_shm's own (the default folder, a registry folder), left
  alone when the user named it (``HEKSHER_SHM_DIR``, ``shm_dir``): who may
  look into a folder the user chose is the user's call.

Every refusal is a :class:`~heksher_shm.exceptions.SegmentError` whose message
starts with what the path is for and the path, so an operator reading a log
knows which file to look at. (A registry scan does not raise: it skips and
logs the entry with the same reason.)
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from heksher_shm.exceptions import SegmentError

__all__ = ["directory_problem", "file_problem", "open_private_file", "refuse_file"]

_OPEN_RETRIES = 10

_NOT_A_FILE = {
    stat.S_IFLNK: "is a symbolic link; refusing to follow it",
    stat.S_IFDIR: "is a directory, not a file",
    stat.S_IFIFO: "is a FIFO, not a regular file",
    stat.S_IFSOCK: "is a socket, not a regular file",
    stat.S_IFCHR: "is a character device, not a regular file",
    stat.S_IFBLK: "is a block device, not a regular file",
}


def file_problem(st: os.stat_result) -> str | None:
    """Why a file with this ``stat`` must not be used, or None (see the module docstring)."""
    mode = st.st_mode
    kind = stat.S_IFMT(mode)
    if kind != stat.S_IFREG:
        return _NOT_A_FILE.get(kind, f"is not a regular file (type {kind:#o})")
    euid = os.geteuid()
    if st.st_uid != euid:
        return f"is owned by uid {st.st_uid}, not by this user (uid {euid})"
    if mode & 0o077:
        return (
            f"has mode {stat.S_IMODE(mode):#o}; group/other permission bits must be clear "
            "(chmod 600 it, or remove it when no process uses it)"
        )
    return None


def refuse_file(what: str, path: Path, st: os.stat_result) -> None:
    """Raise :class:`SegmentError` if the file must not be used."""
    problem = file_problem(st)
    if problem is not None:
        raise SegmentError(f"{what} {path}: {problem}")


def directory_problem(st: os.stat_result, *, ours: bool) -> tuple[str | None, bool]:
    """(why a folder must not be used or None, whether its mode should be tightened to 0700)."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return "is a symbolic link; refusing to follow it", False
    if not stat.S_ISDIR(mode):
        return "is not a directory", False
    euid = os.geteuid()
    if st.st_uid != euid:
        return f"is owned by uid {st.st_uid}, not by this user (uid {euid})", False
    bits = stat.S_IMODE(mode)
    if bits & 0o022:
        return f"has mode {bits:#o}; it must not be writable by group or others", False
    return None, ours and bool(bits & 0o077)


def open_private_file(what: str, path: Path, *, create: bool, writable: bool) -> int:
    """Open a private file of ours (creating it ``0600`` if *create* and missing); a descriptor.

    Raises:
        SegmentError: the file is missing (and not *create*), cannot be opened or
            created, or breaks the policy (the message names *what*, the path and why).
    """
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    for _ in range(_OPEN_RETRIES):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not create:
                raise SegmentError(f"{what} {path}: does not exist") from None
            try:
                # O_EXCL: of two processes creating at once, one wins; the other opens its file.
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            except OSError as exc:
                raise SegmentError(f"{what} {path}: cannot create it: {_why(exc)}") from exc
            try:
                os.fchmod(fd, 0o600)  # the umask may have cleared owner bits
            except OSError as exc:
                os.close(fd)
                raise SegmentError(f"{what} {path}: cannot set mode 0600: {exc.strerror}") from exc
            return fd
        except OSError as exc:
            raise SegmentError(f"{what} {path}: cannot inspect it: {exc.strerror}") from exc
        refuse_file(what, path, st)
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            continue  # removed between lstat and open: start over
        except OSError as exc:
            raise SegmentError(f"{what} {path}: cannot open it: {_why(exc)}") from exc
        try:
            refuse_file(what, path, os.fstat(fd))  # what was opened, in case it was swapped meanwhile
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise SegmentError(f"{what} {path}: keeps being created and removed by another process")


def _why(error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "it is a symbolic link; refusing to follow it"
    if error.errno == errno.EISDIR:
        return "it is a directory, not a file"
    if error.errno in (errno.ENOENT, errno.ENOTDIR):
        return "its folder does not exist"
    return error.strerror or str(error)
