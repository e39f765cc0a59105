"""Lockstep: hosts that start together, or come back together after an outage, and when they query.

H hosts (50; ``--quick``: 6; ``HEKSHER_BENCH_LOCKSTEP_HOSTS`` overrides both) of one side,
one process each (a host is a shared folder of its own on our side), start at one moment:
each makes the same ten settings (the small kind) plus one setting of its own, declared
beforehand by the runner, whose name in the ``settings`` parameter of a query tells the
runner which host sent it. As in the start case, every process blocks on one pipe until
the runner closes it (the release), then builds a ``ThreadHeksherClient`` (update
interval I: 5 s, ``--quick``: 1 s) and calls ``set_as_main()``.

Phase 1, the start: the runner waits until every host has made four query *waves* (or
a deadline), a wave being a host's query that comes at least half an interval after the
previous wave (heksher 0.2.2 sends two queries at once when it starts: one wave).
Phase 2, the end of an outage: the service answers 500 to every query for three
intervals; then it heals, and the runner again waits for four waves per host, counted
from the moment it healed.

For each phase and wave k (0: the first query; 1, 2, 3: the next three intervals), the
*spread* is the time between the first and the last host's k-th wave. On one small
machine the hosts cannot start at one instant: two cores start H processes, so the first
queries already lie seconds apart, which no real fleet of H machines would see. So each
host's times are moved back by its own start delay (its first query's lateness against
the fleet's first), which turns the measurement into that of hosts that started at the
same instant: hosts in lockstep keep a spread near 0, a fleet that spreads out grows it.
The raw spreads, as the service saw them, are in the note.

After the outage the question is whether hosts that were in step come back in step, so
the spreads are those of the largest group of hosts whose last queries before the outage
lay within 5 % of an interval of each other (the note gives its size), unshifted: the
outage began and ended for all of them at the same instants. The outage lasts three
intervals and ends half an interval away from that group's phase, so that hosts which
keep their phase do not straddle its end.

The requirement (issue 16, item 5): within three intervals the queries spread over at
least one update interval, so the row's value is the shifted spread of wave 3 in
intervals, target >= 1. A start still queries at once: the note gives the time from the
release until the first and the last host's first query.

Measured for both clients; nothing here depends on how the engine schedules its queries.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from benchmarks._common import Child, Run, child_main, commands, emit, log, stop_all, summary
from benchmarks._scenario import SMALL_DEFAULTS, SMALL_TRACK, seed_small, specs_from
from benchmarks._sides import library, make_client, make_settings

NAME = "lockstep"
MODULE = "bench_lockstep"
TITLE = "Lockstep: when hosts that start or recover together query"
TARGET = "within three intervals the queries spread over >= 1 update interval"
HOSTS_FULL, HOSTS_QUICK = 50, 6
HOSTS_ENV = "HEKSHER_BENCH_LOCKSTEP_HOSTS"
INTERVAL_FULL, INTERVAL_QUICK = 5.0, 1.0
WAVES = 4
OUTAGE_INTERVALS = 3
IN_STEP = 0.05
"""Hosts whose last queries before the outage lie within this fraction of an interval were in step."""
MIN_SPREAD = 1.0
"""In update intervals, for wave 3."""


# -- child side ---------------------------------------------------------------------------------------------


def body(params: dict[str, Any]) -> None:
    side = params["side"]
    lib = library(side)
    marker = (params["marker"], "int", ["user", "theme"], 0)
    settings = make_settings(lib, [*specs_from(params["settings"]), marker])  # held weakly by both libraries
    emit("armed")
    while os.read(params["release_fd"], 4096):  # end-of-file: released, all at once
        pass
    client = make_client(lib, params["url"], params["interval"], SMALL_TRACK, SMALL_DEFAULTS)
    client.set_as_main()
    emit("ready", done=time.monotonic())
    for command in commands():
        raise ValueError(f"unknown command {command!r}")
    client.close()
    del settings


# -- runner side --------------------------------------------------------------------------------------------


def hosts_for(quick: bool) -> int:
    """The number of hosts: the environment's override, else the mode's."""
    override = os.environ.get(HOSTS_ENV)
    if override:
        return max(2, int(override))
    return HOSTS_QUICK if quick else HOSTS_FULL


def waves(times: list[float], interval: float, count: int = WAVES) -> list[float]:
    """The first *count* waves of one host's query times: a query at least half an interval after the
    previous wave starts a new one (two queries sent at once are one wave)."""
    found: list[float] = []
    for t in sorted(times):
        if not found or t - found[-1] >= interval / 2:
            found.append(t)
            if len(found) == count:
                break
    return found


def spreads(
    per_host: dict[str, list[float]], interval: float, shift: dict[str, float] | None = None
) -> list[float | None]:
    """For each wave k, the time between the first and the last host's k-th wave (None: some host has
    not made it), each host's times moved back by its *shift* (seconds) if given."""
    all_waves = [
        [t - (shift or {}).get(host, 0.0) for t in waves(times, interval)] for host, times in per_host.items()
    ]
    result: list[float | None] = []
    for k in range(WAVES):
        at = [w[k] for w in all_waves if len(w) > k]
        result.append(max(at) - min(at) if at and len(at) == len(all_waves) else None)
    return result


