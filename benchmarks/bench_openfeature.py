"""Resolving a flag through the OpenFeature provider, against a bare ``Setting.get()`` in the same process.

Ours only (heksher 0.2.2 has no provider): the ratio is the provider's time
over ``get()``'s, both timed in the same follower processes, interleaved.
A leader process of ours holds the ten small settings of ``get_repeated``
(the first with rules for alice, the others with rules for users ``r0`` to
``r19``; clients track every user and default ``theme`` to ``light``). Each
measuring process is a follower (checked) that makes every setting but the
second, sets ``HeksherProvider()`` with ``api.set_provider_and_wait`` and times
with ``timeit``, the same context on every call:

* ``get(user='alice')`` on the first setting (the bare ``get()``);
* ``provider.resolve_integer_details(first, 0, EvaluationContext('alice'))``:
  the same setting through the provider (the target: at most 3x ``get()``);
* the same for the second setting, which only the leader declared (read
  from the host's snapshot with its declared type), with ``EvaluationContext('r3')``;
* ``api.get_client().get_integer_details(first, 0, EvaluationContext('alice'))``:
  through the SDK's client, which adds its hooks and context merging (no target).

The evaluation context is made once, outside the timing, as an application
that keeps one per request would. The values are checked: the provider's
equals ``get()``'s.
"""

from __future__ import annotations

import timeit
from typing import Any

from benchmarks._common import Run, child_main, emit, log, summary
from benchmarks._get_case import INTERVAL, small_setup
from benchmarks._scenario import specs_from
from benchmarks._sides import library, make_client, make_settings, role

NAME = "openfeature"
TITLE = "OpenFeature resolution through the provider, against a bare get()"
TARGET = "<= 3x get()"
MAX_RATIO = 3.0

_TIMED = ("get", "provider", "provider_foreign", "sdk")


def _calibrate(timer: timeit.Timer, seconds: float) -> int:
    number = 1000
    while True:
        if timer.timeit(number) >= seconds / 4:
            return max(number * 4, 1)
        number *= 4


def body(params: dict[str, Any]) -> None:
    from openfeature import api
    from openfeature.evaluation_context import EvaluationContext

    from heksher_shm.openfeature import HeksherProvider

    lib = library("ours")
    specs = specs_from(params["settings"])
    own, foreign = specs[0][0], specs[1][0]
    settings = make_settings(lib, [spec for spec in specs if spec[0] != foreign])
    client = make_client(lib, params["url"], INTERVAL, params["track"], params["defaults"])
    client.set_as_main()
    provider = HeksherProvider()
    getattr(api, "set_provider_and_wait", api.set_provider)(provider)  # 0.10; set_provider waits before
    alice, r3 = EvaluationContext("alice"), EvaluationContext("r3")
    values = {
        "get": settings[own].get(user="alice"),
        "provider": provider.resolve_integer_details(own, 0, alice).value,
        "provider_foreign": provider.resolve_integer_details(foreign, 0, r3).value,
        "sdk": api.get_client().get_integer_details(own, 0, alice).value,
    }
    timers = {
        "get": timeit.Timer("get(user='alice')", globals={"get": settings[own].get}),
        "provider": timeit.Timer(
            "resolve(key, 0, context)",
            globals={"resolve": provider.resolve_integer_details, "key": own, "context": alice},
        ),
        "provider_foreign": timeit.Timer(
            "resolve(key, 0, context)",
            globals={"resolve": provider.resolve_integer_details, "key": foreign, "context": r3},
        ),
        "sdk": timeit.Timer(
            "details(key, 0, context)",
            globals={"details": api.get_client().get_integer_details, "key": own, "context": alice},
        ),
    }
    numbers = {name: _calibrate(timer, params["seconds"]) for name, timer in timers.items()}
    per_call: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(params["repeats"]):  # interleaved: drift hits every timing alike
        for name, timer in timers.items():
            per_call[name].append(timer.timeit(numbers[name]) / numbers[name] * 1e9)
    emit("result", role=role("ours", client), values=values, per_call_ns=per_call)
    api.clear_providers()
    client.close()


def run(r: Run) -> dict[str, Any]:
    processes, repeats = (1, 5) if r.quick else (3, 7)
    setup = small_setup(r)
    shm = r.shm_dir("openfeature")
    base = {
        "url": r.service.url,
        "settings": setup.settings,
        "track": setup.track,
        "defaults": setup.defaults,
    }
    holder = {"side": "ours", "interval": INTERVAL, **base}
    leader = r.spawn("_holder", holder, shm_dir=shm, label="of-leader")
    if leader.expect("ready")["role"] != "leader":
        raise RuntimeError("the first process did not become the leader")
    samples: dict[str, list[float]] = {name: [] for name in _TIMED}
    for _ in range(processes):
        child = r.spawn(
            "bench_openfeature",
            {**base, "repeats": repeats, "seconds": 0.1 if r.quick else 0.2},
            shm_dir=shm,
            label="of-follower",
        )
        result = child.expect("result", timeout=180)
        child.stop()
        if result["role"] != "follower":
            raise RuntimeError(f"the measuring process was {result['role']}, not a follower")
        values = result["values"]
        if not values["get"] == values["provider"] == values["sdk"]:
            raise RuntimeError(f"the provider and get() disagree: {values}")
        for name in _TIMED:
            samples[name] += result["per_call_ns"][name]
    leader.stop()
    stats = {name: summary(samples[name]) for name in _TIMED}
    get = stats["get"]["median"]
    ratios = {name: stats[name]["median"] / get for name in _TIMED}
    log(
        f"{NAME}: get {get:.0f} ns; provider {ratios['provider']:.2f}x, a setting of another process "
        f"{ratios['provider_foreign']:.2f}x, through the SDK {ratios['sdk']:.1f}x"
    )
    note = f"ratio against get() in the same processes: {get:.0f} ns"
    rows = [
        {
            "label": "OpenFeature: provider.resolve_integer_details(), repeated context",
            "unit": "ns",
            "ours": stats["provider"],
            "ratio": ratios["provider"],
            "target": TARGET,
            "met": ratios["provider"] <= MAX_RATIO,
            "note": note,
        },
        {
            "label": "OpenFeature: the same, a setting only another process declared",
            "unit": "ns",
            "ours": stats["provider_foreign"],
            "ratio": ratios["provider_foreign"],
            "target": TARGET,
            "met": ratios["provider_foreign"] <= MAX_RATIO,
            "note": note,
        },
        {
            "label": "OpenFeature: api.get_client().get_integer_details() (the SDK's own path on top)",
            "unit": "ns",
            "ours": stats["sdk"],
            "ratio": ratios["sdk"],
            "target": "",
            "met": None,
            "note": note,
        },
    ]
    return {
        "case": NAME,
        "title": TITLE,
        "params": {"processes": processes, "timeit_repeats": repeats, "settings": 10},
        "rows": rows,
        "extra": {"get_ns": stats["get"], "values": values},
    }


if __name__ == "__main__":
    child_main(body)
