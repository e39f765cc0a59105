"""The simulated host: its clocks, its event queue, and the kernel objects the engine relies on.

Everything here is a model of what the real host gives the engine, and each
model is backed by a real-process test that shows the kernel behaves so
(``tests/test_sim_assumptions.py``):

* **flock** (:class:`Lock`): exclusive, per open file; dropped when the holder
  closes it or dies. A lock file can be *replaced*: a new inode is renamed
  over the path (a seizure); the old holder keeps its lock on an inode no path
  names any more, and a look at the path shows it is not the one it holds.
* **processes** (:class:`Kernel`): a pid and a start time; a pid may be reused
  by a later process (with another start time). A process may be killed (its
  locks drop, its exit handles fire, its doorbell goes: rings to it are lost;
  its registration stays until a leader prunes it) or stopped and resumed
  (it performs nothing meanwhile; time passes for everyone else).
* **exit handles** (pidfd): readable once the process they watch is gone.
* **doorbells** (Unix datagram sockets): a ring to a live process makes its
  bell readable (a queue: one pending ring is enough); rings to a dead one are
  lost.

Time is simulated: :class:`World` runs callbacks from a heap ordered by (time,
sequence number), so that the same seed gives the same run.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Clock", "Inode", "Kernel", "Killed", "Lock", "Violation", "World"]

BOOT = 1000.0
"""The monotonic clock when a simulation starts (seconds since the simulated boot)."""

EPOCH = 1_700_000_000.0
"""The wall clock minus the monotonic clock when a simulation starts."""


class Violation(Exception):
    """An invariant does not hold: its name (and design.md's number), and what was seen.

    *known* names the open issue it is an instance of, when the check recognised one (see
    :data:`tests.sim.invariants.KNOWN`): the failure is reported, and counted apart.
    """

    def __init__(self, name: str, detail: str, known: str | None = None) -> None:
        detail = " ".join(detail.split())  # one line (an error's text may hold several)
        super().__init__(f"{name}: {detail}")
        self.name = name
        self.detail = detail
        self.known = known


class Killed(BaseException):
    """Raised inside the segment's ``publish`` when the scheduler kills its process at a crash point:
    the rest of the publish never runs (a BaseException, so that nothing on the way catches it)."""


class Clock:
    """The engine's :class:`~heksher_shm._engine.host.Clock` port, read off the world."""

    def __init__(self, world: World) -> None:
        self._world = world

    def monotonic(self) -> float:
        """The host-wide monotonic clock: only moves forward (it may jump ahead)."""
        return self._world.now

    def wall(self) -> float:
        """The wall clock: the monotonic one plus an offset that clock jumps step."""
        return self._world.now + self._world.wall_offset


class World:
    """The event queue, the clocks, the scheduler's randomness and the trace of one run."""

    def __init__(self, seed: int, trace_length: int = 60) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = BOOT
        self.wall_offset = EPOCH
        self.clock = Clock(self)
        self._queue: list[tuple[float, int, Callable[[], Any]]] = []
        self._seq = 0
        self.trace: deque[tuple[float, int, str, tuple[Any, ...]]] = deque(maxlen=trace_length)
        self.kernel = Kernel(self)

    def at(self, when: float, action: Callable[[], Any]) -> None:
        """Run *action* at monotonic time *when* (now, if *when* is past)."""
        self._seq += 1
        when = max(when, self.now)
        heapq.heappush(self._queue, (when, self._seq, action))

    def after(self, delay: float, action: Callable[[], Any]) -> None:
        """Run *action* *delay* seconds from now (at once if *delay* is 0)."""
        self._seq += 1
        heapq.heappush(self._queue, (self.now + delay, self._seq, action))

    def run_until(self, end: float) -> None:
        """Run every event due until *end*; the clock then reads *end*."""
        queue = self._queue
        while queue and queue[0][0] <= end:
            when, _, action = heapq.heappop(queue)
            self.now = max(self.now, when)  # after a jump, what was due meanwhile runs late
            action()
        self.now = max(self.now, end)

    def jump(self, seconds: float) -> None:
        """The monotonic clock jumps ahead: everything due meanwhile runs late, in order."""
        self.note(0, "monotonic clock jumps %.1f s", seconds)
        self.now += seconds

    def note(self, pid: int, text: str | Callable[..., str], *args: Any) -> None:
        """Add a line to the trace (formatted only if printed: *text* may be a function of *args*)."""
        self.trace.append((self.now, pid, text, args))

    def trace_lines(self) -> list[str]:
        """The trace, oldest first."""
        lines = []
        for when, pid, text, args in self.trace:
            who = f"pid {pid:>3}" if pid else "world  "
            line = text(*args) if callable(text) else text % args if args else text
            lines.append(f"{when - BOOT:10.4f} {who}  {line}")
        return lines


# -- the kernel --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Inode:
    """A file's inode: what a flock is taken on."""

    number: int
    holder: OpenFile | None = None


@dataclass(eq=False)
class OpenFile:
    """An open file description: one process's descriptor of an inode."""

    pid: int
    inode: Inode
    closed: bool = False


@dataclass(eq=False)
class ExitHandle:
    """A pidfd: readable once the process it was opened on is gone."""

    number: int
    pid: int
    start: float


@dataclass(eq=False)
class ProcessEntry:
    """The kernel's record of a process."""

    pid: int
    start: float
    alive: bool = True
    files: list[OpenFile] = field(default_factory=list)
    on_death: list[Callable[[], None]] = field(default_factory=list)


class Kernel:
    """Files with flock and rename-over, processes, exit handles and doorbells."""

    def __init__(self, world: World) -> None:
        self._world = world
        self.paths: dict[str, Inode] = {}
        self._inodes = 0
        self.processes: dict[int, ProcessEntry] = {}
        """The latest process of each pid (an older one of a reused pid is dead)."""
        self._handles = 0
        self.handles: dict[int, ExitHandle] = {}
        self.bells: dict[str, int] = {}
        """Bound doorbells: name -> the pid listening."""
        self.rung: set[str] = set()
        """Doorbells with a ring waiting to be drained."""
        self.listeners: dict[str, Callable[[], None]] = {}
        """What to call when a bell is rung (wakes the process if it waits)."""

    # -- processes -----------------------------------------------------------------------------------------

    def spawn(self, pid: int, start: float) -> ProcessEntry:
        """A new process (the pid must not belong to a live one)."""
        old = self.processes.get(pid)
        assert old is None or not old.alive, f"pid {pid} is in use"
        entry = self.processes[pid] = ProcessEntry(pid, start)
        return entry

    def alive(self, pid: int, start: float) -> bool:
        """Whether the process (pid, start) is alive (a reused pid names another process)."""
        entry = self.processes.get(pid)
        return entry is not None and entry.alive and entry.start == start

    def kill(self, pid: int) -> None:
        """The process dies: its descriptors close (its locks drop), its exit handles fire, its bells go."""
        entry = self.processes[pid]
        if not entry.alive:
            return
        entry.alive = False
        for open_file in entry.files:
            self.close(open_file)
        for name in [name for name, owner in self.bells.items() if owner == pid]:
            self.unbind(name)
        for callback in entry.on_death:
            callback()
        entry.on_death.clear()

    # -- files and flock ----------------------------------------------------------------------------------

    def open(self, pid: int, path: str) -> OpenFile:
        """Open *path*, creating it if missing."""
        inode = self.paths.get(path)
        if inode is None:
            inode = self.paths[path] = self._new_inode()
        return self._track(pid, inode)

    def create_unnamed(self, pid: int) -> OpenFile:
        """A new file no other process can know yet (a temporary file, before its rename)."""
        return self._track(pid, self._new_inode())

    def rename_over(self, open_file: OpenFile, path: str) -> None:
        """Rename the file of *open_file* to *path*, replacing whatever was there (one step)."""
        self.paths[path] = open_file.inode

    def flock(self, open_file: OpenFile) -> bool:
        """Take the exclusive flock without waiting; whether it is held now."""
        inode = open_file.inode
        if inode.holder is None or inode.holder is open_file:
            inode.holder = open_file
            return True
        return False

    def unlock(self, open_file: OpenFile) -> None:
        """Release the flock (if this description holds it)."""
        if open_file.inode.holder is open_file:
            open_file.inode.holder = None

    def close(self, open_file: OpenFile) -> None:
        """Close the descriptor: the last one of a description drops its flock."""
        if not open_file.closed:
            open_file.closed = True
            self.unlock(open_file)

    def names(self, open_file: OpenFile, path: str) -> bool:
        """Whether *path* names the file of *open_file* (``lstat`` against ``fstat``)."""
        return self.paths.get(path) is open_file.inode

    def _new_inode(self) -> Inode:
        self._inodes += 1
        return Inode(self._inodes)

    def _track(self, pid: int, inode: Inode) -> OpenFile:
        open_file = OpenFile(pid, inode)
        entry = self.processes[pid]
        entry.files = [f for f in entry.files if not f.closed]
        entry.files.append(open_file)
        return open_file

    # -- exit handles ---------------------------------------------------------------------------------------

    def watch(self, pid: int, start: float) -> tuple[int | None, bool]:
        """``pidfd_open`` as :func:`heksher_shm._engine.shared._watch_process` uses it: (a handle or None,
        whether the process is gone already)."""
        entry = self.processes.get(pid)
        if entry is None or not entry.alive:
            return None, True  # ProcessLookupError
        if entry.start != start:
            return None, True  # opened on a newer process of a reused pid: judged gone
        self._handles += 1
        self.handles[self._handles] = ExitHandle(self._handles, pid, start)
        return self._handles, False

    def exited(self, handle: int) -> bool:
        """Whether the handle is readable (its process is gone)."""
        watched = self.handles.get(handle)
        return watched is not None and not self.alive(watched.pid, watched.start)

    def close_handle(self, handle: int) -> None:
        """Close the handle."""
        self.handles.pop(handle, None)

    # -- doorbells -----------------------------------------------------------------------------------------

    def bind(self, name: str, pid: int, listener: Callable[[], None]) -> None:
        """Bind a doorbell."""
        self.bells[name] = pid
        self.listeners[name] = listener

    def unbind(self, name: str) -> None:
        """The doorbell's socket is gone: rings to it are lost."""
        self.bells.pop(name, None)
        self.listeners.pop(name, None)
        self.rung.discard(name)

    def ring(self, name: str) -> bool:
        """Send one datagram to a doorbell; whether anyone listens there."""
        if name not in self.bells:
            return False  # ENOENT / ECONNREFUSED: lost
        if name not in self.rung:  # a full queue (EAGAIN): a ring is pending already
            self.rung.add(name)
            self.listeners[name]()
        return True

    def drain(self, name: str) -> None:
        """Empty a doorbell."""
        self.rung.discard(name)


class Lock:
    """:class:`heksher_shm._shm.election.LeaderLock` over the simulated kernel, step for step.

    ``try_acquire`` opens the path and locks what it names, checking that the
    path still names it (else tries once more); ``seize`` locks a new file and
    renames it over the path; ``verify`` compares the path with the held file.
    """

    def __init__(self, kernel: Kernel, pid: int, path: str) -> None:
        self._kernel = kernel
        self._pid = pid
        self.path = path
        self._file: OpenFile | None = None
        self.held = False

    def try_acquire(self) -> bool:
        """Take the lock if it is free, without waiting."""
        if self.held:
            return True
        kernel = self._kernel
        for _ in range(2):
            open_file = self._file = kernel.open(self._pid, self.path)
            if not kernel.flock(open_file):
                self._close()
                return False
            if kernel.names(open_file, self.path):
                self.held = True
                return True
            kernel.unlock(open_file)
            self._close()
        return False

    def seize(self) -> bool:
        """Put a new lock file, locked by this process, in place of the old one."""
        if self.held:
            return True
        self._close()
        kernel = self._kernel
        open_file = self._file = kernel.create_unnamed(self._pid)
        assert kernel.flock(open_file)  # nobody else can know this file yet
        kernel.rename_over(open_file, self.path)
        self.held = True
        return True

    def release(self) -> None:
        """Give up the lock (nothing when not held)."""
        if self._file is None:
            return
        if self.held:
            self._kernel.unlock(self._file)
        self._close()

    def verify(self) -> bool:
        """Whether the lock is held and the path still names the locked file."""
        return self.held and self._file is not None and self._kernel.names(self._file, self.path)

    def _close(self) -> None:
        if self._file is not None:
            self._kernel.close(self._file)
        self._file = None
        self.held = False
