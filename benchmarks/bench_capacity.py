"""Fleet capacity: the load H hosts x W workers put on the service, and what one instance carries.

For each cell (H hosts, W workers per host; full: 4 x 4 and 8 x 4, ``--quick``: 2 x 2),
H x W holder processes of one side start at once, each with a ``ThreadHeksherClient`` on
the same S settings (the small kind: ``int``, configurable by ``user`` and ``theme``, 20
rules each; S = 1,000, ``--quick``: 100), tracked contexts and default. A host is a shared
folder of its own: on our side the W processes of one host share one ``HEKSHER_SHM_DIR``
(one of them leads and queries for the host), and no two hosts share one. heksher 0.2.2
has nothing to share: each of its processes polls on its own.

Once every process has returned from ``set_as_main()``, the runner waits one update
interval (start-up traffic: declarations, first queries), then counts the query requests
the service receives during a window of five intervals (``--quick``: three) and reads the
service's CPU time at both ends (``benchmarks/_load.py``: for the in-memory service the
runner's own process; for a real Heksher on this machine the server's process and the
PostgreSQL backends serving it). The update interval is 2 s against the in-memory service
and 10 s against a real Heksher (``--quick``: half of each), whose single process answers
a query for 1,000 settings in a few hundred milliseconds (a shorter interval would measure
its saturation, not the fleet's load).

Reported per cell: query requests per second (target: ours H per interval, the peer's
H x W), the service's CPU in % of one core, and the CPU per query.

Then the cost of one conditional query: the runner asks for the S settings once, then
sends the same query with its ETag 20 times in a row (answered 304) and takes the median
latency. One instance serves at most 1 / latency such queries per second, so at an update
interval of T seconds it carries about T / latency hosts of ours (one query per host per
interval) and T / latency / W hosts of W workers of heksher 0.2.2 (one per process). The
note gives that arithmetic for T = 60 s and W = 16. Against the in-memory service the
number describes the test service, not Heksher: run it with ``--service URL`` for sizing.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from benchmarks._common import Child, Run, log, stop_all, summary
from benchmarks._load import ServiceCpu
from benchmarks._scenario import SMALL_DEFAULTS, SMALL_TRACK, seed_small
from benchmarks._service import QUERY_PATH

NAME = "capacity"
TITLE = "Fleet capacity: service load for H hosts x W workers"
TARGET = "one query per host per interval (heksher 0.2.2: one per process)"
STEM = "i"
"""The idle case's settings (``i0``, ``i1``, ...): S settings are the first S of them."""
INTERVAL_IN_MEMORY, INTERVAL_REAL = 2.0, 10.0
CONDITIONAL_REPEATS = 20
SIZING_INTERVAL, SIZING_WORKERS = 60.0, 16
"""The arithmetic in the note: hosts one instance carries at this interval, heksher 0.2.2 with W workers."""
SLACK = 1.1
"""A window of k intervals may hold one query more per host than k (at its ends): allowed above H/interval."""


def _start_hosts(r: Run, side: str, hosts: int, workers: int, params: dict[str, Any]) -> list[Child]:
    """H x W holders at once; each host's processes share one folder of their own (ours)."""
    fleet = []
    try:
        for host in range(hosts):
            shm = r.shm_dir(f"{NAME}-h{host}") if side == "ours" else None
            for worker in range(workers):
                fleet.append(
                    r.spawn(
                        "_holder",
                        {"side": side, **params},
                        shm_dir=shm,
                        label=f"{NAME}-{hosts}x{workers}-{side}-h{host}w{worker}",
                    )
                )
        for child in fleet:
            child.expect("ready", timeout=600)
    except BaseException:
        stop_all(fleet)
        raise
    return fleet


def _measure(r: Run, side: str, hosts: int, workers: int, settings: int, interval: float, window: int) -> Any:
    service = r.service
    params = {
        "url": service.counted_url(),
        "interval": interval,
        "settings": {"kind": "small", "prefix": service.prefix, "stem": STEM, "count": settings},
        "track": SMALL_TRACK,
        "defaults": SMALL_DEFAULTS,
    }
    cpu = ServiceCpu(service)
    fleet = _start_hosts(r, side, hosts, workers, params)
    try:
        time.sleep(interval)  # start-up traffic settles
        start, cpu_before = time.monotonic(), cpu.read()
        time.sleep(interval * window)
        end, cpu_after = time.monotonic(), cpu.read()
        leaders = [child.ask("role")["role"] for child in fleet].count("leader")
    finally:
        stop_all(fleet)
    if side == "ours" and leaders != hosts:
        raise RuntimeError(f"{hosts} hosts of ours: expected {hosts} leaders, found {leaders}")
    queries = sum(1 for t in service.times("GET", QUERY_PATH) if start <= t < end)
    seconds = end - start
    used = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return {
        "queries": queries,
        "per_second": queries / seconds,
        "cpu_percent": None if used is None else used / seconds * 100,
        "cpu_ms_per_query": None if used is None or not queries else used / queries * 1000,
        "window_s": seconds,
        "cpu_source": cpu.what,
    }


