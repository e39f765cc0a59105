"""The two drivers of the engine's effects are twins: the same effect scripts, the same transcripts.

Each script below is a generator like the engine: it yields effects and
writes down what it was sent back (or what was thrown in). Every script runs
through the blocking driver (``drive_sync``) and the asyncio driver
(``drive_async``) against a real service on 127.0.0.1, and the two
transcripts must be equal, and equal to what the script expects. A new
effect, or a driver that handles one differently, fails here first.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import select
import socket
import sys
import threading
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, get_args

import httpx
import pytest

from heksher_shm._engine import effects as fx
from heksher_shm._engine.drivers import LoopWaker, WakePipe, drive_async, drive_sync
from heksher_shm._engine.effects import (
    Apply,
    Beat,
    Call,
    Calls,
    Compute,
    Digest,
    Effect,
    GiveUpLead,
    HostEffect,
    Housekeep,
    Publish,
    Report,
    TakeLead,
    Wait,
)
from heksher_shm._engine.host import Host
from heksher_shm._engine.policy import BEAT_INTERVAL
from heksher_shm.exceptions import SegmentError

Script = Callable[["Transcript", "Setup"], Generator[Effect, Any, str]]
Transcript = list[object]

DEADLINE = 10 * BEAT_INTERVAL + 5


class Setup:
    """What the scripts of one run share: the service, a refused address, and a pipe to make readable."""

    def __init__(self, url: str, refused_url: str) -> None:
        self.url = url
        self.refused_url = refused_url
        self.read_fd, self.write_fd = os.pipe()
        self.host: ScriptHost
        """The host of the run in progress."""

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


class ScriptHost:
    """A host whose operations are written down (a :class:`heksher_shm._engine.host.Host` in part:
    what the scripts use). Its doorbell is a pipe the scripts can ring."""

    def __init__(self, log: Transcript) -> None:
        self.log = log
        self.bell_read, self.bell_write = os.pipe()
        os.set_blocking(self.bell_read, False)
        self.beaten = threading.Event()
        self.beats = 0

    def take_lead(self) -> int:
        self.log.append(("host", "take_lead"))
        return 7

    def give_up_lead(self) -> None:
        self.log.append(("host", "give_up_lead"))

    def beat(self, progress: float, promise: float) -> None:
        self.beats += 1
        self.beaten.set()

    def publish(self, head: bytes, blobs: Any, term: int) -> int:
        raise SegmentError(f"no room for term {term}")

    def bell_fd(self) -> int:
        return self.bell_read

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.bell_read, 64)

    def close(self) -> None:
        os.close(self.bell_read)
        os.close(self.bell_write)


def _outcome(result: object) -> object:
    """A transcript entry for a driver's answer: status codes and exception types, not objects."""
    if isinstance(result, httpx.Response):
        return ("response", result.status_code)
    if isinstance(result, BaseException):
        return ("error", type(result).__name__)
    if isinstance(result, list):
        return [_outcome(item) for item in result]
    return result


# -- the scripts ---------------------------------------------------------------------------------------------


def calls_script(log: Transcript, setup: Setup) -> Generator[Effect, Any, str]:
    log.append(_outcome((yield Call("GET", f"{setup.url}/api/health"))))
    log.append(_outcome((yield Call("GET", f"{setup.url}/api/v1/settings/no.such.setting"))))
    try:
        yield Call("GET", f"{setup.refused_url}/api/health")
    except httpx.ConnectError as error:
        log.append(_outcome(error))  # a transport error is thrown in, and the script goes on
    answers = yield Calls(
        [
            Call("GET", f"{setup.url}/api/health"),
            Call("GET", f"{setup.refused_url}/api/health"),
            Call("GET", f"{setup.url}/api/v1/settings/no.such.setting"),
        ],
        limit=2,
    )
    log.append(_outcome(answers))  # each call's own outcome, in order, none thrown
    log.append(_outcome((yield Calls([Call("GET", f"{setup.url}/api/health")], limit=4))))
    return "calls done"


def compute_script(log: Transcript, setup: Setup) -> Generator[Effect, Any, str]:
    log.append((yield Compute(lambda: 6 * 7)))
    try:
        yield Compute(lambda: int("not a number"))
    except ValueError as error:
        log.append(_outcome(error))
    fresh = yield Digest(httpx.Response(200, json={"settings": {}}, headers={"ETag": '"e"'}), 12.5)
    log.append((fresh.entries, fresh.etag, fresh.queried))  # a query's answer, digested
    return "compute done"


