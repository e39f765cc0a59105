"""A file mapped for sharing: opened safely, mapped ``MAP_SHARED``, only ever grown.

The base of :class:`~heksher_shm._shm.segment.Segment`. It owns the file
descriptor and the mapping and nothing of the byte format beyond the header
size: every opener makes sure the header exists, so every mapping covers it
and the header words are plain loads.

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
import sys
from types import TracebackType
from typing import TypeVar

from heksher_shm._shm import files
from heksher_shm._shm.layout import (
    HEADER_SIZE,
    WORD_GENERATION,
)
from heksher_shm.exceptions import SegmentError

__all__ = ["MappedFile", "map_file", "reserve"]

_Mapped = TypeVar("_Mapped", bound="MappedFile")


class MappedFile:
    """One open, checked segment file and its shared mapping, with the header viewed as words."""

    path: pathlib.Path
    """The file."""

    def __init__(self, path: pathlib.Path, fd: int, mapping: mmap.mmap) -> None:
        """Wrap an open, checked descriptor and its mapping; use :meth:`open` instead."""
        self.path = path
        self._fd = fd
        self._closed = False
        self._install(mapping)

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
        fd = files.open_private_file("segment file", seg_path, create=create, writable=True)
        try:
            st = os.fstat(fd)
            if st.st_size < HEADER_SIZE:
                # Every opener, reader or writer, makes sure the header exists, so every
                # mapping covers it and generation() is a plain load with no size check.
                # fallocate only ever extends; it never cuts what another process wrote.
                reserve(seg_path, fd, 0, HEADER_SIZE)
                st = os.fstat(fd)
            mapping = map_file(seg_path, fd, st.st_size)
        except BaseException:
            os.close(fd)
            raise
        return cls(seg_path, fd, mapping)

    def _install(self, mapping: mmap.mmap) -> None:
        # The old mapping is not closed: another thread may still be reading through it.
        # It is unmapped when the last reference goes.
        header = memoryview(mapping)[:HEADER_SIZE]
        self._words = header.cast("Q")
        self._floats = header.cast("d")
        self._mm = mapping

    def _remap(self, min_size: int) -> mmap.mmap | None:
        """Map the file anew if it now holds ``min_size`` bytes; None if it does not."""
        try:
            size = os.fstat(self._fd).st_size
        except OSError:
            return None
        if size < min_size:
            # Check the real file size first: mapping beyond the end of the file and
            # touching it would SIGBUS.
            return None
        current = self._mm
        if len(current) >= min_size:
            return current
        mapping = map_file(self.path, self._fd, size)
        self._install(mapping)
        return mapping

    def _refresh_mapping(self) -> mmap.mmap:
        """The writer's mapping, remapped when another process (a dead leader) grew the file."""
        try:
            size = os.fstat(self._fd).st_size
        except OSError as exc:  # pragma: no cover - the descriptor is ours and open
            raise SegmentError(f"segment file {self.path}: cannot stat: {exc.strerror}") from exc
        if size > len(self._mm):
            self._install(map_file(self.path, self._fd, size))
        return self._mm

    def is_replaced(self) -> bool:
        """Whether the path no longer names the file this segment maps (removed or replaced).

        A process that keeps using an unlinked segment talks to nobody new: a
        newcomer creates a fresh file at the path. One ``lstat`` and one
        ``fstat``; meant for periodic checks, not the hot path.
        """
        self._check_open()
        try:
            named = os.lstat(self.path)
        except FileNotFoundError:
            return True
        except OSError as exc:
            raise SegmentError(f"segment file {self.path}: cannot inspect it: {exc.strerror}") from exc
        mapped = os.fstat(self._fd)
        return (named.st_dev, named.st_ino) != (mapped.st_dev, mapped.st_ino)

    def _check_open(self) -> None:
        if self._closed:
            raise SegmentError(f"segment file {self.path}: segment is closed")

    def close(self) -> None:
        """Unmap and close the file. Idempotent; other methods raise afterwards."""
        if self._closed:
            return
        self._closed = True
        mapping = self._mm
        try:
            self._words.release()
            self._floats.release()
            mapping.close()
        except BufferError:
            # A thread still holds a view; the mapping goes away with the last reference.
            pass
        os.close(self._fd)

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


def reserve(path: pathlib.Path, fd: int, offset: int, length: int) -> None:
    """posix_fallocate, with errors (ENOSPC above all) turned into SegmentError."""
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        raise SegmentError(
            f"segment file {path}: cannot reserve {length} bytes at offset {offset}: {exc.strerror}"
        ) from exc


def map_file(path: pathlib.Path, fd: int, size: int) -> mmap.mmap:
    try:
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError, OverflowError) as exc:
        raise SegmentError(f"segment file {path}: cannot map {size} bytes: {exc}") from exc
