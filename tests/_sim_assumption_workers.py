"""Process bodies for tests/test_sim_assumptions.py (importable, for the spawn start method).

Every wait has a deadline, so a worker whose test died exits on its own.
"""

from __future__ import annotations

import os
import select
import time
from multiprocessing.connection import Connection
from pathlib import Path

from heksher_shm._shm.bell import Bell
from heksher_shm._shm.election import LeaderLock

DEADLINE = 30.0


def holder(path: str, conn: Connection) -> None:
    """Take the lock, say so, then answer "verify" with ``verify()`` until told "stop" (then release)."""
    lock = LeaderLock(path)
    conn.send(lock.try_acquire())
    while conn.poll(DEADLINE):
        order = conn.recv()
        if order == "verify":
            conn.send(lock.verify())
        elif order == "stop":
            lock.release()
            conn.send("released")
            return


def sleeper(directory: str, name: str, conn: Connection) -> None:
    """Bind a doorbell, say so, then report each wake (the rings drained) until the deadline."""
    bell = Bell(Path(directory), name)
    conn.send(("bound", os.getpid()))
    deadline = time.monotonic() + DEADLINE
    poller = select.poll()
    poller.register(bell.fileno(), select.POLLIN)
    while time.monotonic() < deadline:
        if poller.poll(1000):
            conn.send(("woken", bell.drain()))


def idle(conn: Connection) -> None:
    """Do nothing until told to exit (or the deadline)."""
    conn.send(("ready", os.getpid()))
    conn.poll(DEADLINE)