def wait_script(log: Transcript, setup: Setup) -> Generator[Effect, Any, str]:
    log.append((yield Wait(0.01)))  # a timeout: nothing fired
    log.append((yield Wait(0.01, setup.read_fd)))
    os.write(setup.write_fd, b"x")
    log.append((yield Wait(DEADLINE, setup.read_fd)))  # the leader's exit handle fired
    os.read(setup.read_fd, 1)
    return "wait done"


def bell_script(log: Transcript, setup: Setup) -> Generator[Effect, Any, str]:
    """The host's doorbell wakes a wait (which says no exit fired) and is drained by the driver."""
    host = setup.host
    os.write(host.bell_write, b"r")
    log.append((yield Wait(DEADLINE, setup.read_fd)))
    log.append((yield Wait(0.01)))  # drained: it does not wake the next wait
    return "bell done"


def host_script(log: Transcript, setup: Setup) -> Generator[Effect, Any, str]:
    """A host effect calls its one method on the driver's host (a quick one in place, even on a loop);
    a host error is thrown into the script like any other."""
    log.append((yield TakeLead()))
    yield Beat(1.0, 2.0)
    log.append(setup.host.beats)
    try:
        yield Publish(b"head", [b"blob"], 7)
    except SegmentError as error:
        log.append(_outcome(error))
    log.append((yield Housekeep()))
    return "host done"


def apply_report_script(log: Transcript, setup: Setup) -> Generator[Effect, Any, str]:
    sent = yield Apply(blocking=True, report=True, error=None)
    log.append(sent)  # Apply and Report send nothing back
    yield Report(None)
    yield Report(RuntimeError("the service failed"))
    return "apply done"


def failing_hook_script(log: Transcript, setup: Setup) -> Generator[Effect, Any, str]:
    try:
        yield Apply(blocking=False)  # the hooks below raise for a non-blocking apply
    except LookupError as error:
        log.append(_outcome(error))  # a hook's error is thrown into the script like any other
    return "hook error seen"


def beat_script(log: Transcript, setup: Setup) -> Generator[Effect, Any, str]:
    """A busy effect is beaten (the host's liveness words) while it runs, and no more once it ended."""
    host = setup.host
    log.append((yield Compute(lambda: host.beaten.wait(DEADLINE), busy=True)))  # returns once beaten
    seen = host.beats
    log.append((yield Wait(2.5 * BEAT_INTERVAL)))
    log.append(host.beats == seen)
    return "beats done"


def raising_script(log: Transcript, setup: Setup) -> Generator[Effect, Any, str]:
    yield Compute(lambda: None)
    raise KeyError("the engine itself failed")


SCRIPTS: dict[str, tuple[Script, list[object], str]] = {
    "calls": (
        calls_script,
        [
            ("response", 200),
            ("response", 404),
            ("error", "ConnectError"),
            [("response", 200), ("error", "ConnectError"), ("response", 404)],
            [("response", 200)],
        ],
        "calls done",
    ),
    "compute": (compute_script, [42, ("error", "ValueError"), ([], '"e"', 12.5)], "compute done"),
    "wait": (wait_script, [False, False, True], "wait done"),
    "bell": (bell_script, [False, False], "bell done"),
    "host": (
        host_script,
        [("host", "take_lead"), 7, 1, ("error", "SegmentError"), ("housekeep", True), True],
        "host done",
    ),
    "apply-report": (
        apply_report_script,
        [("apply", True, True), None, ("report", None), ("report", "RuntimeError")],
        "apply done",
    ),
    "failing-hook": (failing_hook_script, [("error", "LookupError")], "hook error seen"),
    "beat": (beat_script, [True, False, True], "beats done"),
}


# -- the two drivers' hooks, as thin as the clients' ---------------------------------------------------------


class SyncTestHooks:
    def __init__(self, log: Transcript, host: ScriptHost) -> None:
        self.log = log
        self.host: Host = host  # type: ignore[assignment]  # what the scripts use of one
        self.client = httpx.Client(timeout=DEADLINE)
        self.pools: dict[int, ThreadPoolExecutor] = {}
        self.waker = WakePipe()

    def http(self) -> httpx.Client:
        return self.client

    def pool(self, limit: int) -> ThreadPoolExecutor:
        return self.pools.setdefault(limit, ThreadPoolExecutor(limit))

    def wait(self, timeout: float | None, fds: tuple[int, ...]) -> set[int]:
        return self.waker.wait(timeout, fds)

    def apply(self, effect: Apply) -> None:
        if not effect.blocking:
            raise LookupError("refused by the test")
        self.log.append(("apply", effect.blocking, effect.report))

    def report(self, error: BaseException | None) -> None:
        self.log.append(("report", None if error is None else type(error).__name__))

    def housekeep(self) -> bool:
        self.log.append(("housekeep", True))
        return True

    def close(self) -> None:
        self.client.close()
        for pool in self.pools.values():
            pool.shutdown()
        self.waker.close()


