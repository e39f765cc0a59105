"""Client processes for the fault tests, and the test's side of them.

A *fault worker* is a real process with a real client (thread or async) that
serves ``Setting.get()`` continuously, the way a prefork worker would, and
checks what it gets: the watched setting's value is a counter that only goes
up on the service, so a value lower than one seen before in the same process
is a regression, and a value the service never had is garbage. The worker
streams what it saw over its own pipe every :data:`REPORT_EVERY` seconds, so
the observations of a process that is SIGKILLed later are not lost, and
answers commands from the test over a second pipe.

Workers fork from a forkserver that has already imported this module and the
package, so a replacement process starts in milliseconds rather than the
second a fresh interpreter needs. A forkserver child inherits the server's
environment, not the test's: everything a worker needs (shared folder,
service URL) is passed explicitly.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import heksher_shm as heksher
from heksher_shm._engine import policy as _policy
from heksher_shm._shm import writing
from heksher_shm._shm.identity import current_identity
from heksher_shm._shm.segment import Segment
from heksher_shm.exceptions import SegmentCorruptedError
from heksher_shm.status import segment_status

FEATURES = ["user", "theme", "environment"]
CONTEXT = {"user": "alice"}
"""The context every reader asks for."""

REPORT_EVERY = 0.05
"""Seconds between two reports of a worker."""

BATCH = 50
"""``get()`` calls per batch of a reader."""

PACE = 0.002
"""Seconds a reader rests between batches. This paces the load (eight readers share two cores with the
leader and the service) and synchronises nothing."""

SERVER = multiprocessing.get_context("forkserver")
SERVER.set_forkserver_preload(["tests._fault_workers"])


# ---------------------------------------------------------------------------------------------------------
# The worker process


@dataclass
class _Callbacks:
    """What the client's ``on_update_ok`` / ``on_update_error`` saw."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    oks: int = 0
    errors: list[str] = field(default_factory=list)


