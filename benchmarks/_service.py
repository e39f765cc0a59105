"""The Heksher service both sides talk to: the in-memory one, or a real Heksher at ``HEKSHER_TEST_URL``.

Both sides of every case use the same :class:`BenchService`, with the same
settings and rules. It runs in the runner process. It seeds settings and rules,
changes rule values, and counts the requests that reach it (the in-memory
service records them itself; for a real Heksher the requests of counted cases
go through a small counting proxy in front of it).
"""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs

import httpx

QUERY_PATH = "/api/v1/query"
DECLARE_PATH = "/api/v1/settings/declare"
CONTEXT_FEATURES = ("user", "theme", "environment")

Rule = tuple[str, Mapping[str, str], Any]
"""(setting name, conditions, value)"""


class BenchService:
    """One service for the whole run."""

    url: str
    """Where clients connect (uncounted for a real Heksher)."""
    kind: str
    """``in-memory`` or ``HEKSHER_TEST_URL``."""
    prefix: str
    """Put in front of every setting name: unique per run against a real service, empty in memory."""

    def counted_url(self) -> str:
        """Where clients connect when their requests must be counted."""
        raise NotImplementedError

    def times(self, method: str, path: str) -> list[float]:
        """``time.monotonic()`` of every counted request with this method and path, oldest first."""
        raise NotImplementedError

    def request_count(self) -> int:
        """How many counted requests (any method and path) reached the service so far."""
        raise NotImplementedError

    def queries(self) -> list[tuple[float, str]]:
        """``(time.monotonic(), settings parameter)`` of every counted query request, oldest first.

        The ``settings`` parameter tells which host asked when each host tracks a setting of its own.
        """
        raise NotImplementedError

    def last_request_time(self) -> float | None:
        """``time.monotonic()`` of the latest counted request, None before the first."""
        raise NotImplementedError

    def wait_quiet(self, quiet: float, timeout: float) -> bool:
        """Wait until no counted request arrived for ``quiet`` seconds; False if not within ``timeout``.

        Quiet since the latest request, which may be before the call. Checks the
        count every 50 ms: cheap next to the service's own work.
        """
        now = time.monotonic()
        deadline = now + timeout
        count, last = self.request_count(), self.last_request_time()
        since = now if last is None else last
        while True:
            now = time.monotonic()
            if now - since >= quiet:
                return True
            if now >= deadline:
                return False
            time.sleep(min(0.05, max(0.0, deadline - now)))
            latest = self.request_count()
            if latest != count:
                count, since = latest, time.monotonic()

    def adopt(self, names: Iterable[str]) -> None:
        """Settings that clients declared themselves: deleted with the others at :meth:`close`."""

    def fail_queries(self, status: int, delay: float = 0.0) -> None:
        """An outage: answer every counted ``GET /api/v1/query`` with *status*, after *delay* seconds.

        Each request is judged when it arrives; until :meth:`heal`, nothing of it is served.
        """
        raise NotImplementedError

    def heal(self) -> None:
        """End an outage of :meth:`fail_queries` (nothing happens if none is going on)."""
        raise NotImplementedError

    def wait_for_next(self, method: str, path: str, timeout: float) -> float | None:
        """Wait for the next counted request with this method and path; its time, or None on timeout."""
        seen = len(self.times(method, path))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            times = self.times(method, path)
            if len(times) > seen:
                return times[seen]
            time.sleep(0.0005)
        return None

    def declare(self, name: str, type: str, default: Any, features: Sequence[str]) -> None:
        raise NotImplementedError

    def add_rules(self, rules: Iterable[Rule]) -> list[int]:
        raise NotImplementedError

    def set_rule_value(self, rule_id: int, value: Any) -> None:
        raise NotImplementedError

    def set_rule_values(self, changes: Iterable[tuple[int, Any]]) -> None:
        for rule_id, value in changes:
            self.set_rule_value(rule_id, value)

    def close(self) -> None:
        raise NotImplementedError


class InMemoryService(BenchService):
    """heksher_shm.testing.HeksherService in the runner process."""

    kind = "in-memory"
    prefix = ""

    def __init__(self) -> None:
        from heksher_shm.testing import HeksherService

        self._service = HeksherService(context_features=CONTEXT_FEATURES).start()
        self.url = self._service.url

    def counted_url(self) -> str:
        return self.url

    def times(self, method: str, path: str) -> list[float]:
        return [r.time for r in self._service.requests if r.method == method and r.path == path]

    def request_count(self) -> int:
        return self._service.count()

    def queries(self) -> list[tuple[float, str]]:
        return [
            (r.time, r.query.get("settings", ""))
            for r in self._service.requests
            if r.method == "GET" and r.path == QUERY_PATH
        ]

    def last_request_time(self) -> float | None:
        # Records are kept in the order requests were answered: the latest read is among the last few.
        return max((r.time for r in self._service.requests[-64:]), default=None)

    def fail_queries(self, status: int, delay: float = 0.0) -> None:
        from heksher_shm.testing import Fault

        self._service.inject_fault(Fault(status=status, delay=delay), method="GET", path=QUERY_PATH)

    def heal(self) -> None:
        self._service.clear_faults()

    def wait_for_next(self, method: str, path: str, timeout: float) -> float | None:
        # The service's own condition variable: no polling that would compete with its threads.
        seen = self._service.count(method=method, path=path)
        if not self._service.wait_for_requests(seen + 1, method=method, path=path, timeout=timeout):
            return None
        return self.times(method, path)[seen]

    def declare(self, name: str, type: str, default: Any, features: Sequence[str]) -> None:
        self._service.declare(name, type, default, list(features))

    def add_rules(self, rules: Iterable[Rule]) -> list[int]:
        # The public admin helper: it costs what one rule costs, however many the service holds.
        return [
            self._service.add_rule(setting, dict(conditions), value) for setting, conditions, value in rules
        ]

    def set_rule_value(self, rule_id: int, value: Any) -> None:
        self._service.set_rule_value(rule_id, value)

    def close(self) -> None:
        self._service.stop()


