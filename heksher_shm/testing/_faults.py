"""Faults and request records of the in-memory service: what to break, and what was asked.

:class:`Fault` says how to misbehave, :class:`InjectedFault` is one installed in a :class:`FaultTable`
(which the socket server consults on every request), and :class:`RequestRecord` is one request, kept in
a :class:`RequestLog` that tests can wait on.  Nothing here touches sockets or the store.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Fault", "FaultKind", "FaultTable", "InjectedFault", "RequestLog", "RequestRecord"]

FaultKind = Literal[
    "status",
    "delay",
    "malformed_body",
    "truncated_body",
    "dropped_connection",
    "wrong_shape",
    "huge_body",
    "wrong_etag",
]
"""What a :class:`Fault` does; see :class:`Fault`."""


@dataclass(frozen=True)
class Fault:
    """A way for the service to misbehave on a request; give it to :meth:`HeksherService.inject_fault`.

    ``Fault(status=500)`` answers 500 (with ``body``, or the status phrase as text) without touching the
    state; ``Fault(delay=2.0)`` waits, then serves the request normally (``delay`` also combines with
    every other kind).  The other kinds have constructors:

    * :meth:`malformed_body`: 200 with a body that is not JSON; the request is not served.
    * :meth:`truncated_body`: the request is served, but only half of the response body is sent
      after a ``Content-Length`` for all of it, then the connection is closed.
    * :meth:`dropped_connection`: the connection is closed without any response; not served.
    * :meth:`wrong_shape`: 200 with valid JSON of the wrong shape; not served.
    * :meth:`huge_body`: 200 with a valid JSON object of about ``size`` bytes; not served.
    * :meth:`wrong_etag` ("the ETag lies"): served normally, but the query endpoint sends ``etag`` instead
      of the body's digest *and* compares ``If-None-Match`` against it, so a client holding that tag gets
      a 304 although the rules changed.
    """

    status: int | None = None
    body: bytes | str | Mapping[str, Any] | Sequence[Any] | None = None
    delay: float = 0.0
    kind: FaultKind | None = None
    etag: str = '"0123456789abcdef0123456789abcdef"'
    size: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.kind is None:
            if self.status is not None:
                inferred: FaultKind = "status"
            elif self.delay > 0:
                inferred = "delay"
            else:
                raise ValueError("a Fault needs a status, a delay or a kind")
            object.__setattr__(self, "kind", inferred)
        if self.kind == "status" and self.status is None:
            raise ValueError("a status fault needs a status")
        if self.delay < 0:
            raise ValueError("delay must not be negative")

    @classmethod
    def malformed_body(cls, body: bytes = b'{"settings": {"truncated', *, delay: float = 0.0) -> Fault:
        """200 with ``body``, which is not valid JSON."""
        return cls(kind="malformed_body", body=body, delay=delay)

    @classmethod
    def truncated_body(cls, *, delay: float = 0.0) -> Fault:
        """Serve the request but send only half of the body promised by ``Content-Length``, then close."""
        return cls(kind="truncated_body", delay=delay)

    @classmethod
    def dropped_connection(cls, *, delay: float = 0.0) -> Fault:
        """Close the connection without answering."""
        return cls(kind="dropped_connection", delay=delay)

    @classmethod
    def wrong_shape(
        cls, body: Mapping[str, Any] | Sequence[Any] = ("not", "an", "object"), *, delay: float = 0.0
    ) -> Fault:
        """200 with ``body`` as JSON: valid JSON that no endpoint answers (a list by default)."""
        return cls(kind="wrong_shape", body=body, delay=delay)

    @classmethod
    def huge_body(cls, size: int = 8 * 1024 * 1024, *, delay: float = 0.0) -> Fault:
        """200 with a valid JSON object of about ``size`` bytes."""
        return cls(kind="huge_body", size=size, delay=delay)

    @classmethod
    def wrong_etag(cls, etag: str = '"0123456789abcdef0123456789abcdef"', *, delay: float = 0.0) -> Fault:
        """Serve normally but claim ``etag`` (quotes included) for the query result, and honour it."""
        return cls(kind="wrong_etag", etag=etag, delay=delay)


@dataclass(frozen=True)
class RequestRecord:
    """One request the service received.

    ``query`` holds the last value of each query parameter and ``query_string`` the raw query;
    ``status`` is the status sent (``None`` when the connection was dropped); ``time`` is the
    :func:`time.monotonic` reading when the request was read; ``fault`` names the injected fault applied.
    """

    method: str
    path: str
    query: Mapping[str, str]
    query_string: str
    status: int | None
    time: float
    fault: FaultKind | None = None


class InjectedFault:
    """A fault installed by :meth:`HeksherService.inject_fault`; ``remove()`` uninstalls it."""

    def __init__(
        self,
        table: FaultTable,
        fault: Fault,
        *,
        count: int | None,
        method: str | None,
        path: str | re.Pattern[str] | None,
        probability: float,
        seed: int | None,
    ) -> None:
        self.fault = fault
        """The fault applied."""
        self.method = method.upper() if method else None
        """Only requests with this method are affected (any when ``None``)."""
        self.path = path
        """Only requests to this path (exact string, or a pattern matched in full) are affected."""
        self.probability = probability
        """The chance that a matching request is affected."""
        self.remaining = count
        """How many more requests will be affected (``None``: no limit)."""
        self.triggered = 0
        """How many requests were affected so far."""
        self._table = table
        self._random = random.Random(seed)

    def matches(self, method: str, path: str) -> bool:
        """Whether a request is in scope (the probability is not consulted)."""
        if self.method is not None and method != self.method:
            return False
        if self.path is None:
            return True
        if isinstance(self.path, str):
            return path == self.path
        return self.path.fullmatch(path) is not None

    def remove(self) -> None:
        """Uninstall the fault (nothing happens when it is already gone)."""
        self._table.remove(self)

    def _roll(self) -> bool:
        return self.probability >= 1.0 or self._random.random() < self.probability


class FaultTable:
    """The installed faults, first installed first; shared by the service and its handler threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[InjectedFault] = []

    def install(
        self,
        fault: Fault,
        *,
        count: int | None = None,
        method: str | None = None,
        path: str | re.Pattern[str] | None = None,
        probability: float = 1.0,
        seed: int | None = None,
    ) -> InjectedFault:
        """Install ``fault`` for the requests in scope; see :meth:`HeksherService.inject_fault`."""
        if not 0.0 <= probability <= 1.0:
            raise ValueError("probability must be between 0 and 1")
        if count is not None and count < 1:
            raise ValueError("count must be positive")
        injected = InjectedFault(
            self, fault, count=count, method=method, path=path, probability=probability, seed=seed
        )
        with self._lock:
            self._faults.append(injected)
        return injected

    def remove(self, injected: InjectedFault) -> None:
        """Uninstall one fault (nothing happens when it is already gone)."""
        with self._lock:
            if injected in self._faults:
                self._faults.remove(injected)

    def clear(self) -> None:
        """Uninstall every fault."""
        with self._lock:
            self._faults.clear()

    def pick(self, method: str, path: str) -> Fault | None:
        """The fault to apply to a request, counting it as triggered; ``None`` to serve it normally."""
        with self._lock:
            for injected in self._faults:
                if not injected.matches(method, path) or not injected._roll():
                    continue
                injected.triggered += 1
                if injected.remaining is not None:
                    injected.remaining -= 1
                    if injected.remaining <= 0:
                        self._faults.remove(injected)
                return injected.fault
        return None


