"""The multiprocessing semaphores of a test session, named after it: leftovers can be found and removed.

With the spawn and forkserver start methods, every ``multiprocessing`` lock,
semaphore, queue, barrier and pool makes a POSIX named semaphore, a file
``/dev/shm/sem.<name>``. The process that made it unlinks it when the
object is garbage collected, and its resource tracker (a helper process)
unlinks what is left when every process using it has exited. A test that
SIGKILLs a whole process group (a pool driver with its workers, forkserver
and resource tracker) leaves the files behind for good.

So the session names every semaphore it makes ``mp-heksher-test-<pytest pid>-...``
(multiprocessing's default is ``mp-<random>``), and passes the prefix in
``HEKSHER_TEST_SEMPREFIX`` to the programs it starts: a pool driver names
its own ``<prefix>-<its pid>-...`` (``tests/apps/prefork/pool_app.py``), and
removes them once it killed the driver (:meth:`~tests.apps.prefork.harness.PoolDriver.close`).
``tests/conftest.py`` fails the session when any file with the prefix stays.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from pathlib import Path

SEM_DIR = Path("/dev/shm")
"""Where glibc keeps named semaphores, as ``sem.<name>`` (the name without its leading slash)."""

PREFIX_ENV = "HEKSHER_TEST_SEMPREFIX"


def tag_this_process(prefix: str) -> None:
    """Make this process's multiprocessing semaphores ``/<prefix>-<random>``.

    ``semprefix`` is private to multiprocessing (``SemLock._make_name`` reads
    it; the same from Python 3.4 to 3.13). Only the names change; spawned
    children keep the default, and do not need the tag: what they create
    their own resource tracker cleans up.
    """
    multiprocessing.current_process()._config["semprefix"] = "/" + prefix  # type: ignore[attr-defined]


def semaphores(prefix: str = "mp-") -> set[str]:
    """The names of the semaphore files in /dev/shm whose name starts with *prefix* (``sem.`` left out)."""
    try:
        return {n[4:] for n in os.listdir(SEM_DIR) if n.startswith("sem." + prefix)}
    except OSError:
        return set()


def remove(prefix: str) -> list[str]:
    """Remove the semaphore files whose name starts with *prefix*; returns their names."""
    gone = sorted(semaphores(prefix))
    for name in gone:
        with contextlib.suppress(FileNotFoundError):
            (SEM_DIR / f"sem.{name}").unlink()
    return gone
