"""How a driver sleeps until woken: a wake pipe and ``poll()`` (blocking), a waker on the loop (asyncio).

Blocking waits happen only in ``poll()``/``select()`` on descriptors, which
gevent and eventlet patch into cooperative waits, so a monkey-patched worker
keeps serving its other greenlets while the client sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import sys
from collections.abc import Callable, Sequence
from typing import Any

from heksher_shm._process.threads import on_main_os_thread

__all__ = ["LoopWaker", "WakePipe"]


_KERNEL_POLL = getattr(select, "poll", None)
"""``select.poll`` as this module found it: the kernel's, unless a monkey-patcher ran before the import."""


def _poll_here() -> Callable[[], Any] | None:
    """The ``poll`` to block in from the calling thread (None: eventlet removed it; use ``select``).

    On the main OS thread, whatever ``select.poll`` is now: under gevent or
    eventlet the caller is a greenlet and must wait in the hub. On any other
    OS thread, the kernel's: that thread is a real one (a client's thread
    restarted in a forked gunicorn ``--preload`` worker before the worker
    patched), and it blocks in the kernel rather than running a gevent hub of
    its own.
    """
    if on_main_os_thread():
        return getattr(select, "poll", None)
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        return monkey.get_original("select", "poll")  # type: ignore[no-any-return]
    return _KERNEL_POLL


class WakePipe:
    """How another thread (or a signal handler) wakes a blocking driver's :meth:`wait`."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        """Make the current or next :meth:`wait` return (never blocks; nothing once closed)."""
        if self._write < 0:
            return
        with contextlib.suppress(BlockingIOError, OSError):  # full: a wake is pending already
            os.write(self._write, b"\0")

    def wait(self, timeout: float | None, fds: Sequence[int]) -> set[int]:
        """Block until woken, one of *fds* is readable, or *timeout* seconds passed; the readable *fds*."""
        wanted = (self._read, *fds)
        poller = _poll_here()
        if poller is not None:
            p = poller()
            for fd in wanted:
                p.register(fd, select.POLLIN)
            events = p.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999)))
            ready = {fd for fd, _ in events}
        else:  # pragma: no cover - eventlet
            ready = set(select.select(wanted, [], [], timeout)[0])
        if self._read in ready:
            with contextlib.suppress(BlockingIOError, OSError):
                while os.read(self._read, 512):
                    pass
        ready.discard(self._read)
        return ready

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (its descriptors are no longer this pipe's)."""
        return self._read < 0

    def close(self) -> None:
        """Close both ends (also right in a forked child, where they are copies of the parent's).

        Once: the numbers are free afterwards, and whatever the process opens
        next may take them (closing them again closed someone else's files).
        """
        fds, (self._read, self._write) = (self._read, self._write), (-1, -1)
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


class LoopWaker:
    """Wakes the asyncio driver's :meth:`wait` from any thread (``get()`` and ``reload()`` may run anywhere).

    Built on one future per wait rather than ``asyncio.wait_for``: before
    Python 3.12, ``wait_for`` swallows a cancellation that arrives while the
    awaited thing completes, and a client's ``aclose()`` must always end its
    task.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending = False
        self._future: asyncio.Future[None] | None = None

    def wake(self) -> None:
        """Make the current or next :meth:`wait` return; from any thread, never blocks."""
        if _on_loop_thread(self._loop):
            self._fire()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)
        else:
            self._pending = True

    async def wait(self, timeout: float | None, fds: tuple[int, ...]) -> set[int]:
        """Until woken, one of *fds* is readable, or *timeout* passed; the readable *fds*."""
        ready: set[int] = set()
        if self._pending:
            self._pending = False
            return ready
        loop = self._loop
        future = self._future = loop.create_future()

        def readable(fd: int) -> None:
            ready.add(fd)
            if not future.done():
                future.set_result(None)

        for fd in fds:
            loop.add_reader(fd, readable, fd)
        timer = None if timeout is None else loop.call_later(max(0.0, timeout), _resolve, future)
        try:
            await future
        finally:
            self._future = None
            if timer is not None:
                timer.cancel()
            for fd in fds:
                loop.remove_reader(fd)
        return ready


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
