"""Runner-side helpers for the load cases: the service's CPU time, and hosts that start together.

:class:`ServiceCpu` reads how much CPU the service has used: for the in-memory service, the runner
process's own CPU time (the service's threads run there; the runner's main thread only waits while a
case measures); for a real Heksher on this machine, the CPU time of the process listening on its port
(and its children) plus the PostgreSQL backends that serve its database connections. A real Heksher
on another machine cannot be read: the CPU columns then say n/a.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any
from urllib.parse import urlsplit

__all__ = ["ServiceCpu"]

_LOCAL = {"127.0.0.1", "localhost", "::1"}


class ServiceCpu:
    """CPU seconds used by the service so far (:meth:`read`); ``None`` where it cannot be read."""

    def __init__(self, service: Any) -> None:
        self.kind = service.kind
        self.what = "the runner process (the in-memory service)"
        self._port: int | None = None
        if service.kind != "in-memory":
            parts = urlsplit(service.url)
            self._port = parts.port or (443 if parts.scheme == "https" else 80)
            local = parts.hostname in _LOCAL
            self.what = "the server and its PostgreSQL backends" if local else "n/a (not on this machine)"
            if not local:
                self._port = None

    def read(self) -> float | None:
        """CPU seconds (user + system) used so far by the service's processes."""
        if self.kind == "in-memory":
            return time.process_time()
        if self._port is None:
            return None
        import psutil

        processes = _server_processes(psutil, self._port)
        if not processes:
            return None
        total = 0.0
        for process in processes + _database_backends(psutil, processes):
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
        return total


def _server_processes(psutil: Any, port: int) -> list[Any]:
    """The process listening on *port*, and its children (uvicorn's workers)."""
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
            with contextlib.suppress(psutil.Error):
                server = psutil.Process(connection.pid)
                return [server, *server.children(recursive=True)]
    return []


def _database_backends(psutil: Any, servers: list[Any]) -> list[Any]:
    """The processes at the other end of the servers' TCP connections on this machine (PostgreSQL's
    backends: one per pooled connection), matched by both ends of each connection."""
    pids = {process.pid for process in servers}
    ends = set()
    for process in servers:
        with contextlib.suppress(psutil.Error):
            for connection in process.net_connections(kind="tcp"):
                if connection.raddr and connection.status == psutil.CONN_ESTABLISHED:
                    ends.add((tuple(connection.raddr), tuple(connection.laddr)))
    backends = {}
    for connection in psutil.net_connections(kind="tcp"):
        if not connection.pid or connection.pid in pids or not connection.raddr:
            continue
        if (tuple(connection.laddr), tuple(connection.raddr)) in ends:
            with contextlib.suppress(psutil.Error):
                backends[connection.pid] = psutil.Process(connection.pid)
    return list(backends.values())
