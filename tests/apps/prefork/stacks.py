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

Under gevent only the greenlet running at the moment of the dump shows (the
hub, when the process is idle): a greenlet parked in the hub has no thread of
its own. A real OS thread in such a process (a client's thread restarted in a
``--preload`` worker) shows in full.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

__all__ = ["dump_stacks", "py_spy"]

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
