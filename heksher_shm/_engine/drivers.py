"""The two drivers of the engine's effects, side by side: blocking (thread client) and asyncio.

:class:`~heksher_shm._engine.engine.Engine` yields effects; a driver performs
each one and sends the result back (or throws the error in). The two drivers
below are twins on purpose, written next to each other and kept in step by
``tests/test_drivers.py``, which runs the same effect scripts through both.

=============  ======================================  ==============================================
effect         blocking driver                         asyncio driver
=============  ======================================  ==============================================
``Call``       ``httpx.Client.request``                ``await httpx.AsyncClient.send``; a big body is
                                                       joined in a worker thread
``Calls``      a thread pool, *limit* wide             ``asyncio.gather`` under a semaphore
``Compute``    run in place                            run in a worker thread (the loop never stalls)
``Digest``     run in place                            run in a worker thread, offering the GIL often
host effects   ``effect.perform(host)`` in place       in a worker thread (``quick`` ones in place)
``Wait``       ``poll()`` on the wake pipe, the        loop readers on the doorbell, the exit handle
               doorbell and the exit handle            and a wake event
``Apply``      under ``modification_lock``             under ``modification_lock``, in a worker thread
``Report``     the client's callbacks                  the client's callbacks
``Housekeep``  the client's chores                     the client's chores, in a worker thread
=============  ======================================  ==============================================

While an effect marked ``busy`` runs, the driver stores a new promise of
progress in the segment every :data:`~heksher_shm._engine.policy.BEAT_INTERVAL`
seconds (from a helper thread, or a task): a leader waiting on a slow service
stays trusted by its followers. When a driver stops before the engine ends (a
task cancelled, an error), it performs the engine's closing effects: the lock
is let go at once.

How each sleeps until woken is in :mod:`heksher_shm._engine.sleeping`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import httpx

from heksher_shm._engine.answers import Fresh, digest_query
from heksher_shm._engine.effects import (
    Apply,
    Call,
    Calls,
    Compute,
    Digest,
    Effect,
    HostEffect,
    Housekeep,
    Report,
    Wait,
)
from heksher_shm._engine.host import Host
from heksher_shm._engine.policy import BEAT_INTERVAL, BUSY_PROMISE
from heksher_shm._engine.sleeping import LoopWaker, WakePipe
from heksher_shm._process.gc import paused_gc
from heksher_shm._process.threads import start_thread

__all__ = [
    "AsyncHooks",
    "LoopWaker",
    "SyncHooks",
    "WakePipe",
    "drive_async",
    "drive_sync",
    "in_thread",
    "run_closing",
]

T = TypeVar("T")


class SyncHooks(Protocol):
    """What the blocking driver needs from its client."""

    @property
    def host(self) -> Host: ...

    def http(self) -> httpx.Client: ...

    def pool(self, limit: int) -> ThreadPoolExecutor: ...

    def wait(self, timeout: float | None, fds: tuple[int, ...]) -> set[int]: ...

    def apply(self, effect: Apply) -> None: ...

    def report(self, error: BaseException | None) -> None: ...

    def housekeep(self) -> bool: ...


class AsyncHooks(Protocol):
    """What the asyncio driver needs from its client."""

    @property
    def host(self) -> Host: ...

    def http(self) -> httpx.AsyncClient: ...

    def wait(self, timeout: float | None, fds: tuple[int, ...]) -> Awaitable[set[int]]: ...

    def apply(self, effect: Apply) -> Awaitable[None]: ...

    def report(self, error: BaseException | None) -> None: ...

    def housekeep(self) -> bool: ...


def _request(effect: Call) -> dict[str, Any]:
    return {"params": effect.params, "content": effect.content, "headers": effect.headers}


def _busy_beat(host: Host) -> Callable[[], None]:
    def beat() -> None:
        now = time.monotonic()
        host.beat(now, now + BUSY_PROMISE)

    return beat


def _wait_fds(host: Host, effect: Wait) -> tuple[int, ...]:
    bell = host.bell_fd()
    fds = () if bell is None else (bell,)
    return fds if effect.leader_exit is None else (*fds, effect.leader_exit)


def _digest(effect: Digest) -> Fresh:
    """A query's answer digested, offering the GIL to other threads (an event loop) every millisecond."""
    yield_at = time.perf_counter() + 0.001

    def pause() -> None:
        nonlocal yield_at
        if time.perf_counter() >= yield_at:
            time.sleep(0)  # let a waiting thread run
            yield_at = time.perf_counter() + 0.001

    with paused_gc():
        return digest_query(effect.response, effect.queried, pause)


