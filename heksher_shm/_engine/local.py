"""In-process stand-ins for the segment, the election lock and the registry.

With ``shared=False`` a client runs the same engine as with sharing on, but
snapshots stay in this process's memory, the lock is always free for it, and
the only wishes are its own. This is also the whole story of a process that
is alone on its host and opted out of sharing.
"""

from __future__ import annotations

import array
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

from heksher_shm._engine.ports import Wish
from heksher_shm._shm.segment import HeadRead

__all__ = ["KeptBlob", "LocalLock", "LocalSource", "LocalTransport"]


class KeptBlob(NamedTuple):
    """A blob of a snapshot kept in this process: nothing can damage it."""

    data: bytes

    def verified(self) -> bytes:
        return self.data


class LocalTransport:
    """Snapshots kept in this process: publish swaps one tuple, reads copy nothing."""

    def __init__(self) -> None:
        self._current: tuple[int, bytes, tuple[bytes, ...]] = (0, b"", ())
        self.words = array.array("Q", [0, 0, 0])
        """Item 2 is the generation, as in the shared segment's header words."""
        self._marks: tuple[float, int, str | None] = (0.0, 0, None)
        self._liveness = (0.0, 0.0)
        self._term = 0

    def generation(self) -> int:
        return self._current[0]

    def read_head(self) -> HeadRead | None:
        generation, head, blobs = self._current
        return HeadRead(generation, head, len(blobs)) if generation else None

    def read_blobs(self, generation: int, indices: Sequence[int]) -> list[bytes] | None:
        current, _, blobs = self._current
        if current != generation:
            return None
        return [blobs[i] for i in indices]

    def copy_blobs(self, generation: int, indices: Sequence[int]) -> list[KeptBlob] | None:
        blobs = self.read_blobs(generation, indices)
        return None if blobs is None else [KeptBlob(blob) for blob in blobs]

    def begin_term(self) -> int:
        """Terms count, but fence nothing: no other process publishes here."""
        self._term += 1
        return self._term

    def publish(self, head: bytes, blobs: Sequence[bytes], term: int = 0) -> int:
        """Swap in the snapshot; *term* is ignored (one process cannot replace its own leader)."""
        generation = self._current[0] + 1
        self._current = (generation, head, tuple(blobs))
        self.words[2] = generation
        return generation

    def set_leader(self, pid: int, create_time: float, bell: int = 0, pidns: int = 0) -> None:
        pass

    def beat(self, progress: float, promise: float) -> None:
        self._liveness = (progress, promise)

    def liveness(self) -> tuple[float, float]:
        """(progress, promise), as the segment's words (see :meth:`heksher_shm._shm.segment.Segment.beat`)."""
        return self._liveness

    def record_update_ok(self, when: float) -> None:
        self._marks = (when, self._marks[1], self._marks[2])

    def record_error(self, message: str, when: float) -> None:
        self._marks = (self._marks[0], self._marks[1] + 1, message)

    def update_marks(self) -> tuple[float, int, str | None]:
        return self._marks


class LocalLock:
    """A lock no one else competes for."""

    def __init__(self) -> None:
        self._held = False

    def try_acquire(self) -> bool:
        self._held = True
        return True

    def release(self) -> None:
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    def verify(self) -> bool:
        return True

    def seize(self) -> bool:
        return self.try_acquire()


class LocalSource:
    """This process's own wish, and nothing else."""

    def __init__(self, wish: Callable[[], Wish]) -> None:
        self._wish = wish
        self._changed = threading.Event()

    bells: tuple[str, ...] = ()

    def wishes(self, prune: bool = False) -> list[Wish]:
        self._changed.clear()
        return [self._wish()]

    def changed(self) -> bool:
        return self._changed.is_set()

    def touch(self) -> None:
        """Note that the wish changed."""
        self._changed.set()
