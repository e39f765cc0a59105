"""Helpers shared by the client tests: a uniform facade over both clients, and service admin over HTTP."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

import heksher_shm as heksher

FEATURES = ["user", "theme", "environment"]
REAL_URL = os.environ.get("HEKSHER_TEST_URL")


def unique(prefix: str) -> str:
    """A setting name no other test (or earlier run against a persistent server) uses."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def poke(path: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes of a file in place, as a stray process would (never truncating it)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def peek(path: Path, offset: int, size: int) -> bytes:
    """Read raw bytes of a file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


class Admin:
    """Sets rules up over HTTP, so the same test runs against the in-memory service or a real one."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10)

    def add_rule(self, setting: str, feature_values: Mapping[str, str], value: Any) -> int:
        response = self.http.post(
            "/api/v1/rules", json={"setting": setting, "feature_values": dict(feature_values), "value": value}
        )
        assert response.status_code == 201, response.text
        return int(response.json()["rule_id"])

    def set_value(self, rule_id: int, value: Any) -> None:
        response = self.http.put(f"/api/v1/rules/{rule_id}/value", json={"value": value})
        assert response.status_code == 204, response.text

    def delete_rule(self, rule_id: int) -> None:
        response = self.http.delete(f"/api/v1/rules/{rule_id}")
        assert response.status_code == 204, response.text

    def declare(self, name: str, type_: str, default: Any, features: list[str], version: str = "1.0") -> Any:
        response = self.http.post(
            "/api/v1/settings/declare",
            json={
                "name": name,
                "configurable_features": features,
                "type": type_,
                "default_value": default,
                "metadata": {},
                "version": version,
            },
        )
        return response.json()

    def close(self) -> None:
        self.http.close()


class Driver:
    """Both clients behind one awaitable facade, so one test body covers both."""

    def __init__(self, kind: str, url: str, update_interval: float = 60, **kwargs: Any) -> None:
        kind, _, unshared = kind.partition("-")
        if unshared:
            kwargs.setdefault("shared", False)
        self.kind = kind
        self.updates_ok = threading.Event()
        self.ok_times: list[float] = []  # time.monotonic() of each on_update_ok
        self.errors: list[Exception] = []
        driver = self

        base: type[Any] = heksher.AsyncHeksherClient if kind == "async" else heksher.ThreadHeksherClient

        class Client(base):  # type: ignore[misc, valid-type]
            def on_update_ok(self) -> None:
                driver.ok_times.append(time.monotonic())
                driver.updates_ok.set()

            def on_update_error(self, exc: Exception) -> None:
                driver.errors.append(exc)

        self.client = Client(url, update_interval, FEATURES, **kwargs)

    async def _call(self, name: str) -> Any:
        method = getattr(self.client, name)
        if self.kind == "async":
            return await method()
        return await asyncio.to_thread(method)

    async def set_as_main(self) -> None:
        await self._call("set_as_main")

    async def reload(self) -> None:
        await self._call("reload")

    async def close(self) -> None:
        await self._call("aclose" if self.kind == "async" else "close")

    async def ping(self) -> None:
        await self._call("ping")

    async def get_settings(self) -> Any:
        return await self._call("get_settings")

    async def wait_update(self, timeout: float = 10) -> None:
        """Wait for the next successful update after this call."""
        self.updates_ok.clear()
        assert await asyncio.to_thread(self.updates_ok.wait, timeout), "no update within the deadline"


async def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Wait for *predicate* under a deadline (checked each event loop turn, no fixed sleeps)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.005)