def _compute(effect: Compute) -> Any:
    with paused_gc():  # thousands of small objects made in one go: no collection needs to run meanwhile
        return effect.fn()


def run_closing(host: Host, effects: Sequence[HostEffect]) -> None:
    """Perform an engine's closing effects in place (each one is quick: an unlock, a ring)."""
    for effect in effects:
        with contextlib.suppress(Exception):
            effect.perform(host)


# -- blocking ---------------------------------------------------------------------------------------------


def drive_sync(
    steps: Generator[Effect, Any, T],
    hooks: SyncHooks,
    closing: Callable[[], Sequence[HostEffect]] = list,
) -> T:
    """Run *steps* to completion with blocking I/O (the thread client's driver).

    If the run ends early (an error, or the caller stops it), the effects *closing* returns are
    performed before this returns.
    """
    to_send: Any = None
    to_throw: BaseException | None = None
    beater = Beater()
    host = hooks.host
    finished = False
    try:
        while True:
            try:
                effect = steps.throw(to_throw) if to_throw is not None else steps.send(to_send)
            except StopIteration as stop:
                finished = True
                return stop.value  # type: ignore[no-any-return]
            to_send, to_throw = None, None
            try:
                to_send = _perform_sync(effect, hooks, host, beater)
            except Exception as e:
                to_throw = e
    finally:
        beater.close()
        if not finished:
            effects = closing()  # before the close, which ends a term
            steps.close()
            run_closing(host, effects)


def _perform_sync(effect: Effect, hooks: SyncHooks, host: Host, beater: Beater) -> Any:
    if isinstance(effect, Wait):
        ready = hooks.wait(effect.timeout, _wait_fds(host, effect))
        host.drain()
        return effect.leader_exit is not None and effect.leader_exit in ready
    if isinstance(effect, Apply):
        hooks.apply(effect)
        return None
    if isinstance(effect, Report):
        hooks.report(effect.error)
        return None
    if isinstance(effect, Housekeep):
        return hooks.housekeep()
    with beater.beating(_busy_beat(host) if effect.busy else None):
        if isinstance(effect, HostEffect):
            return effect.perform(host)
        if isinstance(effect, Call):
            return hooks.http().request(effect.method, effect.path, **_request(effect))
        if isinstance(effect, Calls):
            return _calls_sync(hooks, effect)
        if isinstance(effect, Digest):
            return _digest(effect)
        return _compute(effect)


def _calls_sync(hooks: SyncHooks, effect: Calls) -> list[httpx.Response | BaseException]:
    http = hooks.http()

    def one(call: Call) -> httpx.Response | BaseException:
        try:
            return http.request(call.method, call.path, **_request(call))
        except Exception as e:
            return e

    if len(effect.calls) == 1:
        return [one(effect.calls[0])]
    return list(hooks.pool(effect.limit).map(one, effect.calls))


class Beater:
    """One helper thread per driver that calls a *beat* every :data:`BEAT_INTERVAL` while asked to.

    Started on first use and kept (a thread per request would cost a thread
    start per declaration, and each start is a moment a signal could land in
    a thread of ours, see :mod:`heksher_shm._process.threads`); it sleeps on a
    condition while nothing is in progress.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._beat: Callable[[], object] | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def beating(self, beat: Callable[[], object] | None) -> Generator[None, None, None]:
        """Beat with *beat* while the block runs (nothing when it is None)."""
        if beat is None:
            yield
            return
        with self._cond:
            if self._thread is None:
                self._thread = start_thread(self._run, "heksher-shm-beat")
            self._beat = beat
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._beat = None
                self._cond.notify_all()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                beat = self._beat
                if beat is None:
                    self._cond.wait()
                elif not self._cond.wait(BEAT_INTERVAL) and self._beat is beat and not self._closed:
                    beat()

    def close(self) -> None:
        """Stop the helper thread and wait for it (a uwsgi master forks right after: no thread of
        ours may be running then, see :mod:`heksher_shm._process.servers`)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)


# -- asyncio ----------------------------------------------------------------------------------------------


