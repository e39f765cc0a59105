"""The engine's :class:`~heksher_shm._engine.host.Host`, a third time: over the simulated host.

:class:`SimHost` does, method for method, what
:class:`heksher_shm._engine.shared.SharedHost` does (with its ``Neighbours``
and ``RegistrySource``), over the simulated kernel (:mod:`tests.sim.world`),
the shared registry (:class:`Registry`) and the real segment code. The
election's *fencing token* is the segment's (``begin_term``); with fencing
off (``--no-fencing``), the host hands every term the same token, as the
protocol was before fencing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from heksher_shm._engine.host import LeaderSeen, Marks, Restored, Wish
from heksher_shm._engine.shared import GONE_PATIENCE
from heksher_shm._model.snapshot import Ack
from heksher_shm._shm.segment import Segment
from tests.sim.world import Kernel, Lock, World

if TYPE_CHECKING:
    from tests.sim.process import SimProcess
    from tests.sim.run import Sim

__all__ = ["LOCK_PATH", "Published", "Registry", "SimHost", "bell_name", "key_of"]

LOCK_PATH = "/sim/heksher-sim.lock"
TAKEOVER_PATH = "/sim/heksher-sim.takeover"


def key_of(pid: int, start: float) -> str:
    """A process's token, as registrations, acknowledgements and doorbells are named."""
    return f"{pid}-{round(start * 1_000_000)}"


def bell_name(pid: int, start: float, number: int = 1) -> str:
    """The name of a process's doorbell."""
    return f"{key_of(pid, start)}.{number}.bell"


@dataclass(frozen=True)
class Published:
    """What the simulation knows of a published snapshot."""

    epoch: int
    """The election that made its publisher leader (1, 2, ... in the order the lock was taken)."""
    pid: int
    stale: bool
    """Published by a leader that had been replaced already: nobody may accept it."""
    over_damage: bool = False
    """Its publish found the header damaged, and formatted it anew under the publisher's term."""


class Registry:
    """The registry directory: one registration and one acknowledgement per process, and the bells."""

    def __init__(self, kernel: Kernel) -> None:
        self._kernel = kernel
        self.registrations: dict[str, tuple[int, float, Wish]] = {}
        self.acks: dict[tuple[str, int], Ack] = {}
        """Answers by (process key, term): a process reads the answer of the segment's current term."""
        self.bells: dict[str, tuple[int, float]] = {}

    def answer(self, key: str, term: int) -> Ack | None:
        """Term *term*'s answer to the process *key* (``Registry.read_ack``)."""
        return self.acks.get((key, term))

    def scan(self, prune: bool) -> tuple[list[Wish], tuple[str, ...]]:
        """Every live process's wish and bell; with *prune*, the dead ones' files are removed."""
        alive = self._kernel.alive
        wishes = []
        for key, (pid, start, wish) in sorted(self.registrations.items(), key=lambda kv: kv[1][:2]):
            if alive(pid, start):
                wishes.append(wish)
            elif prune:
                del self.registrations[key]
                for answered in [k for k in self.acks if k[0] == key]:
                    del self.acks[answered]
        bells = []
        for name, (pid, start) in sorted(self.bells.items()):
            if alive(pid, start):
                bells.append(name)
            elif prune:
                del self.bells[name]
        return wishes, tuple(bells)


