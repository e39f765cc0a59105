"""What the ``Setting.get()`` cases share (``get_repeated``, ``get_new_context``, ``get_default``).

Runner side, :func:`run_get_case`: a leader process of ours holds the segment;
for each round a measuring process of each side runs (the sides alternate),
ours checked to be a follower; the sides must agree on what ``get()`` returned.
The result is one row, ours against the peer, with the floor in its note.
A case's :class:`GetSetup` (by default :func:`small_setup`) says which
settings, tracked contexts and defaults both sides use, and which setting is
timed.

Child side, :func:`start_setting`: the same settings, client, tracked contexts
and defaults on either side, and the setting to time; :func:`floor` is the
plain function the cases time next to ``get()``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks._common import Run, log, summary
from benchmarks._scenario import (
    SMALL_DEFAULTS,
    SMALL_TRACK,
    THREE_DEFAULTS,
    THREE_TRACK,
    seed_small,
    seed_three,
    specs_from,
)
from benchmarks._sides import library, make_client, make_settings

INTERVAL = 60.0
"""Update interval of every client: no regular update runs while a case measures."""


@dataclass(frozen=True)
class GetSetup:
    """What both sides of a ``get()`` case make, and the setting that is timed."""

    settings: dict[str, Any]
    """The settings, as :func:`benchmarks._scenario.specs_from` rebuilds them in a child."""
    setting: str
    """The name of the setting whose ``get()`` is timed."""
    track: dict[str, Any]
    defaults: dict[str, str]


def small_setup(r: Run) -> GetSetup:
    """The ten small settings (seeded once per run), tracking and defaulting as ``SMALL_*`` say."""
    small = r.shared.get("small")
    if small is None:
        small = r.shared["small"] = seed_small(r.service, "g", 10)
    settings = {"kind": "small", "prefix": r.service.prefix, "stem": "g", "count": 10}
    return GetSetup(settings, small["names"][0], SMALL_TRACK, SMALL_DEFAULTS)


def three_setup(r: Run) -> GetSetup:
    """Ten settings with all three features, ``environment`` defaulting to ``prod`` (``THREE_*``)."""
    three = r.shared.get("three")
    if three is None:
        three = r.shared["three"] = seed_three(r.service, "e", 10)
    settings = {"kind": "three", "prefix": r.service.prefix, "stem": "e", "count": 10}
    return GetSetup(settings, three["names"][0], THREE_TRACK, THREE_DEFAULTS)


@dataclass(frozen=True)
class GetCase:
    """What differs between the two cases' runner sides."""

    name: str
    """The case's name (``NAME``), in the result and the progress log."""
    module: str
    """The measuring module, ``benchmarks.<module>``."""
    title: str
    target: str
    max_ratio: float
    """The target as a number: met when ours / peer is at most this."""
    label: str
    """Names the shm folder and the leader's log (``<label>``, ``<label>-leader``)."""
    value_key: str
    """The key of the child's result that holds what ``get()`` returned (compared between the sides)."""
    floor_note: str
    """How the floor reads in the row's note, before its median."""
    child_timeout: float
    """Seconds to wait for a measuring process's result."""
    setup: Callable[[Run], GetSetup] = small_setup
    """Seeds (once per run) and describes the settings both sides use."""


def clock(params: dict[str, Any]) -> Callable[[], float]:
    """In a measuring child: the clock the run asked for (``--cpu-time``: the thread's CPU time)."""
    return time.thread_time if params.get("clock") == "cpu" else time.perf_counter


def floor(**contexts: str) -> int:
    """A function that returns at once: what any ``get(**contexts)`` pays before doing anything."""
    return 1


def start_setting(params: dict[str, Any]) -> tuple[str, Any, Any]:
    """In a measuring child: make the settings and a main client of ``params["side"]``.

    Returns the side, the client (its ``set_as_main()`` done) and the setting to time.
    """
    side = params["side"]
    lib = library(side)
    settings = make_settings(lib, specs_from(params["settings"]))
    client = make_client(lib, params["url"], INTERVAL, params["track"], params["defaults"])
    client.set_as_main()
    return side, client, settings[params["setting"]]


def run_get_case(
    r: Run, case: GetCase, child_params: dict[str, Any], params: dict[str, Any], processes: int
) -> dict[str, Any]:
    """Run ``processes`` rounds of both sides; *child_params* go to every measuring child.

    *params* is reported as the case's parameters.
    """
    service = r.service
    setup = case.setup(r)
    child_params = {**child_params, "clock": "cpu" if r.cpu_time else "wall"}
    params = {**params, "clock": child_params["clock"]}
    shm = r.shm_dir(case.label)
    leader = r.spawn(
        "_holder",
        {
            "side": "ours",
            "url": service.url,
            "interval": INTERVAL,
            "settings": setup.settings,
            "track": setup.track,
            "defaults": setup.defaults,
        },
        shm_dir=shm,
        label=f"{case.label}-leader",
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
                case.module,
                {
                    "side": side,
                    "url": service.url,
                    "settings": setup.settings,
                    "setting": setup.setting,
                    "track": setup.track,
                    "defaults": setup.defaults,
                    **child_params,
                },
                shm_dir=shm if side == "ours" else None,
                label=f"{case.name}-{side}",
            )
            result = child.expect("result", timeout=case.child_timeout)
            child.stop()
            if side == "ours" and result["role"] != "follower":
                raise RuntimeError(f"the measuring process was {result['role']}, not a follower")
            samples[side] += result["per_call_ns"]
            floors += result["floor_ns"]
            values[side] = result[case.value_key]
    leader.stop()
    if values["ours"] != values["peer"]:
        raise RuntimeError(f"the sides disagree on the {case.value_key}: {values}")
    ours, peer = summary(samples["ours"]), summary(samples["peer"])
    ratio = ours["median"] / peer["median"]
    log(f"{case.name}: ours {ours['median']:.0f} ns, peer {peer['median']:.0f} ns, ratio 1/{1 / ratio:.1f}")
    return {
        "case": case.name,
        "title": case.title,
        "params": params,
        "rows": [
            {
                "label": case.title,
                "unit": "ns",
                "ours": ours,
                "peer": peer,
                "ratio": ratio,
                "target": case.target,
                "met": ratio <= case.max_ratio,
                "note": f"{case.floor_note}: {summary(floors)['median']:.0f} ns",
            }
        ],
        "extra": {"floor_ns": summary(floors), case.value_key: values["ours"]},
    }
