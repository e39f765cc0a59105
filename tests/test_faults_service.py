"""Service faults, measured: the in-memory Heksher misbehaves; two client processes (a leader and a
follower, one of each kind) keep the last good values, report the error, and recover within one update
interval of the service healing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from heksher_shm.testing import Fault, HeksherService
from tests._fault_workers import Counter, FaultWorker, drain_all, percentile, reaping, stress_seconds
from tests._support import unique

QUERY = "/api/v1/query"
INTERVAL = 0.3
TIMEOUT = 0.5
"""The clients' httpx timeout (``http_client_args={"timeout": TIMEOUT}``)."""

Heal = Callable[[], None]


def _inject(fault: Fault) -> Callable[[HeksherService], Heal]:
    def apply(service: HeksherService) -> Heal:
        service.inject_fault(fault, path=QUERY)
        return service.clear_faults

    return apply


def _refuse(service: HeksherService) -> Heal:
    service.stop()  # connections are refused until it starts again, on the same port
    return service.start  # type: ignore[return-value]


# (fault, what the leader's on_update_error receives)
FAILURES: dict[str, tuple[Callable[[HeksherService], Heal], str]] = {
    "500": (_inject(Fault(status=500)), "HTTPStatusError"),
    "503": (_inject(Fault(status=503)), "HTTPStatusError"),
    "timeout": (_inject(Fault(delay=TIMEOUT * 4)), "ReadTimeout"),
    "connection refused": (_refuse, "ConnectError"),
    "dropped connection": (_inject(Fault.dropped_connection()), "RemoteProtocolError"),
    "truncated body": (_inject(Fault.truncated_body()), "RemoteProtocolError"),
    "malformed JSON": (_inject(Fault.malformed_body()), "HeksherProtocolError"),
    "wrong shape": (_inject(Fault.wrong_shape()), "HeksherProtocolError"),
    "wrong shape inside": (_inject(Fault.wrong_shape({"settings": {"x": [1, 2]}})), "HeksherProtocolError"),
}


def _pair(service: HeksherService, leader_kind: str, workers: list[FaultWorker]) -> tuple[str, int]:
    """A counter setting, and a leader of ``leader_kind`` then a follower of the other kind in ``workers``."""
    name = unique("svc")
    service.declare(name, "int", -1, ["user"])
    rule = service.add_rule(name, {"user": "alice"}, 0)
    extra = {"client": {"http_client_args": {"timeout": TIMEOUT}}}
    for kind in (leader_kind, "async" if leader_kind == "thread" else "thread"):
        workers.append(FaultWorker(service.url, kind, [(name, "int", -1)], INTERVAL, **extra).ready())
    assert workers[0].ask("leading")
    return name, rule


def _until_errors(workers: list[FaultWorker], expected: list[str], timeout: float) -> None:
    """Wait until each worker's ``on_update_error`` has received an error naming its ``expected`` type.

    Earlier errors of another type are allowed: a service that stops while a kept-alive connection is
    open fails the request in flight with ``RemoteProtocolError`` before new connections are refused.
    """
    deadline = time.monotonic() + timeout
    while not all(any(want in e for e in w.seen.errors) for w, want in zip(workers, expected, strict=True)):
        assert time.monotonic() < deadline, f"expected {expected}, got {[w.seen.errors for w in workers]}"
        drain_all(workers, 0.05)


def _check_clean(workers: list[FaultWorker], values: set[int]) -> None:
    for w in workers:
        assert w.seen.values <= values, f"{w} served {w.seen.values - values}"
        assert w.seen.backwards == 0, w.seen.problems
        assert w.seen.exceptions == 0, w.seen.problems
        assert w.process.exitcode == 0, w


@pytest.mark.parametrize("leader_kind", ["thread", "async"])
@pytest.mark.parametrize("fault", list(FAILURES))
def test_failing_service(service: HeksherService, fault: str, leader_kind: str) -> None:
    apply, error_type = FAILURES[fault]
    workers: list[FaultWorker] = []
    with reaping(workers):
        name, rule = _pair(service, leader_kind, workers)
        leader, follower = workers
        heal = apply(service)
        healed = False
        try:
            service.set_rule_value(rule, 1)
            # Followers learn of the leader's failure through the segment (LeaderUpdateError).
            _until_errors(workers, [error_type, "LeaderUpdateError"], INTERVAL + TIMEOUT * 4 + 3)
            for w in workers:
                assert w.ask("get", name) == 0, f"{w} lost the last good value"
            assert follower.ask("status")["last_error"], "the failure is not in the status"
            heal()
            healed = True
            t0 = time.monotonic()
            delays = [w.ask("wait_value", 1, INTERVAL + TIMEOUT + 3) for w in workers]
            recovered = time.monotonic() - t0
        finally:
            if not healed:
                heal()
        assert all(d is not None for d in delays), delays
        assert leader.ask("status")["verdict"] == "ok"
    _check_clean(workers, {0, 1})
    print(f"{fault} ({leader_kind} leader): recovered {recovered * 1000:.0f} ms after the service healed")
    # The next update is due at most one interval after the failed one (plus the client's timeout
    # when the failure was a timeout in flight).
    assert recovered < INTERVAL + TIMEOUT + 0.5


