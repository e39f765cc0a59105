"""``heksher-shm demo``: several processes, one poller, and a leader killed on the way.

The demo process starts the in-memory Heksher service (a thread here) and N
worker processes, alternately with a :class:`~heksher_shm.ThreadHeksherClient`
and an :class:`~heksher_shm.AsyncHeksherClient`, all sharing one segment.
Every worker serves one setting and reports, as JSON lines on its stdout,
whenever the value it serves or its leadership changes. The demo then goes
through a fixed script, at fixed fractions of ``duration``:

1. add a rule, and wait until every worker serves it;
2. change the rule's value, and wait again;
3. SIGKILL the leader, and time the takeover (the new leader's pid appears
   in the segment header the moment it holds the election lock);
4. change the value once more, and wait for the survivors;
5. print a summary: each worker's value, and how many queries and
   declarations the service saw compared with what N separate clients
   would have sent.

Any step that misses its deadline fails the demo (exit code 1) with a
message naming the worker and what it serves instead. Workers are stopped by
closing their stdin, so they also go away if the demo itself is killed.

Run a worker alone with ``python -m heksher_shm.cli.demo --worker KIND URL INTERVAL SEGMENT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, TextIO

from heksher_shm._shm.segment import ENV_SHM_DIR, Segment, resolve_shm_dir
from heksher_shm.cli.common import EXIT_OK, EXIT_UNHEALTHY, EXIT_UNREADABLE, EXIT_USAGE, CliError
from heksher_shm.exceptions import SegmentError

__all__ = ["run_demo"]

SETTING = "rate_limit"
DEFAULT = 100
USER = "demo"
FEATURES = ["user", "theme", "environment"]
VALUES = (200, 300, 400)
"""The rule's value at steps 1, 2 and 4."""

_POLL = 0.01  # how often a worker looks at the value it serves
_READY_TIMEOUT = 60.0  # starting Python processes is slow on a busy 2-core machine
_CONVERGE_SLACK = 5.0  # on top of one update interval
_TAKEOVER_TIMEOUT = 5.0
_STOP_TIMEOUT = 10.0


class DemoFailed(Exception):
    """A step missed its deadline or a worker died on its own; the message says which."""


@dataclass
class _Worker:
    index: int
    kind: str
    process: subprocess.Popen[bytes]
    stderr: IO[bytes]
    pid: int
    ready: bool = False
    value: int | None = None
    leading: bool = False
    killed: bool = False
    exited: bool = False

    @property
    def label(self) -> str:
        return f"worker {self.index} ({self.kind}, pid {self.pid})"

    def stderr_tail(self, lines: int = 15) -> str:
        self.stderr.seek(0)
        text = self.stderr.read().decode("utf-8", "replace").strip().splitlines()
        return "\n".join(f"    | {line}" for line in text[-lines:])


