"""Worker processes for the OpenFeature and metrics tests (importable: the spawn start method runs them).

A worker makes its settings, starts a client of the asked kind, becomes main,
sets :class:`heksher_shm.openfeature.HeksherProvider` as the OpenFeature
provider (through the SDK's own API) and records the provider's events; then
it answers commands from the test over a pipe until told to exit.
"""

from __future__ import annotations

import asyncio
import enum
import os
import threading
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

from openfeature import api
from openfeature.evaluation_context import EvaluationContext
from openfeature.event import EventDetails, ProviderEvent

import heksher_shm as heksher
from tests._support import FEATURES


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


TYPES: dict[str, Any] = {
    "int": int,
    "str": str,
    "float": float,
    "bool": bool,
    "seq_int": Sequence[int],
    "map_int": Mapping[str, int],
    "color": Color,
}
"""The setting types a spec may name."""

Spec = tuple[str, str, list[str], Any]
"""A setting to make: (name, a key of TYPES, configurable features, default)."""


def set_provider(provider: Any) -> None:
    """``api.set_provider_and_wait`` (openfeature-sdk 0.10); before 0.10, ``set_provider`` waits itself."""
    getattr(api, "set_provider_and_wait", api.set_provider)(provider)


def make_settings(specs: list[Spec]) -> dict[str, heksher.Setting[Any]]:
    return {
        name: heksher.Setting(name, TYPES[kind], features, default) for name, kind, features, default in specs
    }


class Recorder:
    """The provider's events, as the SDK hands them to handlers (in its own threads)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, list[str] | None, str | None]] = []
        self.changed = threading.Condition()
        for event in ProviderEvent:
            api.add_handler(event, self._handler(event))

    def _handler(self, event: ProviderEvent) -> Any:
        def handle(details: EventDetails) -> None:
            with self.changed:
                self.events.append((event.value, details.flags_changed, details.message))
                self.changed.notify_all()

        return handle

    def wait(self, name: str, count: int, timeout: float) -> list[tuple[str, list[str] | None, str | None]]:
        """The events recorded once *count* of kind *name* are (or after *timeout*: what there is)."""
        with self.changed:
            self.changed.wait_for(lambda: sum(e[0] == name for e in self.events) >= count, timeout)
            return list(self.events)


def describe(details: Any) -> dict[str, Any]:
    """The fields of a FlagEvaluationDetails, picklable."""
    return {
        "value": details.value,
        "reason": None if details.reason is None else str(details.reason),
        "error_code": None if details.error_code is None else str(details.error_code),
        "error_message": details.error_message,
        "variant": details.variant,
        "flag_metadata": dict(details.flag_metadata),
    }


def _context(targeting_key: str | None, attributes: dict[str, Any] | None) -> EvaluationContext | None:
    if targeting_key is None and attributes is None:
        return None
    return EvaluationContext(targeting_key, attributes or {})


def worker(
    conn: Connection, url: str, kind: str, specs: list[Spec], interval: float, extra: dict[str, Any]
) -> None:
    """Serve commands until ("exit",)."""
    for name, value in extra.get("env", {}).items():
        os.environ[name] = value
    settings = make_settings(specs)
    if kind == "thread":
        _thread_worker(conn, url, interval, extra, settings)
    else:
        asyncio.run(_async_worker(conn, url, interval, extra, settings))


def _start_provider() -> Recorder:
    from heksher_shm.openfeature import HeksherProvider

    recorder = Recorder()
    set_provider(HeksherProvider())
    return recorder


def _common(cmd: tuple[Any, ...], client: Any, recorder: Recorder) -> Any:
    op = cmd[0]
    if op == "pid":
        return os.getpid()
    if op == "leading":
        return client.leading
    if op == "wait_event":
        _, name, count, timeout = cmd
        return recorder.wait(name, count, timeout)
    if op == "metrics":
        import prometheus_client

        from heksher_shm.metrics import HeksherCollector

        if not getattr(client, "_test_collector", False):
            prometheus_client.REGISTRY.register(HeksherCollector())
            client._test_collector = True
        return prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    raise ValueError(f"unknown command {cmd!r}")


def _thread_worker(
    conn: Connection, url: str, interval: float, extra: dict[str, Any], settings: dict[str, Any]
) -> None:
    client = heksher.ThreadHeksherClient(url, interval, FEATURES)
    client.track_contexts(**extra.get("track", {"user": heksher.TRACK_ALL}))
    client.set_as_main()
    recorder = _start_provider()
    conn.send(("ready", os.getpid()))
    sdk = api.get_client()
    while True:
        cmd = conn.recv()
        if cmd[0] == "exit":
            client.close()
            conn.send("bye")
            return
        if cmd[0] == "reload":
            client.reload()
            conn.send(True)
        elif cmd[0] == "eval":
            _, resolver, key, default, targeting_key, attributes = cmd
            method = getattr(sdk, f"get_{resolver}_details")
            conn.send(describe(method(key, default, _context(targeting_key, attributes))))
        else:
            conn.send(_common(cmd, client, recorder))


async def _async_worker(
    conn: Connection, url: str, interval: float, extra: dict[str, Any], settings: dict[str, Any]
) -> None:
    loop = asyncio.get_running_loop()
    client = heksher.AsyncHeksherClient(url, interval, FEATURES)
    client.track_contexts(**extra.get("track", {"user": heksher.TRACK_ALL}))
    await client.set_as_main()
    recorder = _start_provider()
    conn.send(("ready", os.getpid()))
    sdk = api.get_client()
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd[0] == "exit":
            await client.aclose()
            conn.send("bye")
            return
        if cmd[0] == "reload":
            await client.reload()
            conn.send(True)
        elif cmd[0] == "eval":
            _, resolver, key, default, targeting_key, attributes = cmd
            method = getattr(sdk, f"get_{resolver}_details_async")
            conn.send(describe(await method(key, default, _context(targeting_key, attributes))))
        elif cmd[0] == "wait_event":
            conn.send(await loop.run_in_executor(None, _common, cmd, client, recorder))
        else:
            conn.send(_common(cmd, client, recorder))
