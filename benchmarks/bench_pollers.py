"""Query requests reaching the service per update interval, with N processes on the host.

For each N, N processes of one side start at once (ten settings, the same
rules and tracked contexts), each becomes main, and once all are ready the
``GET /api/v1/query`` requests the service receives are counted over a window
of several update intervals. Samples are the counts in each interval-long
slice of the window; the table shows their median. The ``POST
/api/v1/settings/declare`` requests made while the processes started are
reported too (ours: each declaration once per leader term; peer: once per
process).

Each process does nothing after ``set_as_main()`` but wait, so 32 processes
fit on two cores; on our side exactly one of them must be the leader.

The window begins once our leader's drawn waits are over: after a start (and
after an outage) it draws its next :data:`~heksher_shm._engine.health.DESYNC_WAVES`
waits between 0.25 and 1.75 intervals, so that hosts started together do not
stay in lockstep (see the lockstep case), and an interval-long slice of that
stretch may hold two queries, or none. Both sides wait as long before their
window; the queries of that stretch, in interval-long slices too, are in the
note.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks._common import Run, log, stop_all, summary
from benchmarks._fleet import roles, start_fleet
from benchmarks._scenario import SMALL_DEFAULTS, SMALL_TRACK, seed_small
from benchmarks._service import DECLARE_PATH, QUERY_PATH
from heksher_shm._engine.health import DESYNC_SPREAD, DESYNC_WAVES

NAME = "pollers"
TITLE = "Query requests per update interval, N processes"
TARGET = "1 for every N (peer: N)"


def _slices(times: list[float], start: float, interval: float, count: int) -> list[int]:
    counts = [0] * count
    for t in times:
        index = int((t - start) // interval)
        if 0 <= index < count:
            counts[index] += 1
    return counts


def run(r: Run) -> dict[str, Any]:
    service = r.service
    small = r.shared.get("small")
    if small is None:
        small = r.shared["small"] = seed_small(service, "g", 10)
    settings = {"kind": "small", "prefix": service.prefix, "stem": "g", "count": 10}
    counts_of = (1, 2, 4) if r.quick else (1, 2, 4, 8, 16, 32)
    interval, slices = (0.5, 4) if r.quick else (0.5, 6)
    url = service.counted_url()
    rows, series = (
        [],
        {"n": list(counts_of), "ours": [], "peer": [], "ours_declares": [], "peer_declares": []},
    )
    for n in counts_of:
        measured: dict[str, Any] = {}
        for side in ("ours", "peer"):
            shm = r.shm_dir(f"pollers-{n}") if side == "ours" else None
            declares_before = len(service.times("POST", DECLARE_PATH))
            fleet, ready_after = start_fleet(
                r,
                side,
                n,
                {
                    "url": url,
                    "interval": interval,
                    "settings": settings,
                    "track": SMALL_TRACK,
                    "defaults": SMALL_DEFAULTS,
                },
                label=f"pollers-{n}",
                shm_dir=shm,
            )
            try:
                ready = time.monotonic()
                # Start-up traffic (first queries, reloads), then our leader's drawn waits.
                drawn = int(DESYNC_WAVES * (1 + DESYNC_SPREAD)) + 2
                time.sleep(interval * drawn)
                declares = len(service.times("POST", DECLARE_PATH)) - declares_before
                start = time.monotonic()
                time.sleep(interval * slices + 0.05)
                counts = _slices(service.times("GET", QUERY_PATH), start, interval, slices)
                early = _slices(service.times("GET", QUERY_PATH), ready, interval, drawn)
                fleet_roles = roles(fleet)
            finally:
                stop_all(fleet)
            if side == "ours" and fleet_roles.count("leader") != 1:
                raise RuntimeError(f"{n} processes of ours: expected one leader, got roles {fleet_roles}")
            measured[side] = {"counts": counts, "early": early, "declares": declares, "ready_s": ready_after}
            log(f"{NAME}: N={n} {side}: per interval {counts} (first {early}), declarations {declares}")
        ours, peer = summary(measured["ours"]["counts"]), summary(measured["peer"]["counts"])
        series["ours"].append(ours["median"])
        series["peer"].append(peer["median"])
        series["ours_declares"].append(measured["ours"]["declares"])
        series["peer_declares"].append(measured["peer"]["declares"])
        rows.append(
            {
                "label": f"Query requests per interval, N={n}",
                "unit": "requests",
                "ours": ours,
                "peer": peer,
                "ratio": ours["median"] / peer["median"] if peer["median"] else None,
                "target": "1" if n == counts_of[0] else "1 (peer: N)",
                "met": ours["max"] <= 1,
                "note": (
                    f"declarations at start: ours {measured['ours']['declares']}, "
                    f"peer {measured['peer']['declares']}; right after the start, per interval: "
                    f"ours {measured['ours']['early']}, peer {measured['peer']['early']}"
                ),
            }
        )
    return {
        "case": NAME,
        "title": TITLE,
        "target": TARGET,
        "params": {"update_interval_s": interval, "slices": slices, "settings": 10, "n": list(counts_of)},
        "rows": rows,
        "series": series,
    }
