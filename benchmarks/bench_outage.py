"""The service fails every query: requests per minute from the whole host, and the time to recover.

For each N (``--quick``: 1 and 4; full: 1, 8 and 32), N processes of one side
start at once (``ThreadHeksherClient``, update interval 1 s, the ten small
settings, their rules, tracked contexts and default) and become main. Once
every one is ready, the service answers every ``GET /api/v1/query`` with 500
after a delay of 50 ms (an overloaded service, not one that refuses at once)
for a window (30 s; ``--quick``: 3 s), and the query requests that reach the
service in the window are counted: queries per minute for the whole host.
Our leader backs off (``heksher_shm._engine.health.backoff_delay``: 0.5 s
doubling with equal jitter until the step reaches the update interval, then
waits of one to 1.25 intervals), so the host makes one query per backoff
step whatever N: no two queries less than an interval apart from the third
query on, which bounds the count; the mean wait is then 1.125 intervals, so
about 51 a minute is expected at 1 s with the fault's 50 ms. Each peer
process polls every interval, whatever the answer.

In the **reload variant** (``--quick``: N=4; full: N=1 and 8) one process
(ours: a follower when there is one; the peer: any) calls ``reload()`` in a
loop, as fast as it returns, for the whole window: the retry storm of issue
11. Ours must not add queries for it, and is meant to answer each
``reload()`` at once with the standing error (the thread client logs it,
as it never raises); the peer's ``reload()`` makes a query each time. A
row reports how long the reloader's ``reload()`` calls took.

Then **recovery**: every process starts reading ``get(user='alice')`` on
the first setting every 5 ms in a thread, and the runner changes the value
of the rule that answers it and ends the outage at the same moment (the
rule first, then the faults, microseconds apart). Each process reports the
``time.monotonic()`` (one clock for the host) at which it first reads the
new value; the table shows the median and the max over the processes. A
query already in flight at that moment still fails (after its delay), and
the next one waits for its backoff step: the target allows the longest step
(1.25 update intervals), that delay, and 100 ms.

Against a real Heksher (``--service URL``) the counting proxy answers the
500s in the service's place.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import threading
import time
from typing import Any

from benchmarks._common import (
    Child,
    ChildError,
    Run,
    child_main,
    commands,
    emit,
    log,
    stop_all,
    summary,
)
from benchmarks._fleet import roles, start_fleet
from benchmarks._scenario import SMALL_DEFAULTS, SMALL_TRACK, seed_small, specs_from
from benchmarks._service import QUERY_PATH
from benchmarks._sides import library, make_client, make_settings, role
from heksher_shm._engine.health import STEADY_SPREAD

NAME = "outage"
MODULE = "bench_outage"
TITLE = "Service answers 500: queries per minute per host, and recovery"
TARGET = (
    "ours: at most one query per backoff step per host, whatever N (the peer grows with N); "
    "reload() answered at once; recovery within the longest backoff step plus a little"
)
INTERVAL = 1.0
STATUS = 500
DELAY = 0.05
"""Seconds the service takes before each 500 (an overloaded service)."""
WATCH_PERIOD = 0.005
CONTEXT = {"user": "alice"}
ORIGINAL_VALUE = 3
"""The small settings' ``{theme: light}`` rule's value (``_scenario.seed_small``), put back at the end."""
LONGEST_STEP = (1 + STEADY_SPREAD) * INTERVAL
"""Seconds: the longest backoff step once failures last (``heksher_shm._engine.health.backoff_delay``
waits one to 1.25 update intervals), so the longest a recovery can go unnoticed."""
RECOVERY_SLACK = 0.1
"""Seconds allowed beyond the longest backoff step and the fault's delay for the recovery."""
RELOAD_AT_ONCE = 0.010
"""Seconds: the median ``reload()`` during the outage must take less (well under the fault's delay)."""


# -- child side ---------------------------------------------------------------------------------------------


