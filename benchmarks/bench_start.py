"""N processes x S settings starting at the same moment: time until all are ready, and requests.

For each scenario (``--quick``: 4 x 100; full: 4 x 100, 8 x 1,000 and 16 x 300),
N fresh processes of one side start, import their library and make the same
S settings (the small kind: ``int``, configurable by ``user`` and ``theme``),
say they are armed, and block reading one pipe that all of them inherited.
When every one is armed, the runner closes the pipe's write end: all readers
see end-of-file at the same moment (the release). Each process then builds a
``ThreadHeksherClient`` (update interval 60 s, tracked contexts and default as
in the other cases) and calls ``set_as_main()``, and reports when it
returned (``time.monotonic()``, one clock for the whole host).

Reported for each side:

* the time from the release until the *last* ``set_as_main()`` returned;
* the declaration requests (``POST /api/v1/settings/declare``) and query
  requests (``GET /api/v1/query``) the service received from the release
  until it had no request for 0.5 s after every process was ready;
* ours only: whether any process fell back to polling the service itself
  (:func:`fallback_signs`), and whether exactly one process leads.

A ``set_as_main()`` that raises (say, ``TimeoutError`` after its
``startup_timeout`` of 30 s) is recorded, not fatal: the scenario fails its
target and the note says what was raised. Each side declares its own, new
settings (``<prefix>s<N>x<S><o|p><i>``), so both see the service create them.
Against a real Heksher (``--service URL`` or ``HEKSHER_TEST_URL``) the
requests go through the counting proxy, and the settings the processes
declared are deleted at the end of the run.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from benchmarks._common import Child, Run, child_main, commands, emit, log, stop_all, summary
from benchmarks._scenario import SMALL_DEFAULTS, SMALL_TRACK, small_specs, specs_from
from benchmarks._service import DECLARE_PATH, QUERY_PATH
from benchmarks._sides import library, make_client, make_settings, role

NAME = "start"
MODULE = "bench_start"
TITLE = "N processes x S settings start at once"
TARGET = "one declaration per setting, <= 2 queries, no fallback, ready in <= 1/5 of heksher 0.2.2's time"
INTERVAL = 60.0
QUIET = 0.5
"""Seconds without a request after which the start is over (the requests are counted until then)."""
MAX_QUERIES = 2
MAX_RATIO = 1 / 5


# -- child side ---------------------------------------------------------------------------------------------


class _Capture(logging.Handler):
    """Keeps every warning (and worse) of the library's loggers, as ``logger: message``."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


def body(params: dict[str, Any]) -> None:
    side = params["side"]
    capture = _Capture()
    to_stderr = logging.StreamHandler()  # the child's log file, for a person reading it later
    for name in ("heksher_shm", "heksher"):
        logging.getLogger(name).addHandler(capture)
        logging.getLogger(name).addHandler(to_stderr)
    lib = library(side)
    settings = make_settings(lib, specs_from(params["settings"]))  # both libraries hold settings weakly
    emit("armed")
    release = params["release_fd"]
    while os.read(release, 4096):  # end-of-file: the runner closed the write end, for all at once
        pass
    released = time.monotonic()
    client, error, got = None, None, None
    try:
        client = make_client(lib, params["url"], INTERVAL, SMALL_TRACK, SMALL_DEFAULTS)
        client.set_as_main()
        got = role(side, client)
    except Exception as e:  # a failed start is a result of this case, not an error of the child
        error = f"{type(e).__name__}: {e}"
    done = time.monotonic()
    emit("ready", pid=os.getpid(), released=released, done=done, error=error, role=got)
    for command in commands():
        if command["cmd"] != "report":
            raise ValueError(f"unknown command {command!r}")
        now = None
        if client is not None and error is None:
            now = role(side, client)
        emit("done", role=now, warnings=capture.lines)
    if client is not None:
        client.close()
    del settings


# -- runner side --------------------------------------------------------------------------------------------


def fallback_signs(reports: list[dict[str, Any]], queries: int) -> list[str]:
    """Signs that the start did not go through one leader (empty: none).

    A follower that judges the leader stuck and replaces it says so on the
    ``heksher_shm`` loggers ("the leader is not making progress ... replaces
    it"; each child keeps its library's warnings), and an extra poller shows as
    more query requests than one leader makes. Kept in this one function so
    that a better signal can replace both.
    """
    signs = [
        f"pid {report['pid']}: {line}"
        for report in reports
        for line in report["warnings"]
        if line.startswith("heksher_shm") and ("not making progress" in line or "unresponsive" in line)
    ]
    if queries > MAX_QUERIES:
        signs.append(f"{queries} query requests (one leader makes at most {MAX_QUERIES})")
    return signs


def _count(times: list[float], start: float, end: float) -> int:
    return sum(1 for t in times if start <= t <= end)


