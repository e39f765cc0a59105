"""A follower's first ``get()`` of one setting after a new 100k-rule snapshot.

A leader process holds 1,000 settings with 100 rules each (100k rules). For
each trial the runner changes one rule of *every* setting on the service (so
every setting's blob in the next snapshot is new) and asks the leader to
reload. The measuring follower waits for the segment's generation word to
move (checking every 0.2 ms, sleeping in between) and then times its first
``get()`` of one setting; that call finds the new snapshot and applies it
before answering. If the follower's background thread happened to start
applying first, the call answers from the previous rules without waiting, so
the follower keeps calling until the new value shows and the time until then
is the sample (such trials are counted in the note). Before the first trial
the follower calls ``reload()`` once, so that the publish acknowledging its
registration (which moves the generation too) is behind it.

Two followers, one after the other:

* **all settings**: it has the same 1,000 settings as the leader, like a
  preforked worker of the same application;
* **one setting**: it has only the setting it reads.

Heksher 0.2.2 has no snapshot to apply (each process applies its own update
in its update thread), so there is no peer number.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks._common import Run, child_main, commands, emit, log, summary
from benchmarks._scenario import BIG_TRACK, change_every_big_setting, grow_big, specs_from
from benchmarks._sides import library, make_client, make_settings, role

NAME = "first_get"
MODULE = "bench_first_get"
TITLE = "A follower's first get() after a new snapshot"
TARGET = "<= 5 ms"
INTERVAL = 60.0
CONTEXT = {"user": "u0", "theme": "none", "environment": "none"}


def body(params: dict[str, Any]) -> None:
    lib = library("ours")
    settings = make_settings(lib, specs_from(params["settings"]))
    client = make_client(lib, params["url"], INTERVAL, BIG_TRACK)
    client.set_as_main()
    # set_as_main() returns as soon as the snapshot covers this process's settings; the leader
    # acknowledges the new registration with a publish of its own a moment later. A reload()
    # returns once that is behind us, so the first trial waits for the reload's snapshot, not
    # for the acknowledgement's.
    client.reload()
    setting = settings[params["setting"]]
    setting.get(**CONTEXT)
    emit("ready", role=role("ours", client))
    transport = client._link.transport  # the segment; generation() is one aligned load
    for command in commands():
        expected = command["expected"]
        generation = transport.generation()
        emit("armed")
        deadline = time.monotonic() + 120
        while transport.generation() == generation:
            if time.monotonic() > deadline:
                raise RuntimeError("no new snapshot within 120 s")
            time.sleep(0.0002)
        start = time.perf_counter()
        value = setting.get(**CONTEXT)
        first = time.perf_counter() - start
        retried = False
        while value != expected:
            retried = True
            if time.perf_counter() - start > 60:
                raise RuntimeError(f"get() still answers {value!r}, expected {expected!r}")
            time.sleep(0.0001)
            value = setting.get(**CONTEXT)
        emit("result", first_s=first, until_new_s=time.perf_counter() - start, retried=retried)
    client.close()


def run(r: Run) -> dict[str, Any]:
    service = r.service
    per = 10 if r.quick else 100
    trials = 3 if r.quick else 7
    big = grow_big(service, r.shared, per)
    rules = per * len(big["specs"])
    settings = {"kind": "big", "prefix": service.prefix}
    shm = r.shm_dir(NAME)
    leader = r.spawn(
        "_holder",
        {"side": "ours", "url": service.url, "interval": INTERVAL, "settings": settings, "track": BIG_TRACK},
        shm_dir=shm,
        label=f"{NAME}-leader",
    )
    if leader.expect("ready", timeout=300)["role"] != "leader":
        raise RuntimeError("the first process did not become the leader")
    rows, series = [], {}
    try:
        for variant, only in (("all settings", None), ("one setting", [0])):
            follower = r.spawn(
                MODULE,
                {"url": service.url, "settings": {**settings, "only": only}, "setting": big["specs"][0][0]},
                shm_dir=shm,
                label=f"{NAME}-follower",
            )
            if follower.expect("ready", timeout=300)["role"] != "follower":
                raise RuntimeError("the measuring process is not a follower")
            samples, retried = [], 0
            for _ in range(trials):
                expected = change_every_big_setting(service, big)[big["specs"][0][0]]
                follower.send("arm", expected=expected)
                follower.expect("armed")
                leader.ask("reload", timeout=300)
                result = follower.expect("result", timeout=300)
                samples.append(result["until_new_s"] * 1000)
                retried += bool(result["retried"])
            follower.stop()
            ms = summary(samples)
            series[variant] = samples
            log(f"{NAME}: {variant}: {[round(x, 1) for x in samples]} ms")
            rows.append(
                {
                    "label": f"First get() after a new {rules // 1000}k-rule snapshot, {variant}",
                    "unit": "ms",
                    "ours": ms,
                    "peer": None,
                    "ratio": None,
                    "target": TARGET,
                    "met": ms["median"] <= 5,
                    "note": f"{trials} snapshots; the background thread started first in {retried}",
                }
            )
    finally:
        leader.stop()
    return {
        "case": NAME,
        "title": TITLE,
        "target": TARGET,
        "params": {"settings": len(big["specs"]), "rules": rules, "trials": trials},
        "rows": rows,
        "series": series,
    }


if __name__ == "__main__":
    child_main(body)