class RequestLog:
    """The requests received, oldest first, with a condition that tests wait on.

    Counting is by (method, path, status) key, so :meth:`count` and a waiter woken by each new request
    cost the number of distinct keys, not the number of requests recorded (a test that sends 100k
    requests while another thread waits would otherwise pay for all of them on every one).
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._requests: list[RequestRecord] = []
        self._counts: dict[tuple[str, str, int | None], int] = {}

    def append(self, record: RequestRecord) -> None:
        """Record one request and wake the waiters."""
        key = (record.method, record.path, record.status)
        with self._changed:
            self._requests.append(record)
            self._counts[key] = self._counts.get(key, 0) + 1
            self._changed.notify_all()

    def snapshot(self) -> list[RequestRecord]:
        """A copy of the records."""
        with self._changed:
            return list(self._requests)

    def count(self, method: str | None = None, path: str | None = None, status: int | None = None) -> int:
        """How many records match the method, path and status given (``None`` matches any)."""
        with self._changed:
            return self._count(method, path, status)

    def wait_for(
        self, count: int, method: str | None, path: str | None, status: int | None, timeout: float
    ) -> bool:
        """Block until at least ``count`` records match; ``False`` on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._count(method, path, status) >= count, timeout)

    def clear(self) -> None:
        """Forget every record."""
        with self._changed:
            self._requests.clear()
            self._counts.clear()

    def _count(self, method: str | None, path: str | None, status: int | None) -> int:
        if method is None and path is None and status is None:
            return len(self._requests)
        wanted_method = None if method is None else method.upper()
        return sum(
            number
            for (record_method, record_path, record_status), number in self._counts.items()
            if (wanted_method is None or record_method == wanted_method)
            and (path is None or record_path == path)
            and (status is None or record_status == status)
        )
