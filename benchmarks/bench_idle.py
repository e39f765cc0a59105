"""CPU that N processes x S settings cost while nothing changes.

For each cell of the grid, N processes in (1, 4, 8, 16) by S settings in (10,
100, 1,000) (``--quick``: N in (1, 4) by S in (10, 100)), N holder processes of
one side start at once with the same S settings (the small kind: ``int``,
configurable by ``user`` and ``theme``, 20 rules each), tracked contexts and
default, each with a ``ThreadHeksherClient`` (update interval 60 s, so no
regular update falls in the window), and call ``set_as_main()``. Once every
process has returned from it, the runner waits until the service has had no
request for 0.5 s (at most 10 s: the cell says if it never was quiet), then
reads every process's CPU time from outside at the start and at the end of a
10 s window (2 s in ``--quick``), and counts the requests (any method, any
path) the service received during the window. The sides alternate from cell
to cell.

CPU time is user + system over all of a process's threads. Where Linux
exposes it, it is the sum of the per-thread run times in
``/proc/<pid>/task/*/schedstat`` (nanoseconds), as long as no thread ended
during the window; otherwise psutil's ``cpu_times()``, which counts in clock
ticks (10 ms: one tick over 10 s is 0.1 % of a core, the follower target
itself). Both are kept in the results; the cell says which one it used.

Reported per cell: our leader's CPU, in % of one core; our busiest
follower's; the total over the N processes; the requests; and the peer's
total and busiest process (every peer process polls on its own: it has no
leader). The ratio is our total over the peer's. Targets: each follower at
most 0.1 % of a core, the leader at most 0.3 %, our total within 2x of the
peer's.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from benchmarks._common import Run, log, stop_all, summary
from benchmarks._fleet import roles, start_fleet
from benchmarks._scenario import SMALL_DEFAULTS, SMALL_TRACK, seed_small

NAME = "idle"
TITLE = "CPU while idle, N processes x S settings"
TARGET = "follower <= 0.1 %, leader <= 0.3 % of a core; total <= 2x heksher 0.2.2's"
INTERVAL = 60.0
STEM = "i"
"""The settings are ``i0``, ``i1``, ...: S settings are the first S of them."""
QUIET = 0.5
"""Seconds without a request that count as settled after start-up."""
FOLLOWER_MAX, LEADER_MAX, TOTAL_MAX_RATIO = 0.1, 0.3, 2.0
ROW_TARGET = f"follower <= {FOLLOWER_MAX} %, leader <= {LEADER_MAX} %, total <= {TOTAL_MAX_RATIO:g}x peer"


# -- CPU time of another process ----------------------------------------------------------------------------


def _cpu_reading(pid: int) -> dict[str, Any]:
    """psutil's CPU seconds of *pid* (all threads, ticks) and, on Linux, each thread's run time (ns)."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    threads: dict[str, int] | None = {}
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # the thread ended meanwhile
                threads[task.name] = int((task / "schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        threads = None
    return {"psutil_s": times.user + times.system, "threads_ns": threads}


def _cpu_used(before: dict[str, Any], after: dict[str, Any]) -> tuple[float, str]:
    """CPU seconds between two readings, and which clock measured them (``schedstat`` or ``psutil``)."""
    start, end = before["threads_ns"], after["threads_ns"]
    if start is not None and end is not None and set(start) <= set(end):
        # Threads born in the window count from zero; a thread that ended would take its time with it.
        return sum(ns - start.get(tid, 0) for tid, ns in end.items()) / 1e9, "schedstat"
    return after["psutil_s"] - before["psutil_s"], "psutil"


# -- one cell -----------------------------------------------------------------------------------------------


def _measure(r: Run, side: str, n: int, s: int, window: float) -> dict[str, Any]:
    service = r.service
    params = {
        "url": service.counted_url(),
        "interval": INTERVAL,
        "settings": {"kind": "small", "prefix": service.prefix, "stem": STEM, "count": s},
        "track": SMALL_TRACK,
        "defaults": SMALL_DEFAULTS,
    }
    shm = r.shm_dir(f"{NAME}-{n}x{s}") if side == "ours" else None
    fleet, ready_s = start_fleet(r, side, n, params, label=f"{NAME}-{n}x{s}", shm_dir=shm, timeout=300)
    try:
        quiet = service.wait_quiet(QUIET, 10.0)
        requests_before = service.request_count()
        before = [_cpu_reading(child.pid) for child in fleet]
        started = time.monotonic()
        time.sleep(window)  # the measurement window
        after = [_cpu_reading(child.pid) for child in fleet]
        wall = time.monotonic() - started
        requests = service.request_count() - requests_before
        fleet_roles = roles(fleet)
    finally:
        stop_all(fleet)
    used = [_cpu_used(b, a) for b, a in zip(before, after, strict=True)]
    percent = [seconds / wall * 100 for seconds, _ in used]
    psutil_percent = [
        (a["psutil_s"] - b["psutil_s"]) / wall * 100 for b, a in zip(before, after, strict=True)
    ]
    if side == "ours" and fleet_roles.count("leader") != 1:
        raise RuntimeError(f"{n} processes of ours: expected one leader, got roles {fleet_roles}")
    leader = [p for p, role in zip(percent, fleet_roles, strict=True) if role == "leader"]
    others = [p for p, role in zip(percent, fleet_roles, strict=True) if role != "leader"]
    return {
        "percent": percent,
        "psutil_percent": psutil_percent,
        "clocks": sorted({clock for _, clock in used}),
        "roles": fleet_roles,
        "leader": leader[0] if leader else None,
        "max_other": max(others, default=None),
        "total": sum(percent),
        "requests": requests,
        "window_s": wall,
        "ready_s": ready_s,
        "quiet": quiet,
    }


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} %"


def _row(n: int, s: int, ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any]:
    ratio = ours["total"] / peer["total"] if peer["total"] > 0 else None
    met = (
        (ours["leader"] or 0.0) <= LEADER_MAX
        and (ours["max_other"] or 0.0) <= FOLLOWER_MAX
        and ours["total"] <= TOTAL_MAX_RATIO * peer["total"]
    )
    note = (
        f"ours: leader {_percent(ours['leader'])}, max follower {_percent(ours['max_other'])}, "
        f"{ours['requests']} requests; peer: max process {_percent(peer['max_other'])}, "
        f"{peer['requests']} requests"
    )
    unquiet = [side for side, got in (("ours", ours), ("peer", peer)) if not got["quiet"]]
    if unquiet:
        note += f"; never quiet before the window: {', '.join(unquiet)}"
    return {
        "label": f"Idle CPU, total of N={n} processes, S={s} settings",
        "unit": "%",
        "ours": summary([ours["total"]]),
        "peer": summary([peer["total"]]),
        "ratio": ratio,
        "target": ROW_TARGET,
        "met": met,
        "note": note,
    }


def run(r: Run) -> dict[str, Any]:
    service = r.service
    counts, sizes, window = ((1, 4), (10, 100), 2.0) if r.quick else ((1, 4, 8, 16), (10, 100, 1000), 10.0)
    if r.shared.get("idle_settings", 0) < max(sizes):
        seed_small(service, STEM, max(sizes))
        r.shared["idle_settings"] = max(sizes)
    rows, cells = [], []
    for s in sizes:
        for n in counts:
            # Alternate the sides from cell to cell so that drift hits both alike.
            order = ("ours", "peer") if len(cells) % 2 == 0 else ("peer", "ours")
            try:
                measured = {side: _measure(r, side, n, s, window) for side in order}
            except (
                RuntimeError
            ) as e:  # a child that failed (a set_as_main() timeout, say) fails this cell only
                log(f"{NAME}: N={n} S={s} failed: {e}")
                first = str(e).splitlines()[0]
                rows.append(
                    {
                        "label": f"Idle CPU, total of N={n} processes, S={s} settings",
                        "unit": "%",
                        "ours": None,
                        "peer": None,
                        "ratio": None,
                        "target": ROW_TARGET,
                        "met": False,
                        "note": f"failed: {first}",
                    }
                )
                cells.append({"n": n, "s": s, "error": str(e)})
                continue
            ours, peer = measured["ours"], measured["peer"]
            log(
                f"{NAME}: N={n} S={s}: ours total {ours['total']:.3f} % (leader {_percent(ours['leader'])}, "
                f"max follower {_percent(ours['max_other'])}), {ours['requests']} requests; "
                f"peer total {peer['total']:.3f} %, {peer['requests']} requests"
            )
            rows.append(_row(n, s, ours, peer))
            cells.append({"n": n, "s": s, "ours": ours, "peer": peer})
    return {
        "case": NAME,
        "title": TITLE,
        "target": TARGET,
        "params": {
            "n": list(counts),
            "settings": list(sizes),
            "window_s": window,
            "update_interval_s": INTERVAL,
            "quiet_s": QUIET,
        },
        "rows": rows,
        "series": {"cells": cells},
    }