def _conditional_latency(r: Run, settings: int) -> dict[str, Any]:
    """Median latency of a conditional query for the S settings, answered 304, and of the first (200)."""
    import httpx

    service = r.service
    names = ",".join(sorted(f"{service.prefix}{STEM}{i}" for i in range(settings)))
    params = {"settings": names, "context_filters": "user:*,theme:(dark,light)", "include_metadata": "false"}
    with httpx.Client(base_url=service.url, timeout=120, verify=False) as http:
        begun = time.perf_counter()
        first = http.get(QUERY_PATH, params=params)
        first_s = time.perf_counter() - begun
        first.raise_for_status()
        etag = first.headers["etag"]
        samples = []
        for _ in range(CONDITIONAL_REPEATS):
            begun = time.perf_counter()
            response = http.get(QUERY_PATH, params=params, headers={"If-None-Match": etag})
            samples.append(time.perf_counter() - begun)
            if response.status_code != 304:
                raise RuntimeError(f"a query with its own ETag answered {response.status_code}, not 304")
    return {"first_s": first_s, "samples_s": samples, "bytes": len(first.content)}


def _cpu_cell(stats: float | None) -> dict[str, Any] | None:
    return None if stats is None else summary([stats])


def _rows(cell: dict[str, Any]) -> list[dict[str, Any]]:
    hosts, workers, interval = cell["hosts"], cell["workers"], cell["interval"]
    ours, peer = cell["ours"], cell["peer"]
    expected = hosts / interval
    scenario = f"H={hosts} hosts x W={workers} workers, update interval {interval:g} s"

    def per_query(side: dict[str, Any]) -> str:
        value = side["cpu_ms_per_query"]
        return "n/a" if value is None else f"{value:.1f} ms"

    cpu_ratio = (
        ours["cpu_percent"] / peer["cpu_percent"]
        if ours["cpu_percent"] is not None and peer["cpu_percent"]
        else None
    )
    return [
        {
            "label": f"Service load: query requests per second, {scenario}",
            "unit": "requests",
            "ours": summary([ours["per_second"]]),
            "peer": summary([peer["per_second"]]),
            "ratio": ours["per_second"] / peer["per_second"] if peer["per_second"] else None,
            "target": f"{expected:g} (H per interval; peer: {hosts * workers / interval:g})",
            "met": ours["per_second"] <= expected * SLACK,
            "note": f"{ours['queries']} and {peer['queries']} queries in {ours['window_s']:.0f} s windows",
        },
        {
            "label": f"Service CPU, {scenario}",
            "unit": "%",
            "ours": _cpu_cell(ours["cpu_percent"]),
            "peer": _cpu_cell(peer["cpu_percent"]),
            "ratio": cpu_ratio,
            "target": "",
            "met": None,
            "note": f"CPU per query: ours {per_query(ours)}, peer {per_query(peer)}; "
            f"CPU of {ours['cpu_source']}",
        },
    ]


def _sizing_row(latency: dict[str, Any], settings: int, kind: str) -> dict[str, Any]:
    median = statistics.median(latency["samples_s"])
    per_second = 1 / median
    ours_hosts = SIZING_INTERVAL * per_second
    peer_hosts = ours_hosts / SIZING_WORKERS
    return {
        "label": f"A conditional query for {settings:,} settings (304), one after the other",
        "unit": "ms",
        "ours": summary([s * 1000 for s in latency["samples_s"]]),
        "peer": None,
        "ratio": None,
        "target": "",
        "met": None,
        "note": (
            f"{per_second:.1f} queries per second; at a {SIZING_INTERVAL:g} s interval one instance "
            f"carries about {ours_hosts:,.0f} hosts of heksher_shm, {peer_hosts:,.0f} hosts of "
            f"{SIZING_WORKERS} workers of heksher 0.2.2; the first (200) took "
            f"{latency['first_s'] * 1000:.0f} ms for {latency['bytes'] / 1e6:.2f} MB; service: {kind}"
        ),
    }


def run(r: Run) -> dict[str, Any]:
    service = r.service
    cells, settings, window = (((2, 2),), 100, 3) if r.quick else (((4, 4), (8, 4)), 1000, 5)
    interval = INTERVAL_IN_MEMORY if service.kind == "in-memory" else INTERVAL_REAL
    if r.quick:
        interval /= 2
    if r.shared.get("idle_settings", 0) < settings:
        seed_small(service, STEM, settings)
        r.shared["idle_settings"] = settings
    rows, series = [], []
    for index, (hosts, workers) in enumerate(cells):
        order = ("ours", "peer") if index % 2 == 0 else ("peer", "ours")
        measured = {side: _measure(r, side, hosts, workers, settings, interval, window) for side in order}
        cell = {"hosts": hosts, "workers": workers, "interval": interval, **measured}
        log(
            f"{NAME}: {hosts}x{workers}: ours {measured['ours']['per_second']:.2f} queries/s, "
            f"peer {measured['peer']['per_second']:.2f} queries/s; CPU ours "
            f"{measured['ours']['cpu_percent']} %, peer {measured['peer']['cpu_percent']} %"
        )
        rows += _rows(cell)
        series.append(cell)
    latency = _conditional_latency(r, settings)
    median_ms = statistics.median(latency["samples_s"]) * 1000
    log(f"{NAME}: conditional query for {settings} settings: {median_ms:.1f} ms")
    rows.append(_sizing_row(latency, settings, service.kind))
    return {
        "case": NAME,
        "title": TITLE,
        "target": TARGET,
        "params": {
            "cells": [list(c) for c in cells],
            "settings": settings,
            "update_interval_s": interval,
            "window_intervals": window,
            "sizing": {"interval_s": SIZING_INTERVAL, "workers": SIZING_WORKERS},
        },
        "rows": rows,
        "series": {"cells": series, "conditional_query": latency},
    }
