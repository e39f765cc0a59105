"""``Setting.get()`` in a follower with a repeated context that a client default completes.

The same set-up as ``get_repeated`` (a leader process of ours, measuring
followers; the peer's measuring processes are heksher 0.2.2 clients), with
other settings: ten ``int`` settings configurable by all three features
(``user``, ``theme``, ``environment``), and clients that track every user,
two themes and two environments and call ``set_defaults(environment="prod")``
(a plain string default). Each call is ``get(user='alice', theme='dark')``,
the same context every call; the default supplies the third feature, without
which none of the first setting's ``environment=prod`` rules would match. The
answer (the ``{user: alice, environment: prod}`` rule) is checked to be the
same on both sides.

The measuring child is ``get_repeated``'s (``benchmarks.bench_get_repeated``):
``timeit`` around the bound method, the floor ``f(**contexts)`` timed next
to it.
"""

from __future__ import annotations

from typing import Any

from benchmarks._common import Run
from benchmarks._get_case import GetCase, run_get_case, three_setup

NAME = "get_default"
TITLE = "Setting.get() in a follower, repeated context and a client default"
TARGET = "<= 1/30 of heksher 0.2.2"

CASE = GetCase(
    name=NAME,
    module="bench_get_repeated",  # the same timing child: only the settings and the context differ
    title=TITLE,
    target=TARGET,
    max_ratio=1 / 30,
    label="get-default",
    value_key="value",
    floor_note="floor f(**kw)",
    child_timeout=120,
    setup=three_setup,
)

CONTEXT = {"user": "alice", "theme": "dark"}


def run(r: Run) -> dict[str, Any]:
    processes, repeats = (1, 5) if r.quick else (3, 7)
    child_params = {"context": CONTEXT, "repeats": repeats, "seconds": 0.1 if r.quick else 0.2}
    params = {
        "processes_per_side": processes,
        "timeit_repeats": repeats,
        "settings": 10,
        "context": CONTEXT,
        "defaults": {"environment": "prod"},
    }
    return run_get_case(r, CASE, child_params, params, processes)
