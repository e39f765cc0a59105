"""A new process's ``set_as_main()`` while a leader and a covering snapshot exist.

Ours: a leader process with the same settings already runs and has published
a snapshot that covers them; each measuring process starts fresh, makes the
settings and a client, and times ``set_as_main()`` (it registers, the leader
picks it up, acknowledges it with a published snapshot, and the process
applies it). Peer: each measuring process is a fresh heksher 0.2.2 client
whose ``set_as_main()`` fetches the context features, declares every setting
(the service already has them: "uptodate") and waits for its first query.

heksher 0.2.2 builds its HTTP clients inside ``set_as_main()``; ours builds
its HTTP client on first use (a follower served by the snapshot makes none).
A second row times the constructor plus ``set_as_main()`` on both sides, so
neither side's setup is hidden. Two sizes: 10 and 100 settings.
"""

from __future__ import annotations

from typing import Any

from benchmarks._common import Run, log, summary
from benchmarks._scenario import SMALL_DEFAULTS, SMALL_TRACK, seed_small

NAME = "set_as_main"
TITLE = "A new process's set_as_main(), leader and snapshot present"
TARGET = "<= 1/10 of heksher 0.2.2"
INTERVAL = 60.0


def _measure(r: Run, count: int, stem: str, processes: int) -> dict[str, dict[str, list[float]]]:
    service = r.service
    params = {
        "url": service.url,
        "interval": INTERVAL,
        "settings": {"kind": "small", "prefix": service.prefix, "stem": stem, "count": count},
        "track": SMALL_TRACK,
        "defaults": SMALL_DEFAULTS,
    }
    shm = r.shm_dir(f"set-as-main-{count}")
    leader = r.spawn("_holder", {"side": "ours", **params}, shm_dir=shm, label=f"{NAME}-leader")
    if leader.expect("ready", timeout=120)["role"] != "leader":
        raise RuntimeError("the first process did not become the leader")
    samples: dict[str, dict[str, list[float]]] = {
        side: {"set_as_main": [], "with_constructor": []} for side in ("ours", "peer")
    }
    try:
        for round_ in range(processes):
            for side in ("ours", "peer") if round_ % 2 == 0 else ("peer", "ours"):
                child = r.spawn(
                    "_holder",
                    {"side": side, **params},
                    shm_dir=shm if side == "ours" else None,
                    label=f"{NAME}-{side}",
                )
                ready = child.expect("ready", timeout=120)
                child.stop()
                if side == "ours" and ready["role"] != "follower":
                    raise RuntimeError(f"the measuring process was {ready['role']}, not a follower")
                samples[side]["set_as_main"].append(ready["set_as_main_s"] * 1000)
                samples[side]["with_constructor"].append(
                    (ready["construct_s"] + ready["set_as_main_s"]) * 1000
                )
    finally:
        leader.stop()
    return samples


def run(r: Run) -> dict[str, Any]:
    service = r.service
    if "small" not in r.shared:
        r.shared["small"] = seed_small(service, "g", 10)
    if "hundred" not in r.shared:
        r.shared["hundred"] = seed_small(service, "m", 100)
    processes = 3 if r.quick else 7
    rows, series = [], {}
    for count, stem in ((10, "g"), (100, "m")):
        samples = _measure(r, count, stem, processes)
        series[count] = samples
        for what, label in (
            ("set_as_main", f"set_as_main(), {count} settings"),
            ("with_constructor", f"constructor + set_as_main(), {count} settings"),
        ):
            ours, peer = summary(samples["ours"][what]), summary(samples["peer"][what])
            ratio = ours["median"] / peer["median"]
            log(f"{NAME}: {label}: ours {ours['median']:.1f} ms, peer {peer['median']:.1f} ms")
            rows.append(
                {
                    "label": label,
                    "unit": "ms",
                    "ours": ours,
                    "peer": peer,
                    "ratio": ratio,
                    "target": "<= 1/10 of peer",
                    "met": ratio <= 1 / 10,
                    "note": "",
                }
            )
    return {
        "case": NAME,
        "title": TITLE,
        "target": TARGET,
        "params": {"processes_per_side": processes, "update_interval_s": INTERVAL},
        "rows": rows,
        "series": series,
    }
