"""The segment file of the simulated host: the real segment code over memory every process shares.

The bytes live in one ``memfd`` (anonymous memory with a file descriptor).
Each simulated process opens the segment with
:meth:`Segment.over <heksher_shm._shm.segment.Segment.over>` and its own
:class:`SimBacking`, whose mappings are ``mmap`` objects of that memory: the
layout, the checksums, the double-buffered writes and the fencing token are
the code the library ships. What the backing simulates is the file's host:
its size and reservations (a full disk is a fault the scheduler injects), the
wall clock it stamps, the processor it would give away while waiting for a
writer (nothing else runs during one simulated step), and byte flips
(:meth:`SegmentFile.flip`).

Memory ordering is not simulated: the simulation runs one step at a time, so
every store is seen by every later load (see ``docs/testing.rst``).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pathlib
import random

from heksher_shm._shm.layout import HEADER_SIZE
from heksher_shm._shm.segment import Segment
from heksher_shm.exceptions import SegmentError
from tests.sim.world import World

__all__ = ["SegmentFile", "SimBacking"]

PATH = pathlib.Path("/sim/heksher-sim.seg")


class SegmentFile:
    """The one segment file of the simulated host (see the module docstring)."""

    def __init__(self, world: World) -> None:
        self._world = world
        self.fd = os.memfd_create("heksher-sim-segment", os.MFD_CLOEXEC)
        self.size = 0
        self.full = False
        """A full disk: no reservation may grow the file."""
        self.opened: list[Segment] = []
        self.reserve(0, HEADER_SIZE)  # the first process to come made the file (a disk fills up later)

    def open(self) -> Segment:
        """A process opens the segment: its own backing and mappings over the shared bytes."""
        segment = Segment.over(SimBacking(self), PATH)
        self.opened.append(segment)
        return segment

    def reserve(self, offset: int, length: int) -> None:
        """Make the bytes exist (the file only grows)."""
        end = offset + length
        if end <= self.size:
            return
        if self.full:
            raise SegmentError(f"segment file {PATH}: cannot reserve {length} bytes at {offset}: disk full")
        os.posix_fallocate(self.fd, 0, end)
        self.size = end

    def flip(self, rng: random.Random) -> int:
        """Flip one bit: in the header half the time, else anywhere in the file; the offset."""
        size = self.size
        if size <= HEADER_SIZE or rng.random() < 0.5:
            offset = rng.randrange(min(size, HEADER_SIZE) or 1)
        else:
            offset = rng.randrange(size)
        byte = os.pread(self.fd, 1, offset)[:1] or b"\0"
        os.pwrite(self.fd, bytes([byte[0] ^ (1 << rng.randrange(8))]), offset)
        return offset

    def close(self) -> None:
        """Close every process's segment and the file."""
        for segment in self.opened:
            segment.close()
        self.opened.clear()
        os.close(self.fd)


class SimBacking:
    """One simulated process's :class:`~heksher_shm._shm.backing.Backing` of the segment file."""

    def __init__(self, file: SegmentFile) -> None:
        self._file = file
        self._clock = file._world.clock
        self._mappings: list[mmap.mmap] = []

    def size(self) -> int:
        return self._file.size

    def reserve(self, offset: int, length: int) -> None:
        self._file.reserve(offset, length)

    def map(self, size: int) -> mmap.mmap:
        mapping = mmap.mmap(self._file.fd, size)
        self._mappings.append(mapping)
        return mapping

    def replaced(self) -> bool:
        return False

    def pause(self) -> None:
        """Nothing else runs inside one simulated step: a writer is never half way through here."""

    def nap(self, seconds: float) -> None:
        """As :meth:`pause`."""

    def wall(self) -> float:
        return self._clock.wall()

    def barrier(self) -> None:
        """One step at a time: every store is seen by every later load already."""

    def close(self) -> None:
        for mapping in self._mappings:
            with contextlib.suppress(BufferError):
                mapping.close()
        self._mappings.clear()
