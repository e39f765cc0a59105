"""Worker processes driven from tests over a pipe (spawn start method), and fixtures for them."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from heksher_shm.testing import HeksherService
from tests._support import FEATURES
from tests._workers import worker

SPAWN = multiprocessing.get_context("spawn")


class Worker:
    """A worker process and the test's end of its pipe: *target* (by default
    :func:`tests._workers.worker`) runs in it, as ``target(conn, url, kind, what, interval, extra)``."""

    def __init__(
        self,
        url: str,
        kind: str,
        what: list[Any],
        interval: float,
        *,
        target: Callable[..., None] = worker,
        **extra: Any,
    ) -> None:
        self.conn, child = SPAWN.Pipe()
        self.kind = kind
        self.process = SPAWN.Process(
            target=target, args=(child, url, kind, what, interval, extra), daemon=True
        )
        self.process.start()
        child.close()
        self.pid: int | None = None

    def ready(self, timeout: float = 30) -> Worker:
        assert self.conn.poll(timeout), "worker did not start"
        status, detail = self.conn.recv()
        assert status == "ready", detail
        self.pid = detail
        return self

    def ask(self, *cmd: Any, timeout: float = 30) -> Any:
        self.conn.send(cmd)
        assert self.conn.poll(timeout), f"no answer to {cmd}"
        return self.conn.recv()

    def kill(self) -> None:
        assert self.process.pid is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)

    def stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(AssertionError, OSError, EOFError):
                self.ask("exit", timeout=10)
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for w in started:
        w.stop()


@pytest.fixture
def service() -> Iterator[HeksherService]:
    with HeksherService(context_features=FEATURES) as svc:
        yield svc


def leaders_of(ws: list[Worker]) -> list[Worker]:
    """The live workers that lead (normally one)."""
    return [w for w in ws if w.process.is_alive() and w.ask("leading")]