class AsyncTestHooks:
    def __init__(self, log: Transcript, host: ScriptHost) -> None:
        self.log = log
        self.host: Host = host  # type: ignore[assignment]
        self.client = httpx.AsyncClient(timeout=DEADLINE)
        self.waker = LoopWaker(asyncio.get_running_loop())

    def http(self) -> httpx.AsyncClient:
        return self.client

    async def wait(self, timeout: float | None, fds: tuple[int, ...]) -> set[int]:
        return await self.waker.wait(timeout, fds)

    async def apply(self, effect: Apply) -> None:
        if not effect.blocking:
            raise LookupError("refused by the test")
        self.log.append(("apply", effect.blocking, effect.report))

    def report(self, error: BaseException | None) -> None:
        self.log.append(("report", None if error is None else type(error).__name__))

    def housekeep(self) -> bool:
        self.log.append(("housekeep", True))
        return True


def _closing() -> list[HostEffect]:
    return [GiveUpLead()]


def run_sync(script: Script, setup: Setup) -> tuple[Transcript, object]:
    log: Transcript = []
    setup.host = ScriptHost(log)
    hooks = SyncTestHooks(log, setup.host)
    try:
        result = drive_sync(script(log, setup), hooks, _closing)
    finally:
        hooks.close()
        setup.host.close()
    return log, result


def run_async(script: Script, setup: Setup) -> tuple[Transcript, object]:
    async def main() -> tuple[Transcript, object]:
        log: Transcript = []
        setup.host = ScriptHost(log)
        hooks = AsyncTestHooks(log, setup.host)
        try:
            result = await drive_async(script(log, setup), hooks, _closing)
        finally:
            await hooks.client.aclose()
            setup.host.close()
        return log, result

    return asyncio.run(main())


# -- the tests -----------------------------------------------------------------------------------------------


@pytest.fixture
def setup(service_url: str) -> Iterator[Setup]:
    with socket.socket() as placeholder:  # a port nobody listens on: connections are refused
        placeholder.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{placeholder.getsockname()[1]}"
    made = Setup(service_url.rstrip("/"), refused)
    yield made
    made.close()


@pytest.mark.parametrize("name", SCRIPTS)
def test_both_drivers_give_the_same_transcript(name: str, setup: Setup) -> None:
    script, expected, result = SCRIPTS[name]
    blocking = run_sync(script, setup)
    asynchronous = run_async(script, setup)
    assert blocking == asynchronous
    assert blocking == (expected, result)


def test_the_scripts_cover_every_effect() -> None:
    """Each kind of effect appears in some script (read from the scripts' code, not run); a host effect
    stands for all of them (each one is a call of one method, checked below)."""
    import inspect

    text = "".join(inspect.getsource(script) for script, _, _ in SCRIPTS.values())
    for kind in get_args(Effect):
        name = "TakeLead" if kind is HostEffect else kind.__name__
        assert f"{name}(" in text, f"no script yields {name}"


def test_each_host_effect_calls_the_host_method_it_names() -> None:
    """Every host effect is one call of a :class:`Host` method (what makes a simulated host enough)."""
    import inspect

    methods = {name for name, _ in inspect.getmembers(Host, inspect.isfunction)}
    for kind in HostEffect.__subclasses__():
        source = inspect.getsource(kind.perform)
        called = [m for m in methods if f"host.{m}(" in source]
        assert len(called) == 1, f"{kind.__name__}.perform calls {called}"
        assert kind.__name__ in fx.__all__


@pytest.mark.parametrize("run", [run_sync, run_async], ids=["sync", "async"])
def test_an_error_of_the_engine_itself_leaves_the_driver(run: Callable[..., Any], setup: Setup) -> None:
    """The engine's own error leaves the driver, which performs the closing effects on the way out."""
    closed: Transcript = []

    def raising(log: Transcript, setup: Setup) -> Generator[Effect, Any, str]:
        closed[:] = [log]
        return raising_script(log, setup)

    with pytest.raises(KeyError, match="the engine itself failed"):
        run(raising, setup)
    assert closed[0] == [("host", "give_up_lead")]


