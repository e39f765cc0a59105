"""Every thread's stack of a server's processes, for a failure message: ``py-spy dump``.

A prefork check that fails because a worker does not answer, or a takeover
does not happen, says little by itself; what the stuck process was doing at
that moment says why. :func:`dump_stacks` asks ``py-spy dump --native`` (the
C frames show which system call or lock a thread waits in) for every process
given, while they are still stuck: call it before the server is killed.

py-spy reads another process's memory, which needs ptrace rights over it (as
root, or with ``kernel.yama.ptrace_scope`` 0 for one's own processes, or
``CAP_SYS_PTRACE`` in a container). Where it cannot attach, or is not
installed, the text says so instead: a failure report never fails
differently because its stacks could not be read.

Under gevent py-spy shows only the greenlet running at that moment (the hub,
when the process waits): a greenlet parked in the hub has no thread of its
own, and a hung gevent worker is usually one. So a server process that
installed :func:`install_greenlet_dump` (the test app does, when the harness
sets :data:`GREENLETS_ENV`) also writes every greenlet's stack to its log on
:data:`DUMP_SIGNAL`; :func:`greenlet_dumps` asks for them and reads them back.
A process that did not install it is not sent the signal (it would die of
it): its signal mask in ``/proc`` says whether it catches it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["DUMP_SIGNAL", "GREENLETS_ENV", "dump_stacks", "greenlet_dumps", "install_greenlet_dump", "py_spy"]

TIMEOUT = 20.0
"""Seconds one dump may take (py-spy pauses the process while it reads it; a few tenths usually)."""


def py_spy() -> str | None:
    """The py-spy executable: next to this Python (a virtualenv's bin) first, then on ``PATH``."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.is_file():
        return str(beside)
    return shutil.which("py-spy")


def dump_one(pid: int, executable: str) -> str:
    """``py-spy dump`` of *pid*, native frames included when py-spy can unwind them; or why not."""
    failures = []
    for extra in (["--native"], []):
        try:
            done = subprocess.run(
                [executable, "dump", "--pid", str(pid), *extra],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            failures.append(f"py-spy dump {' '.join(extra)} took more than {TIMEOUT}s")
            continue
        except OSError as e:
            return f"py-spy could not run: {e!r}"
        if done.returncode == 0 and done.stdout.strip():
            note = "".join(f"({f}; Python frames only)\n" for f in failures)
            return note + done.stdout.rstrip()
        # py-spy's own backtrace says nothing about the process: keep the error and its cause
        said = (done.stderr or done.stdout).split("Stack backtrace:")[0]
        said = " ".join(said.split()) or f"exit status {done.returncode}"
        failures.append(f"py-spy dump {' '.join(extra)}: {said}")
    hint = ""
    if any("ermission" in f or "ptrace" in f.lower() for f in failures):
        hint = " (py-spy needs ptrace rights over the process: root, CAP_SYS_PTRACE or ptrace_scope 0)"
    return "no stacks" + hint + ":\n" + "\n".join(failures)


def dump_stacks(pids: Iterable[tuple[str, int]]) -> str:
    """Every thread of every ``(role, pid)`` given, one section each (a gone process says so)."""
    executable = py_spy()
    sections = []
    for role, pid in pids:
        head = f"---- stacks of {role} {pid} ----"
        if executable is None:
            sections.append(f"{head}\nno stacks: py-spy is not installed (pip install py-spy)")
            continue
        sections.append(f"{head}\n{dump_one(pid, executable)}")
    return "\n".join(sections)


DUMP_SIGNAL = signal.SIGPWR
"""Asks a process that installed :func:`install_greenlet_dump` for its greenlets' stacks. SIGPWR: no
server the tests start uses it (gunicorn resets its own signals in each worker, SIGPWR is not one)."""

GREENLETS_ENV = "HEKSHER_PREFORK_GREENLET_DUMP"
"""Set (to anything) in a server's environment: the test app installs :func:`install_greenlet_dump`."""

_BEGIN = "==== greenlets of pid {} ===="
_END = "==== end of greenlets of pid {} ===="


def install_greenlet_dump() -> None:
    """On :data:`DUMP_SIGNAL`, write every thread's and greenlet's stack to stderr (the server's log).

    The handler runs in whichever greenlet the main thread runs (the hub,
    for a process that waits), so it sees the parked ones py-spy cannot.
    """
    signal.signal(DUMP_SIGNAL, _write_greenlets)


def _write_greenlets(signum: int, frame: Any) -> None:
    pid = os.getpid()
    try:
        if "gevent" in sys.modules:
            from gevent.util import format_run_info

            text = "\n".join(format_run_info())
        else:
            text = "gevent is not imported: no greenlets"
    except Exception as e:
        text = f"could not list the greenlets: {e!r}"
    sys.stderr.write(f"{_BEGIN.format(pid)}\n{text}\n{_END.format(pid)}\n")
    sys.stderr.flush()


def _catches(pid: int, signum: int) -> bool:
    """Whether *pid* has a handler for *signum* (the ``SigCgt`` mask of ``/proc/<pid>/status``)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def greenlet_dumps(pids: Iterable[int], log: Callable[[], str], timeout: float = 5.0) -> str:
    """Every greenlet's stack of each of *pids* that installed the dump, read back from *log* (the
    server's log text); a process that does not answer within *timeout* seconds is named."""
    asked = [pid for pid in pids if _catches(pid, DUMP_SIGNAL)]
    for pid in list(asked):
        try:
            os.kill(pid, DUMP_SIGNAL)
        except OSError:
            asked.remove(pid)
    if not asked:
        return ""
    deadline = time.monotonic() + timeout
    while True:
        text = log()
        missing = [pid for pid in asked if _END.format(pid) not in text]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # a poll period; the deadline bounds the wait
    sections = []
    for pid in asked:
        begin, end = _BEGIN.format(pid), _END.format(pid)
        if end in text:
            body = text[text.rindex(begin) + len(begin) : text.rindex(end)].strip("\n")
            sections.append(f"---- greenlets of {pid} ----\n{body}")
        else:
            sections.append(
                f"---- greenlets of {pid} ----\nno answer within {timeout}s (its main thread never ran "
                "Python code in that time: stuck in a system call or a native lock; see its stacks)"
            )
    return "\n".join(sections)