class _Demo:
    def __init__(self, n: int, duration: float, directory: Path, segment_name: str, out: TextIO) -> None:
        from heksher_shm.testing import HeksherService

        self.n = n
        self.duration = duration
        self.directory = directory
        self.segment_name = segment_name
        self.out = out
        self.interval = min(1.0, max(0.2, duration / 10))
        self.service = HeksherService(context_features=FEATURES)
        self.workers: list[_Worker] = []
        self.events: queue.Queue[tuple[_Worker, dict[str, Any] | None]] = queue.Queue()
        self.started = time.monotonic()
        self.t0 = self.started
        self.quiet = False
        self.segment: Segment | None = None
        self.takeover: float | None = None

    # -- output and events -------------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.2f}s] {text}", file=self.out, flush=True)

    def _read(self, worker: _Worker) -> None:
        stdout = worker.process.stdout
        assert stdout is not None
        for raw in stdout:
            try:
                message = json.loads(raw)
            except ValueError:
                continue  # not ours (a library printing to stdout); the worker goes on
            self.events.put((worker, message))
        self.events.put((worker, None))

    def pump(self, timeout: float) -> None:
        """Handle the workers' reports that arrive within ``timeout`` seconds (at least the first)."""
        try:
            worker, message = self.events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return
        while True:
            self._handle(worker, message)
            try:
                worker, message = self.events.get_nowait()
            except queue.Empty:
                return

    def _handle(self, worker: _Worker, message: dict[str, Any] | None) -> None:
        if message is None:
            worker.exited = True
            if worker.killed or self.quiet:
                return
            code = worker.process.wait()
            tail = worker.stderr_tail()
            raise DemoFailed(
                f"{worker.label} exited on its own with code {code}"
                + (f"; its stderr ends with:\n{tail}" if tail else "")
            )
        event = message.get("event")
        if event == "ready":
            worker.ready = True
            worker.value = message["value"]
            worker.leading = message["leading"]
            role = "the leader: it alone polls the service" if worker.leading else "a follower"
            self.say(f"{worker.label} ready, serves {SETTING} = {worker.value}; {role}")
        elif event == "value":
            worker.value = message["value"]
            if not self.quiet:
                self.say(f"{worker.label} now serves {SETTING} = {worker.value}")
        elif event == "leading":
            worker.leading = message["leading"]
            if not self.quiet:
                self.say(f"{worker.label} {'is now the leader' if worker.leading else 'stepped down'}")

    def wait_until(self, predicate: Callable[[], bool], timeout: float, failure: Callable[[], str]) -> None:
        """Handle reports until ``predicate()`` holds; after ``timeout``, fail with ``failure()``."""
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DemoFailed(failure())
            self.pump(min(remaining, 0.05))

    def sleep_until(self, moment: float) -> None:
        """Handle reports until the demo's clock reaches ``moment`` (seconds after t0)."""
        while (remaining := self.t0 + moment - time.monotonic()) > 0:
            self.pump(min(remaining, 0.05))

    # -- the script -------------------------------------------------------------------------------

    def live(self) -> list[_Worker]:
        return [w for w in self.workers if not w.killed and not w.exited]

    def queries(self) -> str:
        q = self.service.count(path="/api/v1/query")
        d = self.service.count(path="/api/v1/settings/declare")
        return f"service so far: {q} quer{'y' if q == 1 else 'ies'}, {d} declaration{'s' * (d != 1)}"

    def leader_pid(self) -> int | None:
        assert self.segment is not None
        return self.segment.status().leader_pid

    def start(self) -> None:
        self.service.start()
        kinds = ["thread" if i % 2 == 0 else "async" for i in range(self.n)]
        print(
            f"heksher-shm demo: {self.n} worker processes ({', '.join(kinds)}) share one poller\n"
            f"  service  in-memory Heksher at {self.service.url}, in this process\n"
            f"  setting  {SETTING}: int, default {DEFAULT}; every worker serves "
            f"{SETTING}.get(user={USER!r})\n"
            f"  segment  {self.directory / self.segment_name}.seg, update interval {self.interval:g} s",
            file=self.out,
            flush=True,
        )
        env = dict(os.environ, **{ENV_SHM_DIR: str(self.directory)})
        for index, kind in enumerate(kinds, start=1):
            stderr = tempfile.TemporaryFile()  # noqa: SIM115 - kept for the worker's life, closed in stop()
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "heksher_shm.cli.demo",
                    "--worker",
                    kind,
                    self.service.url,
                    str(self.interval),
                    self.segment_name,
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
            )
            worker = _Worker(index, kind, process, stderr, process.pid)
            self.workers.append(worker)
            threading.Thread(
                target=self._read, args=(worker,), name=f"demo-worker-{index}", daemon=True
            ).start()
        self.say(f"started {self.n} workers; waiting for them to declare {SETTING} and serve it")
        self.wait_until(
            lambda: all(w.ready for w in self.workers),
            _READY_TIMEOUT,
            lambda: (
                "not every worker started within "
                f"{_READY_TIMEOUT:g} s: " + ", ".join(w.label for w in self.workers if not w.ready)
            ),
        )
        self.segment = Segment.open(self.directory / f"{self.segment_name}.seg", create=False)
        self.t0 = time.monotonic()
        leader = self.leader()
        self.say(
            f"all {self.n} workers serve {SETTING}; {leader.label} leads, the others read the segment "
            f"({self.queries()})"
        )

    def leader(self) -> _Worker:
        pid = self.leader_pid()
        for worker in self.live():
            if worker.pid == pid:
                return worker
        raise DemoFailed(f"the segment names pid {pid} as its leader, which is none of the live workers")

    def converge(self, value: int, since: float, what: str) -> None:
        live = self.live()
        timeout = self.interval + _CONVERGE_SLACK
        self.wait_until(
            lambda: all(w.value == value for w in self.live()),
            timeout,
            lambda: "; ".join(
                f"{w.label} did not serve {value} within {timeout:g} s of {what} (it serves {w.value})"
                for w in self.live()
                if w.value != value
            ),
        )
        who = f"all {len(live)} live workers serve" if len(live) > 1 else "the only live worker serves"
        self.say(f"{who} {value}, {time.monotonic() - since:.2f} s after {what} ({self.queries()})")

    def run(self) -> None:
        self.start()
        first, second, third = VALUES
        since = time.monotonic()
        rule = self.service.add_rule(SETTING, {"user": USER}, first)
        self.say(f"service: new rule {SETTING}[user={USER}] = {first}")
        self.converge(first, since, "the new rule")

        self.sleep_until(0.3 * self.duration)
        since = time.monotonic()
        self.service.set_rule_value(rule, second)
        self.say(f"service: rule value changed to {second}")
        self.converge(second, since, "the change")

        self.sleep_until(0.5 * self.duration)
        self.kill_leader()

        self.sleep_until(0.7 * self.duration)
        since = time.monotonic()
        self.service.set_rule_value(rule, third)
        self.say(f"service: rule value changed to {third}")
        self.converge(third, since, "the change")

        self.sleep_until(self.duration)
        self.summary()

    def kill_leader(self) -> None:
        victim = self.leader()
        victim.killed = True
        self.say(f"SIGKILL to the leader, {victim.label}")
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        successor: list[_Worker] = []

        def taken_over() -> bool:
            pid = self.leader_pid()
            successor[:] = [w for w in self.live() if w.pid == pid]
            return bool(successor)

        start = time.monotonic()
        deadline = start + _TAKEOVER_TIMEOUT
        # Poll the header closely (every 2 ms): the takeover itself takes tens of milliseconds.
        while not taken_over():
            if time.monotonic() > deadline:
                raise DemoFailed(f"no worker took over within {_TAKEOVER_TIMEOUT:g} s of the leader's death")
            self.pump(0.002)
        self.takeover = time.monotonic() - killed_at
        victim.process.wait()
        still = sorted({w.value for w in self.live()}, key=str)
        self.say(
            f"{successor[0].label} took over {self.takeover * 1000:.0f} ms after the SIGKILL; "
            f"meanwhile the workers kept serving {', '.join(map(str, still))}"
        )

    def summary(self) -> None:
        self.quiet = True
        elapsed = time.monotonic() - self.started
        leader = self.leader()
        queries = self.service.count(path="/api/v1/query")
        declarations = self.service.count(path="/api/v1/settings/declare")
        self.say("summary:")
        for worker in self.workers:
            if worker.killed:
                state = "SIGKILLed while leading"
            else:
                state = f"serves {SETTING} = {worker.value}" + ("  (leader)" if worker is leader else "")
            print(f"           {worker.label:<34} {state}", file=self.out)
        polls = elapsed / self.interval
        indent = " " * 11
        print(
            f"{indent}the service saw {queries} queries and {declarations} declarations in {elapsed:.1f} s\n"
            f"{indent}(the setting is declared once per leader term);\n"
            f"{indent}one poller at a {self.interval:g} s interval makes about {polls:.0f} queries, "
            f"{self.n} separate clients about {self.n * polls:.0f}\n"
            f"{indent}(a few more answer the first worker's set_as_main and the new leader's first update)\n"
            f"{indent}takeover after the leader's SIGKILL: {(self.takeover or 0) * 1000:.0f} ms",
            file=self.out,
            flush=True,
        )

    # -- cleanup ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every worker (closing stdin asks it to close its client), the service, and the segment."""
        self.quiet = True
        for worker in self.workers:
            if worker.process.stdin is not None:
                with contextlib.suppress(OSError):
                    worker.process.stdin.close()
        deadline = time.monotonic() + _STOP_TIMEOUT
        for worker in self.workers:
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            if worker.process.stdout is not None:
                worker.process.stdout.close()
            worker.stderr.close()
        if self.segment is not None:
            self.segment.close()
        self.service.stop()


