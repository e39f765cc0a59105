"""The segment file of the simulated host: the real segment code over memory every process shares.

The bytes live in one ``memfd`` (anonymous memory with a file descriptor):
each simulated process maps it with its own ``mmap`` and runs the real
:class:`~heksher_shm._shm.segment.Segment` code over its mapping, so the
layout, the checksums, the double-buffered writes and the fencing token are
the ones the library ships. Only the file's host operations are simulated:
its size, reservations, the wall clock it stamps, and byte flips, which the
scheduler injects with :meth:`SegmentFile.flip`.

Memory ordering is not simulated: the simulation runs one step at a time, so
every store is seen by every later load (see ``docs/testing.rst``).
"""

from __future__ import annotations

import mmap
import os
import pathlib
import random

from heksher_shm._shm.layout import HEADER_SIZE
from heksher_shm._shm.segment import Segment
from tests.sim.world import World

__all__ = ["SegmentFile"]

PATH = pathlib.Path("/sim/heksher-sim.seg")


class SegmentFile:
    """The one segment file of the simulated host (see the module docstring)."""

    def __init__(self, world: World) -> None:
        self._world = world
        self.fd = os.memfd_create("heksher-sim-segment", os.MFD_CLOEXEC)
        self.opened: list[Segment] = []

    def open(self) -> Segment:
        """A process opens the segment: its own mapping of the shared bytes."""
        size = os.fstat(self.fd).st_size
        if size < HEADER_SIZE:
            os.posix_fallocate(self.fd, 0, HEADER_SIZE)
            size = HEADER_SIZE
        segment = Segment(PATH, os.dup(self.fd), mmap.mmap(self.fd, size))
        self.opened.append(segment)
        return segment

    def size(self) -> int:
        """The file's size."""
        return os.fstat(self.fd).st_size

    def flip(self, rng: random.Random) -> int:
        """Flip one bit: in the header half the time, else anywhere in the slots; the offset."""
        size = self.size()
        offset = (
            rng.randrange(HEADER_SIZE) if rng.random() < 0.5 or size <= HEADER_SIZE else rng.randrange(size)
        )
        byte = os.pread(self.fd, 1, offset)[0]
        os.pwrite(self.fd, bytes([byte ^ (1 << rng.randrange(8))]), offset)
        return offset

    def close(self) -> None:
        """Close every process's mapping and the file."""
        for segment in self.opened:
            segment.close()
        self.opened.clear()
        os.close(self.fd)
