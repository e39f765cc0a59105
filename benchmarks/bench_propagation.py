"""From a rule change on the service to the new value in all N processes.

For each N, N processes of one side run (the same ten settings, rules, tracked
contexts and default); in each, a thread calls ``get(user='alice')`` every 2 ms
and reports the ``time.monotonic()`` (one clock for the whole host) at which
it first sees a new value. The runner then changes the value of the rule that
answers that call, and a trial's latency is the time until the *last* process
saw it.

Trials come in two phases:

* **worst phase**: the change is made just after the service answered a
  query (the runner waits for the request to be recorded), so it just misses
  a poll and waits about a full update interval for the next one. The target
  (``update_interval + 50 ms``) is checked on these.
* **random phase**: the change is made at a random moment; reported for
  reference (about half an interval on average).

The trials begin once our leader's drawn waits are over: after a start (and
after an outage) it draws its next :data:`~heksher_shm._engine.health.DESYNC_WAVES`
waits between 0.25 and 1.75 intervals, so that hosts started together do not
stay in lockstep (see the lockstep case); a change made then can wait up to
1.75 intervals. One worst-phase trial made right after the start shows it,
in the note (both sides make it, and wait as long after it).
"""

from __future__ import annotations

import random
import time
from typing import Any

from benchmarks._common import Child, Run, log, stop_all, summary
from benchmarks._fleet import roles, start_fleet
from benchmarks._scenario import SMALL_DEFAULTS, SMALL_TRACK, seed_small
from benchmarks._service import QUERY_PATH
from heksher_shm._engine.health import DESYNC_SPREAD, DESYNC_WAVES

NAME = "propagation"
TITLE = "Rule change to visible in all N processes"
TARGET = "<= update_interval + 50 ms for every N"
WATCH_PERIOD = 0.002
ORIGINAL_VALUE = 3


def _trial(r: Run, fleet: list[Child], rule_id: int, value: int, worst: bool, interval: float) -> float:
    service = r.service
    if worst:
        if service.wait_for_next("GET", QUERY_PATH, timeout=3 * interval + 5) is None:
            raise RuntimeError("no query reached the service within three update intervals")
    else:
        time.sleep(random.uniform(0, interval))
    changed = time.monotonic()
    service.set_rule_value(rule_id, value)
    latest = changed
    for child in fleet:
        while True:
            seen = child.expect("seen", timeout=3 * interval + 10)
            if seen["value"] == value:
                latest = max(latest, seen["t"])
                break
    return latest - changed


def run(r: Run) -> dict[str, Any]:
    service = r.service
    small = r.shared.get("small")
    if small is None:
        small = r.shared["small"] = seed_small(service, "g", 10)
    settings = {"kind": "small", "prefix": service.prefix, "stem": "g", "count": 10}
    counts_of = (1, 2, 4) if r.quick else (1, 2, 4, 8, 16, 32)
    interval = 0.5
    worst_trials, random_trials = (2, 1) if r.quick else (4, 2)
    budget = interval + 0.050
    rng_value = iter(range(10_000, 1_000_000))
    rows = []
    series: dict[str, Any] = {
        "n": list(counts_of),
        "ours": [],
        "peer": [],
        "ours_random": [],
        "peer_random": [],
    }
    try:
        for n in counts_of:
            measured: dict[str, dict[str, list[float]]] = {}
            for side in ("ours", "peer"):
                shm = r.shm_dir(f"propagation-{n}") if side == "ours" else None
                fleet, _ = start_fleet(
                    r,
                    side,
                    n,
                    {
                        "url": service.counted_url(),
                        "interval": interval,
                        "settings": settings,
                        "track": SMALL_TRACK,
                        "defaults": SMALL_DEFAULTS,
                        "watch": {
                            "setting": small["names"][0],
                            "context": {"user": "alice"},
                            "period": WATCH_PERIOD,
                        },
                    },
                    label=f"propagation-{n}",
                    shm_dir=shm,
                )
                try:
                    if side == "ours" and roles(fleet).count("leader") != 1:
                        raise RuntimeError(f"{n} processes of ours: expected one leader")
                    started = time.monotonic()
                    early = _trial(r, fleet, small["light"], next(rng_value), True, interval)
                    # Until our leader's drawn waits are over (at most 1.75 intervals each).
                    drawn = interval * DESYNC_WAVES * (1 + DESYNC_SPREAD)
                    time.sleep(max(0.0, started + drawn - time.monotonic()))
                    worst = [
                        _trial(r, fleet, small["light"], next(rng_value), True, interval)
                        for _ in range(worst_trials)
                    ]
                    anywhen = [
                        _trial(r, fleet, small["light"], next(rng_value), False, interval)
                        for _ in range(random_trials)
                    ]
                finally:
                    stop_all(fleet)
                measured[side] = {"worst": worst, "random": anywhen, "early": [early]}
                log(
                    f"{NAME}: N={n} {side}: worst phase {[round(x * 1000) for x in worst]} ms, "
                    f"random phase {[round(x * 1000) for x in anywhen]} ms, right after the start "
                    f"{round(early * 1000)} ms"
                )
            ours_ms = summary([x * 1000 for x in measured["ours"]["worst"]])
            peer_ms = summary([x * 1000 for x in measured["peer"]["worst"]])
            series["ours"].append(ours_ms["max"])
            series["peer"].append(peer_ms["max"])
            series["ours_random"].append(summary(measured["ours"]["random"])["median"] * 1000)
            series["peer_random"].append(summary(measured["peer"]["random"])["median"] * 1000)
            rows.append(
                {
                    "label": f"Change to visible in all, N={n} (worst phase)",
                    "unit": "ms",
                    "ours": ours_ms,
                    "peer": peer_ms,
                    "ratio": ours_ms["median"] / peer_ms["median"],
                    "target": f"<= {budget * 1000:.0f} ms",
                    "met": ours_ms["max"] <= budget * 1000,
                    "note": (
                        "random phase, median: "
                        f"ours {series['ours_random'][-1]:.0f} ms, peer {series['peer_random'][-1]:.0f} ms; "
                        "worst phase right after the start: "
                        f"ours {measured['ours']['early'][0] * 1000:.0f} ms, "
                        f"peer {measured['peer']['early'][0] * 1000:.0f} ms"
                    ),
                }
            )
    finally:
        service.set_rule_value(small["light"], ORIGINAL_VALUE)
    return {
        "case": NAME,
        "title": TITLE,
        "target": TARGET,
        "params": {
            "update_interval_s": interval,
            "worst_phase_trials": worst_trials,
            "random_phase_trials": random_trials,
            "watch_period_s": WATCH_PERIOD,
            "n": list(counts_of),
        },
        "rows": rows,
        "series": series,
    }