def _remove_segment_files(directory: Path, name: str) -> None:
    base = directory / name
    for suffix in (".seg", ".lock"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{base}{suffix}")
    shutil.rmtree(f"{base}.seg.d", ignore_errors=True)


def _directory(shm_dir: str | None) -> tuple[Path, bool]:
    """Where the demo's segment goes, and whether it is a private directory to remove afterwards."""
    given = shm_dir or os.environ.get(ENV_SHM_DIR)
    if given:
        try:
            return resolve_shm_dir(given), False
        except SegmentError as e:
            raise CliError(str(e), EXIT_UNREADABLE) from None
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="heksher-shm-demo-", dir=base)), True


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def run_demo(
    *, workers: int = 4, duration: float = 10.0, shm_dir: str | None = None, out: TextIO | None = None
) -> int:
    """Run the demo (see the module docstring); returns the exit status, 0 when every step succeeded."""
    if workers < 2:
        raise CliError("--workers must be at least 2: one leader to kill, and one to take over", EXIT_USAGE)
    if duration < 3:
        raise CliError("--duration must be at least 3 seconds", EXIT_USAGE)
    stream = sys.stdout if out is None else out
    directory, private = _directory(shm_dir)
    segment_name = f"heksher-shm-demo-{os.getpid()}"
    demo = _Demo(workers, duration, directory, segment_name, stream)
    # SIGTERM cleans up like Ctrl-C does: workers stopped, files removed.
    previous = (
        signal.signal(signal.SIGTERM, _raise_exit)
        if threading.current_thread() is threading.main_thread()
        else None
    )
    try:
        demo.run()
    except DemoFailed as e:
        stream.flush()
        print(f"heksher-shm demo: FAILED: {e}", file=sys.stderr, flush=True)
        return EXIT_UNHEALTHY
    except KeyboardInterrupt:
        print("heksher-shm demo: interrupted; stopping the workers", file=sys.stderr, flush=True)
        raise
    finally:
        demo.stop()
        if private:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            _remove_segment_files(directory, segment_name)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(
        "demo OK: every worker converged after each change, and the leader's death cost one takeover",
        file=stream,
        flush=True,
    )
    return EXIT_OK


