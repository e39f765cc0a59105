"""A replaced leader moves no process back, its own included: real processes, a leader stopped at the
narrow points.

Issue 15's hole: a leader stopped (``SIGSTOP``) after it checked the lock
and before its publish landed, for longer than the takeover delay, is
replaced; when it resumes it still tries to publish what it fetched before
the stop. Here four workers (both client kinds) read a value that rises
every 0.1 s, each in a thread of its own that notes every time it went
down; the leader stops itself at one of the narrow points of its next
publish, a follower replaces it, and after ``SIGCONT`` the old leader must
step down without any process, its own included, ever reading an older
value than one it read.

* ``publish``: the engine checked the lock and handed the snapshot to the
  host: the segment's writer refuses (the term moved on);
* ``table``: stopped while writing the payload into its spare slot (which
  the new leader may be using by then): the writer refuses before it claims;
* ``claimed``: stopped after its last check, right before the one store that
  publishes: the store lands, and every reader refuses the snapshot (its
  term is older than the segment's).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from heksher_shm._engine.policy import UNRESPONSIVE_AFTER
from heksher_shm.testing import HeksherService
from tests._procs import Worker, leaders_of
from tests._support import unique

INTERVAL = 0.3


def _until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("point", ["publish", "table", "claimed"])
def test_a_replaced_leader_moves_no_process_back(
    service: HeksherService, workers: list[Worker], point: str
) -> None:
    name = unique("fenced")
    workers.extend(Worker(service.url, kind, [name], INTERVAL) for kind in ["thread", "async"] * 2)
    for w in workers:
        w.ready()
    rule = service.add_rule(name, {"user": "alice"}, 1)
    for w in workers:
        assert w.ask("wait_value", name, {"user": "alice"}, 1, INTERVAL + 5) is not None
        w.ask("watch", name, {"user": "alice"})
    (leader,) = leaders_of(workers)
    followers = [w for w in workers if w is not leader]
    assert leader.pid is not None
    leader.ask("stop_at", point)

    value = [1]
    done = threading.Event()

    def rising() -> None:
        while not done.wait(0.1):
            value[0] += 1
            service.set_rule_value(rule, value[0])

    riser = threading.Thread(target=rising, daemon=True)
    riser.start()
    process = psutil.Process(leader.pid)
    try:
        _until(lambda: process.status() == psutil.STATUS_STOPPED, 10, f"the leader to stop at {point!r}")
        stopped_at = value[0]
        _until(lambda: len(leaders_of(followers)) == 1, UNRESPONSIVE_AFTER + 10, "a follower to take over")
        _until(
            lambda: all(w.ask("watched")["highest"] > stopped_at + 5 for w in followers),
            10,
            "the new leader's newer values in every follower",
        )
    finally:
        os.kill(leader.pid, signal.SIGCONT)
    _until(lambda: not leader.ask("leading"), 10, "the resumed leader to step down")
    done.set()
    riser.join(5)
    for w in workers:
        assert w.ask("wait_value", name, {"user": "alice"}, value[0], 5 * INTERVAL + 5) is not None
    assert len(leaders_of(workers)) == 1
    for w in workers:
        seen = w.ask("watched")
        assert seen["reads"] > 100
        assert not seen["backwards"], f"{'the replaced leader' if w is leader else 'a follower'} read {seen}"
