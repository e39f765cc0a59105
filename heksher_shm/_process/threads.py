"""The threads heksher_shm starts, and what they must not do: take the process's signals.

A process-directed signal (``SIGINT``, ``SIGTERM``...) goes to any thread that
does not block it. Python's own handlers only ever run in the main thread,
but a server that embeds Python installs handlers in C that run in whichever
thread the kernel picked: uwsgi's worker shutdown handler calls ``exit()``
there, and when that thread was one of ours (seen: in the middle of starting
another thread) Python's finalisation then waits for the main thread forever,
and uwsgi kills the worker only after its 60 s grace period. So every thread
heksher_shm starts blocks the asynchronous signals first: they go to the
application's threads, as they would without heksher_shm.

Under gevent or eventlet, ``threading`` starts greenlets in the main OS
thread; blocking signals there would block them for the whole process, so a
thread that turns out to run on the main OS thread leaves its mask alone.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["block_signals", "on_main_os_thread", "start_thread"]

_SYNCHRONOUS = {
    getattr(signal, name)
    for name in ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGTRAP", "SIGABRT", "SIGSYS")
    if hasattr(signal, name)
}
"""Signals the thread itself causes: blocking them would not defer them, it would kill the process."""


def on_main_os_thread() -> bool:
    """Whether the caller runs on the process's main OS thread (a greenlet under gevent or eventlet does).

    On Linux the main thread's id is the process id, in a forked child too
    (where the id noted at import would be the parent's).
    """
    return threading.get_native_id() == os.getpid()


def block_signals() -> None:
    """Block the asynchronous signals in the calling OS thread, unless it is the main one."""
    if on_main_os_thread() or not hasattr(signal, "pthread_sigmask"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals() - _SYNCHRONOUS)


def start_thread(target: Callable[[], Any], name: str) -> threading.Thread:
    """Start a daemon thread that runs *target* with the asynchronous signals blocked."""

    def run() -> None:
        block_signals()
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
