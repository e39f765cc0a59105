"""The in-process host: a client that shares nothing (``shared=False``).

A client with sharing off runs the same engine as with sharing on, over a
host where snapshots stay in this process's memory, the lock is always free
for it, and the only wish is its own. This is also the whole story of a
process that is alone on its host and opted out of sharing.
"""

from __future__ import annotations

import array
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from heksher_shm._engine.host import LeaderSeen, Marks, Restored, Wish
from heksher_shm._engine.keeping import Keeper
from heksher_shm._model.snapshot import Ack
from heksher_shm._shm.lastgood import KeptFile

__all__ = ["KeptBlob", "LocalHost", "Published"]


class Published(NamedTuple):
    """A snapshot kept in this process (the in-process counterpart of a segment's verified head)."""

    generation: int
    head: bytes
    blob_count: int
    term: int


class KeptBlob(NamedTuple):
    """A blob of a snapshot kept in this process: nothing can damage it."""

    data: bytes

    def verified(self) -> bytes:
        """Its bytes."""
        return self.data


class LocalHost:
    """Snapshots, acknowledgements and the lock of a client alone in its process (a
    :class:`heksher_shm._engine.host.Host`; also the transport its settings read from).

    Args:
        wish: this process's wish, as it is now.
        kept: the last-known-good file, if the client has one.
    """

    def __init__(self, wish: Callable[[], Wish], kept: KeptFile | None = None) -> None:
        self._wish = wish
        self._keeper = Keeper(kept)
        self._wishes: list[Wish] = []
        self._changed = threading.Event()
        self._changed.set()
        self._current: tuple[int, bytes, tuple[bytes, ...], int] = (0, b"", (), 0)
        self.words = array.array("Q", [0, 0, 0])
        """Item 2 is the generation, as in the shared segment's header words (what ``get()`` reads)."""
        self._marks = Marks(0.0, 0, None)
        self._liveness = (0.0, 0.0)
        self._terms = 0
        self._ack: Ack | None = None

    def touch(self) -> None:
        """This process's wish changed: the next scan reads it again."""
        self._changed.set()

    # -- the election: always this process's --------------------------------------------------------

    def take_lead(self) -> int:
        self._terms += 1
        return self._terms

    def keeps_lead(self) -> bool:
        return True

    def give_up_lead(self) -> None:
        pass

    def try_takeover(self) -> bool:
        return False

    def end_takeover(self) -> None:
        pass

    def seize_lead(self) -> int | None:
        return None

    def announce(self) -> None:
        pass

    def beat(self, progress: float, promise: float) -> None:
        self._liveness = (progress, promise)

    def look_at_leader(self) -> LeaderSeen:
        return LeaderSeen(None, None, False, *self._liveness, 0.0)

    def ring_answered(self) -> None:
        pass

    def leader_exited(self) -> None:
        pass

    def liveness(self) -> tuple[float, float]:
        """(progress, promise), as the segment's words."""
        return self._liveness

    # -- snapshots ----------------------------------------------------------------------------------

    def generation(self) -> int:
        """The generation of the latest snapshot (0: none)."""
        return self._current[0]

    def publish(self, head: bytes, blobs: Sequence[bytes], term: int) -> int:
        generation = self._current[0] + 1
        self._current = (generation, head, tuple(blobs), term)
        self.words[2] = generation
        return generation

    def read_head(self) -> Published | None:
        generation, head, blobs, term = self._current
        return Published(generation, head, len(blobs), term) if generation else None

    def read_blobs(self, generation: int, indices: Sequence[int]) -> list[bytes] | None:
        current, _, blobs, _ = self._current
        if current != generation:
            return None
        return [blobs[i] for i in indices]

    def copy_blobs(self, generation: int, indices: Sequence[int]) -> list[KeptBlob] | None:
        """Like :meth:`read_blobs`, for a client's apply."""
        blobs = self.read_blobs(generation, indices)
        return None if blobs is None else [KeptBlob(blob) for blob in blobs]

    def keep_snapshot(self, head: bytes, blobs: Sequence[bytes]) -> None:
        self._keeper.keep(head, blobs)

    def restore_kept(self) -> Restored | None:
        return self._keeper.restore()

    def record_ok(self, when: float) -> None:
        self._marks = self._marks._replace(ok_time=when)

    def record_error(self, message: str, when: float) -> None:
        self._marks = self._marks._replace(errors=self._marks.errors + 1, message=message)

    def read_marks(self) -> Marks:
        return self._marks

    def count_declarations(self, ok: int, failed: int) -> None:
        pass

    def damage_reports(self) -> int:
        return 0  # a snapshot kept in this process's memory is not shared: nobody else can damage it

    # -- this process's wish and answers -------------------------------------------------------------

    def scan_wishes(self, prune: bool) -> list[Wish]:
        if self._changed.is_set():
            self._changed.clear()
            self._wishes = [self._wish()]
        return self._wishes

    def ring_all(self) -> None:
        pass

    def acknowledge(self, acks: Mapping[str, Ack]) -> None:
        for ack in acks.values():  # only this process's own
            self._ack = ack

    def read_ack(self) -> Ack | None:
        """This process's latest acknowledgement (of the current term)."""
        ack = self._ack
        return ack if ack is not None and ack.term == self._terms else None

    def bell_fd(self) -> None:
        return None

    def drain(self) -> None:
        pass