def _start(r: Run, side: str, n: int, s: int) -> dict[str, Any]:
    """Start N processes of one side with S new settings at one moment; what it took."""
    service = r.service
    stem = f"s{n}x{s}{side[0]}"
    settings = {"kind": "small", "prefix": service.prefix, "stem": stem, "count": s}
    service.adopt(name for name, *_ in small_specs(service.prefix, stem, s))
    shm = r.shm_dir(f"{NAME}-{n}x{s}") if side == "ours" else None
    params = {"side": side, "url": service.counted_url(), "settings": settings}
    read_end, write_end = os.pipe()
    children: list[Child] = []
    try:
        try:
            for i in range(n):
                children.append(
                    r.spawn(
                        MODULE,
                        {**params, "release_fd": read_end},
                        shm_dir=shm,
                        label=f"{NAME}-{n}x{s}-{side}-{i}",
                        pass_fds=(read_end,),
                    )
                )
        finally:
            os.close(read_end)
        for child in children:
            child.expect("armed", timeout=120)
        release = time.monotonic()
        os.close(write_end)
        write_end = -1
        readies = [child.expect("ready", timeout=300) for child in children]
        quiet = service.wait_quiet(QUIET, 30.0)
        until = time.monotonic()
        for ready, child in zip(readies, children, strict=True):
            ready["warnings"] = child.ask("report")["warnings"]
    finally:
        if write_end != -1:
            os.close(write_end)
        stop_all(children)
    declarations = _count(service.times("POST", DECLARE_PATH), release, until)
    queries = _count(service.times("GET", QUERY_PATH), release, until)
    done = [ready["done"] - release for ready in readies]
    woke = [ready["released"] - release for ready in readies]
    return {
        "ready_s": max(done),
        "first_ready_s": min(done),
        "wake_spread_s": max(woke) - min(woke),
        "declarations": declarations,
        "queries": queries,
        "errors": [ready["error"] for ready in readies if ready["error"]],
        "roles": [ready["role"] for ready in readies],
        "fallback": fallback_signs(readies, queries) if side == "ours" else [],
        "warnings": sum(len(ready["warnings"]) for ready in readies),
        "quiet": quiet,
    }


def _rows(n: int, s: int, ours: dict[str, Any], peer: dict[str, Any]) -> list[dict[str, Any]]:
    scenario = f"N={n} x S={s}"
    ratio = ours["ready_s"] / peer["ready_s"]
    leaders = ours["roles"].count("leader")
    notes = [
        f"first ready after {ours['first_ready_s'] * 1000:.0f} ms (peer {peer['first_ready_s'] * 1000:.0f})",
        f"release reached all within {max(ours['wake_spread_s'], peer['wake_spread_s']) * 1000:.1f} ms",
    ]
    for side, got in (("ours", ours), ("peer", peer)):
        if got["errors"]:
            notes.append(f"{side}: {len(got['errors'])} set_as_main() raised: {got['errors'][0]}")
    if leaders != 1:
        notes.append(f"ours: {leaders} leaders")
    fallback = ours["fallback"]
    return [
        {
            "label": f"Start: time until all set_as_main() returned, {scenario}",
            "unit": "ms",
            "ours": summary([ours["ready_s"] * 1000]),
            "peer": summary([peer["ready_s"] * 1000]),
            "ratio": ratio,
            "target": "<= 1/5 of peer",
            "met": ratio <= MAX_RATIO and not ours["errors"] and leaders == 1,
            "note": "; ".join(notes),
        },
        {
            "label": f"Start: declaration requests, {scenario}",
            "unit": "requests",
            "ours": summary([ours["declarations"]]),
            "peer": summary([peer["declarations"]]),
            "ratio": ours["declarations"] / peer["declarations"] if peer["declarations"] else None,
            "target": f"{s} (one per setting)",
            "met": ours["declarations"] == s,
            "note": "",
        },
        {
            "label": f"Start: query requests, {scenario}",
            "unit": "requests",
            "ours": summary([ours["queries"]]),
            "peer": summary([peer["queries"]]),
            "ratio": ours["queries"] / peer["queries"] if peer["queries"] else None,
            "target": f"<= {MAX_QUERIES}, no fallback",
            "met": ours["queries"] <= MAX_QUERIES and not fallback,
            "note": (
                f"fell back: {len(fallback)} sign(s), first: {fallback[0]}"
                if fallback
                else "no fallback seen"
            ),
        },
    ]


def run(r: Run) -> dict[str, Any]:
    scenarios = ((4, 100),) if r.quick else ((4, 100), (8, 1000), (16, 300))
    rows, series = [], []
    for index, (n, s) in enumerate(scenarios):
        order = ("ours", "peer") if index % 2 == 0 else ("peer", "ours")
        measured = {side: _start(r, side, n, s) for side in order}
        ours, peer = measured["ours"], measured["peer"]
        log(
            f"{NAME}: N={n} S={s}: ours ready in {ours['ready_s'] * 1000:.0f} ms, "
            f"{ours['declarations']} declarations, {ours['queries']} queries, "
            f"{len(ours['errors'])} errors, fallback signs {len(ours['fallback'])}; "
            f"peer ready in {peer['ready_s'] * 1000:.0f} ms, {peer['declarations']} declarations, "
            f"{peer['queries']} queries, {len(peer['errors'])} errors"
        )
        rows += _rows(n, s, ours, peer)
        series.append({"n": n, "s": s, "ours": ours, "peer": peer})
    return {
        "case": NAME,
        "title": TITLE,
        "target": TARGET,
        "params": {
            "scenarios": [list(x) for x in scenarios],
            "update_interval_s": INTERVAL,
            "quiet_s": QUIET,
        },
        "rows": rows,
        "series": series,
    }


if __name__ == "__main__":
    child_main(body)