async def drive_async(
    steps: Generator[Effect, Any, T],
    hooks: AsyncHooks,
    closing: Callable[[], Sequence[HostEffect]] = list,
) -> T:
    """Run *steps* to completion on the running loop (the async client's driver).

    If the run ends early (cancelled, or an error), the effects *closing* returns are performed
    in place before this returns or raises.
    """
    to_send: Any = None
    to_throw: BaseException | None = None
    host = hooks.host
    finished = False
    try:
        while True:
            try:
                effect = steps.throw(to_throw) if to_throw is not None else steps.send(to_send)
            except StopIteration as stop:
                finished = True
                return stop.value  # type: ignore[no-any-return]
            to_send, to_throw = None, None
            try:
                to_send = await _perform_async(effect, hooks, host)
            except Exception as e:
                to_throw = e
    finally:
        if not finished:
            effects = closing()  # before the close, which ends a term
            steps.close()
            run_closing(host, effects)


async def _perform_async(effect: Effect, hooks: AsyncHooks, host: Host) -> Any:
    if isinstance(effect, Wait):
        ready = await hooks.wait(effect.timeout, _wait_fds(host, effect))
        host.drain()
        return effect.leader_exit is not None and effect.leader_exit in ready
    if isinstance(effect, Apply):
        await hooks.apply(effect)
        return None
    if isinstance(effect, Report):
        hooks.report(effect.error)
        return None
    if isinstance(effect, Housekeep):
        return await in_thread(hooks.housekeep)
    if isinstance(effect, HostEffect) and effect.quick:
        return effect.perform(host)
    async with abeating(_busy_beat(host) if effect.busy else None):
        if isinstance(effect, HostEffect):
            return await in_thread(functools.partial(effect.perform, host))
        if isinstance(effect, Call):
            return await _send_async(hooks.http(), effect)
        if isinstance(effect, Calls):
            return await _calls_async(hooks, effect)
        if isinstance(effect, Digest):
            return await in_thread(functools.partial(_digest, effect))
        return await in_thread(functools.partial(_compute, effect))


async def _calls_async(hooks: AsyncHooks, effect: Calls) -> list[httpx.Response | BaseException]:
    http = hooks.http()
    gate = asyncio.Semaphore(effect.limit)

    async def one(call: Call) -> httpx.Response | BaseException:
        async with gate:
            try:
                return await _send_async(http, call)
            except Exception as e:
                return e

    return list(await asyncio.gather(*(one(call) for call in effect.calls)))


_JOIN_IN_PLACE = 256 * 1024
"""Bytes of body below which the asyncio driver joins it on the loop (well under a millisecond)."""

_BODY_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})
"""Headers that describe the body as it came over the wire, not the decoded bytes it is joined into."""


async def _send_async(http: httpx.AsyncClient, call: Call) -> httpx.Response:
    """Send *call*; the body is read on the loop a chunk at a time, and a big one is joined in a thread.

    Joining a big answer in one piece (8 MB for 100k rules) writes to freshly
    allocated pages for milliseconds; on the loop (as ``Response.aread()``
    does it) that stalls every other task for as long.
    """
    response = await http.send(http.build_request(call.method, call.path, **_request(call)), stream=True)
    try:
        chunks = [chunk async for chunk in response.aiter_bytes()]
    finally:
        await response.aclose()

    def joined() -> httpx.Response:
        headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _BODY_HEADERS]
        body = b"".join(chunks)
        return httpx.Response(response.status_code, headers=headers, content=body, request=response.request)

    if sum(map(len, chunks)) < _JOIN_IN_PLACE:
        return joined()  # a declaration's answer, a 304: a thread hop would cost more than the copy
    return await in_thread(joined)


async def in_thread(fn: Callable[[], T]) -> T:
    """Run *fn* in the loop's default executor, and wait for it to finish even when cancelled.

    A cancelled wait must not leave *fn* running behind the caller's back:
    the engine's next step (releasing the lock, say) must come after it.
    """
    future = asyncio.get_running_loop().run_in_executor(None, fn)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise


@contextlib.asynccontextmanager
async def abeating(beat: Callable[[], object] | None) -> Any:
    """Call *beat* every :data:`BEAT_INTERVAL` from a task while the block runs."""
    if beat is None:
        yield
        return

    async def run() -> None:
        while True:
            await asyncio.sleep(BEAT_INTERVAL)
            beat()

    task = asyncio.get_running_loop().create_task(run())
    try:
        yield
    finally:
        # Not awaited: awaiting a cancelled task raises CancelledError, and telling that one from a
        # cancellation of this task itself (aclose()) is not possible before Python 3.11.
        task.cancel()
