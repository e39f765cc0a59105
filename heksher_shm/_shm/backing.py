"""What a segment needs from its host, as one small protocol, and the real file behind it.

The reading and writing logic of a segment (:mod:`~heksher_shm._shm.reading`,
:mod:`~heksher_shm._shm.writing`) does no I/O of its own: every host
operation goes through a :class:`Backing`. :class:`FileBacking` is the real
one (a checked descriptor, ``posix_fallocate`` and a ``MAP_SHARED`` mapping);
a test may hand :meth:`~heksher_shm._shm.segment.Segment.over` an in-memory
one, so the real layout code runs over a simulated mapping with a simulated
clock (``tests/_memory_backing.py``).

**Only grow.** Shrinking or truncating a mapped file raises SIGBUS in every
process that maps it, so the file never shrinks. Space is reserved with
``posix_fallocate`` before it is used, so a full disk is an error in the
writer's ``publish``, never a SIGBUS in a reader. A file another process grew
is mapped anew (never past its real end, checked with ``fstat``); the old
mapping stays alive while a thread still reads through it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pathlib
import time
from typing import Protocol

from heksher_shm._shm import files
from heksher_shm.exceptions import SegmentError

__all__ = ["Backing", "FileBacking", "SharedMemory"]


class SharedMemory(Protocol):
    """A mapping of the file: what :meth:`Backing.map` returns (an ``mmap`` for real).

    Slices read copies (``bytes``); slice assignment writes in place and never
    changes the length; ``memoryview(mapping)`` views it in place (the header
    words are read through ``memoryview(...).cast("Q")``).
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice, /) -> bytes: ...

    def __setitem__(self, index: slice, value: bytes, /) -> None: ...

    def __buffer__(self, flags: int, /) -> memoryview: ...


class Backing(Protocol):
    """The host operations of one open segment file (see the module docstring)."""

    def size(self) -> int:
        """The file's real size in bytes now; raises :class:`SegmentError` if it cannot be had."""
        ...

    def reserve(self, offset: int, length: int) -> None:
        """Make bytes ``offset`` to ``offset + length`` exist (growing the file, never shrinking it);
        raises :class:`SegmentError` (a full disk) instead of leaving a hole to SIGBUS on."""
        ...

    def map(self, size: int) -> SharedMemory:
        """A shared mapping of the first *size* bytes (at most :meth:`size`). Earlier mappings stay
        valid: another thread may still read through one."""
        ...

    def replaced(self) -> bool:
        """Whether the path no longer names this file (removed, or replaced by another)."""
        ...

    def pause(self) -> None:
        """Give the CPU away once (a reader waiting for a writer to finish)."""
        ...

    def nap(self, seconds: float) -> None:
        """Sleep briefly (the status seqlock's bounded wait for a descheduled writer)."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch (``published_at``, and the floors of a reformatted header)."""
        ...

    def barrier(self) -> None:
        """Make this process's earlier stores to the mapping visible to every process before its
        later loads (after the fencing token is stored)."""
        ...

    def close(self) -> None:
        """Unmap and close; a mapping a thread still views goes away with its last reference."""
        ...


class FileBacking:
    """The real segment file: an ``O_NOFOLLOW`` descriptor checked by :mod:`files`, and its ``mmap``."""

    def __init__(self, path: pathlib.Path, fd: int) -> None:
        """Wrap a descriptor opened and checked by :func:`files.open_private_file`; use :meth:`open`."""
        self.path = path
        self._fd = fd
        self._mapping: mmap.mmap | None = None

    @classmethod
    def open(cls, path: pathlib.Path, *, create: bool) -> FileBacking:
        """Open (with ``create``, creating it ``0600``) and check the segment file at *path*.

        Raises :class:`SegmentError` naming the path and the reason for a
        symlink, FIFO, directory or other non-regular file, a file owned by
        another user, or one with group/other permission bits (see :mod:`files`).
        """
        return cls(path, files.open_private_file("segment file", path, create=create, writable=True))

    def size(self) -> int:
        """``fstat`` of the descriptor: the real size, whatever the mapping covers."""
        try:
            return os.fstat(self._fd).st_size
        except OSError as exc:  # pragma: no cover - the descriptor is ours and open
            raise SegmentError(f"segment file {self.path}: cannot stat: {exc.strerror}") from exc

    def reserve(self, offset: int, length: int) -> None:
        """``posix_fallocate``, with errors (ENOSPC above all) turned into :class:`SegmentError`."""
        try:
            os.posix_fallocate(self._fd, offset, length)
        except OSError as exc:
            raise SegmentError(
                f"segment file {self.path}: cannot reserve {length} bytes at offset {offset}: {exc.strerror}"
            ) from exc

    def map(self, size: int) -> mmap.mmap:
        """A new ``MAP_SHARED`` read-write mapping of *size* bytes."""
        try:
            mapping = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as exc:
            raise SegmentError(f"segment file {self.path}: cannot map {size} bytes: {exc}") from exc
        self._mapping = mapping
        return mapping

    def replaced(self) -> bool:
        """One ``lstat`` of the path and one ``fstat`` of the descriptor: do they name one file?"""
        try:
            named = os.lstat(self.path)
        except FileNotFoundError:
            return True
        except OSError as exc:
            raise SegmentError(f"segment file {self.path}: cannot inspect it: {exc.strerror}") from exc
        mapped = os.fstat(self._fd)
        return (named.st_dev, named.st_ino) != (mapped.st_dev, mapped.st_ino)

    def pause(self) -> None:
        """``sched_yield``."""
        os.sched_yield()

    def nap(self, seconds: float) -> None:
        """``time.sleep``."""
        time.sleep(seconds)

    def wall(self) -> float:
        """``time.time``."""
        return time.time()

    def barrier(self) -> None:
        """``msync`` of the header page: a full barrier on x86-64.

        CPython emits no fences, and x86-64 (TSO) lets a store wait in the
        store buffer while later loads go ahead; that is the one reordering
        fencing cannot allow (a new leader's token must be seen by a stale
        publisher's check, or the new leader must see that publish). msync
        takes the kernel's mmap lock, a locked instruction, which drains the
        store buffer. On a tmpfs file (``/dev/shm``) it writes nothing back.
        """
        mapping = self._mapping
        if mapping is None or mapping.closed:
            return
        try:
            mapping.flush(0, min(len(mapping), mmap.PAGESIZE))
        except ValueError:  # closed by another thread meanwhile: nothing left to order
            pass
        except OSError as exc:  # pragma: no cover - msync of our own mapping does not fail
            raise SegmentError(f"segment file {self.path}: cannot msync: {exc.strerror}") from exc

    def close(self) -> None:
        """Close the last mapping (unless a thread still views it) and the descriptor."""
        mapping, self._mapping = self._mapping, None
        if mapping is not None:
            # A thread still holds a view; the mapping goes away with the last reference.
            with contextlib.suppress(BufferError):
                mapping.close()
        os.close(self._fd)
