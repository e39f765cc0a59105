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

from heksher_shm._engine import policy
from heksher_shm._engine.effects import (
    Apply,
    Call,
    Compute,
    Digest,
    Housekeep,
    KeepsLead,
    LookAtLeader,
    Publish,
    ReadBlobs,
    ReadHead,
    ReadMarks,
    ScanWishes,
    TakeLead,
    Wait,
)
from heksher_shm._model.protocol import DeclarationBody
from heksher_shm._shm import writing
from tests.sim.host import Published, Registry, SimHost
from tests.sim.invariants import Checks, convergence_bound
from tests.sim.process import SimProcess
from tests.sim.segment import SegmentFile
from tests.sim.service import CLIENT_TIMEOUT, Exchange, SimService, version_of
from tests.sim.world import BOOT, Killed, Violation, World

__all__ = ["PROFILES", "Config", "Result", "Sim", "config_for", "replay_command", "run_schedule"]

RUN_OUT = 3.0
"""Seconds after the fault phase by which every fault started in it has ended (a longer one is cut)."""

PROFILES = ("ci", "long")
"""``ci``: short schedules (many of them fit in a CI step); ``long``: longer ones, for the stress step."""


@dataclass(frozen=True)
class Config:
    """What one schedule is made of (drawn from its seed and profile by :func:`config_for`)."""

    profile: str
    fencing: bool
    queried_rule: bool
    """Whether clients refuse a snapshot queried before the one they applied (``Applying._apply_from``);
    off only to see what it protects (``--no-queried-rule``)."""
    processes: int
    update_interval: float
    fault_time: float
    idle_time: float
    settings: tuple[str, ...]
    startup_timeout: float
    longest: float
    """The longest a stop, a stall, an outage or a slow spell lasts (seconds)."""
    # Faults, as rates per second during the fault phase, or probabilities per occasion.
    kill_rate: float
    stop_rate: float
    issue_stop: float
    """Probability that a leader stops, for longer than the takeover delay, between its lock check and
    its publish (the narrow point of issue 15)."""
    boundary_stop: float
    boundary_kill: float
    stall: float
    crash_publish: float
    stop_publish: float
    flip_rate: float
    jump_rate: float
    outage_rate: float
    slow_rate: float
    error_rate: float
    reset_rate: float
    full_rate: float
    change_rate: float
    reload_rate: float
    get_rate: float
    churn_rate: float


