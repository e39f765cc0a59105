"""Runner-side helper: N processes of one side holding a client (``benchmarks._holder``) at once."""

from __future__ import annotations

import time
from typing import Any

from benchmarks._common import Child, Run, stop_all


def start_fleet(
    r: Run,
    side: str,
    n: int,
    params: dict[str, Any],
    *,
    label: str,
    shm_dir: str | None,
    timeout: float = 180.0,
    module: str = "_holder",
) -> tuple[list[Child], float]:
    """Start ``n`` holders at once and wait until every one returned from ``set_as_main()``.

    *module* is the child to run: ``benchmarks._holder``, or a case's own child that reports
    ``ready`` likewise. Returns the children and how long the whole fleet took to be ready.
    """
    started = time.monotonic()
    fleet = [
        r.spawn(module, {"side": side, **params}, shm_dir=shm_dir, label=f"{label}-{side}-{i}")
        for i in range(n)
    ]
    try:
        for child in fleet:
            child.expect("ready", timeout=timeout)
    except BaseException:
        stop_all(fleet)
        raise
    return fleet, time.monotonic() - started


def roles(fleet: list[Child]) -> list[str]:
    """Each child's current role."""
    return [child.ask("role")["role"] for child in fleet]