@pytest.mark.parametrize("leader_kind", ["thread", "async"])
def test_lying_etag(service: HeksherService, leader_kind: str) -> None:
    """The service answers 304 to the tag it handed out although the rules changed: nothing looks wrong,
    so values stay as they were (and no error is reported) until the service tells the truth again."""
    workers: list[FaultWorker] = []
    with reaping(workers):
        name, rule = _pair(service, leader_kind, workers)
        service.inject_fault(Fault.wrong_etag(), path=QUERY)
        service.set_rule_value(rule, 1)  # served whole, with the lying tag
        for w in workers:
            assert w.ask("wait_value", 1, INTERVAL + 2) is not None
        service.set_rule_value(rule, 2)
        seen = service.count(path=QUERY)
        assert service.wait_for_requests(seen + 3, path=QUERY, timeout=10)  # three 304s to the lie
        for w in workers:
            assert w.ask("get", name) == 1
        service.clear_faults()
        t0 = time.monotonic()
        for w in workers:
            assert w.ask("wait_value", 2, INTERVAL + 2) is not None
        recovered = time.monotonic() - t0
        drain_all(workers, 0.1)
        assert all(not w.seen.errors for w in workers)
    _check_clean(workers, {0, 1, 2})
    print(f"lying ETag ({leader_kind} leader): recovered {recovered * 1000:.0f} ms after the truth returned")
    assert recovered < INTERVAL + 0.5


@pytest.mark.parametrize("leader_kind", ["thread", "async"])
def test_huge_body(service: HeksherService, leader_kind: str) -> None:
    """An 8 MB answer that names none of the settings: read and survived; rules it lacks are kept."""
    workers: list[FaultWorker] = []
    with reaping(workers):
        name, rule = _pair(service, leader_kind, workers)
        service.inject_fault(Fault.huge_body(), path=QUERY)
        service.set_rule_value(rule, 1)
        seen = service.count(path=QUERY)
        assert service.wait_for_requests(seen + 2, path=QUERY, timeout=10)
        for w in workers:
            assert w.ask("get", name) == 0
        service.clear_faults()
        t0 = time.monotonic()
        for w in workers:
            assert w.ask("wait_value", 1, INTERVAL + 2) is not None
        recovered = time.monotonic() - t0
    _check_clean(workers, {0, 1})
    print(f"huge body ({leader_kind} leader): recovered {recovered * 1000:.0f} ms after the service healed")
    assert recovered < INTERVAL + 0.5


@pytest.mark.stress
@pytest.mark.timeout(stress_seconds(30) + 180)
def test_flaky_service_long(service: HeksherService) -> None:
    """For HEKSHER_STRESS_SECONDS, a third of the queries fail in a random way while the value counts up
    and four processes read: never a wrong or older value, errors reported, and every process catches up
    once the service heals."""
    seconds = stress_seconds(30)
    name = unique("flaky")
    service.declare(name, "int", -1, ["user"])
    rule = service.add_rule(name, {"user": "alice"}, 0)
    extra = {"client": {"http_client_args": {"timeout": TIMEOUT}}}
    workers = [
        FaultWorker(service.url, ("thread", "async")[i % 2], [(name, "int", -1)], INTERVAL, **extra)
        for i in range(4)
    ]
    faults = [
        Fault(status=500),
        Fault(status=503),
        Fault(delay=TIMEOUT * 2),
        Fault.dropped_connection(),
        Fault.truncated_body(),
        Fault.malformed_body(),
        Fault.wrong_shape(),
    ]
    with reaping(workers):
        for w in workers:
            w.ready()
        seed = int(time.time())
        share = 0.33 / len(faults)
        for i, fault in enumerate(faults):
            # The first fault that applies wins: this makes each one hit `share` of all queries.
            service.inject_fault(fault, path=QUERY, probability=share / (1 - i * share), seed=seed + i)
        counter = Counter(service, rule, period=0.1).start()
        try:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                drain_all(workers, 0.1)
        finally:
            counter.stop()
            service.clear_faults()
        final = counter.bump()
        for w in workers:
            assert w.ask("wait_value", final, INTERVAL + TIMEOUT + 2) is not None
        failed = sum(1 for r in service.requests if r.path == QUERY and r.fault is not None)
        total = service.count(path=QUERY)
    errors = sum(len(w.seen.errors) for w in workers)
    lags = [counter.lag(m, last) for w in workers for m, last, _ in w.seen.reports]
    print(
        f"flaky service: {seconds:.0f} s, {failed} of {total} queries failed; {errors} on_update_error calls "
        f"in 4 processes; {sum(w.seen.reads for w in workers)} get() calls; staleness p99 "
        f"{percentile(lags, 0.99) * 1000:.0f} ms"
    )
    _check_clean(workers, set(range(final + 1)))
    assert errors > 0