def start_delays(per_host: dict[str, list[float]]) -> dict[str, float]:
    """How much later than the fleet's first query each host made its own first query."""
    firsts = {host: min(times) for host, times in per_host.items() if times}
    earliest = min(firsts.values(), default=0.0)
    return {host: first - earliest for host, first in firsts.items()}


def _by_host(r: Run, markers: dict[str, str], since: float) -> dict[str, list[float]]:
    per_host: dict[str, list[float]] = {marker: [] for marker in markers}
    for t, settings in r.service.queries():
        if t < since:
            continue
        for name in settings.split(","):
            if name in per_host:
                per_host[name].append(t)
                break
    return per_host


def _wait_waves(r: Run, markers: dict[str, str], since: float, interval: float, deadline: float) -> None:
    while time.monotonic() < deadline:
        per_host = _by_host(r, markers, since)
        if all(len(waves(times, interval)) >= WAVES for times in per_host.values()):
            return
        time.sleep(interval / 4)


def in_step(per_host: dict[str, list[float]], before: float, window: float) -> dict[str, float]:
    """The largest group of hosts in step when an outage began: whose last queries before *before* lie
    within *window* seconds of each other (each host's time moved back to 0 for the group)."""
    lasts = sorted((max(t for t in times if t < before), host) for host, times in per_host.items() if times)
    best: list[tuple[float, str]] = []
    for i, (first, _) in enumerate(lasts):
        group = [(t, host) for t, host in lasts[i:] if t - first <= window]
        if len(group) > len(best):
            best = group
    return {host: 0.0 for _, host in best}


def _phase(
    per_host: dict[str, list[float]], since: float, interval: float, delays: dict[str, float]
) -> dict[str, Any]:
    firsts = [min(times) - since for times in per_host.values() if times]
    return {
        "spreads_s": spreads(per_host, interval, delays),
        "raw_spreads_s": spreads(per_host, interval),
        "first_query_s": {"min": min(firsts, default=None), "max": max(firsts, default=None)},
        "hosts_short": sum(1 for times in per_host.values() if len(waves(times, interval)) < WAVES),
    }


def _side(r: Run, side: str, hosts: int, interval: float, settings: dict[str, Any]) -> dict[str, Any]:
    service = r.service
    markers = {f"{service.prefix}lk{side[0]}{i}": str(i) for i in range(hosts)}
    for marker in markers:
        service.declare(marker, "int", 0, ["user", "theme"])
    read_end, write_end = os.pipe()
    children: list[Child] = []
    try:
        try:
            for i, marker in enumerate(markers):
                params = {
                    "side": side,
                    "url": service.counted_url(),
                    "interval": interval,
                    "settings": settings,
                    "marker": marker,
                    "release_fd": read_end,
                }
                shm = r.shm_dir(f"{NAME}-{i}") if side == "ours" else None
                children.append(
                    r.spawn(MODULE, params, shm_dir=shm, label=f"{NAME}-{side}-{i}", pass_fds=(read_end,))
                )
        finally:
            os.close(read_end)
        for child in children:
            child.expect("armed", timeout=300)
        released = time.monotonic()
        os.close(write_end)
        write_end = -1
        ready = [child.expect("ready", timeout=300)["done"] - released for child in children]
        _wait_waves(r, markers, released, interval, time.monotonic() + (WAVES + 2) * interval)
        at_start = _by_host(r, markers, released)
        delays = start_delays(at_start)
        start = _phase(at_start, released, interval, delays)

        outage_began = time.monotonic()
        service.fail_queries(500)
        # After the outage, only the hosts that were in step when it began: whether they come back in
        # step is the question, and the others' phases say nothing about it.
        group = in_step(_by_host(r, markers, released), outage_began, IN_STEP * interval)
        # The outage ends half an interval away from the group's phase: hosts that keep their phase
        # through it must not straddle the end, some failing just before it and the others not.
        phase = statistics.median(
            max(t for t in times if t < outage_began)
            for host, times in _by_host(r, markers, released).items()
            if host in group
        )
        heal_at = outage_began + OUTAGE_INTERVALS * interval
        heal_at += (phase + interval / 2 - heal_at) % interval
        time.sleep(max(0.0, heal_at - time.monotonic()))
        service.heal()
        healed = time.monotonic()
        _wait_waves(r, markers, healed, interval, healed + (WAVES + 3) * interval)
        after = {host: times for host, times in _by_host(r, markers, healed).items() if host in group}
        outage = {**_phase(after, healed, interval, group), "hosts_in_step": len(group)}
    finally:
        service.heal()
        if write_end != -1:
            os.close(write_end)
        stop_all(children)
    return {"start": start, "outage": outage, "ready_s": {"max": max(ready), "min": min(ready)}}