def test_a_cancelled_async_driver_closes_its_script(setup: Setup) -> None:
    """Cancelling the async driver (a client's ``aclose()``) runs the script's ``finally`` blocks; the
    blocking driver has no cancellation (its thread is woken and the script returns instead)."""
    closed = threading.Event()

    def waits_forever(log: Transcript, setup: Setup) -> Generator[Effect, Any, str]:
        try:
            yield Wait(None)
        finally:
            closed.set()
        return "unreachable"

    log: Transcript = []

    async def main() -> None:
        setup.host = ScriptHost(log)
        hooks = AsyncTestHooks(log, setup.host)
        task = asyncio.get_running_loop().create_task(drive_async(waits_forever([], setup), hooks, _closing))
        await asyncio.sleep(0)  # let it reach its wait
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await hooks.client.aclose()
        setup.host.close()

    asyncio.run(main())
    assert closed.is_set()
    assert log == [("host", "give_up_lead")]  # the closing effects were performed


def _payload(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


@pytest.fixture
def gzip_url() -> Iterator[str]:
    """A real HTTP server whose ``GET /<size>`` answers *size* bytes, gzip-encoded, with an ETag."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            compressed = gzip.compress(_payload(int(self.path.strip("/"))))
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(compressed)))
            self.send_header("ETag", '"v1"')
            self.end_headers()
            self.wfile.write(compressed)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(DEADLINE)


@pytest.mark.parametrize("size", [10, 4 << 20], ids=["small", "big"])
def test_a_body_arrives_decoded_and_whole(gzip_url: str, setup: Setup, size: int) -> None:
    """A gzip-encoded answer reaches the engine decoded, whole and with its ETag from both drivers,
    whether the asyncio driver joins it on the loop (small) or in a worker thread (big)."""

    def fetch(log: Transcript, setup: Setup) -> Generator[Effect, Any, str]:
        response = yield Call("GET", f"{gzip_url}/{size}")
        log.append((response.status_code, response.headers.get("ETag"), response.content == _payload(size)))
        response.raise_for_status()  # the answer still knows its request
        return "fetched"

    expected = ([(200, '"v1"', True)], "fetched")
    assert run_sync(fetch, setup) == expected
    assert run_async(fetch, setup) == expected


def test_a_real_thread_waits_in_the_kernels_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a monkey-patcher, a greenlet on the main OS thread waits in the patched ``select.poll``;
    a real OS thread (a client's thread restarted in a forked gunicorn ``--preload`` gevent worker
    before the worker patched) waits in the kernel's, not in a gevent hub of its own."""
    patched: list[str] = []
    kernel_poll = select.poll

    class PatchedPoll:
        def __init__(self) -> None:
            patched.append(threading.current_thread().name)
            self._real = kernel_poll()

        def register(self, fd: int, mask: int) -> None:
            self._real.register(fd, mask)

        def poll(self, timeout: int | None) -> list[tuple[int, int]]:
            return self._real.poll(timeout)

    monkeypatch.delitem(sys.modules, "gevent.monkey", raising=False)
    monkeypatch.setattr(select, "poll", PatchedPoll)
    pipe = WakePipe()
    try:
        pipe.wake()
        assert pipe.wait(DEADLINE, ()) == set()  # on the main thread: the patched poll
        assert patched == ["MainThread"]

        def in_a_thread() -> None:
            pipe.wake()
            pipe.wait(DEADLINE, ())

        thread = threading.Thread(target=in_a_thread, name="real")
        thread.start()
        thread.join(DEADLINE)
        assert not thread.is_alive()
        assert patched == ["MainThread"]  # the real thread never used it
    finally:
        pipe.close()


def test_the_main_os_thread_is_known_in_a_forked_child() -> None:
    """A forked child's main thread is its main OS thread (not the parent's, noted at import), and a
    thread it starts is not: signals stay unblocked where the application handles them."""
    from heksher_shm._process.threads import on_main_os_thread

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            seen: list[bool] = []
            thread = threading.Thread(target=lambda: seen.append(on_main_os_thread()))
            thread.start()
            thread.join(DEADLINE)
            code = 0 if on_main_os_thread() and seen == [False] else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert on_main_os_thread()
