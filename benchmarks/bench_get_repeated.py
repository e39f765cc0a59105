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

from benchmarks._common import Run, child_main, emit
from benchmarks._get_case import GetCase, clock, floor, run_get_case, start_setting
from benchmarks._sides import role

NAME = "get_repeated"
MODULE = "bench_get_repeated"
TITLE = "Setting.get() in a follower, repeated context"
TARGET = "<= 1/20 of heksher 0.2.2"

CASE = GetCase(
    name=NAME,
    module=MODULE,
    title=TITLE,
    target=TARGET,
    max_ratio=1 / 20,
    label="get-repeated",
    value_key="value",
    floor_note="floor f(**kw)",
    child_timeout=120,
)


def _calibrate(timer: timeit.Timer, seconds: float) -> int:
    number = 1000
    while True:
        if timer.timeit(number) >= seconds / 4:
            return max(number * 4, 1)
        number *= 4


def body(params: dict[str, Any]) -> None:
    side, client, setting = start_setting(params)
    context: dict[str, str] = params["context"]
    value = setting.get(**context)
    arguments = ", ".join(f"{k}={v!r}" for k, v in context.items())
    timer = timeit.Timer(f"get({arguments})", timer=clock(params), globals={"get": setting.get})
    floor_timer = timeit.Timer(f"get({arguments})", timer=clock(params), globals={"get": floor})
    number = _calibrate(timer, params["seconds"])
    per_call = [t / number * 1e9 for t in timer.repeat(params["repeats"], number)]
    floor_number = _calibrate(floor_timer, params["seconds"] / 2)
    floor_ns = [t / floor_number * 1e9 for t in floor_timer.repeat(params["repeats"], floor_number)]
    emit(
        "result", role=role(side, client), value=value, per_call_ns=per_call, floor_ns=floor_ns, number=number
    )
    client.close()


def run(r: Run) -> dict[str, Any]:
    processes, repeats = (1, 5) if r.quick else (3, 7)
    child_params = {"context": {"user": "alice"}, "repeats": repeats, "seconds": 0.1 if r.quick else 0.2}
    params = {"processes_per_side": processes, "timeit_repeats": repeats, "settings": 10}
    return run_get_case(r, CASE, child_params, params, processes)


if __name__ == "__main__":
    child_main(body)
