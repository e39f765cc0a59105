"""Who a process is, and whether it is still there.

A PID alone does not name a process: once a process exits the kernel hands
its PID to a later one (PID reuse, one of the design's known traps). A
:class:`ProcessIdentity` pairs the PID with the process's start time, which
never changes while the process lives, so a registration or a leader record
left by a dead process can never be mistaken for a live one.

``create_time`` is measured in **seconds since boot**, not since the epoch.
psutil reports start times on the wall clock (boot time + start ticks), and
the boot time it reads moves whenever the system clock is stepped (NTP,
manual changes). Two processes reading the same start time on either side of
a clock step would then disagree, and a live process would look dead. The
difference ``create_time() - boot_time()`` is the kernel's own start tick
count, which no clock step touches.

**PID namespaces.** A PID is a number in one PID namespace: two containers
that share ``/dev/shm`` (Docker's ``--ipc=host``) but not their PIDs may
each have a process 7, and neither can see the other's. An identity
therefore also names the namespace its PID is numbered in (the inode of
``/proc/self/ns/pid``, :func:`pid_namespace`), and nobody judges the
liveness of a process of another namespace: :func:`is_alive` answers
``True`` for it (its death cannot be proven from here). ``0`` stands for
"unknown" (the file could not be read, or an identity recorded by an older
version, or the segment header, which holds no namespace) and is taken for
the reader's own namespace, as every process did before namespaces were
recorded.

**Names.** :func:`token` is the one spelling of an identity in file names
(``<pid>-<start µs>[-<namespace>]``), and :func:`parse_token` reads it back;
code that names per-process files uses these two and :data:`TOKEN_PATTERN`.

The current process's identity is cached and recomputed after ``fork()``
(the child has a new PID, and may be in a new PID namespace). Tests replace
it with :func:`set_identity_provider`, as prometheus_client's multiprocess
mode lets tests inject ``process_identifier``.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Callable
from typing import TypedDict

import msgspec

# No stubs ship with psutil (types-psutil is a separate package); `unused-ignore`
# keeps this line valid once the stubs are installed.
import psutil

__all__ = [
    "TOKEN_PATTERN",
    "IdentityProvider",
    "ProcessDescription",
    "ProcessIdentity",
    "current_identity",
    "describe_process",
    "identity_of",
    "in_this_pid_namespace",
    "is_alive",
    "parse_token",
    "pid_namespace",
    "set_identity_provider",
    "token",
]

# psutil's start times come in clock ticks (10 ms on Linux). Identities are
# rounded to the millisecond when computed and compared with this tolerance,
# so float noise never splits one process in two, while a different process
# would need to reuse the PID within the same two ticks to be mistaken for it.
_CREATE_TIME_TOLERANCE = 0.015
_DEAD_STATUSES = frozenset({psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD})


class ProcessIdentity(msgspec.Struct, frozen=True):
    """One process, for as long as it lives: its PID, its start time and its PID namespace.

    Attributes:
        pid: the process ID, as numbered in the namespace ``pidns``.
        create_time: when the process started, in seconds since boot
            (rounded to the millisecond); see the module docstring for why
            not seconds since the epoch.
        pidns: the PID namespace ``pid`` belongs to (see
            :func:`pid_namespace`); ``0`` when unknown, taken for the
            reader's own.
    """

    pid: int
    create_time: float
    pidns: int = 0


IdentityProvider = Callable[[], ProcessIdentity]
"""A callable returning the identity of the calling process."""


class ProcessDescription(TypedDict):
    """What :func:`describe_process` reports about a process, for status displays.

    ``cmdline``, ``uptime`` and ``started`` are ``None`` when the process is
    gone, was replaced by another one with the same PID, or cannot be
    inspected.
    """

    pid: int
    alive: bool
    cmdline: str | None
    uptime: float | None
    started: float | None


def _start_since_boot(process: psutil.Process) -> float:
    # Reading boot time on both sides detects a clock step in between: psutil
    # reads it afresh inside create_time() too, so only when both reads agree
    # is the difference the pure tick count.
    for _ in range(3):
        before = float(psutil.boot_time())
        started = float(process.create_time())
        if float(psutil.boot_time()) == before:
            break
    return round(started - before, 3)


# Linux fast path: one read of /proc/<pid>/stat costs ~15 us where the psutil
# calls above cost ~90 us, and the leader checks every registered process on
# each registry scan. Its answer is the number psutil derives from the same
# field (start ticks / CLK_TCK), so both paths agree; other systems, or a
# /proc that cannot be read, use psutil.
_PROC_FAST = sys.platform.startswith("linux") and os.path.exists("/proc/self/stat")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if _PROC_FAST else 100
_PROC_DEAD_STATES = frozenset({b"Z", b"X", b"x"})


class _Unknown(Exception):
    """The process exists but cannot be inspected."""


def _read_proc_stat(pid: int) -> float | None:
    # Raises OSError when /proc cannot answer, so the caller falls back to psutil.
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        data = os.read(fd, 4096)
    except ProcessLookupError:  # exited between open and read
        return None
    finally:
        os.close(fd)
    # The command name (field 2) is in parentheses and may itself contain
    # ")" or spaces, so the fixed fields are counted from the last ")".
    fields = data.rpartition(b")")[2].split()
    if not fields:
        return None
    if fields[0] in _PROC_DEAD_STATES:
        return None
    return round(int(fields[19]) / _CLOCK_TICKS, 3)


def _probe(pid: int) -> float | None:
    """Start time since boot of the live, non-zombie process ``pid``; ``None`` if there is none."""
    if pid <= 0:
        return None
    if _PROC_FAST:
        try:
            return _read_proc_stat(pid)
        except (OSError, ValueError, IndexError):
            pass
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            if process.status() in _DEAD_STATUSES:
                return None
            return _start_since_boot(process)
    except psutil.NoSuchProcess:  # includes psutil.ZombieProcess
        return None
    except psutil.AccessDenied as error:
        raise _Unknown(pid) from error


def identity_of(pid: int) -> ProcessIdentity | None:
    """Return the identity of the live process with this PID (in this process's namespace), or ``None``.

    ``None`` when there is no such process, when it is a zombie (exited but
    not yet reaped), or when it cannot be inspected.
    """
    try:
        started = _probe(pid)
    except _Unknown:
        return None
    return None if started is None else ProcessIdentity(pid, started, pid_namespace())


_NS_PATH = "/proc/self/ns/pid"
_pidns: tuple[int, int] | None = None  # (pid that read it, namespace)


def pid_namespace() -> int:
    """The PID namespace of this process: the inode of ``/proc/self/ns/pid``; ``0`` if it cannot be read.

    Read once per process (a forked child reads it again: a parent that
    called ``unshare(CLONE_NEWPID)`` has children in a new namespace).
    """
    global _pidns
    cached = _pidns
    pid = os.getpid()
    if cached is None or cached[0] != pid:
        try:
            namespace = os.stat(_NS_PATH).st_ino
        except OSError:  # no /proc, a /proc without namespaces, or one we may not read
            namespace = 0
        _pidns = cached = (pid, namespace)
    return cached[1]


def in_this_pid_namespace(identity: ProcessIdentity) -> bool:
    """Whether *identity*'s PID is numbered in this process's namespace, so that it can be looked up here.

    ``True`` when either namespace is unknown (``0``): without the
    information, processes are assumed to share one, as they always were
    before namespaces were recorded.
    """
    own = pid_namespace()
    return identity.pidns == 0 or own in (0, identity.pidns)


TOKEN_PATTERN = r"[1-9][0-9]{0,9}-[0-9]{1,16}(?:-[1-9][0-9]{0,19})?"
"""A regular expression (no groups) matching what :func:`token` writes, for names built around it."""

_TOKEN_RE = re.compile(r"([1-9][0-9]{0,9})-([0-9]{1,16})(?:-([1-9][0-9]{0,19}))?")


def token(identity: ProcessIdentity) -> str:
    """The identity as it appears in file names: ``<pid>-<start µs>``, then ``-<namespace>`` when known.

    Unique per process on the host (PID reuse changes the start time, a
    PID namespace the suffix), and read back by :func:`parse_token`.
    """
    base = f"{identity.pid}-{round(identity.create_time * 1_000_000)}"
    return f"{base}-{identity.pidns}" if identity.pidns else base


def parse_token(text: str) -> ProcessIdentity | None:
    """The identity :func:`token` wrote as *text*; ``None`` if *text* is not a token."""
    match = _TOKEN_RE.fullmatch(text)
    if match is None:
        return None
    return ProcessIdentity(int(match[1]), int(match[2]) / 1_000_000, int(match[3] or 0))


_provider: IdentityProvider | None = None
_cached: ProcessIdentity | None = None


def set_identity_provider(provider: IdentityProvider | None) -> IdentityProvider | None:
    """Make :func:`current_identity` return ``provider()``; ``None`` restores the real identity.

    Returns the previous provider so a test can put it back. Meant for tests
    that simulate several processes, or PID reuse, inside one.
    """
    global _provider
    previous = _provider
    _provider = provider
    return previous


def current_identity() -> ProcessIdentity:
    """Return this process's identity.

    Computed once per process and cached; after ``fork()`` the child sees its
    own identity, because the cache is keyed by :func:`os.getpid`.
    """
    global _cached
    if _provider is not None:
        return _provider()
    cached = _cached
    pid = os.getpid()
    if cached is None or cached.pid != pid:
        found = identity_of(pid)
        if found is None:  # pragma: no cover - the calling process is alive by definition
            raise RuntimeError(f"cannot read the start time of this process (pid {pid})")
        _cached = cached = found
    return cached


def _reset_after_fork() -> None:
    """In a forked child (called by :mod:`heksher_shm._process.fork`): forget the parent's identity."""
    # getpid() already tells a child from its parent; clearing the cache also
    # covers a child that sees the same PID number (a fresh PID namespace).
    global _cached, _pidns
    _cached = None
    _pidns = None


def is_alive(identity: ProcessIdentity) -> bool:
    """Return whether the process named by ``identity`` is still running.

    ``False`` when no process has that PID, when the process holding it now
    started at another time (PID reuse), or when it is a zombie. ``True``
    when the process exists but cannot be inspected, or belongs to another
    PID namespace: a process whose death cannot be proven is not declared
    dead, so its files are left alone.
    """
    if not in_this_pid_namespace(identity):
        return True
    try:
        started = _probe(identity.pid)
    except _Unknown:
        return True
    if started is None:
        return False
    return math.isclose(started, identity.create_time, rel_tol=0.0, abs_tol=_CREATE_TIME_TOLERANCE)


def describe_process(identity: ProcessIdentity) -> ProcessDescription:
    """Describe a process for status output: command line, uptime in seconds, start time (epoch).

    Fields that cannot be read are ``None``; a process that is gone (or whose
    PID now belongs to another process) has ``alive=False`` and no details; a
    process of another PID namespace is taken as alive, without details.
    """
    gone = ProcessDescription(pid=identity.pid, alive=False, cmdline=None, uptime=None, started=None)
    if not in_this_pid_namespace(identity):  # its PID means another process here, or none
        return ProcessDescription(pid=identity.pid, alive=True, cmdline=None, uptime=None, started=None)
    if not is_alive(identity):
        return gone
    try:
        process = psutil.Process(identity.pid)
        started = float(process.create_time())
    except psutil.NoSuchProcess:
        return gone
    except psutil.AccessDenied:
        return ProcessDescription(pid=identity.pid, alive=True, cmdline=None, uptime=None, started=None)
    try:
        cmdline: str | None = " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return gone
    except psutil.AccessDenied:
        cmdline = None
    return ProcessDescription(
        pid=identity.pid,
        alive=True,
        cmdline=cmdline,
        uptime=max(0.0, time.time() - started),
        started=started,
    )
