"""What the simulation (``tests/sim``) assumes of the kernel, shown with real processes.

The simulated host (``tests/sim/world.py``) models flock, rename-over, exit
handles and doorbells; each model rests on a behaviour of Linux shown here
(or in the test named):

* a ``flock`` goes with its holder's death: ``tests/test_election.py``,
  ``test_one_leader_among_six_and_takeover_after_sigkill``;
* a lock file renamed over (a seizure) leaves the old holder its lock on a
  file no path names: it blocks nobody, and its ``verify()`` says so;
* a pidfd becomes readable when its process dies (not while it is stopped);
* a ring wakes a process waiting on its doorbell, rings pile up as one
  pending wake, and a ring to a dead process is lost without an error.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pytest

from heksher_shm._engine.shared import _watch_process
from heksher_shm._shm.bell import ring
from heksher_shm._shm.election import LeaderLock
from heksher_shm._shm.identity import identity_of
from tests import _sim_assumption_workers as workers

DEADLINE = 20.0

_SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def private_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "shm"
    directory.mkdir(mode=0o700)
    return directory


def _start(
    spawn: Callable[..., BaseProcess], target: Callable[..., object], *args: Any
) -> tuple[Connection, BaseProcess]:
    ours, theirs = _SPAWN.Pipe()
    process = spawn(target, *args, theirs)
    theirs.close()
    return ours, process


def _recv(conn: Connection) -> Any:
    assert conn.poll(DEADLINE), "the worker did not answer in time"
    return conn.recv()


def test_a_seized_lock_leaves_the_old_holder_a_file_no_path_names(
    private_dir: Path, spawn: Callable[..., BaseProcess]
) -> None:
    path = private_dir / "seg.lock"
    old, _ = _start(spawn, workers.holder, str(path))
    assert _recv(old) is True  # it holds the lock
    assert not LeaderLock(path).try_acquire()
    seizer = LeaderLock(path)
    assert seizer.seize()  # a new file renamed over the path, locked by the seizer
    old.send("verify")
    assert _recv(old) is False  # the old holder sees that the path names another file
    assert not LeaderLock(path).try_acquire()  # the path's file is the seizer's
    seizer.release()
    newcomer = LeaderLock(path)
    assert newcomer.try_acquire()  # the old holder's lock blocks nobody: no path names its file
    newcomer.release()
    old.send("stop")
    assert _recv(old) == "released"


def test_an_exit_handle_is_readable_once_its_process_is_gone_not_while_it_is_stopped(
    spawn: Callable[..., BaseProcess],
) -> None:
    conn, _ = _start(spawn, workers.idle)
    ready, pid = _recv(conn)
    assert ready == "ready"
    identity = identity_of(pid)
    assert identity is not None
    handle, gone = _watch_process(identity)
    assert handle is not None
    assert not gone
    try:
        poller = select.poll()
        poller.register(handle, select.POLLIN)
        os.kill(pid, signal.SIGSTOP)
        assert not poller.poll(200)  # stopped is not gone
        os.kill(pid, signal.SIGKILL)
        assert poller.poll(int(DEADLINE * 1000))  # gone: readable, reaped or not
    finally:
        os.close(handle)
    assert _watch_process(identity) == (None, True)  # a look after the death sees it gone


def test_a_ring_wakes_a_sleeper_rings_pile_up_and_a_dead_process_misses_them(
    private_dir: Path, spawn: Callable[..., BaseProcess]
) -> None:
    conn, process = _start(spawn, workers.sleeper, str(private_dir), "1-1.1.bell")
    bound, pid = _recv(conn)
    assert bound == "bound"
    assert ring(private_dir, "1-1.1.bell")
    assert _recv(conn) == ("woken", 1)
    os.kill(pid, signal.SIGSTOP)  # not listening for a while: the rings wait in its queue
    try:
        assert ring(private_dir, "1-1.1.bell")
        assert ring(private_dir, "1-1.1.bell")
    finally:
        os.kill(pid, signal.SIGCONT)
    kind, count = _recv(conn)
    assert kind == "woken"
    assert count >= 1  # one wake for the rings that came meanwhile
    os.kill(pid, signal.SIGKILL)
    process.join(DEADLINE)  # dead and reaped: its socket is closed
    assert not ring(private_dir, "1-1.1.bell")  # nobody listens: lost, and no error
    assert not ring(private_dir, "nobody.1.bell")