class _Errors(logging.Handler):
    """Counts the library's ERROR records (a failed reload() or update is logged, never raised)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


class _FewRepeats(logging.Filter):
    """Lets the first few records of each message through: a reload loop logs an error per call."""

    def __init__(self, keep: int = 5) -> None:
        super().__init__()
        self.keep = keep
        self.seen: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        count = self.seen[record.msg] = self.seen.get(record.msg, 0) + 1
        return count <= self.keep


def _reload_loop(client: Any, stop: threading.Event, durations: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        client.reload()
        durations.append(time.perf_counter() - started)


def _watch(setting: Any, value: Any, period: float) -> None:
    while setting.get(**CONTEXT) != value:
        time.sleep(period)
    emit("seen", t=time.monotonic(), value=value)


def body(params: dict[str, Any]) -> None:
    side = params["side"]
    lib = library(side)
    settings = make_settings(lib, specs_from(params["settings"]))
    watched = settings[params["watch"]]
    client = make_client(lib, params["url"], params["interval"], params["track"], params.get("defaults"))
    client.set_as_main()
    errors = _Errors()
    to_stderr = logging.StreamHandler()  # the child's log file, for a person reading it later
    to_stderr.setLevel(logging.WARNING)
    to_stderr.addFilter(_FewRepeats())
    for name in ("heksher_shm", "heksher"):
        logging.getLogger(name).addHandler(errors)
        logging.getLogger(name).addHandler(to_stderr)
    emit("ready", role=role(side, client))
    stop = threading.Event()
    reloader: threading.Thread | None = None
    durations: list[float] = []
    errors_before = 0
    for command in commands():
        name = command["cmd"]
        if name == "role":
            emit("done", role=role(side, client), value=watched.get(**CONTEXT))
        elif name == "reload_loop":
            errors_before = errors.count
            reloader = threading.Thread(target=_reload_loop, args=(client, stop, durations), daemon=True)
            reloader.start()
            emit("done")
        elif name == "reload_stop":
            stop.set()
            if reloader is not None:
                reloader.join()
            took = summary([x * 1000 for x in durations])
            del took["samples"]  # thousands of calls a second: the summary is enough
            emit("done", took_ms=took, errors=errors.count - errors_before)
        elif name == "watch":
            threading.Thread(
                target=_watch, args=(watched, command["value"], command["period"]), daemon=True
            ).start()
            emit("done")
        else:
            raise ValueError(f"unknown command {command!r}")
    client.close()


# -- runner side --------------------------------------------------------------------------------------------


def _in(times: list[float], start: float, end: float) -> list[float]:
    return [t for t in times if start <= t < end]


def _recover(r: Run, fleet: list[Child], rule_id: int, value: int) -> list[float | None]:
    """End the outage with a new rule value; seconds until each process read it (None: not in time)."""
    for child in fleet:
        child.send("watch", value=value, period=WATCH_PERIOD)
    for child in fleet:
        child.expect("done")
    healed = time.monotonic()
    r.service.set_rule_value(rule_id, value)
    r.service.heal()
    deadline = healed + 3 * INTERVAL + 10
    seen: list[float | None] = []
    for child in fleet:
        try:
            message = child.expect("seen", timeout=max(0.0, deadline - time.monotonic()))
        except ChildError:
            if child.process.poll() is not None:
                raise
            seen.append(None)
            continue
        seen.append(message["t"] - healed)
    return seen


def _outage(
    r: Run, side: str, n: int, window: float, reload: bool, rule_id: int, value: int
) -> dict[str, Any]:
    """One fleet of one side through one outage and its end."""
    service = r.service
    tag = f"{NAME}-{n}{'-reload' if reload else ''}"
    settings = {"kind": "small", "prefix": service.prefix, "stem": "g", "count": 10}
    fleet, ready_after = start_fleet(
        r,
        side,
        n,
        {
            "url": service.counted_url(),
            "interval": INTERVAL,
            "settings": settings,
            "track": SMALL_TRACK,
            "defaults": SMALL_DEFAULTS,
            "watch": r.shared["small"]["names"][0],
        },
        label=tag,
        shm_dir=r.shm_dir(tag) if side == "ours" else None,
        module=MODULE,
    )
    try:
        states = [child.ask("role") for child in fleet]
        values = {state["value"] for state in states}
        if len(values) != 1:
            raise RuntimeError(
                f"{tag} {side}: the processes read different values before the outage: {values}"
            )
        fleet_roles = [state["role"] for state in states]
        if side == "ours" and fleet_roles.count("leader") != 1:
            raise RuntimeError(f"{tag} ours: expected one leader, got roles {fleet_roles}")
        reloader = None
        if reload:
            followers = [c for c, role_ in zip(fleet, fleet_roles, strict=True) if role_ == "follower"]
            reloader = followers[0] if followers else fleet[0]
        service.fail_queries(STATUS, DELAY)
        try:
            start = time.monotonic()
            if reloader is not None:
                reloader.ask("reload_loop")
            time.sleep(window)  # the outage: the one timed wait of the case
            end = start + window
            reloads = reloader.ask("reload_stop", timeout=30 + window) if reloader is not None else None
        except BaseException:
            service.heal()
            raise
        recovery = _recover(r, fleet, rule_id, value)  # heals the service
        end_roles = roles(fleet)
    finally:
        stop_all(fleet)
    queries = _in(service.times("GET", QUERY_PATH), start, end)
    result: dict[str, Any] = {
        "queries": len(queries),
        "per_minute": len(queries) * 60 / window,
        "gaps": [b - a for a, b in itertools.pairwise(queries)],
        "recovery": recovery,
        "ready_s": ready_after,
        "roles": end_roles,
    }
    if reloads is not None:
        result["reloads"] = {
            "took_ms": reloads["took_ms"],
            "per_second": reloads["took_ms"]["n"] / window,
            "errors_logged": reloads["errors"],
            "role": fleet_roles[fleet.index(reloader)] if reloader is not None else None,
        }
    if side == "ours" and end_roles.count("leader") != 1:
        raise RuntimeError(f"{tag} ours: expected one leader after the outage, got roles {end_roles}")
    return result


def _query_row(
    n: int, reload: bool, window: float, ours: dict[str, Any], peer: dict[str, Any]
) -> dict[str, Any]:
    # The step reaches the update interval at the second failure, and from then on every wait is one
    # to 1.25 intervals: one query per step means none closer than an interval from the third query
    # on, and at most window / interval + 2 queries.
    floor = INTERVAL
    closest = min(ours["gaps"][2:], default=None)
    bound = window / floor + 2
    gaps = ours["gaps"]
    text = f"ours: {ours['queries']} queries"
    if gaps:
        text += f", {statistics.mean(gaps) * 1000:.0f} ms apart on average"
    if closest is not None:
        text += (
            f", {closest * 1000:.0f} ms at the closest from the third on ({min(gaps) * 1000:.0f} ms before)"
        )
    notes = [text, f"peer: {peer['queries']} queries"]
    return {
        "label": f"Queries per minute while every query fails, N={n}"
        + (", one process reloading in a loop" if reload else ""),
        "unit": "queries/min",
        "ours": summary([ours["per_minute"]]),
        "peer": summary([peer["per_minute"]]),
        "ratio": ours["per_minute"] / peer["per_minute"] if peer["per_minute"] else None,
        "target": f"one per backoff step, any N: >= {floor * 1000:.0f} ms apart (about 51/min expected)",
        "met": ours["queries"] <= bound and (closest is None or closest >= floor),
        "note": "; ".join(notes),
    }


def _who(role_: str) -> str:
    return {"leader": "the leader", "follower": "a follower"}.get(role_, "one of the processes")


def _reload_row(n: int, ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any]:
    loops = {"ours": ours["reloads"], "peer": peer["reloads"]}
    took = {side: loop["took_ms"] for side, loop in loops.items()}
    notes = [
        f"{side}: the reloader is {_who(loop['role'])}, {loop['per_second']:.1f} calls/s, "
        f"{loop['errors_logged']} errors logged"
        for side, loop in loops.items()
    ]
    return {
        "label": f"reload() in a loop while every query fails, N={n}",
        "unit": "ms",
        "ours": took["ours"],
        "peer": took["peer"],
        "ratio": took["ours"]["median"] / took["peer"]["median"] if took["peer"]["median"] else None,
        "target": f"at once, without a query: median <= {RELOAD_AT_ONCE * 1000:.0f} ms",
        "met": took["ours"]["n"] > 0 and took["ours"]["median"] <= RELOAD_AT_ONCE * 1000,
        "note": "; ".join(notes),
    }


def _recovery_row(n: int, reload: bool, ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any]:
    budget_ms = (LONGEST_STEP + DELAY + RECOVERY_SLACK) * 1000
    ms = {
        side: [x * 1000 for x in got["recovery"] if x is not None]
        for side, got in (("ours", ours), ("peer", peer))
    }
    missing = {side: got["recovery"].count(None) for side, got in (("ours", ours), ("peer", peer))}
    ours_ms, peer_ms = summary(ms["ours"]), summary(ms["peer"])
    notes = [f"max over processes: ours {ours_ms['max']:.0f} ms, peer {peer_ms['max']:.0f} ms"]
    for side, count in missing.items():
        if count:
            notes.append(
                f"{side}: {count} process(es) did not read the new value within {3 * INTERVAL + 10:.0f} s"
            )
    return {
        "label": f"Outage over to the new value in every process, N={n}"
        + (" (reload variant)" if reload else ""),
        "unit": "ms",
        "ours": ours_ms,
        "peer": peer_ms,
        "ratio": ours_ms["median"] / peer_ms["median"] if peer_ms["median"] else None,
        "target": f"max <= {budget_ms:.0f} ms",
        "met": not missing["ours"] and ours_ms["max"] <= budget_ms,
        "note": "; ".join(notes),
    }


def run(r: Run) -> dict[str, Any]:
    service = r.service
    small = r.shared.get("small")
    if small is None:
        small = r.shared["small"] = seed_small(service, "g", 10)
    plain_n = (1, 4) if r.quick else (1, 8, 32)
    reload_n = (4,) if r.quick else (1, 8)
    window = 3.0 if r.quick else 30.0
    runs = [(n, False) for n in plain_n] + [(n, True) for n in reload_n]
    values = iter(range(20_000, 1_000_000))
    rows: list[dict[str, Any]] = []
    series: dict[str, Any] = {"runs": []}
    try:
        for index, (n, reload) in enumerate(runs):
            order = ("ours", "peer") if index % 2 == 0 else ("peer", "ours")
            measured = {
                side: _outage(r, side, n, window, reload, small["light"], next(values)) for side in order
            }
            for side in order:
                got = measured[side]
                recovered = [round(x * 1000) for x in got["recovery"] if x is not None]
                log(
                    f"{NAME}: N={n}{' reload loop' if reload else ''} {side}: {got['queries']} queries in "
                    f"{window:.0f} s ({got['per_minute']:.0f}/min), recovered in max "
                    f"{max(recovered, default=-1)} ms"
                    + (
                        f"; reload() {got['reloads']['per_second']:.1f}/s, median "
                        f"{got['reloads']['took_ms']['median']:.1f} ms ({_who(got['reloads']['role'])})"
                        if reload
                        else ""
                    )
                )
            ours, peer = measured["ours"], measured["peer"]
            rows.append(_query_row(n, reload, window, ours, peer))
            if reload:
                rows.append(_reload_row(n, ours, peer))
            rows.append(_recovery_row(n, reload, ours, peer))
            series["runs"].append({"n": n, "reload": reload, "ours": ours, "peer": peer})
    finally:
        service.heal()
        service.set_rule_value(small["light"], ORIGINAL_VALUE)
    return {
        "case": NAME,
        "title": TITLE,
        "target": TARGET,
        "params": {
            "update_interval_s": INTERVAL,
            "status": STATUS,
            "fault_delay_s": DELAY,
            "window_s": window,
            "n": list(plain_n),
            "reload_n": list(reload_n),
            "watch_period_s": WATCH_PERIOD,
        },
        "rows": rows,
        "series": series,
    }


if __name__ == "__main__":
    child_main(body)
