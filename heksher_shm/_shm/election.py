"""The host-wide leader election: one ``flock`` per segment, fork-safe.

Whoever holds an exclusive ``flock`` on ``<segment>.lock`` is the segment's
leader. The kernel drops the lock when the holder's last descriptor closes,
which includes every kind of death (SIGKILL, OOM kill), so a dead leader never
blocks a successor. Nobody waits on the lock itself: followers try it
without waiting when something tells them the leader may be gone (its pidfd,
a ring; see :mod:`heksher_shm._engine`).

Why the descriptor is ours and not a :class:`filelock.FileLock`
---------------------------------------------------------------

Only the lock operation itself comes from filelock (``lock_descriptor`` /
``unlock_descriptor``, filelock >= 3.30, "the same primitive as FileLock",
with a plain ``fcntl.flock`` fallback for older filelock). Opening, checking,
and above all the fork handling need control that ``FileLock`` does not give
across the filelock versions this project allows (>= 3.12):

* **Fork** (invariant 6, first known trap). After ``fork()`` the child
  shares the parent's open file description, and ``flock(LOCK_UN)`` through
  it releases the *parent's* lock. filelock 3.x has no fork handling at all:
  a child inherits ``lock_counter`` and ``lock_file_fd``, and its
  ``release()``, or ``__del__`` when the child drops the object, unlocks the
  parent (some 3.x releases also unlink the lock file). filelock 4 resets
  its own locks in a child, but through private machinery that has changed
  shape between releases. Keeping the descriptor here, the whole trap is
  handled in :func:`_reset_after_fork`: close, never unlock.
* **Symlinks and foreign files** (invariant 9). filelock 3.12 opens the path
  without ``O_NOFOLLOW`` and with ``O_TRUNC``, so a planted symlink would
  make it truncate the target. Here the file is opened with ``O_NOFOLLOW``
  and checked with ``fstat`` on the very descriptor that gets locked.
* **No silent downgrade.** On a filesystem without ``flock`` FileLock falls
  back to a marker file that a SIGKILLed holder never removes, which would
  block takeover forever; here that is a :class:`SegmentError`.
* **The file is never unlinked.** Removing a lock file that another process
  has open lets a newcomer lock a fresh inode under the same name while the
  old holder still believes it leads.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import filelock

from heksher_shm._shm import files
from heksher_shm.exceptions import SegmentError

__all__ = ["LeaderLock"]


def _fcntl_lock(fd: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        # Some filesystems report contention as EACCES (filelock does the same).
        if error.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            return False
        raise
    return True


def _fcntl_unlock(fd: int) -> None:
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_UN)


def _filelock_lock(fd: int) -> bool:
    return bool(filelock.lock_descriptor(fd, blocking=False))


# filelock < 3.30 lacks the descriptor primitives; flock(2) is what they wrap.
if hasattr(filelock, "lock_descriptor") and hasattr(filelock, "unlock_descriptor"):
    _try_lock: Callable[[int], bool] = _filelock_lock
    _unlock: Callable[[int], None] = filelock.unlock_descriptor
else:  # pragma: no cover - depends on the installed filelock
    _try_lock = _fcntl_lock
    _unlock = _fcntl_unlock


# Serialises every change to a LeaderLock's descriptor with fork(): the
# before-fork hook takes it, so a child never inherits a descriptor that was
# opened or locked but not yet recorded (a lock the child could not find to
# close would stay held after the parent died). An RLock, so that a signal
# handler that closes a client (say, a worker's SIGTERM handler) while this
# thread is inside a critical section cannot deadlock it.
_GATE = threading.RLock()
_LIVE: weakref.WeakSet[LeaderLock] = weakref.WeakSet()


class LeaderLock:
    """An exclusive, host-wide lock on one file: whoever holds it leads the segment.

    Backed by ``flock(2)``, so the kernel releases it when the holder dies.
    Not counted and not thread-local: acquiring a held lock again returns
    ``True``, one :meth:`release` (from any thread) releases it. Two
    instances, even in one process, exclude each other.

    Fork-safe: in a child the inherited lock is closed without being
    unlocked, so the parent keeps leading, the child's :attr:`held` is
    ``False``, and the child may compete for the lock like any other
    process.

    The lock file is created ``0600`` in ``path``'s directory, which must
    exist, belong to this user and not be writable by others. A symlink, a
    non-regular file, or a file owned by another user at ``path`` is refused
    with :class:`~heksher_shm.exceptions.SegmentError`. The file is never
    removed.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)
        self._fd: int | None = None  # open descriptor, locked when _held
        self._inode: tuple[int, int] | None = None  # (st_dev, st_ino) of _fd
        self._held = False
        self._owner_pid = os.getpid()
        with _GATE:
            _LIVE.add(self)

    def __repr__(self) -> str:
        return f"<LeaderLock {str(self._path)!r} held={self.held}>"

    @property
    def path(self) -> Path:
        """The lock file's path."""
        return self._path

    @property
    def held(self) -> bool:
        """Whether this process holds the lock through this instance."""
        # The PID check also covers a fork that skipped the at-fork hooks
        # (a C extension calling fork() directly).
        return self._held and self._owner_pid == os.getpid()

    def try_acquire(self) -> bool:
        """Take the lock if it is free, without waiting; return whether it is held now."""
        with _GATE:
            self._adopt_fork()
            return self._held or self._attempt()

    def seize(self) -> bool:
        """Lead in place of a holder that stopped making progress: put a new lock file, locked by this
        instance, where the old one was. Returns whether the lock is held now.

        The old holder keeps its ``flock`` on a file no path names any more; its
        next :meth:`verify` says ``False``, and it steps down. Only for a holder
        judged stuck (see :mod:`heksher_shm._engine.engine`), and only under a second
        lock that lets one process at a time do it: two seizing at once would
        each hold a file for a moment.
        """
        with _GATE:
            self._adopt_fork()
            if self._held:
                return True
            self._close()
            self._check_directory()
            temp = self._path.with_name(f".{self._path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            try:
                fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as error:
                raise SegmentError(f"{temp}: cannot create a new leader lock file: {_why(error)}") from error
            self._fd = fd  # recorded before anything can raise, so the fork hook always finds it
            try:
                st = os.fstat(fd)
                self._inode = (st.st_dev, st.st_ino)
                if not _try_lock(fd):  # a file nobody else can know yet: cannot be taken
                    raise SegmentError(f"{temp}: a brand-new lock file is locked by someone else")
                os.rename(temp, self._path)  # one step: the path names the new file from here on
            except BaseException:
                self._close()
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise
            self._held = True
            return True

    def release(self) -> None:
        """Give up the lock. Does nothing when it is not held (or was inherited across fork)."""
        with _GATE:
            self._adopt_fork()
            if self._fd is None:
                return
            fd, held = self._fd, self._held
            self._fd = self._inode = None
            self._held = False
            try:
                if held:
                    # Closing alone would release it only if no stray duplicate
                    # of the descriptor exists; an explicit unlock always does.
                    _unlock(fd)
            finally:
                os.close(fd)

    def verify(self) -> bool:
        """Return whether the lock is held and ``path`` still names the locked file.

        A leader can call this now and then: if someone removed or replaced
        the lock file (a temp-directory cleaner, say), a newcomer could lock
        the new file, so a ``False`` here means: step down and acquire again.
        """
        with _GATE:
            self._adopt_fork()
            return self._held and self._path_matches()

    def __del__(self, _getpid: Callable[[], int] = os.getpid) -> None:
        # No gate here: the last reference is gone, so no other thread can be
        # using this instance. _getpid is bound at definition because module
        # globals may already be gone at interpreter shutdown. Only the process
        # that took the lock may unlock it; a child merely closes (and its
        # at-fork hook has normally done that already).
        fd = self.__dict__.get("_fd")
        if fd is None:
            return
        with contextlib.suppress(Exception):
            if self.__dict__.get("_owner_pid") == _getpid() and self.__dict__.get("_held"):
                _unlock(fd)
        with contextlib.suppress(Exception):
            os.close(fd)

    # -- internals (callers hold _GATE) ------------------------------------

    def _attempt(self) -> bool:
        # Two rounds: if the file we locked turns out to have been replaced
        # (see verify()), try once more on the file that is there now.
        for _ in range(2):
            if self._fd is None:
                self._open()
            fd = self._fd
            assert fd is not None
            try:
                locked = _try_lock(fd)
            except OSError as error:
                self._close()
                raise SegmentError(f"{self._path}: cannot lock the leader lock file: {error}") from error
            if not locked:
                self._close()
                return False
            if self._path_matches():
                self._held = True
                return True
            _unlock(fd)
            self._close()
        return False

    def _open(self) -> None:
        self._check_directory()
        fd = files.open_private_file("leader lock file", self._path, create=True, writable=False)
        # Recorded before anything can raise, so the fork hook always finds it.
        self._fd = fd
        try:
            st = os.fstat(fd)
            self._inode = (st.st_dev, st.st_ino)
        except BaseException:
            self._close()
            raise

    def _check_directory(self) -> None:
        directory = self._path.parent
        try:
            st = os.lstat(directory)
        except OSError as error:
            raise SegmentError(f"{self._path}: cannot use the lock's directory: {_why(error)}") from error
        problem, _ = files.directory_problem(st, ours=False)
        if problem is not None:
            raise SegmentError(f"lock folder {directory}: {problem}")

    def _path_matches(self) -> bool:
        try:
            st = os.lstat(self._path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._inode

    def _close(self) -> None:
        fd = self._fd
        self._fd = self._inode = None
        self._held = False
        if fd is not None:
            os.close(fd)

    def _adopt_fork(self) -> None:
        if self._owner_pid != os.getpid():
            self._forget_inherited()

    def _forget_inherited(self) -> None:
        # In a child: drop the parent's descriptor WITHOUT unlocking it. The
        # lock belongs to the open file description, shared with the parent;
        # flock(LOCK_UN) here would release the parent's lock, while close()
        # only drops this process's reference to it.
        fd, inode = self._fd, self._inode
        self._fd = self._inode = None
        self._held = False
        self._owner_pid = os.getpid()
        if fd is None:
            return
        # Close only if the number still refers to our file, so a number
        # reused by someone else is never closed under them.
        with contextlib.suppress(OSError):
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == inode:
                os.close(fd)


def _why(error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "it is a symbolic link"
    if error.errno in (errno.ENOENT, errno.ENOTDIR):
        return "its directory does not exist"
    return error.strerror or str(error)


def _before_fork() -> None:
    _GATE.acquire()


def _after_fork_in_parent() -> None:
    _GATE.release()


def _reset_after_fork() -> None:
    """In a forked child (called by :mod:`heksher_shm._process.fork`): a new gate; inherited locks closed."""
    # The child runs with a single thread, so walking the set is safe; every
    # lock the parent knew of, held or merely open while waiting, is
    # forgotten. The gate is made anew rather than released: some servers
    # (uwsgi's fork hooks) run only this child hook, without the before-fork
    # one that took it, and a gate another thread held at fork time would
    # otherwise stay locked in the child forever.
    global _GATE
    _GATE = threading.RLock()
    for lock in list(_LIVE):
        lock._forget_inherited()