def config_for(seed: int, profile: str = "ci", fencing: bool = True, queried_rule: bool = True) -> Config:
    """The configuration of schedule *seed* (the same on every machine and run)."""
    rng = random.Random(f"heksher-sim-config-{profile}-{seed}")
    interval = rng.choice((1.0, 1.0, 2.0, 3.0))
    long = profile == "long"
    fault_intervals = rng.uniform(15, 60) if long else rng.uniform(1.5, 5)
    # Every long schedule ends with a quiet stretch; one short one in six does (it costs as much
    # as the faults before it).
    idle = 10 if long else (5 if rng.random() < 1 / 6 else 0)

    def maybe(rate: float, chance: float = 0.5) -> float:
        return rate * rng.uniform(0.3, 1.7) if rng.random() < chance else 0.0

    return Config(
        profile=profile,
        fencing=fencing,
        queried_rule=queried_rule,
        processes=rng.randint(2, 6 if long else 4),
        update_interval=interval,
        fault_time=max(4.0, fault_intervals * interval),
        idle_time=idle * interval,
        settings=tuple(f"s{i}" for i in range(rng.randint(1, 5))),
        startup_timeout=rng.choice((10.0, 30.0)),
        longest=20.0 if long else 10.0,
        kill_rate=maybe(0.03),
        stop_rate=maybe(0.05),
        issue_stop=maybe(0.25, 0.6),
        boundary_stop=maybe(0.002),
        boundary_kill=maybe(0.001),
        stall=maybe(0.003),
        crash_publish=maybe(0.05, 0.3),
        stop_publish=maybe(0.05, 0.3),
        flip_rate=maybe(0.05, 0.3),
        jump_rate=maybe(0.02, 0.3),
        outage_rate=maybe(0.03, 0.4),
        slow_rate=maybe(0.02, 0.3),
        error_rate=maybe(0.1, 0.3),
        reset_rate=maybe(0.005, 0.15),
        full_rate=maybe(0.02, 0.15),
        change_rate=rng.uniform(0.2, 2.0) / interval,
        reload_rate=maybe(0.05, 0.7),
        get_rate=rng.uniform(0.5, 3.0) / interval,
        churn_rate=maybe(0.02, 0.3),
    )


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
        hook.append(sim.crash_point)
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
        self.service = SimService(world, random.Random(rng.getrandbits(64)), list(config.settings))
        self.segment_file = SegmentFile(world)
        self.registry = Registry(world.kernel)
        self.checks = Checks(self, skip)
        self.epoch = 0
        """The latest election (the lock taken or seized)."""
        self.generations: dict[int, Published] = {}
        self.procs: list[SimProcess] = []
        self._next_pid = 100
        self.faults_over = False
        self.faults_end = 0.0
        self.publisher: SimProcess | None = None
        self._nested = False
        self.wakes_at_idle: dict[int, int] = {}
        self._counts: dict[str, int] = {}

    # -- the run --------------------------------------------------------------------------------------------

    def run(self) -> None:
        config, world, checks = self.config, self.world, self.checks
        for _ in range(config.processes):
            world.after(self.fault_rng.uniform(0.0, 0.3 * config.update_interval), self.spawn)
        self._schedule_faults()
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
        # Converged, the leader may still finish work the faults left it (a new term's declarations).
        world.run_until(world.now + config.update_interval)
        world.note(0, "converged; idle from here")
        self.wakes_at_idle = {proc.pid: proc.wakes for proc in self.live()}
        idle_from = world.now
        self._idle = True
        world.run_until(idle_from + config.idle_time)
        checks.idle(idle_from, config.idle_time)

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

    def _count(self, what: str) -> None:
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
        self.world.note(pid, "elected: election %d", self.epoch)
        return self.epoch

    def published(self, host: SimHost, generation: int) -> None:
        """A process published *generation* (judged when readers could first see it)."""
        if generation in self.generations:
            return  # seen at its last crash point already, before a stop there
        stale = host.epoch < self.epoch
        self.generations[generation] = Published(host.epoch, host.pid, stale)
        if stale:
            self._count("stale publishes")
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

    # -- faults at effect boundaries ------------------------------------------------------------------------

    def at_boundary(self, proc: SimProcess, effect: object) -> float:
        """Before *proc* performs *effect*: maybe kill it, or stop it (the seconds it stops, else 0)."""
        world = self.world
        previous, proc.previous = proc.previous, effect
        if proc.engine.leading or type(effect) not in _ROUTINE:
            world.note(proc.pid, _describe, effect)
        if self.faults_over:
            return 0.0
        rng, config = self.fault_rng, self.config
        kind = type(effect)
        narrow = kind is Publish or (kind is Compute and type(previous) is KeepsLead)
        if narrow and proc.engine.leading and rng.random() < config.issue_stop:
            # Issue 15's point: the lock checked, the snapshot not yet published.
            self._count("issue stops")
            least = policy.UNRESPONSIVE_AFTER + policy.BUSY_PROMISE + 0.5
            return self._stop_length(rng.uniform(least, max(least + 1.0, config.longest)))
        if not (config.boundary_kill or config.boundary_stop):
            return 0.0
        roll = rng.random()
        if roll < config.boundary_kill:
            self._kill(proc)
            return 0.0
        if roll < config.boundary_kill + config.boundary_stop:
            return self._stop_length(self._some_stop())
        return 0.0

    def cost(self, proc: SimProcess, effect: object) -> float:
        """The simulated time *effect* takes (its CPU and system calls), sometimes a long stall."""
        rng = self.fault_rng
        cost = _COSTS.get(type(effect), 1e-3) * (0.1 + rng.random())
        if not self.faults_over and self.config.stall and rng.random() < self.config.stall:
            self._count("stalls")
            stall = self._cut(rng.uniform(1.0, min(8.0, self.config.longest)))
            self.world.note(proc.pid, "stalls %.2f s in %s", stall, type(effect).__name__)
            cost += stall
            self.faults_end = max(self.faults_end, self.world.now + cost)
        return cost

    def crash_point(self, step: str) -> None:
        """The segment writer passes *step* of a publish (a crash point): maybe kill or stop it there."""
        proc = self.publisher
        if proc is None:
            return
        if step == "published":  # the generation word is stored: readers may see it from now on
            self.published(proc.host, proc.host.segment.generation())
        if self.faults_over:
            return
        rng, config = self.fault_rng, self.config
        roll = rng.random() * 10
        if roll < config.crash_publish:
            self._count("kills inside publish")
            self.world.note(proc.pid, "killed inside publish at %s", step)
            proc.kill()
            raise Killed
        if roll < config.crash_publish + config.stop_publish and not self._nested:
            self._count("stops inside publish")
            least = policy.UNRESPONSIVE_AFTER + policy.BUSY_PROMISE
            seconds = self._stop_length(rng.uniform(least, max(least + 1.0, config.longest)))
            self.world.note(proc.pid, "stops inside publish at %s", step)
            proc.stop(seconds)
            self._nested = True
            try:
                self.world.run_until(self.world.now + seconds)  # everyone else runs meanwhile
            finally:
                self._nested = False
            if not proc.alive:
                raise Killed

    # -- faults in time -------------------------------------------------------------------------------------

    def _schedule_faults(self) -> None:
        config, service = self.config, self.service
        self._every(config.kill_rate, lambda: self._kill(self._victim()))
        self._every(config.stop_rate, lambda: self._stop(self._victim()))
        self._every(config.flip_rate, self._flip)
        self._every(config.jump_rate, self._jump)
        self._every(config.outage_rate, self._outage)
        self._every(config.slow_rate, self._slow)
        self._every(config.reset_rate, self._reset)
        self._every(config.full_rate, self._full)
        self._every(config.change_rate, self._change)
        self._every(config.reload_rate, self._reload)
        self._every(config.get_rate, self._get, until_idle=True)
        self._every(config.churn_rate, self._churn)
        service.error_rate = config.error_rate

    def _every(self, rate: float, action: Callable[[], None], until_idle: bool = False) -> None:
        """Run *action* at the times of a Poisson process of *rate* (per second) while faults go on."""
        if rate <= 0:
            return
        world, rng = self.world, self.fault_rng

        def fire() -> None:
            if self.faults_over and not until_idle:
                return
            if getattr(self, "_idle", False):
                return
            action()
            world.after(rng.expovariate(rate), fire)

        world.after(rng.expovariate(rate), fire)

    def _victim(self) -> SimProcess | None:
        live = [p for p in self.live() if p is not self.publisher or not self._nested]
        if not live:
            return None
        leaders = [p for p in live if p.engine.leading]
        if leaders and self.fault_rng.random() < 0.5:
            return leaders[0]
        return self.fault_rng.choice(live)

    def _kill(self, proc: SimProcess | None) -> None:
        if proc is None:
            return
        self._count("kills")
        proc.kill()
        if self.fault_rng.random() < 0.8:
            self.world.after(self.fault_rng.uniform(0.05, 2.0), self.spawn)

    def _some_stop(self) -> float:
        rng = self.fault_rng
        return rng.uniform(0.05, 3.0) if rng.random() < 0.7 else rng.uniform(5.5, self.config.longest)

    def _cut(self, seconds: float) -> float:
        """*seconds*, cut so that a fault ends at most :data:`RUN_OUT` seconds after the fault phase."""
        return max(0.05, min(seconds, BOOT + self.config.fault_time + RUN_OUT - self.world.now))

    def _stop_length(self, seconds: float) -> float:
        seconds = self._cut(seconds)
        self._count("stops")
        self.faults_end = max(self.faults_end, self.world.now + seconds)
        return seconds

    def _stop(self, proc: SimProcess | None) -> None:
        if proc is not None and not proc.stopped:
            proc.stop(self._stop_length(self._some_stop()))

    def _flip(self) -> None:
        self._count("byte flips")
        offset = self.segment_file.flip(self.fault_rng)
        self.world.note(0, "bit flipped at offset %d", offset)

    def _jump(self) -> None:
        rng, world = self.fault_rng, self.world
        self._count("clock jumps")
        if rng.random() < 0.7:
            step = rng.uniform(-7200.0, 7200.0)
            world.wall_offset += step
            world.note(0, "wall clock steps %+.0f s", step)
        else:
            world.jump(rng.uniform(0.5, 8.0))

    def _outage(self) -> None:
        rng, service, world = self.fault_rng, self.service, self.world
        self._count("outages")
        seconds = self._cut(rng.uniform(1.0, self.config.longest))
        service.down_until = max(service.down_until, world.now + seconds)
        service.down_mode = rng.choice(("refused", "hang", "503"))
        self.faults_end = max(self.faults_end, service.down_until + CLIENT_TIMEOUT)
        world.note(0, "service down (%s) for %.1f s", service.down_mode, seconds)

    def _slow(self) -> None:
        rng, service, world = self.fault_rng, self.service, self.world
        self._count("slow spells")
        seconds = self._cut(rng.uniform(1.0, self.config.longest * 0.75))
        service.slow_until = max(service.slow_until, world.now + seconds)
        service.slow_factor = rng.uniform(20.0, 800.0)
        self.faults_end = max(self.faults_end, service.slow_until + CLIENT_TIMEOUT)
        world.note(0, "service slow (x%.0f) for %.1f s", service.slow_factor, seconds)

    def _reset(self) -> None:
        self._count("data resets")
        self.service.reset()
        self.world.note(0, "the service lost all its data")

    def _full(self) -> None:
        file, world = self.segment_file, self.world
        if file.full:
            return
        self._count("disk full")
        seconds = self._cut(self.fault_rng.uniform(0.5, self.config.longest))
        file.full = True
        self.faults_end = max(self.faults_end, world.now + seconds)
        world.note(0, "disk full for %.1f s", seconds)

        def freed() -> None:
            file.full = False
            world.note(0, "disk space again")

        world.after(seconds, freed)

    def _change(self) -> None:
        if self.world.now > BOOT + self.config.fault_time - self.config.update_interval:
            return  # the last interval of faults changes no rule: convergence is then about the faults
        name = self.service.change_rule()
        if name is not None:
            self.world.note(0, "rule of %s changed: version %d", name, self.service.stamp)

    def _reload(self) -> None:
        live = [p for p in self.live() if not p.stopped]
        if live:
            proc = self.fault_rng.choice(live)
            self.world.note(proc.pid, "reload()")
            proc.client.reload()

    def _quiet_reload(self) -> None:
        self._quiet_reloads -= 1
        self._reload()

    def _get(self) -> None:
        live = [p for p in self.live() if not p.stopped]
        if live:
            self.fault_rng.choice(live).client.apply_latest()

    def _churn(self) -> None:
        live = [p for p in self.live() if not p.stopped]
        if live:
            self._count("closes")
            self.fault_rng.choice(live).close()


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


_ROUTINE = (Apply, ReadMarks, Housekeep, LookAtLeader, Wait, TakeLead)
"""A follower's effects at every wake, left out of the trace."""

_COSTS: dict[type, float] = {
    Publish: 5e-3,
    ReadHead: 3e-3,
    ReadBlobs: 3e-3,
    ScanWishes: 3e-3,
    Compute: 0.02,
    Digest: 0.02,
}
"""The most an effect takes (it takes 10 % to 110 % of it); 1 ms for the others."""
"""A follower's effects at every wake, left out of the trace."""


def _describe(effect: object) -> str:
    name = type(effect).__name__
    if isinstance(effect, Wait):
        return f"Wait({effect.timeout if effect.timeout is None else round(effect.timeout, 3)})"
    if isinstance(effect, Call):
        return f"Call({effect.method} {effect.path})"
    if isinstance(effect, Publish):
        return f"Publish(term {effect.term})"
    return name