class _LogCounter(logging.Handler):
    """Keeps the warnings and errors the package logged in this process."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.messages.append(f"{record.name}: {record.getMessage()}")


class _Reader:
    """Calls ``get()`` in batches and keeps the counts the worker reports."""

    def __init__(self, setting: heksher.Setting[int], client: Any) -> None:
        self.setting = setting
        self.client = client
        self.lock = threading.Lock()
        self.reads = 0
        self.backwards = 0
        self.exceptions = 0
        self.first_problem: str | None = None
        self.high: int | None = None
        self.last: int | None = None
        self.seen: set[int] = set()
        self.new_values: set[int] = set()
        self.leading: bool | None = None
        self.events: list[tuple[str, float]] = []
        self.stopped = False

    def batch(self) -> None:
        reads = backwards = exceptions = 0
        values: set[int] = set()
        problem = None
        get = self.setting.get
        for _ in range(BATCH):
            try:
                value = get(**CONTEXT)
            except Exception:
                exceptions += 1
                problem = problem or traceback.format_exc()
                continue
            reads += 1
            if self.high is not None and value < self.high:
                backwards += 1
                problem = problem or f"value {value} after {self.high}"
            elif self.high is None or value > self.high:
                self.high = value
            self.last = value
            values.add(value)
        leading = bool(self.client._engine.leading)
        with self.lock:
            self.reads += reads
            self.backwards += backwards
            self.exceptions += exceptions
            self.first_problem = self.first_problem or problem
            fresh = values - self.seen
            self.seen |= fresh
            self.new_values |= fresh
            if leading != self.leading:
                # a change of role: "lead" (took over) or "follow" (stepped down)
                if self.leading is not None:
                    self.events.append(("lead" if leading else "follow", time.monotonic()))
                self.leading = leading

    def run_in_thread(self) -> None:
        while not self.stopped:
            self.batch()
            time.sleep(PACE)  # pacing, see PACE

    async def run_in_task(self) -> None:
        while not self.stopped:
            self.batch()
            await asyncio.sleep(PACE)  # pacing, see PACE

    def report(self, client: Any, callbacks: _Callbacks) -> dict[str, Any]:
        with self.lock:
            report = {
                "reads": self.reads,
                "backwards": self.backwards,
                "exceptions": self.exceptions,
                "problem": self.first_problem,
                "values": sorted(self.new_values),
                "events": self.events,
                "last": self.last,
                "mono": time.monotonic(),
            }
            self.reads = self.backwards = self.exceptions = 0
            self.first_problem = None
            self.new_values = set()
            self.events = []
        with callbacks.lock:
            report["oks"] = callbacks.oks
            report["errors"] = list(callbacks.errors)
            callbacks.oks = 0
            callbacks.errors.clear()
        report["leading"] = client._engine.leading
        return report


def _reporter(
    reader: _Reader, client: Any, callbacks: _Callbacks, out: Connection, stop: threading.Event
) -> None:
    while not stop.wait(REPORT_EVERY):
        try:
            out.send(reader.report(client, callbacks))
        except (OSError, ValueError):
            return


def _make_settings(spec: dict[str, Any]) -> dict[str, heksher.Setting[Any]]:
    settings: dict[str, heksher.Setting[Any]] = {}
    for name, type_name, default in spec["settings"]:
        type_ = {"int": int, "str": str}[type_name]
        settings[name] = heksher.Setting(name, type_, ["user"], default)
    return settings


def _client(spec: dict[str, Any], callbacks: _Callbacks) -> Any:
    base: type[Any] = heksher.ThreadHeksherClient if spec["kind"] == "thread" else heksher.AsyncHeksherClient

    class Client(base):  # type: ignore[misc, valid-type]
        def on_update_ok(self) -> None:
            with callbacks.lock:
                callbacks.oks += 1

        def on_update_error(self, exc: Exception) -> None:
            with callbacks.lock:
                callbacks.errors.append(f"{type(exc).__name__}: {exc}")

    client = Client(
        spec["url"], spec["interval"], FEATURES, shm_dir=spec["shm_dir"], **spec.get("client", {})
    )
    client.track_contexts(user=heksher.TRACK_ALL)
    return client


def _die_at(step: str) -> Callable[[str], None]:
    def crash_point(name: str) -> None:
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)

    return crash_point


_real_fallocate = os.posix_fallocate


def _full_disk(fd: int, offset: int, length: int) -> None:
    """``posix_fallocate`` on a full disk: growing fails with ENOSPC, space already held is fine."""
    if offset + length > os.fstat(fd).st_size:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    _real_fallocate(fd, offset, length)


@dataclass
class _Context:
    spec: dict[str, Any]
    client: Any
    settings: dict[str, heksher.Setting[Any]]
    reader: _Reader
    logs: _LogCounter


def _answer(cmd: tuple[Any, ...], ctx: _Context) -> Any:
    op = cmd[0]
    client = ctx.client
    if op == "get":
        return ctx.settings[cmd[1]].get(**CONTEXT)
    if op == "leading":
        return client._engine.leading
    if op == "status":
        status = segment_status(client.segment_path)
        return {
            "verdict": status.verdict,
            "leader": status.leader.pid if status.leader else None,
            "generation": status.generation,
            "last_error": status.last_error,
            "error_count": status.error_count,
            "processes": sorted(p.pid for p in status.processes),
        }
    if op == "segment_path":
        return client.segment_path
    if op == "registration":
        return str(client._parts.registry.path_for(current_identity()))
    if op == "arm":
        writing._crash_point = _die_at(cmd[1])
        return True
    if op == "disk_full":
        os.posix_fallocate = _full_disk if cmd[1] else _real_fallocate  # type: ignore[assignment]
        return True
    if op == "logs":
        return [m for m in ctx.logs.messages if cmd[1] in m]
    raise ValueError(f"unknown command {cmd!r}")


def client_worker(commands: Connection, reports: Connection, spec: dict[str, Any]) -> None:
    """The body of a fault worker: start a client, become main, read, report, answer until ("exit",)."""
    if "umask" in spec:
        os.umask(spec["umask"])
    if "verify_interval" in spec:
        # Only to keep the default test run short; the stress runs measure the real interval.
        _policy.VERIFY_INTERVAL = spec["verify_interval"]
    logs = _LogCounter()
    package_logger = logging.getLogger("heksher_shm")
    package_logger.addHandler(logs)
    stderr = logging.StreamHandler()
    stderr.setLevel(logging.WARNING)
    stderr.setFormatter(logging.Formatter(f"[worker {os.getpid()}] %(name)s %(levelname)s %(message)s"))
    package_logger.addHandler(stderr)
    settings = _make_settings(spec)
    callbacks = _Callbacks()
    if spec["kind"] == "thread":
        _thread_main(commands, reports, spec, settings, callbacks, logs)
    else:
        asyncio.run(_async_main(commands, reports, spec, settings, callbacks, logs))


def _start_reporting(ctx: _Context, callbacks: _Callbacks, reports: Connection) -> threading.Event:
    stop = threading.Event()
    threading.Thread(
        target=_reporter, args=(ctx.reader, ctx.client, callbacks, reports, stop), daemon=True
    ).start()
    return stop


def _thread_main(
    commands: Connection,
    reports: Connection,
    spec: dict[str, Any],
    settings: dict[str, heksher.Setting[Any]],
    callbacks: _Callbacks,
    logs: _LogCounter,
) -> None:
    try:
        client = _client(spec, callbacks)
        client.set_as_main()
    except Exception as e:
        commands.send(("error", f"{type(e).__name__}: {e}"))
        return
    ctx = _Context(spec, client, settings, _Reader(settings[spec["watch"]], client), logs)
    threading.Thread(target=ctx.reader.run_in_thread, daemon=True).start()
    stop = _start_reporting(ctx, callbacks, reports)
    commands.send(("ready", os.getpid()))
    while True:
        cmd = commands.recv()
        op = cmd[0]
        try:
            if op == "exit":
                ctx.reader.stopped = True
                stop.set()
                client.close()
                commands.send("bye")
                return
            if op == "reload":
                client.reload()  # logs, never raises
                answer: Any = None
            elif op == "wait_value":
                answer = _wait_value(ctx.reader, cmd[1], cmd[2])
            else:
                answer = _answer(cmd, ctx)
        except Exception as e:
            answer = ("exception", f"{type(e).__name__}: {e}")
        commands.send(answer)


def _wait_value(reader: _Reader, value: int, timeout: float) -> float | None:
    """Seconds until the reader served ``value`` or a later one (polled under a deadline), else None."""
    start = time.monotonic()
    while reader.last is None or reader.last < value:
        if time.monotonic() - start > timeout:
            return None
        time.sleep(0.001)
    return time.monotonic() - start


async def _async_main(
    commands: Connection,
    reports: Connection,
    spec: dict[str, Any],
    settings: dict[str, heksher.Setting[Any]],
    callbacks: _Callbacks,
    logs: _LogCounter,
) -> None:
    loop = asyncio.get_running_loop()
    try:
        client = _client(spec, callbacks)
        await client.set_as_main()
    except Exception as e:
        commands.send(("error", f"{type(e).__name__}: {e}"))
        return
    ctx = _Context(spec, client, settings, _Reader(settings[spec["watch"]], client), logs)
    task = loop.create_task(ctx.reader.run_in_task())
    stop = _start_reporting(ctx, callbacks, reports)
    commands.send(("ready", os.getpid()))
    while True:
        cmd = await loop.run_in_executor(None, commands.recv)
        op = cmd[0]
        try:
            if op == "exit":
                ctx.reader.stopped = True
                stop.set()
                await task
                await client.aclose()
                commands.send("bye")
                return
            if op == "reload":
                try:
                    await client.reload()
                    answer: Any = None
                except Exception as e:
                    answer = f"{type(e).__name__}: {e}"
            elif op == "wait_value":
                answer = await _await_value(ctx.reader, cmd[1], cmd[2])
            else:
                answer = _answer(cmd, ctx)
        except Exception as e:
            answer = ("exception", f"{type(e).__name__}: {e}")
        commands.send(answer)


async def _await_value(reader: _Reader, value: int, timeout: float) -> float | None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while reader.last is None or reader.last < value:
        if loop.time() - start > timeout:
            return None
        await asyncio.sleep(0.001)
    return loop.time() - start


# ---------------------------------------------------------------------------------------------------------
# The test's side


@dataclass
class Seen:
    """Everything one worker reported, summed."""

    reads: int = 0
    backwards: int = 0
    exceptions: int = 0
    problems: list[str] = field(default_factory=list)
    values: set[int] = field(default_factory=set)
    events: list[tuple[str, float]] = field(default_factory=list)
    oks: int = 0
    errors: list[str] = field(default_factory=list)
    reports: list[tuple[float, int | None, bool]] = field(default_factory=list)
    """(monotonic time, last value served, leading) per report."""

    def add(self, report: dict[str, Any]) -> None:
        self.reads += report["reads"]
        self.backwards += report["backwards"]
        self.exceptions += report["exceptions"]
        if report["problem"]:
            self.problems.append(report["problem"])
        self.values.update(report["values"])
        self.events.extend(report["events"])
        self.oks += report["oks"]
        self.errors.extend(report["errors"])
        self.reports.append((report["mono"], report["last"], report["leading"]))


class FaultWorker:
    """A fault worker process and the test's ends of its two pipes."""

    def __init__(
        self,
        url: str,
        kind: str,
        settings: list[tuple[str, str, Any]],
        interval: float,
        *,
        shm_dir: str | None = None,
        watch: str | None = None,
        **extra: Any,
    ) -> None:
        self.kind = kind
        self.commands, child_commands = SERVER.Pipe()
        self.reports, child_reports = SERVER.Pipe(duplex=False)
        spec = {
            "url": url,
            "kind": kind,
            "settings": settings,
            "watch": watch or settings[0][0],
            "interval": interval,
            "shm_dir": shm_dir or os.environ["HEKSHER_SHM_DIR"],
            **extra,
        }
        self.process = SERVER.Process(target=client_worker, args=(child_commands, child_reports, spec))
        self.process.daemon = True
        self.process.start()
        child_commands.close()
        child_reports.close()
        self.pid = self.process.pid
        self.seen = Seen()
        self.is_ready = False
        self.startup_error: str | None = None
        self.ended = False  # the report pipe reached its end

    def __repr__(self) -> str:
        return f"<FaultWorker {self.kind} pid={self.pid}>"

    def poll_ready(self, timeout: float = 0.0) -> bool:
        """Whether the worker said it is ready (waiting up to ``timeout``); a startup error is kept."""
        if self.is_ready or self.startup_error is not None:
            return self.is_ready
        try:
            if not self.commands.poll(timeout):
                return False
            status, detail = self.commands.recv()
        except (EOFError, OSError):
            self.startup_error = "died before it was ready"
            return False
        if status == "ready":
            self.is_ready = True
        else:
            self.startup_error = str(detail)
        return self.is_ready

    def ready(self, timeout: float = 30) -> FaultWorker:
        deadline = time.monotonic() + timeout
        while not self.poll_ready(0.05):
            assert self.startup_error is None, f"{self} failed to start: {self.startup_error}"
            assert time.monotonic() < deadline, f"{self} not ready within {timeout}s"
        return self

    def refused(self, timeout: float = 30) -> str:
        """The error the worker failed to start with (asserting that it did not start)."""
        deadline = time.monotonic() + timeout
        while self.startup_error is None:
            assert not self.poll_ready(0.05), f"{self} started"
            assert time.monotonic() < deadline, f"{self} neither started nor failed within {timeout}s"
        return self.startup_error

    def ask(self, *cmd: Any, timeout: float = 30) -> Any:
        self.commands.send(cmd)
        assert self.commands.poll(timeout), f"{self}: no answer to {cmd}"
        answer = self.commands.recv()
        if isinstance(answer, tuple) and answer and answer[0] == "exception":
            raise AssertionError(f"{self}: {cmd} raised {answer[1]}")
        return answer

    def drain(self) -> None:
        """Take in every report waiting in the pipe."""
        while not self.ended:
            try:
                if not self.reports.poll():
                    return
                self.seen.add(self.reports.recv())
            except (EOFError, OSError):
                # The end of the pipe, or a report cut short by SIGKILL: nothing more will come.
                self.ended = True

    def drain_to_end(self, timeout: float = 10) -> None:
        """After the process died: take in its last reports, up to the end of the pipe."""
        deadline = time.monotonic() + timeout
        while not self.ended and time.monotonic() < deadline:
            if self.reports.poll(0.05):
                self.drain()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid or 0, sig)
        self.process.join(10)
        self.drain_to_end()

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def stop(self) -> None:
        """Exit cleanly if possible, else kill; always reaped."""
        if self.process.is_alive():
            with contextlib.suppress(Exception):
                os.kill(self.pid or 0, signal.SIGCONT)  # in case a test left it stopped
            if self.is_ready:
                with contextlib.suppress(AssertionError, OSError, EOFError, ValueError):
                    self.commands.send(("exit",))
                    self.commands.poll(10)
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)
        self.drain_to_end(timeout=2)
        for conn in (self.commands, self.reports):
            conn.close()


