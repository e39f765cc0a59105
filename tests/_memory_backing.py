"""A segment file in memory: the real segment code over a simulated mapping, clock and scheduler.

``Segment.over(MemoryBacking(file), path)`` runs the real reading and writing
code (layout, checksums, fencing) with no file, no ``mmap`` and no clock of
the host. Every process of a simulation opens its own backing over one
:class:`MemoryFile`: writes through one are seen at once through the others
(a sequentially consistent machine: the simulation interleaves whole calls,
so the reorderings of real hardware are out of its reach).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import SupportsIndex, overload

from heksher_shm.exceptions import SegmentError

__all__ = ["MemoryBacking", "MemoryFile"]


class MemoryFile(bytearray):
    """The simulated file and every mapping of it: one buffer of fixed capacity, of which the first
    :attr:`size` bytes exist.

    Like an ``mmap``: slices read ``bytes`` copies, slice assignment writes in
    place and never changes the length, and ``memoryview`` views it in place.
    The length is the file's size, so a mapping always covers the whole file
    (the simulation has no SIGBUS to model). :meth:`reserve` past
    :attr:`capacity` fails like a full disk.
    """

    def __init__(self, capacity: int = 1 << 22) -> None:
        super().__init__(capacity)
        self.capacity = capacity
        self.size = 0
        self.replaced = False
        """Set by a simulation: the path names another file now."""

    def __len__(self) -> int:
        return self.size

    @overload
    def __getitem__(self, index: SupportsIndex, /) -> int: ...

    @overload
    def __getitem__(self, index: slice, /) -> bytes: ...  # type: ignore[override]

    def __getitem__(self, index: SupportsIndex | slice, /) -> int | bytes:
        if isinstance(index, slice):
            return bytes(super().__getitem__(slice(*index.indices(self.size))))
        return super().__getitem__(index)

    def __setitem__(self, index: SupportsIndex | slice, value: object, /) -> None:  # type: ignore[override]
        if not isinstance(index, slice):
            raise TypeError("the simulated mapping is written by slices")
        start, stop, step = index.indices(self.size)
        data = bytes(value)  # type: ignore[call-overload]
        if step != 1 or stop - start != len(data):  # a slice past the end is clamped, so it falls short
            raise IndexError(f"{len(data)} bytes at {index.start}..{index.stop}: not within the mapping")
        super().__setitem__(slice(start, stop), data)

    def reserve(self, offset: int, length: int) -> None:
        """Grow the file to hold ``offset + length`` bytes (never shrinks)."""
        end = offset + length
        if end > self.capacity:
            raise SegmentError(
                f"segment file (simulated): cannot reserve {length} bytes at offset {offset}: No space left"
            )
        self.size = max(self.size, end)


class MemoryBacking:
    """One simulated process's handle on a :class:`MemoryFile` (a :class:`~heksher_shm._shm.backing.Backing`).

    *clock* gives the wall time; *on_pause* runs where a real reader would
    yield the CPU or nap (a scheduler may switch processes there); *barriers*
    counts the barrier calls.
    """

    def __init__(
        self,
        file: MemoryFile,
        clock: Callable[[], float] = lambda: 1_700_000_000.0,
        on_pause: Callable[[], None] | None = None,
    ) -> None:
        self.file = file
        self.clock = clock
        self.on_pause = on_pause
        self.barriers = 0
        self.closed = False

    def size(self) -> int:
        return self.file.size

    def reserve(self, offset: int, length: int) -> None:
        self.file.reserve(offset, length)

    def map(self, size: int) -> MemoryFile:
        assert size <= self.file.size, "mapping past the end of the file"
        return self.file

    def replaced(self) -> bool:
        return self.file.replaced

    def pause(self) -> None:
        if self.on_pause is not None:
            self.on_pause()

    def nap(self, seconds: float) -> None:
        self.pause()

    def wall(self) -> float:
        return self.clock()

    def barrier(self) -> None:
        self.barriers += 1

    def close(self) -> None:
        self.closed = True
