"""multiprocessing.Pool and ProcessPoolExecutor, with the fork, spawn and forkserver start methods.

A driver process (``tests/apps/prefork/pool_app.py``) owns the pool; the
client is made main either in the driver before the pool starts ("parent")
or in each worker by the pool's initializer ("initializer"). Probes wait on a
barrier, so that every worker answers each round.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from heksher_shm.testing import HeksherService
from tests.apps.prefork import harness as h

INTERVAL = 0.3
MARGIN = h.MARGIN
WORKERS = 4
METHODS = ["fork", "spawn", "forkserver"]


def start(
    service: HeksherService, tmp_path: Path, kind: str, method: str, mode: str, tag: str = ""
) -> h.PoolDriver:
    env = h.server_env(service.url, INTERVAL)
    return h.PoolDriver(kind, method, mode, WORKERS, env, tmp_path / f"pool{tag}.log")


def check_values(answers: list[dict[str, object]], value: int) -> set[int]:
    """Check 1: every worker answered, each the rule's value."""
    pids = {int(str(a["pid"])) for a in answers}
    assert len(pids) == WORKERS, answers
    assert {a["value"] for a in answers} == {value}, answers
    return pids


def check_propagation(driver: h.PoolDriver, service: HeksherService, rule: int, value: int) -> list[float]:
    """Check 3: a rule change reaches every worker within one update interval plus a margin."""
    t0 = time.time()
    service.set_rule_value(rule, value)
    answers = driver.answers(op="await", value=value)
    assert len({a["pid"] for a in answers}) == WORKERS, answers
    delays = [a["seen"] - t0 for a in answers if a["seen"] is not None]
    assert len(delays) == WORKERS, f"some workers never answered {value}: {answers}"
    assert max(delays) <= INTERVAL + MARGIN, delays
    if h.TIMING:
        print(f"    propagation: {[round(d, 3) for d in sorted(delays)]}", file=sys.stderr)
    return delays


def restart_works(
    service: HeksherService, tmp_path: Path, kind: str, method: str, mode: str, rule: int
) -> None:
    """Check 5, second half: a new pool on the same folder works."""
    value = next(r.value for r in service.rules if r.rule_id == rule)
    driver = start(service, tmp_path, kind, method, mode, tag="-again")
    try:
        check_values(driver.ready["ready"], value)
        check_propagation(driver, service, rule, int(value) + 1)  # type: ignore[call-overload]
        assert driver.ask(op="exit")["bye"] < 15
    finally:
        driver.close()


def kill_during_work(
    driver: h.PoolDriver, service: HeksherService, rule: int, value: int, victim: int | None = None
) -> tuple[h.Takeover | None, list[float]]:
    """Check 4 for multiprocessing.Pool: SIGKILL a worker (the leader by default) while all are busy.

    Every worker is inside a task when the kill comes, because an idle Pool
    worker holds the lock of the pool's task queue: killing that one would
    wedge the Pool for good (a multiprocessing limitation, nothing to do with
    heksher_shm). The survivors' tasks wait for *value*; the rule changes
    after the takeover; they must all see it within an interval plus a margin.
    """
    assert driver.ask(op="hold", value=value)["held"] == WORKERS
    takeover = None
    if victim is None:
        takeover = h.kill_leader()
    else:
        os.kill(victim, signal.SIGKILL)
    t0 = time.time()
    service.set_rule_value(rule, value)
    reply = driver.ask(op="collect", expect=WORKERS - 1)
    assert reply["lost"] == 1, reply
    delays = [a["seen"] - t0 for a in reply["answers"]]
    assert None not in [a["seen"] for a in reply["answers"]], reply
    assert max(delays) <= INTERVAL + MARGIN, delays
    return takeover, delays


@pytest.mark.parametrize("method", METHODS)
def test_pool_initializer(service: HeksherService, tmp_path: Path, method: str) -> None:
    """Pool(initializer=start_client): each worker makes its client main; one worker leads."""
    rule = service.add_rule(h.SETTING, {"user": "alice"}, 1)
    driver = start(service, tmp_path, "pool", method, "initializer")
    try:
        workers = check_values(driver.ready["ready"], 1)
        assert driver.ready["leading"] is None  # the parent has no client
        assert sum(1 for a in driver.ready["ready"] if a["leading"]) == 1
        assert h.leader_pid() in workers
        h.one_poller(service, INTERVAL)
        check_propagation(driver, service, rule, 2)
        takeover, _ = kill_during_work(driver, service, rule, 3)
        # a survivor takes over, or the Pool's replacement worker when it starts first
        assert takeover is not None
        assert takeover.seconds < 1.0, takeover
        # the Pool replaced the dead worker; its initializer made a follower. It may have joined before
        # the value changed and be applying the change in the background as it is asked (get() never
        # waits for that), so it is waited for, not probed.
        replaced = check_values(driver.answers(op="await", value=3), 3)
        assert len(replaced - workers) == 1
        check_propagation(driver, service, rule, 4)
        bye = driver.ask(op="exit")
        assert bye["bye"] < 15, bye
        h.until(lambda: not driver.group(), 15, "the pool's processes exit")
    finally:
        driver.close()
    restart_works(service, tmp_path, "pool", method, "initializer", rule)


