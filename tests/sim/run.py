"""One schedule: a seed becomes a host, a service, processes and faults; the invariants judge the run.

A schedule has three phases:

1. **faults** (``fault_time`` seconds): processes start, work, and are
   killed, stopped (among others at the narrow point of issue 15: a leader
   after its lock check and before its publish), stalled, replaced, restarted
   and closed; the clocks jump; bits of the segment flip; the service fails,
   slows down, answers 5xx, forgets its data; rules change; processes call
   ``reload()`` and ``get()``;
2. **convergence**: faults stop (those under way run out); within
   :func:`~tests.sim.invariants.convergence_bound` every request must return
   and every process must have the service's latest rules;
3. **idle** (``idle_time`` seconds): nothing changes; the service's traffic
   and the processes' wakes are counted.

Everything random comes from the seed (the configuration from the seed and
the profile alone), so ``python -m tests.sim --seed N`` replays a run exactly.
"""

from __future__ import annotations

import logging
import random
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from heksher_shm._engine.effects import Call
from heksher_shm._engine.health import DESYNC_SPREAD
from heksher_shm._engine.policy import VERIFY_INTERVAL
from heksher_shm._model.protocol import DeclarationBody
from heksher_shm._shm import writing
from tests.sim.config import PROFILES, Config, config_for
from tests.sim.faults import Faults
from tests.sim.host import Published, Registry, SimHost
from tests.sim.invariants import Checks, convergence_bound
from tests.sim.process import SimProcess
from tests.sim.segment import SegmentFile
from tests.sim.service import Exchange, SimService, version_of
from tests.sim.world import BOOT, Violation, World

__all__ = ["PROFILES", "Config", "Result", "Sim", "config_for", "replay_command", "run_schedule"]


@dataclass
class Result:
    """How one schedule went."""

    seed: int
    profile: str
    fencing: bool
    queried_rule: bool = True
    skip: frozenset[str] = frozenset()
    violation: str | None = None
    detail: str = ""
    known: str | None = None
    """The open issue (:data:`tests.sim.invariants.KNOWN`) the violation is an instance of."""
    trace: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.violation is None

    def report(self) -> str:
        """The failure, the command that replays it, and the last events."""
        if self.ok:
            return f"seed {self.seed}: ok"
        lines = [
            f"FAILED seed {self.seed} ({self.profile}, fencing {'on' if self.fencing else 'off'}): "
            f"{self.violation}: {self.detail}" + (f" [known issue: {self.known}]" if self.known else ""),
            f"replay: {replay_command(self.seed, self.profile, self.fencing, self.queried_rule, self.skip)}",
            "last events (seconds since the start):",
            *("  " + line for line in self.trace),
        ]
        return "\n".join(lines)


def replay_command(
    seed: int, profile: str, fencing: bool, queried_rule: bool = True, skip: frozenset[str] = frozenset()
) -> str:
    """The one-line command that replays schedule *seed* exactly."""
    return (
        f"python -m tests.sim --seed {seed} --profile {profile}"
        + ("" if fencing else " --no-fencing")
        + ("" if queried_rule else " --no-queried-rule")
        + "".join(f" --skip {name}" for name in sorted(skip))
    )


def run_schedule(
    seed: int,
    profile: str = "ci",
    fencing: bool = True,
    trace: int = 60,
    skip: frozenset[str] = frozenset(),
    keep_trace: bool = False,
    queried_rule: bool = True,
) -> Result:
    """Run schedule *seed*; never raises for what the run finds (see :class:`Result`).

    *skip*: invariants (name prefixes) to count rather than fail on, to see what follows them.
    The trace is formatted for a failure, or with *keep_trace*.
    """
    config = config_for(seed, profile, fencing, queried_rule)
    result = Result(seed, profile, fencing, queried_rule, skip)
    with _quiet_logs(), _crash_points() as hook:
        sim = Sim(seed, config, trace, skip)
        hook.append(sim.faults.crash_point)
        try:
            sim.run()
        except Violation as v:
            result.violation, result.detail, result.known = v.name, v.detail, v.known
        except Exception as e:
            result.violation = "crash"
            result.detail = "".join(traceback.format_exception_only(type(e), e)).strip()
            sim.world.note(0, "%s", traceback.format_exc(limit=-6))
        finally:
            if not result.ok or keep_trace:
                result.trace = sim.world.trace_lines()
            result.stats = sim.stats()
            sim.close()
    return result