def drain_all(workers: Iterable[FaultWorker], timeout: float) -> None:
    """Wait up to ``timeout`` for a report from any worker, then take in every waiting report."""
    open_ = {w.reports: w for w in workers if not w.ended}
    if not open_:
        return
    for conn in wait(list(open_), timeout):
        open_[conn].drain()  # type: ignore[index]


@contextlib.contextmanager
def reaping(workers: list[FaultWorker]) -> Iterator[list[FaultWorker]]:
    """Stop (or kill) and reap every worker in the list on the way out, whatever happened."""
    try:
        yield workers
    finally:
        for w in workers:
            w.stop()


class Counter:
    """Moves one rule's value up by one every ``period`` seconds, in a thread, and remembers when."""

    def __init__(self, service: Any, rule: int, period: float, start: int = 0) -> None:
        self.service = service
        self.rule = rule
        self.period = period
        self.value = start
        self.set_at: dict[int, float] = {start: time.monotonic()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Counter:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.bump()

    def bump(self) -> int:
        value = self.value + 1
        # Recorded before the service has it: a reader can never be seen ahead of the record.
        self.set_at[value] = time.monotonic()
        self.service.set_rule_value(self.rule, value)
        self.value = value
        return value

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def lag(self, mono: float, last: int | None) -> float:
        """How stale ``last`` was at ``mono``: time since a newer value was set (0 when none was)."""
        if last is None:
            return 0.0
        newer = self.set_at.get(last + 1)
        return max(0.0, mono - newer) if newer is not None and newer < mono else 0.0


def stress_seconds(default: float) -> float:
    """How long a stress test runs: ``HEKSHER_STRESS_SECONDS``, else ``default``.

    Stress tests also pass it to ``pytest.mark.timeout``, so a longer run is not cut at the suite's
    default per-test timeout.
    """
    return float(os.environ.get("HEKSHER_STRESS_SECONDS") or default)


def percentile(values: list[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``values`` lie (nearest rank); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


# ---------------------------------------------------------------------------------------------------------
# Segment-level processes for the crash-point test: payloads named by a token, readers that check them


def token_payload(token: int, big: bool = False) -> tuple[bytes, list[bytes]]:
    """The head and blobs published under ``token``: every byte derives from it, so a mix shows."""
    head = f"token={token};".encode() * 40
    size = 300_000 if big else 1_000
    blobs = []
    for index in range(6):
        unit = f"[{token}:{index}]".encode()
        blobs.append((unit * (size // len(unit) + 1))[: size + index])
    return head, blobs


def check_token_snapshot(segment: Segment) -> tuple[str, int | None]:
    """Read the current snapshot and check it byte for byte: (outcome, token).

    Outcomes: ``ok``, ``none`` (nothing published), ``moved`` (republished while reading),
    ``corrupt`` (the reader reported corruption), ``torn`` (a verified copy that is not what was
    published under its token: must never happen).
    """
    try:
        head = segment.read_head()
        if head is None:
            return "none", None
        blobs = segment.read_blobs(head.generation, range(head.blob_count))
    except SegmentCorruptedError:
        return "corrupt", None
    if blobs is None:
        return "moved", None
    label = head.head.split(b";", 1)[0]
    if not label.startswith(b"token=") or not label[6:].isdigit():
        return "torn", None
    token = int(label[6:])
    small, big = token_payload(token), token_payload(token, big=True)
    # A token is published either small or big; each snapshot must be exactly one of the two.
    if (head.head, blobs) not in ((small[0], small[1]), (big[0], big[1])):
        return "torn", token
    return "ok", token


def segment_reader(path: str, conn: Connection) -> None:
    """Read and check snapshots in a loop; answer ("checkpoint", n) after n more reads, stop on ("exit",)."""
    counts = {"ok": 0, "none": 0, "moved": 0, "corrupt": 0, "torn": 0, "errors": 0}
    tokens: set[int] = set()
    state: dict[str, Any] = {"last": None, "problem": None}

    def read_once(segment: Segment) -> None:
        try:
            outcome, token = check_token_snapshot(segment)
        except Exception:
            outcome, token = "errors", None
            state["problem"] = state["problem"] or traceback.format_exc()
        counts[outcome] += 1
        if outcome == "ok" and token is not None:
            state["last"] = token
            tokens.add(token)
        elif outcome == "torn":
            state["problem"] = state["problem"] or f"torn snapshot (token {token})"

    def summary() -> dict[str, Any]:
        return {"counts": dict(counts), "tokens": sorted(tokens), **state}

    with Segment.open(path, create=False) as segment:
        conn.send("ready")
        while True:
            read_once(segment)
            if conn.poll():
                cmd = conn.recv()
                if cmd[0] == "exit":
                    conn.send(summary())
                    return
                for _ in range(cmd[1]):
                    read_once(segment)
                conn.send(summary())


def doomed_publish(path: str, step: str, token: int) -> None:
    """Publish a big snapshot under ``token`` and SIGKILL this process at ``step`` of the publish."""
    writing._crash_point = _die_at(step)
    with Segment.open(path) as segment:
        segment.publish(*token_payload(token, big=True))
    # Reaching this line means the step was never passed: the test sees exit code 0 and fails.
