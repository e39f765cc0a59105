"""Worker processes for the multi-process tests (importable, so the spawn start method can run them).

A worker makes settings, starts a client of the asked kind, becomes main, and
then answers commands from the test over a pipe until told to exit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, ClassVar

import heksher_shm as heksher
from heksher_shm.status import segment_status

FEATURES = ["user", "theme", "environment"]


def _make(names: list[str], defaults: dict[str, int]) -> dict[str, heksher.Setting[int]]:
    return {name: heksher.Setting(name, int, ["user"], defaults.get(name, 0)) for name in names}


def _answer(cmd: tuple[Any, ...], settings: dict[str, heksher.Setting[int]], client: Any) -> Any:
    op = cmd[0]
    if op == "get":
        return settings[cmd[1]].get(**cmd[2])
    if op == "pid":
        return os.getpid()
    if op == "leading":
        return client._engine.leading
    if op == "status":
        return segment_status(client.segment_path)
    if op == "add":
        settings.update(_make([cmd[1]], {cmd[1]: cmd[2]}))
        return True
    if op == "step_clock":
        _step_wall_clock(3.0)
        return True
    if op == "watch":
        _Watch(settings[cmd[1]], cmd[2]).start()
        return True
    if op == "watched":
        return _Watch.report()
    if op == "stop_at":
        _stop_at(client, cmd[1])
        return True
    raise ValueError(f"unknown command {cmd!r}")


class _Watch(threading.Thread):
    """Reads a setting over and over and notes every time its value went down (it must never)."""

    seen: ClassVar[dict[str, Any]] = {"last": None, "highest": None, "reads": 0, "backwards": []}

    def __init__(self, setting: heksher.Setting[int], ctx: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self._setting, self._ctx = setting, ctx

    def run(self) -> None:
        seen = self.seen
        while True:
            value = self._setting.get(**self._ctx)
            last = seen["last"]
            if last is not None and value < last:
                seen["backwards"].append((last, value))
            seen["last"] = value
            seen["highest"] = value if seen["highest"] is None else max(seen["highest"], value)
            seen["reads"] += 1
            time.sleep(0.0005)

    @classmethod
    def report(cls) -> dict[str, Any]:
        return dict(cls.seen)


def _stop_at(client: Any, point: str) -> None:
    """Make this process stop itself (SIGSTOP) once, at *point* of its next publish: "publish" (the
    engine checked the lock and asked the host to publish), or a step inside the segment's publish
    (heksher_shm._shm.writing's crash points: "table", "claimed"...)."""
    from heksher_shm._shm import writing

    def stop() -> None:
        os.kill(os.getpid(), signal.SIGSTOP)

    if point == "publish":
        host = client._host
        real = host.publish

        def publish(*args: Any) -> int:
            host.publish = real
            stop()
            return int(real(*args))

        host.publish = publish
        return

    def crash_point(name: str) -> None:
        if name == point:
            writing._crash_point = None
            stop()

    writing._crash_point = crash_point


def _step_wall_clock(seconds: float) -> None:
    """Make this process's wall clock jump *seconds* ahead, as an NTP step would (the monotonic clock,
    which the kernel keeps for everyone, cannot be stepped from a test)."""
    real = time.time
    time.time = lambda: real() + seconds  # type: ignore[assignment]


def worker(
    conn: Connection, url: str, kind: str, names: list[str], interval: float, extra: dict[str, Any]
) -> None:
    """Serve commands until ("exit",)."""
    settings = _make(names, extra.get("defaults", {}))
    if kind == "thread":
        client = heksher.ThreadHeksherClient(url, interval, FEATURES, **extra.get("client", {}))
        client.track_contexts(**extra.get("track", {"user": heksher.TRACK_ALL}))
        try:
            client.set_as_main()
            conn.send(("ready", os.getpid()))
        except Exception as e:
            conn.send(("error", repr(e)))
        while True:
            cmd = conn.recv()
            if cmd[0] == "exit":
                client.close()
                conn.send("bye")
                return
            if cmd[0] == "reload":
                client.reload()
                conn.send(True)
                continue
            if cmd[0] == "wait_value":
                _, name, ctx, expected, timeout = cmd
                start = time.monotonic()
                while settings[name].get(**ctx) != expected and time.monotonic() - start < timeout:
                    time.sleep(0.001)
                ok = settings[name].get(**ctx) == expected
                conn.send(time.monotonic() - start if ok else None)
                continue
            conn.send(_answer(cmd, settings, client))
    else:
        asyncio.run(_async_worker(conn, url, names, interval, extra, settings))


async def _async_worker(
    conn: Connection,
    url: str,
    names: list[str],
    interval: float,
    extra: dict[str, Any],
    settings: dict[str, heksher.Setting[int]],
) -> None:
    loop = asyncio.get_running_loop()
    client = heksher.AsyncHeksherClient(url, interval, FEATURES, **extra.get("client", {}))
    client.track_contexts(**extra.get("track", {"user": heksher.TRACK_ALL}))
    try:
        await client.set_as_main()
        conn.send(("ready", os.getpid()))
    except Exception as e:
        conn.send(("error", repr(e)))
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd[0] == "exit":
            await client.aclose()
            conn.send("bye")
            return
        if cmd[0] == "reload":
            await client.reload()
            conn.send(True)
            continue
        if cmd[0] == "wait_value":
            _, name, ctx, expected, timeout = cmd
            start = loop.time()
            while settings[name].get(**ctx) != expected and loop.time() - start < timeout:
                await asyncio.sleep(0.001)
            ok = settings[name].get(**ctx) == expected
            conn.send(loop.time() - start if ok else None)
            continue
        conn.send(_answer(cmd, settings, client))
