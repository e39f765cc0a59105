"""The faults a schedule injects: at effect boundaries, inside a publish, and at random times.

:class:`Faults` draws everything from the schedule's fault generator, in the
order the run asks, so a seed replays the same faults at the same points.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING

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
from tests.sim.config import RUN_OUT
from tests.sim.service import CLIENT_TIMEOUT
from tests.sim.world import BOOT, Killed

if TYPE_CHECKING:
    from tests.sim.process import SimProcess
    from tests.sim.run import Sim

__all__ = ["Faults"]


class Faults:
    """What goes wrong in one schedule, and when (see the module docstring)."""

    def __init__(self, sim: Sim, rng: random.Random) -> None:
        self.sim = sim
        self.rng = rng
        self.nested = False
        """A stop inside a publish is under way (the rest of the host runs inside it)."""

    def at_boundary(self, proc: SimProcess, effect: object) -> float:
        """Before *proc* performs *effect*: maybe kill it, or stop it (the seconds it stops, else 0)."""
        world = self.sim.world
        previous, proc.previous = proc.previous, effect
        if proc.engine.leading or type(effect) not in _ROUTINE:
            world.note(proc.pid, _describe, effect)
        if self.sim.faults_over:
            return 0.0
        rng, config = self.rng, self.sim.config
        kind = type(effect)
        narrow = kind is Publish or (kind is Compute and type(previous) is KeepsLead)
        if narrow and proc.engine.leading and rng.random() < config.issue_stop:
            # Issue 15's point: the lock checked, the snapshot not yet published.
            self.sim.count("issue stops")
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
        rng = self.rng
        cost = _COSTS.get(type(effect), 1e-3) * (0.1 + rng.random())
        if not self.sim.faults_over and self.sim.config.stall and rng.random() < self.sim.config.stall:
            self.sim.count("stalls")
            stall = self._cut(rng.uniform(1.0, min(8.0, self.sim.config.longest)))
            self.sim.world.note(proc.pid, "stalls %.2f s in %s", stall, type(effect).__name__)
            cost += stall
            self.sim.faults_end = max(self.sim.faults_end, self.sim.world.now + cost)
        return cost

    def crash_point(self, step: str) -> None:
        """The segment writer passes *step* of a publish (a crash point): maybe kill or stop it there."""
        proc = self.sim.publisher
        if proc is None:
            return
        if step == "published":  # the generation word is stored: readers may see it from now on
            self.sim.published(proc.host, proc.host.segment.generation())
        if self.sim.faults_over:
            return
        rng, config = self.rng, self.sim.config
        roll = rng.random() * 10
        if roll < config.crash_publish:
            self.sim.count("kills inside publish")
            self.sim.world.note(proc.pid, "killed inside publish at %s", step)
            proc.kill()
            raise Killed
        if roll < config.crash_publish + config.stop_publish and not self.nested:
            self.sim.count("stops inside publish")
            least = policy.UNRESPONSIVE_AFTER + policy.BUSY_PROMISE
            seconds = self._stop_length(rng.uniform(least, max(least + 1.0, config.longest)))
            self.sim.world.note(proc.pid, "stops inside publish at %s", step)
            proc.stop(seconds)
            self.nested = True
            try:
                self.sim.world.run_until(self.sim.world.now + seconds)  # everyone else runs meanwhile
            finally:
                self.nested = False
            if not proc.alive:
                raise Killed

    def schedule(self) -> None:
        config, service = self.sim.config, self.sim.service
        self._every(config.kill_rate, lambda: self._kill(self._victim()))
        self._every(config.stop_rate, lambda: self._stop(self._victim()))
        self._every(config.flip_rate, self._flip)
        self._every(config.jump_rate, self._jump)
        self._every(config.outage_rate, self._outage)
        self._every(config.slow_rate, self._slow)
        self._every(config.reset_rate, self._reset)
        self._every(config.full_rate, self._full)
        self._every(config.change_rate, self._change)
        self._every(config.reload_rate, self.reload)
        self._every(config.get_rate, self._get, until_idle=True)
        self._every(config.churn_rate, self._churn)
        service.error_rate = config.error_rate

    def _every(self, rate: float, action: Callable[[], None], until_idle: bool = False) -> None:
        """Run *action* at the times of a Poisson process of *rate* (per second) while faults go on."""
        if rate <= 0:
            return
        world, rng = self.sim.world, self.rng

        def fire() -> None:
            if self.sim.faults_over and not until_idle:
                return
            if self.sim.idle:
                return
            action()
            world.after(rng.expovariate(rate), fire)

        world.after(rng.expovariate(rate), fire)

    def _victim(self) -> SimProcess | None:
        live = [p for p in self.sim.live() if p is not self.sim.publisher or not self.nested]
        if not live:
            return None
        leaders = [p for p in live if p.engine.leading]
        if leaders and self.rng.random() < 0.5:
            return leaders[0]
        return self.rng.choice(live)

    def _kill(self, proc: SimProcess | None) -> None:
        if proc is None:
            return
        self.sim.count("kills")
        proc.kill()
        if self.rng.random() < 0.8:
            self.sim.world.after(self.rng.uniform(0.05, 2.0), self.sim.spawn)

    def _some_stop(self) -> float:
        rng = self.rng
        return rng.uniform(0.05, 3.0) if rng.random() < 0.7 else rng.uniform(5.5, self.sim.config.longest)

    def _cut(self, seconds: float) -> float:
        """*seconds*, cut so that a fault ends at most :data:`RUN_OUT` seconds after the fault phase."""
        return max(0.05, min(seconds, BOOT + self.sim.config.fault_time + RUN_OUT - self.sim.world.now))

    def _stop_length(self, seconds: float) -> float:
        seconds = self._cut(seconds)
        self.sim.count("stops")
        self.sim.faults_end = max(self.sim.faults_end, self.sim.world.now + seconds)
        return seconds

    def _stop(self, proc: SimProcess | None) -> None:
        if proc is not None and not proc.stopped:
            proc.stop(self._stop_length(self._some_stop()))

    def _flip(self) -> None:
        self.sim.count("byte flips")
        offset = self.sim.segment_file.flip(self.rng)
        self.sim.flipped_at = self.sim.world.now
        self.sim.world.note(0, "bit flipped at offset %d", offset)

    def _jump(self) -> None:
        rng, world = self.rng, self.sim.world
        self.sim.count("clock jumps")
        if rng.random() < 0.7:
            step = rng.uniform(-7200.0, 7200.0)
            world.wall_offset += step
            world.note(0, "wall clock steps %+.0f s", step)
        else:
            world.jump(rng.uniform(0.5, 8.0))

    def _outage(self) -> None:
        rng, service, world = self.rng, self.sim.service, self.sim.world
        self.sim.count("outages")
        seconds = self._cut(rng.uniform(1.0, self.sim.config.longest))
        service.down_until = max(service.down_until, world.now + seconds)
        service.down_mode = rng.choice(("refused", "hang", "503"))
        self.sim.faults_end = max(self.sim.faults_end, service.down_until + CLIENT_TIMEOUT)
        world.note(0, "service down (%s) for %.1f s", service.down_mode, seconds)

    def _slow(self) -> None:
        rng, service, world = self.rng, self.sim.service, self.sim.world
        self.sim.count("slow spells")
        seconds = self._cut(rng.uniform(1.0, self.sim.config.longest * 0.75))
        service.slow_until = max(service.slow_until, world.now + seconds)
        service.slow_factor = rng.uniform(20.0, 800.0)
        self.sim.faults_end = max(self.sim.faults_end, service.slow_until + CLIENT_TIMEOUT)
        world.note(0, "service slow (x%.0f) for %.1f s", service.slow_factor, seconds)

    def _reset(self) -> None:
        self.sim.count("data resets")
        self.sim.service.reset()
        self.sim.world.note(0, "the service lost all its data")

    def _full(self) -> None:
        file, world = self.sim.segment_file, self.sim.world
        if file.full:
            return
        self.sim.count("disk full")
        seconds = self._cut(self.rng.uniform(0.5, self.sim.config.longest))
        file.full = True
        self.sim.faults_end = max(self.sim.faults_end, world.now + seconds)
        world.note(0, "disk full for %.1f s", seconds)

        def freed() -> None:
            file.full = False
            world.note(0, "disk space again")

        world.after(seconds, freed)

    def _change(self) -> None:
        if self.sim.world.now > BOOT + self.sim.config.fault_time - self.sim.config.update_interval:
            return  # the last interval of faults changes no rule: convergence is then about the faults
        name = self.sim.service.change_rule()
        if name is not None:
            self.sim.world.note(0, "rule of %s changed: version %d", name, self.sim.service.stamp)

    def reload(self) -> None:
        live = [p for p in self.sim.live() if not p.stopped]
        if live:
            proc = self.rng.choice(live)
            self.sim.world.note(proc.pid, "reload()")
            proc.client.reload()

    def _get(self) -> None:
        live = [p for p in self.sim.live() if not p.stopped]
        if live:
            self.rng.choice(live).client.apply_latest()

    def _churn(self) -> None:
        live = [p for p in self.sim.live() if not p.stopped]
        if live:
            self.sim.count("closes")
            self.rng.choice(live).close()


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


def _describe(effect: object) -> str:
    name = type(effect).__name__
    if isinstance(effect, Wait):
        return f"Wait({effect.timeout if effect.timeout is None else round(effect.timeout, 3)})"
    if isinstance(effect, Call):
        return f"Call({effect.method} {effect.path})"
    if isinstance(effect, Publish):
        return f"Publish(term {effect.term})"
    return name
