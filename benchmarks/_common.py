"""What every case shares: statistics, machine facts, and the runner <-> child process protocol.

Every measurement side runs in fresh processes started by the runner. A child is
``python -m benchmarks.<case> child '<json params>'``; it writes one JSON object
per line on stdout (``{"event": ...}``) and reads one JSON command per line on
stdin. Its stderr (the libraries' logs) goes to a file in the run's log folder,
whose tail is shown when the child fails.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
"""The repository root: children run from here so that ``benchmarks`` imports as a package."""

_started = time.monotonic()


def log(message: str) -> None:
    """Progress for the person running the suite (stderr; stdout carries the JSON)."""
    print(f"[{time.monotonic() - _started:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- statistics ---------------------------------------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (``q`` in 0..100): with 20 samples, p99 is the largest one."""
    ordered = sorted(samples)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(samples: Sequence[float]) -> dict[str, Any]:
    """Median, min, max, p99 and count of ``samples`` (the raw samples are kept too)."""
    values = [float(s) for s in samples]
    if not values:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "p99": math.nan, "n": 0, "samples": []}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "p99": percentile(values, 99),
        "n": len(values),
        "samples": values,
    }


# -- the machine --------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, OS and Python: printed with every result."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = round(int(line.split()[1]) / 1024 / 1024, 1)
    versions = {}
    for package in ("heksher_shm", "heksher", "msgspec", "httpx"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[package] = version(package)
    return {
        "source": _source_version(),
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": versions,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def _source_version() -> str:
    """The commit measured, and whether the library had uncommitted changes (read-only git calls)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "heksher_shm"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit} (with uncommitted changes to heksher_shm)" if dirty else commit


# -- runner side: child processes ---------------------------------------------------------------------------


class ChildError(RuntimeError):
    """A child process failed, answered an error, or did not answer in time."""


@dataclass
class Run:
    """One run of the suite: options, the service, and where its files go."""

    quick: bool
    service: Any  # benchmarks._service.BenchService
    workdir: Path
    children: list[Child] = field(default_factory=list)
    shared: dict[str, Any] = field(default_factory=dict)
    """State that cases share to save time (the big rule set is seeded once)."""
    cpu_time: bool = False
    """Time the get() cases in the measuring thread's CPU time instead of the wall clock."""

    def shm_dir(self, label: str) -> str:
        """A fresh, private HEKSHER_SHM_DIR: every measurement starts without segments."""
        path = Path(tempfile.mkdtemp(prefix=f"shm-{label}-", dir=self.workdir))
        path.chmod(0o700)
        return str(path)

    def spawn(
        self,
        case: str,
        params: dict[str, Any],
        *,
        shm_dir: str | None = None,
        label: str = "",
        pass_fds: Sequence[int] = (),
    ) -> Child:
        """Start ``python -m benchmarks.<case> child <params>``; it is reaped at the end of the run.

        *pass_fds* stay open in the child under the same numbers (a release pipe, for instance).
        """
        child = Child(
            case, params, workdir=self.workdir, shm_dir=shm_dir, label=label or case, pass_fds=pass_fds
        )
        self.children.append(child)
        return child

    def reap(self) -> None:
        """Stop every child still running (kill after a grace period)."""
        for child in self.children:
            child.stop()
        self.children.clear()


class Child:
    """The runner's end of one child process."""

    def __init__(
        self,
        case: str,
        params: dict[str, Any],
        *,
        workdir: Path,
        shm_dir: str | None,
        label: str,
        pass_fds: Sequence[int] = (),
    ) -> None:
        env = dict(os.environ)
        env.pop("HEKSHER_SHM_DIR", None)
        if shm_dir is not None:
            env["HEKSHER_SHM_DIR"] = shm_dir
        env["PYTHONUNBUFFERED"] = "1"
        self.label = label
        log_dir = workdir / "logs"
        log_dir.mkdir(exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{label}-", suffix=".log", dir=log_dir)
        self.log_path = Path(name)
        with os.fdopen(fd, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", f"benchmarks.{case}", "child", json.dumps(params)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=REPO,
                env=env,
                pass_fds=tuple(pass_fds),
            )
        self.pid = self.process.pid
        self._buffer = b""
        self._lines: list[dict[str, Any]] = []

    def _read_line(self, deadline: float) -> dict[str, Any]:
        stdout = self.process.stdout
        assert stdout is not None
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChildError(f"{self.label} (pid {self.pid}) did not answer in time{self._tail()}")
            with selectors.DefaultSelector() as selector:
                selector.register(stdout, selectors.EVENT_READ)
                if not selector.select(min(remaining, 1.0)):
                    continue
            chunk = os.read(stdout.fileno(), 65536)
            if not chunk:
                self.process.wait(5)
                raise ChildError(
                    f"{self.label} (pid {self.pid}) exited with {self.process.returncode}{self._tail()}"
                )
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        if message.get("event") == "error":
            raise ChildError(f"{self.label} (pid {self.pid}) failed: {message.get('error')}{self._tail()}")
        return message

    def expect(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for the next message named ``event`` (other messages are kept for :meth:`messages`)."""
        deadline = time.monotonic() + timeout
        for i, message in enumerate(self._lines):
            if message.get("event") == event:
                return self._lines.pop(i)
        while True:
            message = self._read_line(deadline)
            if message.get("event") == event:
                return message
            self._lines.append(message)

    def ready(self) -> bool:
        """Whether a complete message is waiting (does not block)."""
        if b"\n" in self._buffer or self._lines:
            return True
        stdout = self.process.stdout
        assert stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            return bool(selector.select(0))

    def send(self, command: str, **data: Any) -> None:
        """Send one command line."""
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write((json.dumps({"cmd": command, **data}) + "\n").encode())
        stdin.flush()

    def ask(self, command: str, timeout: float = 60.0, **data: Any) -> dict[str, Any]:
        """Send a command and wait for its ``done`` answer."""
        self.send(command, **data)
        return self.expect("done", timeout)

    def kill(self) -> None:
        """SIGKILL, then reap."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the child to exit (it closes its client), kill it if it does not."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.send("exit")
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace").strip().splitlines()[-25:]
            if text:
                return "\n  stderr of the child:\n    " + "\n    ".join(text)
        return ""


def stop_all(children: Sequence[Child]) -> None:
    """Ask every child to exit at once, then wait for each (killing stragglers)."""
    for child in children:
        if child.process.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                child.send("exit")
    for child in children:
        child.stop()


# -- child side ---------------------------------------------------------------------------------------------


_emit_lock = threading.Lock()


def emit(event: str, **data: Any) -> None:
    """Send one message to the runner (from any thread)."""
    line = json.dumps({"event": event, **data}) + "\n"
    with _emit_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


def commands() -> Iterator[dict[str, Any]]:
    """The runner's commands, until ``exit`` or the end of stdin."""
    for line in sys.stdin:
        command: dict[str, Any] = json.loads(line)
        if command.get("cmd") == "exit":
            return
        yield command


def child_main(body: Callable[[dict[str, Any]], None]) -> None:
    """The entry point of a case module run as ``python -m benchmarks.<case> child '<params>'``.

    Any exception is reported to the runner as an ``error`` message before the
    process exits with status 1.
    """
    if len(sys.argv) != 3 or sys.argv[1] != "child":
        raise SystemExit(f"usage: python -m {sys.argv[0]} child '<json params>' (the runner starts this)")
    params = json.loads(sys.argv[2])
    try:
        body(params)
    except BaseException as e:
        if isinstance(e, SystemExit) and not e.code:
            raise
        import traceback

        traceback.print_exc()
        emit("error", error=f"{type(e).__name__}: {e}")
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.flush()
    # Daemon threads of either client may still be inside a request; exit without waiting on them.
    os._exit(0)
