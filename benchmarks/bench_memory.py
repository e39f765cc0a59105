"""Memory per process with 1,000 settings and 100k rules (USS, from psutil).

Ours: a leader and three followers; peer: three heksher 0.2.2 processes. All
have the same 1,000 settings and track every context. Once a process is main,
the runner has it call ``get()`` on every setting once (so whatever a setting
builds lazily is built), collect garbage, and report its USS (memory no other
process shares), PSS (shared pages split between their users: this counts
our share of the segment) and RSS.

Baselines: one process per side that made the same settings but no client
(the interpreter, the library and the settings, without rules). "Rules cost"
in the note is USS minus that baseline.
"""

from __future__ import annotations

from typing import Any

from benchmarks._common import Run, log, stop_all, summary
from benchmarks._fleet import start_fleet
from benchmarks._scenario import BIG_TRACK, grow_big

NAME = "memory"
TITLE = "Memory per follower (USS), 1,000 settings"
TARGET = "<= 1/2 of heksher 0.2.2 per process"
INTERVAL = 60.0
CONTEXT = {"user": "u0", "theme": "none", "environment": "none"}


def run(r: Run) -> dict[str, Any]:
    service = r.service
    per = 10 if r.quick else 100
    processes = 2 if r.quick else 3
    big = grow_big(service, r.shared, per)
    rules = per * len(big["specs"])
    params = {
        "url": service.url,
        "interval": INTERVAL,
        "settings": {"kind": "big", "prefix": service.prefix},
        "track": BIG_TRACK,
    }
    measured: dict[str, dict[str, list[float]]] = {}
    baselines: dict[str, dict[str, float]] = {}
    leader_memory: dict[str, float] = {}
    for side in ("ours", "peer"):
        baseline = r.spawn(
            "_holder", {"side": side, **params, "no_client": True}, label=f"{NAME}-base-{side}"
        )
        baseline.expect("ready", timeout=120)
        baselines[side] = baseline.ask("memory", context=CONTEXT, timeout=120)
        baseline.stop()
        shm = r.shm_dir(NAME) if side == "ours" else None
        fleet = []
        try:
            if side == "ours":
                leader, _ = start_fleet(r, side, 1, params, label=f"{NAME}-leader", shm_dir=shm, timeout=300)
                fleet += leader
                if leader[0].ask("role")["role"] != "leader":
                    raise RuntimeError("the first process did not become the leader")
            members, _ = start_fleet(r, side, processes, params, label=NAME, shm_dir=shm, timeout=600)
            fleet += members
            reports = [child.ask("memory", context=CONTEXT, timeout=300) for child in members]
            if side == "ours":
                if any(report["role"] != "follower" for report in reports):
                    raise RuntimeError("a measured process of ours is not a follower")
                leader_memory = fleet[0].ask("memory", context=CONTEXT, timeout=300)
        finally:
            stop_all(fleet)
        measured[side] = {key: [report[key] for report in reports] for key in ("uss", "pss", "rss")}
        log(
            f"{NAME}: {side}: USS {[round(x, 1) for x in measured[side]['uss']]} MiB, "
            f"baseline {baselines[side]['uss']:.1f} MiB"
        )
    ours, peer = summary(measured["ours"]["uss"]), summary(measured["peer"]["uss"])
    ratio = ours["median"] / peer["median"]
    rules_cost = {
        side: summary(measured[side]["uss"])["median"] - baselines[side]["uss"] for side in measured
    }
    pss = {side: summary(measured[side]["pss"])["median"] for side in measured}
    return {
        "case": NAME,
        "title": TITLE,
        "target": TARGET,
        "params": {"settings": len(big["specs"]), "rules": rules, "processes_per_side": processes},
        "rows": [
            {
                "label": f"USS per follower, {rules // 1000}k rules",
                "unit": "MiB",
                "ours": ours,
                "peer": peer,
                "ratio": ratio,
                "target": TARGET,
                "met": ratio <= 0.5,
                "note": (
                    f"USS - baseline: ours {rules_cost['ours']:.1f}, peer {rules_cost['peer']:.1f} MiB;"
                    f" PSS ours {pss['ours']:.1f}, peer {pss['peer']:.1f} MiB;"
                    f" our leader USS {leader_memory.get('uss', float('nan')):.1f} MiB"
                ),
            }
        ],
        "series": {side: {**measured[side], "baseline": baselines[side]} for side in measured}
        | {"leader": leader_memory},
    }
