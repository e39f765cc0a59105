"""A deterministic simulation of one host running heksher_shm: N processes, each with the real engine.

The simulated host (:mod:`tests.sim.world`: clocks, flock, rename-over,
processes, pidfds, doorbells), the real segment code over shared memory
(:mod:`tests.sim.segment`), the registry and the engine's host port
(:mod:`tests.sim.host`), a Heksher service on simulated time
(:mod:`tests.sim.service`), one driver and one client per process
(:mod:`tests.sim.process`, :mod:`tests.sim.client`), a seeded scheduler that
injects faults (:mod:`tests.sim.run`), and the invariants it checks
(:mod:`tests.sim.invariants`). ``python -m tests.sim --help`` runs and
replays schedules; ``docs/testing.rst`` says what it covers and what it
cannot.
"""

from tests.sim.run import Result, config_for, replay_command, run_schedule

__all__ = ["Result", "config_for", "replay_command", "run_schedule"]
