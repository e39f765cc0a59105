"""Work for a process pool whose workers share one Heksher poller (see pool_example.py).

With the fork start method, a client made main in the parent before the pool
starts is inherited by every worker and resumes there by itself. With spawn
and forkserver, workers start from a fresh interpreter: give the pool
``initializer=start_client`` so that each one makes its own client main.
The functions after the "for the tests" line serve the tests only.
"""

from __future__ import annotations

import os
import time
from typing import Any

import heksher_shm as heksher

cache_size = heksher.Setting("cache_size", int, ["user"], default_value=10)
client: heksher.ThreadHeksherClient | None = None


def start_client() -> None:
    """Make this process's client main: call it in the parent, or pass it as the pool's initializer."""
    global client
    client = heksher.ThreadHeksherClient(
        os.environ["HEKSHER_URL"],
        float(os.environ.get("HEKSHER_UPDATE_INTERVAL", "60")),
        ["user", "theme", "environment"],
    )
    client.track_contexts(user=heksher.TRACK_ALL)
    client.set_as_main()


def lookup(user: str) -> int:
    """A task: the setting's value for *user*."""
    return cache_size.get(user=user)


# -- for the tests ---------------------------------------------------------------------------------------

_barrier: Any = None
_inside: Any = None


def test_initializer(barrier: Any, inside: Any, with_client: bool) -> None:
    """Keep the barrier that spreads probes over the workers, and the count of workers inside a task.

    Starts a client when asked.
    """
    global _barrier, _inside
    _barrier, _inside = barrier, inside
    if with_client:
        start_client()


def probe(timeout: float) -> dict[str, Any]:
    """Wait until every worker holds a probe (so each answers once), then answer."""
    _barrier.wait(timeout)
    return {
        "pid": os.getpid(),
        "value": lookup("alice"),
        "leading": client.leading if client is not None else None,
    }


def await_value(value: int, timeout: float) -> dict[str, Any]:
    """In every worker at once: when (epoch seconds) the setting first answered *value*, or None."""
    _barrier.wait(timeout)
    with _inside.get_lock():
        _inside.value += 1
    deadline = time.monotonic() + timeout
    while lookup("alice") != value:
        if time.monotonic() > deadline:
            return {"pid": os.getpid(), "seen": None, "value": lookup("alice")}
        time.sleep(0.001)  # polling the worker's own setting, as fast as is reasonable
    return {"pid": os.getpid(), "seen": time.time(), "value": value}
