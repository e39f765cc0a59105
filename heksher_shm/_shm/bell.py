"""Doorbells: how one process wakes another that sleeps until something changes.

Every process attached to a segment binds a Unix datagram socket, its
*bell*, in the segment's registry directory (``<segment>.d/<token>.bell``,
named like its registration). A process that sleeps waits on its bell's
descriptor (with ``poll``, an asyncio reader, or gevent's patched ``select``);
anyone who wants it to look again sends one byte to the bell's path.

* A follower that changed its registration (a new process, a reload) rings
  the leader's bell, found through the leader's identity in the segment's
  status block.
* The leader rings every registered process after an update, a publish, or a
  change of leader, so their waits for an acknowledgement end at once and
  their ``on_update_ok``/``on_update_error`` callbacks run.

A ring carries no data: the truth stays in the files (registrations, the
segment), and a bell only says "look". So a lost ring costs latency, never
correctness: the leader also rescans the registry at every regular update,
and every sleeper has a deadline. A full queue (``EAGAIN``) means a ring is
already pending; a missing socket (``ENOENT``, ``ECONNREFUSED``) means nobody
listens there.

The directory is ``0700`` and ours, so only this user's processes can ring.
Socket paths are limited to 107 bytes; a longer one (a deep
``HEKSHER_SHM_DIR``) is reached through ``/proc/self/fd/<directory fd>``,
which also means no component of the path is followed as a symlink after the
directory was opened.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import socket
import stat
from pathlib import Path

from heksher_shm.exceptions import SegmentError

__all__ = ["Bell", "ring"]

logger = logging.getLogger("heksher_shm.bell")

_MAX_PATH = 100  # sun_path holds 108 bytes with the terminating NUL; keep a margin
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    # Said outright rather than with SOCK_NONBLOCK: gevent's socket class ignores that flag and would
    # wait (cooperatively, but forever) in recv() on an empty queue.
    sock.setblocking(False)
    return sock


class _Address(contextlib.AbstractContextManager["_Address"]):
    """The address of ``directory/name`` for bind/sendto, through the directory's descriptor if long."""

    def __init__(self, directory: Path, name: str) -> None:
        self._fd: int | None = None
        full = str(directory / name)
        if len(full.encode()) <= _MAX_PATH:
            self.path = full
        else:
            self._fd = os.open(directory, _DIR_FLAGS)
            self.path = f"/proc/self/fd/{self._fd}/{name}"

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)


class Bell:
    """This process's doorbell in *directory*: a bound, non-blocking Unix datagram socket.

    Raises:
        SegmentError: the socket cannot be bound (the message names the path).
    """

    def __init__(self, directory: Path, name: str) -> None:
        self.path = directory / name
        self._owner = os.getpid()
        sock = _socket()
        try:
            with _Address(directory, name) as address:
                # A socket left at our name can only be a dead process's with our pid and start
                # time (never a live one's), or ours from before a reopen: replace it.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(address.path)
                sock.bind(address.path)
                # bind() applies the umask to 0777; the folder is private anyway, the file too.
                os.chmod(address.path, 0o600)
        except OSError as error:
            sock.close()
            raise SegmentError(f"doorbell {self.path}: cannot bind it: {error.strerror or error}") from error
        self._sock: socket.socket | None = sock

    def fileno(self) -> int:
        """The descriptor to wait on: readable when someone rang."""
        if self._sock is None:
            raise ValueError("the bell is closed")
        return self._sock.fileno()

    def drain(self) -> int:
        """Take every pending ring; returns how many there were."""
        sock = self._sock
        count = 0
        if sock is None:
            return 0
        while True:
            try:
                sock.recv(16)
            except (BlockingIOError, InterruptedError):
                return count
            except OSError:
                return count
            count += 1

    def present(self) -> bool:
        """Whether the socket file is still there (someone may have cleaned the folder)."""
        try:
            return stat.S_ISSOCK(os.lstat(self.path).st_mode)
        except OSError:
            return False

    def close(self) -> None:
        """Stop listening and remove the socket file (only in the process that bound it)."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        sock.close()
        if self._owner == os.getpid():
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def forget_inherited(self) -> None:
        """In a forked child: close the inherited descriptor, leave the parent's socket file alone."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


_sender: tuple[int, socket.socket] | None = None
"""The socket this process rings with (and the pid that made it: a forked child makes its own)."""


def _close_sender() -> None:
    global _sender
    sender, _sender = _sender, None
    if sender is not None and sender[0] == os.getpid():
        sender[1].close()


atexit.register(_close_sender)


def _reset_after_fork() -> None:
    """In a forked child (called by :mod:`heksher_shm._process.fork`): drop the parent's sending socket."""
    global _sender
    sender, _sender = _sender, None
    if sender is not None:
        sender[1].close()  # the child's copy of the descriptor; the parent keeps its own


def ring(directory: Path, name: str) -> bool:
    """Ring the bell ``directory/name``; returns whether it is (now or already) ringing.

    Never raises: ringing is a hint, and a process that is not there to hear
    it needs no ring.
    """
    global _sender
    sender = _sender
    if sender is None or sender[0] != os.getpid():  # a forked child makes its own
        _sender = sender = (os.getpid(), _socket())
    try:
        with _Address(directory, name) as address:
            sender[1].sendto(b"\0", address.path)
    except BlockingIOError:
        return True  # the queue is full: a ring is pending already
    except OSError as error:
        if error.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR):
            logger.debug("could not ring %s", directory / name, exc_info=True)
        return False
    return True
