"""``Setting.get()`` with a context never seen before on every call.

The same set-up as ``get_repeated`` (a leader process, measuring followers;
the same settings, rules, tracked contexts and default on both sides), but
each call passes a new ``user`` (every user is tracked, so neither side logs
an "untracked value" warning). The users have no rule of their own, so every
call resolves through to the ``{theme: light}`` rule. On our side, the first
4,096 contexts a process asks about fill the per-setting cache, each resolved
and stored (most of them in the first repeat); once the cache has filled up,
the setting's lookup no longer tells apart values that no rule names, and the
new users share one cache entry. The median over the repeats is that steady
state; the first repeat of each process includes the filling. (A new user
that has rules of its own is still resolved and stored on every call.)

Timing: a plain ``for user in users: get(user=user)`` loop over a list built
beforehand, divided by its length; the loop itself is inside the timing on
both sides (the floor, timed the same way with a function that returns at
once, is reported next to it).
"""

from __future__ import annotations

from typing import Any

from benchmarks._common import Run, child_main, emit
from benchmarks._get_case import GetCase, clock, floor, run_get_case, start_setting
from benchmarks._sides import role

NAME = "get_new_context"
MODULE = "bench_get_new_context"
TITLE = "Setting.get(), a new context every call"
TARGET = "<= 1/10 of heksher 0.2.2"

CASE = GetCase(
    name=NAME,
    module=MODULE,
    title=TITLE,
    target=TARGET,
    max_ratio=1 / 10,
    label="get-new",
    value_key="values",
    floor_note="floor loop + f(**kw)",
    child_timeout=180,
)


def _time_loop(get: Any, users: list[str], now: Any) -> float:
    start = now()
    for user in users:
        get(user=user)
    return now() - start


def body(params: dict[str, Any]) -> None:
    side, client, setting = start_setting(params)
    calls, repeats = params["calls"], params["repeats"]
    values = {setting.get(user=f"warm{k}") for k in range(100)}
    per_call, floor_ns = [], []
    for repeat in range(repeats):
        users = [f"n{repeat}x{k}" for k in range(calls)]  # new to this process: never asked before
        per_call.append(_time_loop(setting.get, users, clock(params)) / calls * 1e9)
        floor_ns.append(_time_loop(floor, users, clock(params)) / calls * 1e9)
    values.add(setting.get(user=f"last{repeats}"))
    emit("result", role=role(side, client), values=sorted(values), per_call_ns=per_call, floor_ns=floor_ns)
    client.close()


def run(r: Run) -> dict[str, Any]:
    processes, repeats, calls = (1, 5, 10_000) if r.quick else (3, 7, 20_000)
    child_params = {"calls": calls, "repeats": repeats}
    params = {"processes_per_side": processes, "repeats": repeats, "calls_per_repeat": calls}
    return run_get_case(r, CASE, child_params, params, processes)


if __name__ == "__main__":
    child_main(body)