@contextmanager
def _quiet_logs() -> Iterator[None]:
    """The engine logs every trouble it meets; thousands of schedules need none of it."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


@contextmanager
def _crash_points() -> Iterator[list[Callable[[str], None]]]:
    """Route the segment writer's crash points (a test hook of the real code) to the running schedule."""
    hooks: list[Callable[[str], None]] = []
    previous = writing._crash_point
    writing._crash_point = lambda step: hooks[-1](step) if hooks else None
    try:
        yield hooks
    finally:
        writing._crash_point = previous


class Sim:
    """One schedule's host, service and processes, and the faults injected into them."""

    MAX_PROCESSES = 6

    def __init__(
        self, seed: int, config: Config, trace: int = 60, skip: frozenset[str] = frozenset()
    ) -> None:
        self.config = config
        self.fencing = config.fencing
        world = self.world = World(seed, trace)
        rng = world.rng
        self.fault_rng = random.Random(rng.getrandbits(64))
        self.faults = Faults(self, self.fault_rng)
        self.service = SimService(world, random.Random(rng.getrandbits(64)), list(config.settings))
        self.segment_file = SegmentFile(world)
        self.registry = Registry(world.kernel)
        self.kept: tuple[bytes, list[bytes]] | None = None
        """The last-known-good file (one per host: it outlives every process)."""
        self.checks = Checks(self, skip)
        self.epoch = 0
        """The latest election (the lock taken or seized)."""
        self.elected_at = 0.0
        """When the latest election was."""
        self.generations: dict[int, Published] = {}
        self.procs: list[SimProcess] = []
        self._next_pid = 100
        self.faults_over = False
        self.faults_end = 0.0
        self.flipped_at: float | None = None
        """When a byte of the segment last flipped."""
        self.publisher: SimProcess | None = None
        self.idle = False
        """The quiet stretch began: nothing is injected any more, not even get() calls."""
        self.wakes_at_idle: dict[int, int] = {}
        self._counts: dict[str, int] = {}

    # -- the run --------------------------------------------------------------------------------------------

    def run(self) -> None:
        config, world, checks = self.config, self.world, self.checks
        for _ in range(config.processes):
            world.after(self.fault_rng.uniform(0.0, 0.3 * config.update_interval), self.spawn)
        self.faults.schedule()
        world.run_until(BOOT + config.fault_time)
        self.faults_over = True
        self.service.error_rate = 0.0
        world.run_until(max(world.now, self.faults_end))
        quiet = checks.quiet_since = world.now
        world.note(0, "faults over")
        bound = convergence_bound(config.update_interval)
        self._quiet_reloads = self.fault_rng.randrange(3)
        for _ in range(self._quiet_reloads):  # requests made once all is well must return in time
            world.at(quiet + self.fault_rng.uniform(0, config.update_interval), self._quiet_reload)
        # Checked now and then until everything settled (the bound is what it may take at most).
        while world.now < quiet + bound and not (
            self._quiet_reloads == 0 and checks.requests_done() and checks.converged(strict=False)
        ):
            world.run_until(min(quiet + bound, world.now + config.update_interval / 4))
        checks.pending_requests(quiet + bound)
        checks.converged()
        if not config.idle_time:
            return
        # Converged, the leader may still finish work the faults left it: a new term's declarations,
        # or a takeover still to come. A leader stalled or stopped until the faults ended sleeps out the
        # wait it drew before (up to 1 + DESYNC_SPREAD intervals) before it shows progress again, and is
        # replaced only then if it overran its promise; the new term declares everything once. So the
        # quiet stretch begins an interval after convergence, after that longest wait, and an interval
        # after the latest election. A flipped byte that no reader came upon (the term word, say:
        # readers see no snapshot of theirs damaged, nobody reports it) waits for the leader's next
        # check of the segment: at its first update that publishes nothing, at least VERIFY_INTERVAL
        # after its previous check (seed 1114431: a term word flipped high, found 2.4 s after the
        # faults, fenced the leader off; its successor's declarations fell in the quiet stretch).
        interval = config.update_interval
        settled = max(world.now + interval, self.faults_end + (1 + DESYNC_SPREAD) * interval)
        if self.flipped_at is not None:
            settled = max(settled, self.flipped_at + VERIFY_INTERVAL + (1 + DESYNC_SPREAD) * interval)
        while world.now < settled:
            world.run_until(settled)
            settled = max(settled, self.elected_at + interval)
        world.note(0, "converged; idle from here")
        self.wakes_at_idle = {proc.pid: proc.wakes for proc in self.live()}
        idle_from = world.now
        self.idle = True
        world.run_until(idle_from + config.idle_time)
        checks.idle(idle_from, config.idle_time)

    def _quiet_reload(self) -> None:
        self._quiet_reloads -= 1
        self.faults.reload()

    def close(self) -> None:
        self.segment_file.close()

    def live(self) -> list[SimProcess]:
        """The processes alive now."""
        return [proc for proc in self.procs if proc.alive]

    def stats(self) -> dict[str, int]:
        counts = dict(self._counts)
        counts["elections"] = self.epoch
        counts["processes"] = len(self.procs)
        counts["applies"] = self.checks.applies
        counts["queries"] = sum(e.kind == "query" for e in self.service.exchanges)
        counts["stale publishes"] = sum(p.stale for p in self.generations.values())
        counts.update({f"skipped {name}": n for name, n in self.checks.skipped.items()})
        return counts

    def count(self, what: str) -> None:
        """Count one more *what* in the schedule's statistics."""
        self._counts[what] = self._counts.get(what, 0) + 1

    # -- processes ------------------------------------------------------------------------------------------

    def spawn(self) -> None:
        """A new process joins (a worker starts): it makes its client main."""
        if self.faults_over or len(self.live()) >= self.MAX_PROCESSES:
            return
        rng = self.fault_rng
        dead = sorted(p.pid for p in self.procs if not p.alive and p.pid not in {q.pid for q in self.live()})
        if dead and rng.random() < 0.3:
            pid = dead[0]  # a reused pid: another process, another start time
        else:
            pid = self._next_pid
            self._next_pid += 1
        names = rng.sample(self.config.settings, rng.randint(1, len(self.config.settings)))
        declarations = {name: _declaration(name, rng) for name in sorted(names)}
        tracked = {"theme": ["dark", "light"] if rng.random() < 0.5 else ["dark"]}
        users = sorted(rng.sample(["u0", "u1", "u2"], rng.randint(0, 3)))
        if users:
            tracked["user"] = users
        proc = SimProcess(self, pid, declarations, tracked)
        self.procs.append(proc)
        self.world.note(pid, "starts: %s, tracking %s", sorted(declarations), tracked)
        proc.begin()

    def process_exited(self, proc: SimProcess) -> None:
        """A process closed its client and exited; another one takes its place."""
        self.world.after(self.fault_rng.uniform(0.05, 2.0), self.spawn)

    def elected(self, pid: int) -> int:
        """A process took (or seized) the election lock: the election's number."""
        self.epoch += 1
        self.elected_at = self.world.now
        self.world.note(pid, "elected: election %d", self.epoch)
        return self.epoch

    def published(self, host: SimHost, generation: int) -> None:
        """A process published *generation* (judged when readers could first see it)."""
        if generation in self.generations:
            return  # seen at its last crash point already, before a stop there
        stale = host.epoch < self.epoch
        self.generations[generation] = Published(host.epoch, host.pid, stale, stale and host.over_damage)
        if stale:
            self.count("stale publishes")
        self.world.note(
            host.pid,
            "published generation %d (election %d%s)",
            generation,
            host.epoch,
            ", STALE" if stale else "",
        )

    def send(self, proc: SimProcess, call: Call, done: Callable[[httpx.Response | Exception], None]) -> None:
        """A process sends a request to the service."""
        exchange: Exchange

        def answered(answer: httpx.Response | Exception) -> None:
            self.checks.answered(call, exchange, answer)
            done(answer)

        exchange = self.service.send(proc.pid, proc.host.epoch, call, answered)
        self.checks.sent(proc, call, exchange)

    def service_versions(self, client: Any) -> dict[str, int]:
        """The content version of each of a client's settings at the service now."""
        versions = {}
        for name in client.declarations:
            current = self.service.current(name, client.tracked)
            version = None if current is None else version_of(current)
            if version is not None:
                versions[name] = version
        return versions


def _declaration(name: str, rng: random.Random) -> DeclarationBody:
    """One of the declarations processes make of a setting: most alike, some that differ (a mismatch, an
    upgrade, an outdated one, a rejected one)."""
    roll = rng.random()
    version, type_, default = "1.0", "int", 0
    if roll < 0.10:
        default = 7  # same version, another default: mismatch
    elif roll < 0.22:
        version, default = "1.1", 3  # a minor upgrade (outdated for the others afterwards)
    elif roll < 0.30:
        version, type_, default = "1.2", "str", "x"  # incompatible with the rules' values: rejected
    return DeclarationBody(name, ["user", "theme"], type_, default, {}, version)