class SimHost:
    """One simulated process's host (see the module docstring)."""

    def __init__(self, sim: Sim, pid: int, start: float, segment: Segment) -> None:
        world: World = sim.world
        self._sim = sim
        self._world = world
        self._kernel = world.kernel
        self.pid, self.start = pid, start
        self.key = key_of(pid, start)
        self.segment = segment
        self.proc: SimProcess | None = None
        self.lock = Lock(self._kernel, pid, LOCK_PATH)
        self.takeover = Lock(self._kernel, pid, TAKEOVER_PATH)
        self.bell = bell_name(pid, start)
        self.epoch = 0
        """The election this process last won (0: never)."""
        self.over_damage = False
        self.rang_at = 0.0
        self._watched: tuple[int, float] | None = None
        self._exit: int | None = None
        self._gone_since: float | None = None
        self._wishes: list[Wish] | None = None
        self._seq = -1
        self._bells: tuple[str, ...] = ()

    # -- the election ---------------------------------------------------------------------------------

    def take_lead(self) -> int | None:
        if not self.lock.try_acquire():
            return None
        return self._begin_term()

    def keeps_lead(self) -> bool:
        return self.lock.verify()

    def give_up_lead(self) -> None:
        if self.lock.held:
            self.lock.release()

    def try_takeover(self) -> bool:
        return self.takeover.try_acquire()

    def end_takeover(self) -> None:
        self.takeover.release()

    def seize_lead(self) -> int | None:
        if not self.lock.seize():
            return None
        return self._begin_term()

    def _begin_term(self) -> int:
        self.epoch = self._sim.elected(self.pid)
        if not self._sim.fencing:
            # Before fencing: every term alike (the segment's first), and readers compare nothing.
            return self.segment.term() or self.segment.begin_term()
        return self.segment.begin_term()

    def announce(self) -> None:
        self.segment.set_leader(self.pid, self.start, 1, 0)

    # -- liveness -------------------------------------------------------------------------------------

    def beat(self, progress: float, promise: float) -> None:
        self.segment.beat(progress, promise)

    def look_at_leader(self) -> LeaderSeen:
        leader, exit_handle, gone = self._watch()
        progress, promise = self.segment.liveness()
        return LeaderSeen(leader, exit_handle, gone, progress, promise, self.rang_at)

    def _watch(self) -> tuple[tuple[int, float] | None, int | None, bool]:
        """``Neighbours.watch``: a handle on the recorded leader, and whether it exited lately."""
        now = self._world.now
        leader = self.segment.leader()
        identity = None if leader is None else (leader[0], leader[1])
        if identity != self._watched:
            self._forget_watch()
            self._watched = identity
            if identity is not None:
                self._exit, gone = self._kernel.watch(*identity)
                if gone:
                    self._gone_since = now
        gone = self._gone_since is not None
        if gone and now - (self._gone_since or 0.0) > GONE_PATIENCE:
            return identity, None, False
        return identity, self._exit, gone

    def _forget_watch(self) -> None:
        if self._exit is not None:
            self._kernel.close_handle(self._exit)
        self._exit = None
        self._watched = None
        self._gone_since = None

    def ring_answered(self) -> None:
        self.rang_at = 0.0

    def leader_exited(self) -> None:
        if self._exit is not None:
            self._kernel.close_handle(self._exit)
        self._exit = None
        self._gone_since = self._world.now

    def read_marks(self) -> Marks:
        return Marks(*self.segment.update_marks())

    # -- the segment ----------------------------------------------------------------------------------

    def publish(self, head: bytes, blobs: Sequence[bytes], term: int) -> int:
        sim = self._sim
        # (Looked at only for a replaced leader: whether its publish formats a damaged header anew.)
        self.over_damage = self.epoch < sim.epoch and self.segment.status().header_problem is not None
        outer, sim.publisher = sim.publisher, self.proc  # whom the segment's crash points stop or kill
        try:
            generation = self.segment.publish(head, blobs, term)
        finally:
            sim.publisher = outer
        sim.published(self, generation)
        return generation

    def read_head(self) -> object:
        return self.segment.read_head()

    def read_blobs(self, generation: int, indices: Sequence[int]) -> list[bytes] | None:
        return self.segment.read_blobs(generation, indices)

    def keep_snapshot(self, head: bytes, blobs: Sequence[bytes]) -> None:
        """The last-known-good file: one per host, kept by whoever leads (it survives every process)."""
        self._sim.kept = (head, list(blobs))

    def restore_kept(self) -> Restored | None:
        kept = self._sim.kept
        return None if kept is None else Restored(kept[0], list(kept[1]), "the simulated snapshot file")

    def record_ok(self, when: float) -> None:
        self.segment.record_update_ok(when)

    def record_error(self, message: str, when: float) -> None:
        self.segment.record_error(message, when)

    def count_declarations(self, ok: int, failed: int) -> None:
        self.segment.count_declarations(ok, failed)

    def damage_reports(self) -> int:
        return self.segment.damage_reports()

    # -- the other processes --------------------------------------------------------------------------

    def scan_wishes(self, prune: bool) -> list[Wish]:
        """``RegistrySource.wishes``: read again only when the segment's registry counter moved."""
        if not prune and self._wishes is not None and self.segment.registry_seq() == self._seq:
            return self._wishes
        self._seq = self.segment.registry_seq()
        self._wishes, self._bells = self._sim.registry.scan(prune)
        return self._wishes

    def ring_all(self) -> None:
        self._ring(self._bells)

    def acknowledge(self, acks: Mapping[str, Ack]) -> None:
        registry = self._sim.registry
        for key, ack in acks.items():
            registry.acks[(key, ack.term)] = ack
        self._ring(bell for bell in self._bells if bell.split(".", 1)[0] in acks)

    def _ring(self, bells: Iterable[str]) -> None:
        for name in bells:
            if name != self.bell:
                self._kernel.ring(name)

    def ring_leader(self) -> bool:
        """``Neighbours.ring_leader``: ring the recorded leader (a request waits in the registry)."""
        leader = self.segment.leader()
        if leader is None or not leader[3]:
            return False
        if not self.rang_at:
            self.rang_at = self._world.now
        return self._kernel.ring(bell_name(leader[0], leader[1], leader[3]))

    # -- for the driver -------------------------------------------------------------------------------

    def bell_fd(self) -> int:
        return 0

    def drain(self) -> None:
        self._kernel.drain(self.bell)