# -- the worker process --------------------------------------------------------------------------


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _watch_stdin(stop: threading.Event) -> None:
    # The demo closes our stdin to stop us; so does its death.
    with contextlib.suppress(OSError):
        sys.stdin.buffer.read()
    stop.set()


def _thread_worker(url: str, interval: float, segment: str, stop: threading.Event) -> None:
    import heksher_shm as heksher

    setting = heksher.Setting(SETTING, int, ["user"], default_value=DEFAULT)
    client = heksher.ThreadHeksherClient(url, interval, FEATURES, segment_name=segment)
    client.track_contexts(user=heksher.TRACK_ALL)
    client.set_as_main()
    try:
        seen = _Seen(setting, client)
        while not stop.wait(_POLL):
            seen.report()
    finally:
        client.close()


class _Seen:
    """What a worker last told the demo: it reports its value and role once, then each change."""

    def __init__(self, setting: Any, client: Any) -> None:
        self.setting, self.client = setting, client
        self.value, self.leading = setting.get(user=USER), client.leading
        _emit({"event": "ready", "pid": os.getpid(), "value": self.value, "leading": self.leading})

    def report(self) -> None:
        value, leading = self.setting.get(user=USER), self.client.leading
        if value != self.value:
            self.value = value
            _emit({"event": "value", "value": value})
        if leading != self.leading:
            self.leading = leading
            _emit({"event": "leading", "leading": leading})


async def _async_worker(url: str, interval: float, segment: str, stop: threading.Event) -> None:
    import heksher_shm as heksher

    setting = heksher.Setting(SETTING, int, ["user"], default_value=DEFAULT)
    client = heksher.AsyncHeksherClient(url, interval, FEATURES, segment_name=segment)
    client.track_contexts(user=heksher.TRACK_ALL)
    await client.set_as_main()
    try:
        seen = _Seen(setting, client)
        while not stop.is_set():
            await asyncio.sleep(_POLL)
            seen.report()
    finally:
        await client.aclose()


def _worker_main(argv: list[str]) -> int:
    kind, url, interval, segment = argv
    # Ctrl-C in a terminal reaches the whole process group: the demo decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    threading.Thread(target=_watch_stdin, args=(stop,), daemon=True).start()
    try:
        if kind == "thread":
            _thread_worker(url, float(interval), segment, stop)
        else:
            asyncio.run(_async_worker(url, float(interval), segment, stop))
    except BrokenPipeError:
        pass  # the demo is gone
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["--worker"] or len(sys.argv) != 6:
        sys.exit(
            "usage: python -m heksher_shm.cli.demo --worker KIND URL INTERVAL SEGMENT (the demo runs this)"
        )
    sys.exit(_worker_main(sys.argv[2:]))