@pytest.mark.parametrize("method", METHODS)
def test_executor_initializer(service: HeksherService, tmp_path: Path, method: str) -> None:
    """ProcessPoolExecutor(initializer=start_client): each worker makes its client main; one leads.

    A ProcessPoolExecutor whose worker dies is broken for good and stops its
    other workers (concurrent.futures' own rule): after the leader is killed
    no worker is left to update; the next executor on the same folder works.
    """
    rule = service.add_rule(h.SETTING, {"user": "alice"}, 1)
    driver = start(service, tmp_path, "executor", method, "initializer")
    try:
        workers = check_values(driver.ready["ready"], 1)
        assert driver.ready["leading"] is None
        assert sum(1 for a in driver.ready["ready"] if a["leading"]) == 1
        assert h.leader_pid() in workers
        h.one_poller(service, INTERVAL)
        check_propagation(driver, service, rule, 2)
        os.kill(h.leader_pid(), signal.SIGKILL)
        assert "BrokenProcessPool" in driver.ask(op="probe").get("error", "")
        bye = driver.ask(op="exit")
        assert bye["bye"] < 15, bye
        h.until(lambda: not driver.group(), 15, "the pool's processes exit")
    finally:
        driver.close()
    restart_works(service, tmp_path, "executor", method, "initializer", rule)


@pytest.mark.parametrize("kind", ["pool", "executor"])
def test_parent_fork(service: HeksherService, tmp_path: Path, kind: str) -> None:
    """fork: the parent's client (main before the pool starts) leads; every worker inherits a follower."""
    rule = service.add_rule(h.SETTING, {"user": "alice"}, 1)
    driver = start(service, tmp_path, kind, "fork", "parent")
    try:
        workers = check_values(driver.ready["ready"], 1)
        assert driver.ready["leading"] is True
        assert not any(a["leading"] for a in driver.ready["ready"])
        assert h.leader_pid() == driver.pid
        h.one_poller(service, INTERVAL)
        check_propagation(driver, service, rule, 2)
        if kind == "pool":
            kill_during_work(driver, service, rule, 3, victim=min(workers))  # a follower
            check_values(driver.answers(op="await", value=3), 3)  # replaced by a fork of the parent
            assert h.leader_pid() == driver.pid
            check_propagation(driver, service, rule, 4)
        else:
            os.kill(min(workers), signal.SIGKILL)
            assert "BrokenProcessPool" in driver.ask(op="probe").get("error", "")
        # The leader is the pool's owner: killing it ends the pool. The workers
        # exit (end-of-file on the pool's queues), so nobody is left to update.
        os.kill(driver.pid, signal.SIGKILL)
        h.until(lambda: not driver.group(), 15, "the orphaned workers exit")
    finally:
        driver.close()
    restart_works(service, tmp_path, kind, "fork", "parent", rule)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
@pytest.mark.parametrize("kind", ["pool", "executor"])
def test_parent_spawn(service: HeksherService, tmp_path: Path, kind: str, method: str) -> None:
    """spawn/forkserver: workers inherit nothing, so a client made main in the parent is not theirs.

    They answer the setting's default until they make their own client main
    (use ``initializer=start_client``); the parent alone polls.
    """
    service.add_rule(h.SETTING, {"user": "alice"}, 1)
    driver = start(service, tmp_path, kind, method, "parent")
    try:
        check_values(driver.ready["ready"], h.DEFAULT)
        assert driver.ready["leading"] is True
        h.one_poller(service, INTERVAL)
        assert driver.ask(op="exit")["bye"] < 15
    finally:
        driver.close()


def test_docs_example(service: HeksherService) -> None:
    """pool_example.py, as docs/deployment/multiprocessing.rst shows it."""
    service.add_rule(h.SETTING, {"user": "alice"}, 7)
    out = subprocess.run(
        [sys.executable, "pool_example.py"],
        cwd=h.HERE,
        env=h.server_env(service.url, INTERVAL),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[7, 10]", "[7, 10]"], out.stdout
