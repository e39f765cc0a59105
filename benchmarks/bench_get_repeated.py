"""``Setting.get()`` in a follower, the same context on every call.

Ours: a leader process holds the segment; each measuring process is a
follower (checked). Peer: each measuring process is a heksher 0.2.2 client.
Both sides have the same ten settings, rules, tracked contexts and default
(``theme="light"``), and time ``get(user='alice')`` on the same setting with
``timeit`` (the bound method is looked up once; the call, its keyword
argument and the loop are inside the timing on both sides). The answer (the
``{theme: light}`` rule) is checked to be the same on both sides.

Each process also times a plain Python function ``f(**contexts)`` that returns
at once: the floor any ``get(**contexts)`` pays before doing anything.
"""

from __future__ import annotations

import timeit
from typing import Any

from benchmarks._common import Run, child_main, emit, log, summary
from benchmarks._scenario import SMALL_DEFAULTS, SMALL_TRACK, seed_small, specs_from
from benchmarks._sides import library, make_client, make_settings, role

NAME = "get_repeated"
MODULE = "bench_get_repeated"
TITLE = "Setting.get() in a follower, repeated context"
TARGET = "<= 1/20 of heksher 0.2.2"
INTERVAL = 60.0


def _floor(**contexts: str) -> int:
    return 1


def _calibrate(timer: timeit.Timer, seconds: float) -> int:
    number = 1000
    while True:
        if timer.timeit(number) >= seconds / 4:
            return max(number * 4, 1)
        number *= 4


def body(params: dict[str, Any]) -> None:
    side = params["side"]
    lib = library(side)
    settings = make_settings(lib, specs_from(params["settings"]))
    client = make_client(lib, params["url"], INTERVAL, SMALL_TRACK, SMALL_DEFAULTS)
    client.set_as_main()
    setting = settings[params["setting"]]
    context: dict[str, str] = params["context"]
    value = setting.get(**context)
    arguments = ", ".join(f"{k}={v!r}" for k, v in context.items())
    timer = timeit.Timer(f"get({arguments})", globals={"get": setting.get})
    floor = timeit.Timer(f"get({arguments})", globals={"get": _floor})
    number = _calibrate(timer, params["seconds"])
    per_call = [t / number * 1e9 for t in timer.repeat(params["repeats"], number)]
    floor_number = _calibrate(floor, params["seconds"] / 2)
    floor_ns = [t / floor_number * 1e9 for t in floor.repeat(params["repeats"], floor_number)]
    emit(
        "result", role=role(side, client), value=value, per_call_ns=per_call, floor_ns=floor_ns, number=number
    )
    client.close()


def run(r: Run) -> dict[str, Any]:
    service = r.service
    small = r.shared.get("small")
    if small is None:
        small = r.shared["small"] = seed_small(service, "g", 10)
    settings = {"kind": "small", "prefix": service.prefix, "stem": "g", "count": 10}
    processes, repeats = (1, 5) if r.quick else (3, 7)
    shm = r.shm_dir("get-repeated")
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
        label="get-repeated-leader",
    )
    if leader.expect("ready")["role"] != "leader":
        raise RuntimeError("the first process did not become the leader")
    samples: dict[str, list[float]] = {"ours": [], "peer": []}
    floors: list[float] = []
    values: dict[str, Any] = {}
    for round_ in range(processes):
        # Alternate the sides so that drift (thermal, noisy neighbours) hits both alike.
        for side in ("ours", "peer") if round_ % 2 == 0 else ("peer", "ours"):
            child = r.spawn(
                MODULE,
                {
                    "side": side,
                    "url": service.url,
                    "settings": settings,
                    "setting": small["names"][0],
                    "context": {"user": "alice"},
                    "repeats": repeats,
                    "seconds": 0.1 if r.quick else 0.2,
                },
                shm_dir=shm if side == "ours" else None,
                label=f"{NAME}-{side}",
            )
            result = child.expect("result", timeout=120)
            child.stop()
            if side == "ours" and result["role"] != "follower":
                raise RuntimeError(f"the measuring process was {result['role']}, not a follower")
            samples[side] += result["per_call_ns"]
            floors += result["floor_ns"]
            values[side] = result["value"]
    leader.stop()
    if values["ours"] != values["peer"]:
        raise RuntimeError(f"the sides disagree on the value: {values}")
    ours, peer = summary(samples["ours"]), summary(samples["peer"])
    ratio = ours["median"] / peer["median"]
    log(f"{NAME}: ours {ours['median']:.0f} ns, peer {peer['median']:.0f} ns, ratio 1/{1 / ratio:.1f}")
    return {
        "case": NAME,
        "title": TITLE,
        "params": {"processes_per_side": processes, "timeit_repeats": repeats, "settings": 10},
        "rows": [
            {
                "label": TITLE,
                "unit": "ns",
                "ours": ours,
                "peer": peer,
                "ratio": ratio,
                "target": TARGET,
                "met": ratio <= 1 / 20,
                "note": f"floor f(**kw): {summary(floors)['median']:.0f} ns",
            }
        ],
        "extra": {"floor_ns": summary(floors), "value": values["ours"]},
    }


if __name__ == "__main__":
    child_main(body)
