"""From the leader's SIGKILL to the next snapshot published by its successor.

Four processes of ours share a segment (``update_interval=60``, so no regular
update can be what publishes). Each round the runner finds the leader,
notes the segment's generation, SIGKILLs the leader and polls the generation
word (every 0.5 ms, sleeping in between so the service in this process is
not starved) until it moves: that is one sample. It also notes when the
status block first names a new leader pid, to split the latency into
"a follower noticed the lock was free" and "the new leader declared, queried
and published". A fresh process then replaces the dead one, so every round
starts with four.

A new leader adopts the snapshot its predecessor left. Rules queried less
than an interval ago (always, here) it publishes again under its own term at
once, before any call to the service; older ones it queries first. Then it
declares every setting again (once per term): the main row has the usual ten
settings, a second row (full mode only) has 1,000, to show the first
snapshot does not wait for the declarations.

Heksher 0.2.2 has no leader, so there is no peer number.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from benchmarks._common import Child, Run, log, stop_all, summary
from benchmarks._fleet import start_fleet
from benchmarks._scenario import BIG_TRACK, SMALL_DEFAULTS, SMALL_TRACK, grow_big, seed_small

NAME = "takeover"
TITLE = "Leader SIGKILLed to next snapshot published"
TARGET = "p99 <= 1 s"
INTERVAL = 60.0
PROCESSES = 4


def _leader(fleet: list[Child]) -> tuple[Child, dict[str, Any]]:
    infos = [(child, child.ask("info")) for child in fleet]
    leaders = [(child, info) for child, info in infos if info["role"] == "leader"]
    if len(leaders) != 1:
        raise RuntimeError(f"expected one leader, got roles {[info['role'] for _, info in infos]}")
    return leaders[0]


def _kills(r: Run, params: dict[str, Any], kills: int, label: str) -> dict[str, list[float]]:
    from heksher_shm._shm.segment import Segment

    shm = r.shm_dir(label)
    fleet, _ = start_fleet(r, "ours", PROCESSES, params, label=label, shm_dir=shm)
    total, to_lock = [], []
    segment = None
    try:
        for _ in range(kills):
            leader, info = _leader(fleet)
            if segment is None:
                segment = Segment.open(info["segment"], create=False)
            generation = segment.generation()
            killed = time.monotonic()
            os.kill(info["pid"], signal.SIGKILL)
            locked = None
            deadline = killed + 30
            while segment.generation() == generation:
                if locked is None:
                    pid = segment.status().leader_pid
                    if pid is not None and pid != info["pid"]:
                        locked = time.monotonic()
                if time.monotonic() > deadline:
                    raise RuntimeError("no new snapshot 30 s after the leader was killed")
                time.sleep(0.0005)
            published = time.monotonic()
            total.append(published - killed)
            to_lock.append((locked if locked is not None else published) - killed)
            leader.process.wait(10)
            fleet.remove(leader)
            replacement = r.spawn("_holder", {"side": "ours", **params}, shm_dir=shm, label=f"{label}-new")
            replacement.expect("ready", timeout=120)
            fleet.append(replacement)
    finally:
        if segment is not None:
            segment.close()
        stop_all(fleet)
    return {"total": total, "to_lock": to_lock}


def _row(label: str, measured: dict[str, list[float]], settings: int) -> dict[str, Any]:
    ours = summary([x * 1000 for x in measured["total"]])
    lock = summary([x * 1000 for x in measured["to_lock"]])
    return {
        "label": label,
        "unit": "ms",
        "ours": ours,
        "peer": None,
        "ratio": None,
        "target": "p99 <= 1000 ms",
        "met": ours["p99"] <= 1000,
        "note": (
            f"{settings} settings, {ours['n']} kills; p99 {ours['p99']:.0f} ms; "
            f"new leader named after {lock['median']:.0f} ms (median)"
        ),
        "to_lock_ms": lock,
    }


def run(r: Run) -> dict[str, Any]:
    service = r.service
    small = r.shared.get("small")
    if small is None:
        small = r.shared["small"] = seed_small(service, "g", 10)
    kills = 5 if r.quick else 20
    params = {
        "url": service.url,
        "interval": INTERVAL,
        "settings": {"kind": "small", "prefix": service.prefix, "stem": "g", "count": 10},
        "track": SMALL_TRACK,
        "defaults": SMALL_DEFAULTS,
    }
    measured = _kills(r, params, kills, "takeover")
    log(f"{NAME}: 10 settings: {[round(x * 1000) for x in measured['total']]} ms")
    rows = [_row(f"{TITLE} (10 settings)", measured, 10)]
    series = {"small": measured}
    if not r.quick:
        grow_big(service, r.shared, 1)
        big_params = {
            **params,
            "settings": {"kind": "big", "prefix": service.prefix},
            "track": BIG_TRACK,
            "defaults": None,
        }
        big = _kills(r, big_params, 10, "takeover-big")
        log(f"{NAME}: 1,000 settings: {[round(x * 1000) for x in big['total']]} ms")
        rows.append(_row(f"{TITLE} (1,000 settings)", big, 1000))
        series["big"] = big
    return {
        "case": NAME,
        "title": TITLE,
        "target": TARGET,
        "params": {"update_interval_s": INTERVAL, "processes": PROCESSES, "kills": kills},
        "rows": rows,
        "series": series,
    }
