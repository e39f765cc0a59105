"""How long an ``AsyncHeksherClient`` keeps its event loop from running other tasks during an update.

Ours: one process holds an ``AsyncHeksherClient`` that leads alone
(``shared=True``, a private ``HEKSHER_SHM_DIR``, checked to be the leader).
Peer: one process holds heksher 0.2.2's ``AsyncHeksherClient``. Both have the
1,000 big settings with 100 rules each (100k rules; 10k in ``--quick``),
every context tracked, and an update interval of 60 s.

Each trial changes one rule on the service (rule 0 of the first setting),
then each process, in turn, measures while it runs ``await client.reload()``:
the update queries the service, decodes the response and (ours) publishes
the new snapshot, or (peer) applies it to its settings. Meanwhile a ticker
task on the same loop sleeps 1 ms at a time and records how late each wake-up
is (the time since the previous one, less 1 ms). The window runs from just
before ``reload()`` until 100 ms after it returned; after it the new value is
checked with ``get()``. A trial's samples are the ticks' worst delay and
their p99; the table shows the median over the trials, with min and max.

Not included: the ticker's own resolution (``asyncio.sleep(0.001)`` wakes
late by the selector's rounding and the OS's scheduling). An idle window of
the same ticker, with no reload, is measured first in each process and its
worst delay shown in the note.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

from benchmarks._common import Run, child_main, emit, log, percentile, stop_all, summary
from benchmarks._scenario import BIG_TRACK, change_one_big_rule, grow_big, specs_from
from benchmarks._service import CONTEXT_FEATURES
from benchmarks._sides import library, make_settings, role

NAME = "stall"
MODULE = "bench_stall"
TITLE = "Event-loop stall while an async leader updates"
TARGET = "<= 5 ms"
INTERVAL = 60.0
PERIOD = 0.001
"""The ticker's period: one ``asyncio.sleep(0.001)`` per tick."""
TAIL = 0.1
"""Seconds the window goes on after ``reload()`` returned (work the update left on the loop)."""
CONTEXT = {"user": "u0", "theme": "none", "environment": "none"}
"""Matches rule 0 of the first big setting: the rule each trial changes."""


# -- child side ---------------------------------------------------------------------------------------------


class _Ticker:
    """A task that sleeps ``PERIOD`` at a time and records how late each wake-up was (seconds)."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        clock = time.perf_counter
        last = clock()
        while True:
            await asyncio.sleep(PERIOD)
            now = clock()
            self.delays.append(now - last - PERIOD)
            last = now

    def start(self) -> None:
        self.delays = []
        self._task = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> list[float]:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return self.delays


def _stats(delays: list[float]) -> dict[str, float]:
    ms = [d * 1000 for d in delays]
    return {"max_ms": max(ms, default=0.0), "p99_ms": percentile(ms, 99) if ms else 0.0, "ticks": len(ms)}


async def _main(params: dict[str, Any]) -> None:
    side = params["side"]
    lib = library(side)
    settings = make_settings(lib, specs_from(params["settings"]))
    setting = settings[params["setting"]]
    extra = {"shared": True} if side == "ours" else {}
    client = lib.AsyncHeksherClient(params["url"], INTERVAL, list(CONTEXT_FEATURES), **extra)
    client.track_contexts(**{f: (lib.TRACK_ALL if v == "*" else v) for f, v in BIG_TRACK.items()})
    await client.set_as_main()
    emit("ready", role=role(side, client))
    loop = asyncio.get_running_loop()
    ticker = _Ticker()
    try:
        while True:
            # A thread waits on stdin (it holds no GIL while blocked): the loop stays free.
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            command = json.loads(line)
            name = command["cmd"]
            if name == "exit":
                break
            if name == "idle":
                ticker.start()
                await asyncio.sleep(command["seconds"])
                emit("done", **_stats(await ticker.stop()))
            elif name == "reload":
                ticker.start()
                await asyncio.sleep(0.01)  # the ticker is running before the update starts
                started = time.perf_counter()
                await client.reload()
                reload_s = time.perf_counter() - started
                await asyncio.sleep(TAIL)
                delays = await ticker.stop()
                value = setting.get(**CONTEXT)
                emit("done", reload_s=reload_s, value=value, **_stats(delays))
            else:
                raise ValueError(f"unknown command {command!r}")
    finally:
        await client.aclose()


def body(params: dict[str, Any]) -> None:
    asyncio.run(_main(params))


# -- runner side --------------------------------------------------------------------------------------------


def run(r: Run) -> dict[str, Any]:
    service = r.service
    per = 10 if r.quick else 100
    trials = 3 if r.quick else 7
    big = grow_big(service, r.shared, per)
    rules = per * len(big["specs"])
    first = big["specs"][0][0]
    params = {"url": service.url, "settings": {"kind": "big", "prefix": service.prefix}, "setting": first}
    children = {
        side: r.spawn(
            MODULE,
            {"side": side, **params},
            shm_dir=r.shm_dir(NAME) if side == "ours" else None,
            label=f"{NAME}-{side}",
        )
        for side in ("ours", "peer")
    }
    results: dict[str, list[dict[str, Any]]] = {"ours": [], "peer": []}
    idle: dict[str, dict[str, float]] = {}
    try:
        for side, child in children.items():
            got = child.expect("ready", timeout=300)["role"]
            if side == "ours" and got != "leader":
                raise RuntimeError(f"our async client is {got}, not the leader")
        for side, child in children.items():
            idle[side] = child.ask("idle", seconds=0.5)
        for trial in range(trials):
            expected = change_one_big_rule(service, big)[first]
            # Alternate the sides so that drift hits both alike.
            for side in ("ours", "peer") if trial % 2 == 0 else ("peer", "ours"):
                result = children[side].ask("reload", timeout=300)
                if result["value"] != expected:
                    raise RuntimeError(
                        f"{side}: get() answers {result['value']!r} after reload, not {expected!r}"
                    )
                results[side].append(result)
    finally:
        stop_all(list(children.values()))
    rows = []
    for key, what in (("max_ms", "worst"), ("p99_ms", "p99")):
        ours = summary([t[key] for t in results["ours"]])
        peer = summary([t[key] for t in results["peer"]])
        ratio = ours["median"] / peer["median"] if peer["median"] else None
        reload_ms = {s: summary([t["reload_s"] * 1000 for t in results[s]])["median"] for s in results}
        medians = f"ours {ours['median']:.1f} ms, peer {peer['median']:.1f} ms"
        log(f"{NAME}: {what} tick delay, {rules:,} rules: {medians}")
        rows.append(
            {
                "label": f"Event-loop stall during reload(), {what} tick delay, {rules // 1000}k rules",
                "unit": "ms",
                "ours": ours,
                "peer": peer,
                "ratio": ratio,
                "target": TARGET,
                "met": ours["median"] <= 5,
                "note": (
                    f"{trials} reloads; reload() took {reload_ms['ours']:.0f} ms "
                    f"(peer {reload_ms['peer']:.0f} ms); idle ticker's worst: "
                    f"{idle['ours']['max_ms']:.1f} ms (peer {idle['peer']['max_ms']:.1f} ms)"
                ),
            }
        )
    return {
        "case": NAME,
        "title": TITLE,
        "target": TARGET,
        "params": {
            "settings": len(big["specs"]),
            "rules": rules,
            "trials": trials,
            "period_ms": PERIOD * 1000,
        },
        "rows": rows,
        "series": {side: results[side] for side in results} | {"idle": idle},
    }


if __name__ == "__main__":
    child_main(body)
