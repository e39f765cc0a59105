"""What a schedule is made of: its configuration, drawn from its seed and profile alone."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["PROFILES", "RUN_OUT", "Config", "config_for"]

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
