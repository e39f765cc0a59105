"""A simulated process: the real :class:`~heksher_shm._engine.engine.Engine`, driven on simulated time.

:class:`SimProcess` is a third driver of the engine's effects, next to the
two in :mod:`heksher_shm._engine.drivers`, and performs each effect as they
do, against the simulated host:

=============  ===========================================================================
effect         here
=============  ===========================================================================
``Call``       sent to the simulated service; the answer (or error) comes back later
``Calls``      the same, at most *limit* at a time
``Compute``    run at once; the process goes on after a simulated CPU time
``Digest``     :func:`~heksher_shm._engine.answers.digest_query`, the same way
host effects   ``effect.perform(host)`` on the :class:`~tests.sim.host.SimHost`
``Wait``       until the doorbell rings, the exit handle fires, the process wakes itself,
               or the timeout passes; then the doorbell is drained
``Apply``      :meth:`SimClient.apply_effect`; ``Report`` and ``Housekeep`` likewise
=============  ===========================================================================

While a ``busy`` effect runs, the process beats every ``BEAT_INTERVAL`` (as
the drivers' beater does) unless it is stopped. A stopped process starts
nothing and beats nothing; what completes meanwhile (an answer) waits for it
to resume. A killed process is gone: its generator is dropped, its kernel
objects go (:meth:`tests.sim.world.Kernel.kill`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

from heksher_shm._engine.answers import digest_query
from heksher_shm._engine.context import Context, ErrorBook
from heksher_shm._engine.effects import (
    Apply,
    Call,
    Calls,
    Compute,
    Digest,
    Housekeep,
    Report,
    Wait,
)
from heksher_shm._engine.engine import Engine
from heksher_shm._engine.policy import BEAT_INTERVAL, BUSY_PROMISE
from heksher_shm._model.protocol import DeclarationBody
from tests.sim.client import SimClient
from tests.sim.host import SimHost
from tests.sim.service import FEATURES
from tests.sim.world import Killed

if TYPE_CHECKING:
    from tests.sim.run import Sim

__all__ = ["SimProcess"]

_DRIVER_EFFECTS = frozenset({Wait, Apply, Report, Housekeep, Call, Calls, Digest, Compute})
"""The effects the driver performs itself; the others are host effects (``effect.perform(host)``)."""


class SimProcess:
    """One process of the simulated host: its engine, its driver, its client (see the module docstring)."""

    def __init__(
        self,
        sim: Sim,
        pid: int,
        declarations: dict[str, DeclarationBody],
        tracked: dict[str, list[str]],
    ) -> None:
        world = sim.world
        self.sim = sim
        self.pid = pid
        self.start = round(world.now, 3)
        self.entry = world.kernel.spawn(pid, self.start)
        self.host = SimHost(sim, pid, self.start, sim.segment_file.open())
        self.host.proc = self
        self.client = SimClient(
            self, declarations, tracked, sim.config.startup_timeout, sim.checks.applied_by(self)
        )
        self.rng = random.Random(world.rng.getrandbits(64))
        self.engine = Engine(
            Context(
                update_interval=sim.config.update_interval,
                context_features=FEATURES,
                shared=True,
                clock=world.clock,
                rng=self.rng,
                errors=ErrorBook(pid),
            )
        )
        self._steps = self.engine.run()
        self.alive = True
        self.exited = False
        self.stopped = False
        self._on_resume: list[Callable[[], None]] = []
        self.effect: object = None
        self._send: Any = None
        self._throw: BaseException | None = None
        self._waiting: object = None
        self._woken = False
        self.previous: object = None
        """The effect before the current one (the scheduler looks at the boundary between them)."""
        self.wakes = 0
        """Waits that ended (what "quiet when idle" counts)."""
        world.kernel.bind(self.host.bell, pid, self._rung)
        sim.registry.bells[self.host.bell] = (pid, self.start)

    # -- life ------------------------------------------------------------------------------------------

    def begin(self) -> None:
        """Start the engine (its thread) and call ``set_as_main`` (the main thread)."""
        self.sim.world.after(0.0, self._advance)
        self.client.set_as_main()

    def kill(self) -> None:
        """SIGKILL: nothing more runs; the kernel lets go of its locks and bells."""
        if not self.alive:
            return
        self.alive = False
        self.sim.world.note(self.pid, "killed%s", " (leading)" if self.engine.leading else "")
        self.sim.world.kernel.kill(self.pid)
        self._steps = None  # type: ignore[assignment]

    def stop(self, seconds: float) -> None:
        """SIGSTOP now, SIGCONT *seconds* later."""
        if not self.alive or self.stopped:
            return
        self.stopped = True
        world = self.sim.world
        world.note(self.pid, "stopped for %.2f s%s", seconds, " (leading)" if self.engine.leading else "")
        world.after(seconds, self.resume)

    def resume(self) -> None:
        """SIGCONT."""
        if not self.alive or not self.stopped:
            return
        self.stopped = False
        self.sim.world.note(self.pid, "resumed")
        hooks, self._on_resume = self._on_resume, []
        for hook in hooks:
            hook()

    def close(self) -> None:
        """``client.close()``: the engine ends at its next wake; then the process exits."""
        if self.alive and not self.stopped:
            self.sim.world.note(self.pid, "closing")
            self.engine.closed = True
            self.wake()

    def when_running(self, action: Callable[[], None]) -> None:
        """Run *action* now, or when the process resumes (never if it died)."""
        if not self.alive:
            return
        if self.stopped:
            self._on_resume.append(lambda: self.when_running(action))
        else:
            action()

    def at_deadline(self, when: float, action: Callable[[], None]) -> None:
        """Run *action* at *when* in one of the process's threads (later if it is stopped then)."""
        self.sim.world.at(when, lambda: self.when_running(action))

    def wake(self) -> None:
        """The client wakes its engine (``_wake``: a setting added, a reload, close)."""
        self._woken = True
        if self._waiting is not None:
            self._end_wait(self._waiting)

    def _rung(self) -> None:
        if self._waiting is not None:
            self._end_wait(self._waiting)

    # -- the driver ------------------------------------------------------------------------------------

    def _advance(self) -> None:
        """Send the last result into the engine and perform the effect it yields next.

        Between the two (an effect boundary), the scheduler may kill or stop the process
        (:meth:`tests.sim.run.Sim.at_boundary`).
        """
        if not self.alive:
            return
        if self.stopped:
            self._on_resume.append(self._advance)
            return
        send, throw = self._send, self._throw
        self._send = self._throw = None
        try:
            effect = self._steps.throw(throw) if throw is not None else self._steps.send(send)
        except StopIteration:
            self._exit()
            return
        self.effect = effect
        stop = self.sim.faults.at_boundary(self, effect)
        if not self.alive:
            return  # killed at this boundary
        if stop:
            self._on_resume.append(lambda: self._perform(effect))
            self.stop(stop)
            return
        self._perform(effect)

    def _done(
        self, effect: object, delay: float, result: Any = None, error: BaseException | None = None
    ) -> None:
        """The effect ends *delay* seconds from now with *result* (or *error*)."""

        def finish() -> None:
            if self.effect is not effect:
                return
            self.effect = None
            self._send, self._throw = result, error
            self._advance()

        self.sim.world.after(delay, finish)

    def _perform(self, effect: object) -> None:
        if not self.alive:
            return
        cost = self.sim.faults.cost(self, effect)
        kind = type(effect)
        if getattr(effect, "busy", False) and (cost >= BEAT_INTERVAL or kind is Call or kind is Calls):
            self._beat_while(effect)  # (an effect that ends before the first beat needs none)
        if kind not in _DRIVER_EFFECTS:  # a host effect: the most common kind
            try:
                result = effect.perform(self.host)  # type: ignore[attr-defined]
            except Killed:
                return  # killed inside publish, at one of its crash points
            except Exception as e:
                self._done(effect, cost, error=e)
                return
            self._done(effect, cost, result)
        elif kind is Wait:
            self._wait(effect)  # type: ignore[arg-type]
        elif kind is Apply:
            self.client.apply_effect(effect)  # type: ignore[arg-type]
            self._done(effect, cost)
        elif kind is Report:
            self.client.report(effect.error)  # type: ignore[attr-defined]
            self._done(effect, cost)
        elif kind is Housekeep:
            self._done(effect, cost, self.client.housekeep())
        elif kind is Call:
            self._call(effect, lambda answer: self._answered(effect, answer))  # type: ignore[arg-type]
        elif kind is Calls:
            self._calls(effect)  # type: ignore[arg-type]
        else:
            try:
                result = (
                    digest_query(effect.response, effect.queried)  # type: ignore[attr-defined]
                    if kind is Digest
                    else effect.fn()  # type: ignore[attr-defined]
                )
            except Exception as e:
                self._done(effect, cost, error=e)
            else:
                self._done(effect, cost, result)

    def _answered(self, effect: object, answer: httpx.Response | Exception) -> None:
        if isinstance(answer, Exception):
            self._done(effect, 0.0, error=answer)
        else:
            self._done(effect, 0.0, answer)

    def _call(self, call: Call, done: Callable[[httpx.Response | Exception], None]) -> None:
        self.sim.send(self, call, done)

    def _calls(self, effect: Calls) -> None:
        calls = list(effect.calls)
        results: list[httpx.Response | Exception | None] = [None] * len(calls)
        pending = list(range(len(calls)))
        in_flight = 0
        finished = 0

        def start_more() -> None:
            nonlocal in_flight
            while pending and in_flight < effect.limit:
                index = pending.pop(0)
                in_flight += 1
                self._call(calls[index], lambda answer, i=index: one_done(i, answer))

        def one_done(index: int, answer: httpx.Response | Exception) -> None:
            nonlocal in_flight, finished
            results[index] = answer
            in_flight -= 1
            finished += 1
            if finished == len(calls):
                self._done(effect, 0.0, list(results))
            else:
                start_more()

        start_more()

    def _beat_while(self, effect: object) -> None:
        """The drivers' beater: a new promise every BEAT_INTERVAL while *effect* runs (not while stopped)."""
        world = self.sim.world

        def beat() -> None:
            if not self.alive or self.effect is not effect:
                return
            if not self.stopped:
                self.host.beat(world.now, world.now + BUSY_PROMISE)
            world.after(BEAT_INTERVAL, beat)

        world.after(BEAT_INTERVAL, beat)

    def _wait(self, effect: Wait) -> None:
        kernel = self.sim.world.kernel
        token = object()
        exit_handle = effect.leader_exit
        if (
            self._woken
            or self.host.bell in kernel.rung
            or (exit_handle is not None and kernel.exited(exit_handle))
        ):
            self._waiting = token
            self.sim.world.after(0.0, lambda: self._end_wait(token))
            return
        self._waiting = token
        if effect.timeout is not None:
            self.sim.world.after(effect.timeout, lambda: self._end_wait(token))
        if exit_handle is not None:
            watched = kernel.handles.get(exit_handle)
            if watched is not None:
                kernel.processes[watched.pid].on_death.append(lambda: self._end_wait(token))

    def _end_wait(self, token: object) -> None:
        if self._waiting is not token or not self.alive:
            return
        if self.stopped:
            self._on_resume.append(lambda: self._end_wait(token))
            return
        self._waiting = None
        effect = self.effect
        assert isinstance(effect, Wait)
        kernel = self.sim.world.kernel
        fired = effect.leader_exit is not None and kernel.exited(effect.leader_exit)
        self._woken = False
        self.host.drain()
        self.wakes += 1
        self._done(effect, 0.0, fired)

    def _exit(self) -> None:
        """The engine ended (the client closed): the registration and the bell go, the process exits."""
        sim = self.sim
        sim.world.note(self.pid, "exits")
        sim.registry.registrations.pop(self.host.key, None)
        self.host.segment.bump_registry_seq()
        self.exited = True
        self.alive = False
        sim.world.kernel.kill(self.pid)
        sim.process_exited(self)
