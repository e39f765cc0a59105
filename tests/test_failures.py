"""Failure behaviour an operator can trust (issue 11): no retry storm, a service that lost its data,
and a log that says what happened once instead of on every attempt."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

import heksher_shm as heksher
from heksher_shm.testing import Fault, HeksherService
from tests._procs import Worker
from tests._support import FEATURES, unique

QUERY = "/api/v1/query"


def test_outage_costs_one_query_per_backoff_step(service: HeksherService, workers: list[Worker]) -> None:
    """An overloaded service: every query takes 50 ms and answers 500. A process that tracks new
    contexts and then reloads again and again while an update is in flight gets the error at once
    each time; the host sends at most one query per backoff step (heksher_shm 0.1 sent 136 in 10 s
    here, heksher 0.2.2 twelve)."""
    name = unique("storm")
    interval = 1.0
    leader = Worker(service.url, "thread", [name], interval)
    workers.append(leader)
    leader.ready()
    keep = heksher.Setting(name, int, ["user"], 0)
    client = heksher.ThreadHeksherClient(service.url, interval, FEATURES)
    client.set_as_main()
    try:
        service.inject_fault(Fault(status=500, delay=0.05), path=QUERY)
        service.reset_requests()
        window = 6.0
        t0 = time.monotonic()
        client.track_contexts(user="alice")  # asks the leader for an update
        reloads = 0
        while time.monotonic() - t0 < window:
            client.reload()  # logs the standing error and returns
            reloads += 1
        elapsed = time.monotonic() - t0
        queries = service.count(path=QUERY)
        # Steps of 0.5, 1, 1, ... s (interval 1 s), each waited for at least half: at most one query
        # per half step, plus the first.
        assert queries <= 2 + elapsed / 0.5, (queries, reloads)
        assert reloads > 10 * queries, (queries, reloads)  # the reloads did not each cost a query
        service.clear_faults()
        service.add_rule(name, {"user": "alice"}, 7)
        client.reload()  # the service is back: the next step queries, and this one waits for it
        deadline = time.monotonic() + 2 * interval + 1
        while keep.get(user="alice") != 7:
            assert time.monotonic() < deadline, "no fresh value after the service recovered"
            client.reload()
    finally:
        client.close()


def test_a_long_outage_is_a_few_lines_of_log(
    memory_service: HeksherService, caplog: pytest.LogCaptureFixture
) -> None:
    """One warning when the service starts failing, one when it recovers; the attempts in between,
    and their tracebacks, at DEBUG only."""
    name = unique("quietlog")
    keep = heksher.Setting(name, int, ["user"], 0)
    client = heksher.ThreadHeksherClient(memory_service.url, 0.2, FEATURES, shared=False)
    client.set_as_main()
    try:
        with caplog.at_level(logging.DEBUG, logger="heksher_shm"):
            memory_service.inject_fault(Fault(status=500), path=QUERY)
            assert memory_service.wait_for_requests(8, path=QUERY, timeout=30)
            memory_service.clear_faults()
            deadline = time.monotonic() + 10
            while not any("no more" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "no line saying the trouble ended"
                time.sleep(0.01)
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        failing = [r for r in warnings if "failing" in r.getMessage()]
        assert len(failing) == 2, [r.getMessage() for r in warnings]  # begins, ends
        assert memory_service.url in str(failing[0].__dict__.get("service_url"))
        assert not any(r.exc_info for r in warnings), "tracebacks belong at DEBUG"
        assert any(r.exc_info for r in caplog.records if r.levelno == logging.DEBUG)
        assert keep.get(user="x") == 0
    finally:
        client.close()


@pytest.mark.parametrize("how", ["setting deleted", "service restarted empty"])
def test_service_that_lost_a_setting_gets_it_declared_again(
    service: HeksherService, workers: list[Worker], how: str
) -> None:
    """The service forgot a setting the host uses (someone deleted it, or an in-memory service came
    back empty): the next query answers 404, the leader declares everything again, queries again, and
    the host keeps updating instead of staying stale for good."""
    name, other = unique("lost"), unique("kept")
    interval = 0.3
    workers.extend(Worker(service.url, kind, [name, other], interval) for kind in ["thread", "async"])
    for w in workers:
        w.ready()
    fresh = service
    if how == "setting deleted":
        service.delete_setting(name)
    else:
        port = service.port
        service.stop()
        fresh = HeksherService(context_features=FEATURES, port=port).start()
    try:
        deadline = time.monotonic() + 10
        while name not in fresh.settings:
            assert time.monotonic() < deadline, "the lost setting was not declared again"
            time.sleep(0.01)
        rule = fresh.add_rule(name, {"user": "alice"}, 42)
        for w in workers:
            assert w.ask("wait_value", name, {"user": "alice"}, 42, interval + 3) is not None
        fresh.set_rule_value(rule, 43)
        for w in workers:
            assert w.ask("wait_value", name, {"user": "alice"}, 43, interval + 3) is not None
        assert workers[0].ask("status").verdict == "ok"
    finally:
        if fresh is not service:
            fresh.stop()


class Recording(heksher.ThreadHeksherClient):
    """A thread client that remembers the failure its set_as_main logged."""

    failure: str | None = None

    def _report_wait(self, seq: int, what: str, timed_out: bool) -> None:
        error = None if timed_out else self._answers.error(seq, starting=False)
        self.failure = "timed out" if timed_out else (None if error is None else repr(error))
        super()._report_wait(seq, what, timed_out)


def test_two_hosts_racing_to_declare_a_new_setting(memory_service: HeksherService, tmp_path: Any) -> None:
    """Two hosts (two folders, two leaders) declare the same new setting at the same moment: the
    service answers one with a 500 (as a real Heksher does, a unique-key violation), and that leader
    tries again, gets ``uptodate``, and its set_as_main returns without an error."""
    name = unique("raced")
    race = memory_service.race_declarations(2, setting=name)
    outcomes: dict[str, str | None] = {}

    def host(label: str) -> None:
        keep = heksher.Setting(name, int, ["user"], 0)
        folder = tmp_path / label
        folder.mkdir(mode=0o700)
        client = Recording(memory_service.url, 60, FEATURES, shm_dir=folder)
        try:
            client.set_as_main()  # the thread client logs what fails: the recording keeps it
            outcomes[label] = client.failure
        finally:
            client.close()
        assert keep.get(user="x") == 0

    threads = [threading.Thread(target=host, args=(label,)) for label in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert race.wait(5)
    assert sorted(race.statuses) == [200, 500]
    assert outcomes == {"a": None, "b": None}
    assert memory_service.count(path="/api/v1/settings/declare") == 3  # one of them twice