def _fmt(values: list[float | None]) -> str:
    return ", ".join("n/a" if v is None else f"{v:.2f}" for v in values)


def _row(phase: str, label: str, hosts: int, interval: float, ours: Any, peer: Any) -> dict[str, Any]:
    def last(side: Any) -> float | None:
        value = side[phase]["spreads_s"][-1]
        return None if value is None else value / interval

    notes = []
    for name, side in (("ours", ours), ("peer", peer)):
        got = side[phase]
        which = (
            f" (raw {_fmt(got['raw_spreads_s'])} s)"
            if phase == "start"
            else f" over the {got['hosts_in_step']} hosts in step when it began"
        )
        notes.append(
            f"{name}: waves 0-3 spread {_fmt(got['spreads_s'])} s{which}, first queries "
            f"{got['first_query_s']['min']:.2f} to {got['first_query_s']['max']:.2f} s after the "
            f"{'release' if phase == 'start' else 'healing'}"
            + (f", {got['hosts_short']} hosts made fewer than {WAVES} waves" if got["hosts_short"] else "")
        )
    ours_value, peer_value = last(ours), last(peer)
    return {
        "label": f"{label}, H={hosts} hosts, interval {interval:g} s: spread of wave 3 (the third interval)",
        "unit": "intervals",
        "ours": None if ours_value is None else summary([ours_value]),
        "peer": None if peer_value is None else summary([peer_value]),
        "ratio": None,
        "target": f">= {MIN_SPREAD:g} interval",
        "met": ours_value is not None and ours_value >= MIN_SPREAD,
        "note": "; ".join(notes),
    }


def run(r: Run) -> dict[str, Any]:
    hosts = hosts_for(r.quick)
    interval = INTERVAL_QUICK if r.quick else INTERVAL_FULL
    if r.shared.get("small") is None:
        r.shared["small"] = seed_small(r.service, "g", 10)
    settings = {"kind": "small", "prefix": r.service.prefix, "stem": "g", "count": 10}
    measured = {}
    for side in ("ours", "peer"):
        measured[side] = _side(r, side, hosts, interval, settings)
        got = measured[side]
        log(
            f"{NAME}: {side}: start spreads {_fmt(got['start']['spreads_s'])} s (raw "
            f"{_fmt(got['start']['raw_spreads_s'])}); after the outage {_fmt(got['outage']['spreads_s'])} s "
            f"({got['outage']['hosts_in_step']} hosts in step) (interval {interval:g} s, {hosts} hosts)"
        )
    ours, peer = measured["ours"], measured["peer"]
    return {
        "case": NAME,
        "title": TITLE,
        "target": TARGET,
        "params": {
            "hosts": hosts,
            "update_interval_s": interval,
            "waves": WAVES,
            "outage_intervals": OUTAGE_INTERVALS,
        },
        "rows": [
            _row("start", "Hosts started together", hosts, interval, ours, peer),
            _row("outage", "Hosts back together after an outage", hosts, interval, ours, peer),
        ],
        "series": measured,
    }


if __name__ == "__main__":
    child_main(body)