class RemoteService(BenchService):
    """A real Heksher (``HEKSHER_TEST_URL``), seeded over its HTTP API, with a counting proxy for counts."""

    kind = "HEKSHER_TEST_URL"

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.prefix = f"b{uuid.uuid4().hex[:4]}_"
        self._http = httpx.Client(base_url=self.url, timeout=120)
        self._http.get("/api/health").raise_for_status()
        self._declared: list[str] = []
        self._proxy: _CountingProxy | None = None

    def counted_url(self) -> str:
        if self._proxy is None:
            self._proxy = _CountingProxy(self.url)
        return self._proxy.url

    def times(self, method: str, path: str) -> list[float]:
        return [] if self._proxy is None else self._proxy.times(method, path)

    def request_count(self) -> int:
        return 0 if self._proxy is None else self._proxy.count()

    def queries(self) -> list[tuple[float, str]]:
        return [] if self._proxy is None else self._proxy.queries()

    def last_request_time(self) -> float | None:
        return None if self._proxy is None else self._proxy.last()

    def fail_queries(self, status: int, delay: float = 0.0) -> None:
        # The counting proxy answers in the service's place: only counted requests see the outage.
        self.counted_url()
        assert self._proxy is not None
        self._proxy.failing = (status, delay)

    def heal(self) -> None:
        if self._proxy is not None:
            self._proxy.failing = None

    def adopt(self, names: Iterable[str]) -> None:
        known = set(self._declared)
        self._declared.extend(n for n in names if n not in known)

    def declare(self, name: str, type: str, default: Any, features: Sequence[str]) -> None:
        body = {
            "name": name,
            "configurable_features": list(features),
            "type": type,
            "default_value": default,
            "metadata": {},
            "version": "1.0",
        }
        self._http.post(DECLARE_PATH, json=body).raise_for_status()
        self._declared.append(name)

    def add_rules(self, rules: Iterable[Rule]) -> list[int]:
        ids = []
        for setting, conditions, value in rules:
            body = {"setting": setting, "feature_values": dict(conditions), "value": value, "metadata": {}}
            response = self._http.post("/api/v1/rules", json=body)
            response.raise_for_status()
            ids.append(int(response.json()["rule_id"]))
        return ids

    def set_rule_value(self, rule_id: int, value: Any) -> None:
        self._http.put(f"/api/v1/rules/{rule_id}/value", json={"value": value}).raise_for_status()

    def close(self) -> None:
        # Leave the real service as we found it: the settings of this run go, and their rules with them.
        for name in self._declared:
            with contextlib.suppress(httpx.HTTPError):
                self._http.delete(f"/api/v1/settings/{name}")
        self._http.close()
        if self._proxy is not None:
            self._proxy.close()


def open_service(url: str | None = None) -> BenchService:
    """The real Heksher at *url* or else at ``HEKSHER_TEST_URL`` if set, else a fresh in-memory service."""
    url = url or os.environ.get("HEKSHER_TEST_URL")
    return RemoteService(url) if url else InMemoryService()


class _CountingProxy:
    """A forwarding HTTP proxy that records (method, path, time, query) of every request it passes on.

    While :attr:`failing` is ``(status, delay)``, it answers query requests itself: *status*
    after *delay* seconds, without passing them on (an outage, for :meth:`BenchService.fail_queries`).
    """

    def __init__(self, upstream: str) -> None:
        records: list[tuple[str, str, float, str]] = []
        lock = threading.Lock()
        local = threading.local()
        proxy = self
        self.failing: tuple[int, float] | None = None

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _fail(self, status: int, delay: float, received: float) -> None:
                time.sleep(delay)
                with lock:
                    records.append((self.command, QUERY_PATH, received, self.path.partition("?")[2]))
                content = b"Internal Server Error" if status == 500 else f"Error {status}".encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def _forward(self) -> None:
                received = time.monotonic()
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                failing = proxy.failing
                if failing is not None and self.command == "GET" and self.path.split("?", 1)[0] == QUERY_PATH:
                    self._fail(*failing, received)
                    return
                http_client = getattr(local, "client", None)
                if http_client is None:
                    http_client = local.client = httpx.Client(base_url=upstream, timeout=120)
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")
                }
                response = http_client.request(self.command, self.path, content=body, headers=headers)
                with lock:
                    path, _, query = self.path.partition("?")
                    records.append((self.command, path, received, query))
                content = response.content
                self.send_response(response.status_code)
                for name, value in response.headers.items():
                    if name.lower() not in ("content-length", "transfer-encoding", "content-encoding"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._records = records
        self._lock = lock
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def times(self, method: str, path: str) -> list[float]:
        with self._lock:
            return [t for m, p, t, _ in self._records if m == method and p == path]

    def count(self) -> int:
        with self._lock:
            return len(self._records)

    def last(self) -> float | None:
        with self._lock:
            return max((t for _, _, t, _ in self._records[-64:]), default=None)

    def queries(self) -> list[tuple[float, str]]:
        with self._lock:
            found = [(t, q) for m, p, t, q in self._records if m == "GET" and p == QUERY_PATH]
        return [(t, parse_qs(q).get("settings", [""])[-1]) for t, q in found]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
