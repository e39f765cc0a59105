"""``Setting.get()`` with a context never seen before on every call.

The same set-up as ``get_repeated`` (a leader process, measuring followers;
the same settings, rules, tracked contexts and default on both sides), but
each call passes a new ``user`` (every user is tracked, so neither side logs
an "untracked value" warning). The users have no rule of their own, so every
call resolves through to the ``{theme: light}`` rule, and on our side every
call misses the per-setting cache (which is cleared whenever it fills up:
that cost is included).

Timing: a plain ``for user in users: get(user=user)`` loop over a list built
beforehand, divided by its length; the loop itself is inside the timing on
both sides (the floor, timed the same way with a function that returns at
once, is reported next to it).
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks._common import Run, child_main, emit, log, summary
from benchmarks._scenario import SMALL_DEFAULTS, SMALL_TRACK, seed_small, specs_from
from benchmarks._sides import library, make_client, make_settings, role

NAME = "get_new_context"
MODULE = "bench_get_new_context"
TITLE = "Setting.get(), a new context every call"
TARGET = "<= 1/5 of heksher 0.2.2"
INTERVAL = 60.0


def _floor(**contexts: str) -> int:
    return 1


def _time_loop(get: Any, users: list[str]) -> float:
    start = time.perf_counter()
    for user in users:
        get(user=user)
    return time.perf_counter() - start


def body(params: dict[str, Any]) -> None:
    side = params["side"]
    lib = library(side)
    settings = make_settings(lib, specs_from(params["settings"]))
    client = make_client(lib, params["url"], INTERVAL, SMALL_TRACK, SMALL_DEFAULTS)
    client.set_as_main()
    setting = settings[params["setting"]]
    calls, repeats = params["calls"], params["repeats"]
    values = {setting.get(user=f"warm{k}") for k in range(100)}
    per_call, floor = [], []
    for repeat in range(repeats):
        users = [f"n{repeat}x{k}" for k in range(calls)]  # new to this process: never asked before
        per_call.append(_time_loop(setting.get, users) / calls * 1e9)
        floor.append(_time_loop(_floor, users) / calls * 1e9)
    values.add(setting.get(user=f"last{repeats}"))
    emit("result", role=role(side, client), values=sorted(values), per_call_ns=per_call, floor_ns=floor)
    client.close()


def run(r: Run) -> dict[str, Any]:
    service = r.service
    small = r.shared.get("small")
    if small is None:
        small = r.shared["small"] = seed_small(service, "g", 10)
    settings = {"kind": "small", "prefix": service.prefix, "stem": "g", "count": 10}
    processes, repeats, calls = (1, 5, 10_000) if r.quick else (3, 7, 20_000)
    shm = r.shm_dir("get-new")
    leader = r.spawn(
        "_holder",
        {
            "side": "ours",
            "url": service.url,
            "interval": INTERVAL,
            "settings": settings,
            "track": SMALL_TRACK,
            "defaults": SMALL_DEFAULTS,
        },
        shm_dir=shm,
        label="get-new-leader",
    )
    if leader.expect("ready")["role"] != "leader":
        raise RuntimeError("the first process did not become the leader")
    samples: dict[str, list[float]] = {"ours": [], "peer": []}
    floors: list[float] = []
    values: dict[str, Any] = {}
    for round_ in range(processes):
        for side in ("ours", "peer") if round_ % 2 == 0 else ("peer", "ours"):
            child = r.spawn(
                MODULE,
                {
                    "side": side,
                    "url": service.url,
                    "settings": settings,
                    "setting": small["names"][0],
                    "calls": calls,
                    "repeats": repeats,
                },
                shm_dir=shm if side == "ours" else None,
                label=f"{NAME}-{side}",
            )
            result = child.expect("result", timeout=180)
            child.stop()
            if side == "ours" and result["role"] != "follower":
                raise RuntimeError(f"the measuring process was {result['role']}, not a follower")
            samples[side] += result["per_call_ns"]
            floors += result["floor_ns"]
            values[side] = result["values"]
    leader.stop()
    if values["ours"] != values["peer"]:
        raise RuntimeError(f"the sides disagree on the values: {values}")
    ours, peer = summary(samples["ours"]), summary(samples["peer"])
    ratio = ours["median"] / peer["median"]
    log(f"{NAME}: ours {ours['median']:.0f} ns, peer {peer['median']:.0f} ns, ratio 1/{1 / ratio:.1f}")
    return {
        "case": NAME,
        "title": TITLE,
        "params": {"processes_per_side": processes, "repeats": repeats, "calls_per_repeat": calls},
        "rows": [
            {
                "label": TITLE,
                "unit": "ns",
                "ours": ours,
                "peer": peer,
                "ratio": ratio,
                "target": TARGET,
                "met": ratio <= 1 / 5,
                "note": f"floor loop + f(**kw): {summary(floors)['median']:.0f} ns",
            }
        ],
        "extra": {"floor_ns": summary(floors), "values": values["ours"]},
    }


if __name__ == "__main__":
    child_main(body)
