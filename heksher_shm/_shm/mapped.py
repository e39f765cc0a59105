"""A file mapped for sharing, over a :class:`~heksher_shm._shm.backing.Backing`: only ever grown.

The base of :class:`~heksher_shm._shm.segment.Segment`. It owns the backing
and the current mapping and nothing of the byte format beyond the header
size: every opener makes sure the header exists, so every mapping covers it
and the header words are plain loads. The host operations (``fstat``,
``posix_fallocate``, ``mmap``) are the backing's; see
:mod:`~heksher_shm._shm.backing` for why the file only grows.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys
from types import TracebackType
from typing import TypeVar

from heksher_shm._shm.backing import Backing, FileBacking, SharedMemory
from heksher_shm._shm.layout import (
    HEADER_SIZE,
    WORD_GENERATION,
)
from heksher_shm.exceptions import SegmentError

__all__ = ["MappedFile"]

_Mapped = TypeVar("_Mapped", bound="MappedFile")


class MappedFile:
    """One open, checked segment file and its shared mapping, with the header viewed as words."""

    path: pathlib.Path
    """The file."""

    def __init__(self, path: pathlib.Path, backing: Backing) -> None:
        """Map the file behind *backing*, reserving the header first if it is shorter; use :meth:`open`
        (or :meth:`over`) instead."""
        self.path = path
        self._backing = backing
        size = backing.size()
        if size < HEADER_SIZE:
            # Every opener, reader or writer, makes sure the header exists, so every
            # mapping covers it and generation() is a plain load with no size check.
            # Reserving only ever extends; it never cuts what another process wrote.
            backing.reserve(0, HEADER_SIZE)
            size = backing.size()
        self._install(backing.map(size))
        self._closed = False

    @classmethod
    def open(cls: type[_Mapped], path: os.PathLike[str] | str, *, create: bool = True) -> _Mapped:
        """Open the segment file at ``path``, creating it (mode 0600) if missing.

        With ``create=False`` a missing file raises :class:`SegmentError`
        instead (for status tools that must not leave files behind).

        Never blocks and never follows a symlink. Raises :class:`SegmentError`
        (naming the path and the reason) for a symlink, FIFO, directory or other
        non-regular file, a file owned by another user, or one with group/other
        permission bits. A new, empty or unformatted file is fine: it simply has
        no snapshot yet (:meth:`generation` is 0).
        """
        if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
            # The hot path reads the generation as a native word; the layout is little-endian.
            raise SegmentError(f"segment file {path}: big-endian hosts are not supported")
        seg_path = pathlib.Path(os.path.abspath(os.fspath(path)))
        backing = FileBacking.open(seg_path, create=create)
        try:
            return cls(seg_path, backing)
        except BaseException:
            backing.close()
            raise

    @classmethod
    def over(cls: type[_Mapped], backing: Backing, path: os.PathLike[str] | str) -> _Mapped:
        """The segment file behind any *backing* (a simulated one in tests), named *path* in messages.

        The reading and writing logic is the same as over a real file
        (:meth:`open`); only the host operations are the backing's.
        """
        return cls(pathlib.Path(path), backing)

    def _install(self, mapping: SharedMemory) -> None:
        # The old mapping is not closed: another thread may still be reading through it.
        # It is unmapped when the last reference goes.
        header = memoryview(mapping)[:HEADER_SIZE]
        self._words = header.cast("Q")
        self._floats = header.cast("d")
        self._mm = mapping

    def _remap(self, min_size: int) -> SharedMemory | None:
        """Map the file anew if it now holds ``min_size`` bytes; None if it does not."""
        try:
            size = self._backing.size()
        except SegmentError:
            return None
        if size < min_size:
            # Check the real file size first: mapping beyond the end of the file and
            # touching it would SIGBUS.
            return None
        current = self._mm
        if len(current) >= min_size:
            return current
        mapping = self._backing.map(size)
        self._install(mapping)
        return mapping

    def _refresh_mapping(self) -> SharedMemory:
        """The writer's mapping, remapped when another process (a dead leader) grew the file."""
        size = self._backing.size()
        if size > len(self._mm):
            self._install(self._backing.map(size))
        return self._mm

    def is_replaced(self) -> bool:
        """Whether the path no longer names the file this segment maps (removed or replaced).

        A process that keeps using an unlinked segment talks to nobody new: a
        newcomer creates a fresh file at the path. One ``lstat`` and one
        ``fstat``; meant for periodic checks, not the hot path.
        """
        self._check_open()
        return self._backing.replaced()

    def _check_open(self) -> None:
        if self._closed:
            raise SegmentError(f"segment file {self.path}: segment is closed")

    def close(self) -> None:
        """Unmap and close the file. Idempotent; other methods raise afterwards."""
        if self._closed:
            return
        self._closed = True
        try:
            self._words.release()
            self._floats.release()
        except BufferError:
            # A thread still holds a view; the mapping goes away with the last reference.
            pass
        self._backing.close()

    def __del__(self) -> None:
        """Close a segment that was dropped without :meth:`close`, so its descriptor is not leaked."""
        # getattr: __init__ may have failed before _closed was set.
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):  # nothing useful to do while being collected
                self.close()

    def __enter__(self: _Mapped) -> _Mapped:
        """Return self; the segment is closed on exit."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the segment."""
        self.close()

    def __repr__(self) -> str:
        """Path and state, for logs."""
        state = "closed" if self._closed else f"generation={self._words[WORD_GENERATION]}"
        return f"<{type(self).__name__} {str(self.path)!r} {state}>"
