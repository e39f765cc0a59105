"""Process bodies for the election and registry tests.

They live in an importable module so that ``multiprocessing``'s spawn start
method can find them in a fresh interpreter. Every wait here has a deadline,
so a worker whose test died exits on its own.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import time
import weakref
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier

from heksher_shm._shm.election import LeaderLock
from heksher_shm._shm.identity import current_identity
from heksher_shm._shm.registration import Registration, encode_declaration
from heksher_shm._shm.registry import Registry

WORKER_DEADLINE = 30.0

# Keeps a lock alive until interpreter shutdown in the "exit_with_reference" mode.
_KEPT: list[LeaderLock] = []


def racer(path: str, barrier: Barrier, conn: Connection) -> None:
    """Race for the lock; report the first try, then wait to take over and report when it does.

    The holder releases when ``conn`` says "stop". (Not a multiprocessing
    Event: its ``set()`` waits for every sleeper to wake, and a SIGKILLed
    sleeper never does.)
    """
    lock = LeaderLock(path)
    barrier.wait(WORKER_DEADLINE)
    got = lock.try_acquire()
    conn.send(("first", os.getpid(), got, time.monotonic()))
    if not got:
        got = wait_for_lock(lock, WORKER_DEADLINE)
        if got:
            conn.send(("acquired", os.getpid(), True, time.monotonic()))
    if got and conn.poll(WORKER_DEADLINE):
        conn.recv()
        lock.release()


def wait_for_lock(lock: LeaderLock, timeout: float, poll: float = 0.02) -> bool:
    """Try the lock every *poll* seconds until it is taken or *timeout* passed (a test's waiter: the
    library itself never waits on the lock, it is told when to try)."""
    deadline = time.monotonic() + timeout
    while not lock.try_acquire():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True


def fork_leader(path: str, mode: str, conn: Connection) -> None:
    """Lead, fork a child that checks the lock and exits as ``mode`` says, then obey ``conn``.

    Modes: ``os_exit`` (child leaves with ``os._exit``), ``gc_then_exit``
    (child drops every reference, collects, and exits through normal
    interpreter shutdown), ``exit_with_reference`` (child keeps the lock
    referenced until interpreter shutdown finalizes it).
    """
    lock = LeaderLock(path)
    if not lock.try_acquire():
        conn.send(("error", "could not acquire"))
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        report = f"held={lock.held} try={lock.try_acquire()} verify={lock.verify()}"
        lock.release()  # must not release the parent's lock
        report += f" after_release_try={lock.try_acquire()}"
        if mode == "os_exit":
            os.write(write_end, report.encode())
            os._exit(0)
        if mode == "gc_then_exit":
            ref = weakref.ref(lock)
            del lock
            gc.collect()
            report += f" finalized={ref() is None}"
        else:
            _KEPT.append(lock)
        # Written at the very end of interpreter shutdown's atexit phase,
        # which proves the child went through it.
        atexit.register(os.write, write_end, b" atexit=ran")
        os.write(write_end, report.encode())
        sys.exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        child_report = pipe.read().decode()
    conn.send(("child", child_report, os.waitstatus_to_exitcode(status), lock.held))
    if conn.poll(WORKER_DEADLINE) and conn.recv() == "release":
        lock.release()
        conn.send(("released", lock.held))
    if conn.poll(WORKER_DEADLINE):
        conn.recv()


def register_and_wait(directory: str, conn: Connection) -> None:
    """Register in ``directory``, report the identity, and wait (to be SIGKILLed)."""
    me = current_identity()
    registry = Registry(directory)
    registry.write(Registration(pid=me.pid, create_time=me.create_time, pidns=me.pidns, kind="async"))
    conn.send((me.pid, me.create_time, me.pidns))
    conn.poll(WORKER_DEADLINE)


def rewrite_loop(directory: str, count: int, conn: Connection) -> None:
    """Rewrite this process's registration ``count`` times with varying sizes, then report."""
    me = current_identity()
    registry = Registry(directory)
    for seq in range(count):
        declarations = [
            encode_declaration({"name": f"setting_{i}", "version": "1.0", "pad": "x" * (seq % 7) * 100})
            for i in range(seq % 13)
        ]
        registry.write(
            Registration(
                pid=me.pid,
                create_time=me.create_time,
                pidns=me.pidns,
                kind="thread",
                declarations=declarations,
                reload_seq=seq,
            )
        )
        if seq == 0:
            conn.send("started")
    conn.send("done")
