"""The asynchronous client: its background work runs in one asyncio task.

:class:`AsyncHeksherClient` is the parts every client holds (see
:mod:`heksher_shm.clients._base`) and an :class:`_AsyncRunner`: the task that
drives the engine on the event loop, and the asyncio driver's hooks
(:class:`heksher_shm._engine.drivers.AsyncHooks`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx

from heksher_shm._engine.drivers import LoopWaker, drive_async, in_thread
from heksher_shm._engine.effects import Apply
from heksher_shm._engine.local import LocalHost
from heksher_shm._engine.shared import SharedHost
from heksher_shm._model import protocol as proto
from heksher_shm.clients._background import Background
from heksher_shm.clients._base import BaseHeksherClient
from heksher_shm.clients._feed import SettingsFeed

__all__ = ["AsyncHeksherClient"]

logger = logging.getLogger("heksher_shm.client")

A = TypeVar("A", bound="AsyncHeksherClient")


class AsyncHeksherClient(BaseHeksherClient["_AsyncRunner"]):
    """An asynchronous client for Heksher. Declares and updates settings in a background asyncio task.

    ``set_as_main()`` and ``reload()`` raise when a declaration or the update
    fails; later errors in the background are logged.

    Args:
        service_url: the URL of the Heksher service.
        update_interval: seconds between two updates.
        context_features: the context features to check for existence.
        http_client_args: keyword arguments for the underlying :class:`httpx.AsyncClient`.
        shared: share one poller with the host's other processes (the default);
            ``False`` makes this a plain single-process client.
        shm_dir: the folder of the shared files (default: ``HEKSHER_SHM_DIR``,
            else a per-user folder in a private ``$XDG_RUNTIME_DIR``, under ``/dev/shm`` or in the temp dir).
        segment_name: the shared segment's name (default: derived from the
            service URL and the context features).
        startup_timeout: seconds ``set_as_main()`` and ``reload()`` wait without
            any progress towards their update (a leader that neither answers nor
            works on it) before raising :class:`TimeoutError`.
        snapshot_file: a last-known-good file: the leader keeps the latest
            snapshot there, and a host with no snapshot that cannot reach the
            service starts from it (default: ``HEKSHER_SHM_SNAPSHOT_FILE``, else
            none; see :doc:`/last-known-good`).

    After ``fork()`` (e.g. gunicorn ``--preload``), a child's copy resumes its
    background task on the first ``get()``, ``reload()`` or ``set_as_main()``
    made inside a running event loop; until then it serves the shared segment.
    """

    _kind = "async"
    _http_class = httpx.AsyncClient

    def __init__(
        self,
        service_url: str,
        update_interval: float,
        context_features: Sequence[str],
        *,
        http_client_args: Mapping[str, Any] | None = None,
        shared: bool = True,
        shm_dir: str | os.PathLike[str] | None = None,
        segment_name: str | None = None,
        startup_timeout: float = 30.0,
        snapshot_file: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(
            service_url,
            update_interval,
            context_features,
            http_client_args=http_client_args,
            shared=shared,
            shm_dir=shm_dir,
            segment_name=segment_name,
            startup_timeout=startup_timeout,
            snapshot_file=snapshot_file,
            runner=_AsyncRunner,
        )

    # -- documented API --------------------------------------------------------------------------------------

    @property
    def modification_lock(self) -> asyncio.Lock:
        """Held while setting values change; hold it to keep them from changing."""
        return self._runner.modification_lock

    async def __aenter__(self: A) -> A:
        # ``async with client:`` makes the client main on entry and closes it on exit.
        await self.set_as_main()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def set_as_main(self) -> None:
        """Make this the main client: declare all settings, then wait for an initial update.

        Raises:
            httpx.HTTPError: a declaration or the initial update failed.
            TimeoutError: nothing progressed towards the update for ``startup_timeout`` seconds.
        """
        self._become_main()
        self._runner.start()
        async with self.modification_lock:
            await in_thread(self._feed.apply_latest)
        seq = await in_thread(self._register_as_main)  # file work: off the loop
        if seq is None:
            return  # a leader already serves everything this process needs
        try:
            await self._wait_for(seq, starting=True)
        except BaseException:
            await self.aclose()
            raise

    async def reload(self) -> None:
        """Update all rules now, and wait until done; also resets the update timer.

        Raises:
            httpx.HTTPError: the update failed.
        """
        self._runner.start()
        await self._wait_for(await in_thread(self._registration.request), starting=False)

    async def aclose(self) -> None:
        """Cancel the background task and close the HTTP client."""
        if self._closed:
            return
        self._mark_closed()
        await self._runner.stop()
        self._leave_shared()
        self._runner.notify_applied()

    async def close(self) -> None:
        """Deprecated alias of :meth:`aclose` (since 0.2.0)."""
        warnings.warn("close() is deprecated, use aclose() instead", DeprecationWarning, stacklevel=2)
        await self.aclose()

    async def ping(self) -> None:
        """Check the health of the Heksher service.

        Raises:
            httpx.HTTPError: the ping failed.
        """
        (await self._runner.http().get(proto.HEALTH)).raise_for_status()

    async def get_settings(self) -> dict[str, proto.SettingData]:
        """All settings declared on the service (not only this client's), by name."""
        response = await self._runner.http().get(proto.SETTINGS, params={"include_additional_data": "true"})
        response.raise_for_status()
        data = proto.decode(proto.SETTINGS, response.status_code, response.content, proto.SettingsResponse)
        return {s.name: s for s in data.settings}

    # -- waiting for the leader ------------------------------------------------------------------------------

    async def _wait_for(self, seq: int, starting: bool) -> None:
        """Wait until request *seq* is answered; raise after ``startup_timeout`` without progress."""
        answers = self._answers
        progress = answers.progress(seq)
        waiters = self._runner.waiters
        while not await waiters.wait(lambda: answers.acked(seq) or self._closed, self._startup_timeout):
            now_progress = answers.progress(seq)
            if now_progress == progress:
                raise TimeoutError(answers.timed_out("set_as_main" if starting else "reload"))
            progress = now_progress
        if self._closed:
            return
        error = answers.error(seq, starting)
        if error is not None:
            raise error

    # -- what tests look at ----------------------------------------------------------------------------------

    @property
    def _http(self) -> httpx.AsyncClient:
        return self._runner.http()


class _AsyncRunner:
    """How the async client runs its engine: a task on the event loop drives it, woken from any thread.
    Holds ``modification_lock``, the HTTP client and the waiters of ``set_as_main``/``reload``, and is
    the asyncio driver's hooks (:class:`heksher_shm._engine.drivers.AsyncHooks`): every point where the
    engine touches the async client is a method here or in :mod:`heksher_shm.clients._background`.
    """

    def __init__(self, service_url: str, http_client_args: dict[str, Any]) -> None:
        self._service_url = service_url
        self._http_client_args = http_client_args
        self._background: Background | None = None
        self._feed: SettingsFeed | None = None
        self._report: Callable[[BaseException | None], None] = _unbound
        self._make()

    def _make(self) -> None:
        # Also run in a forked child: the parent's loop, task and HTTP client
        # (with its sockets) belong to the parent and are abandoned, never closed.
        self.modification_lock = asyncio.Lock()
        """Held while setting values change; hold it to keep them from changing."""
        self._http_client: httpx.AsyncClient | None = None
        self._waker: LoopWaker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self.waiters = _Waiters()
        """Notified whenever a snapshot was applied (or the client closed): waiters look at the answers."""
        self._needs_restart = False

    def bind(
        self, background: Background, feed: SettingsFeed, report: Callable[[BaseException | None], None]
    ) -> None:
        self._background, self._feed, self._report = background, feed, report

    # -- what the shared parts ask of it (heksher_shm.clients._base.Runner) ----------------------------------

    def wake(self) -> None:
        waker = self._waker
        if waker is not None:
            waker.wake()

    def try_enter(self) -> bool:
        if self._needs_restart and self._background is not None and not self._background.engine.closed:
            # A forked child's first get() inside a running loop restarts the task there; without a
            # running loop, the segment is served passively for now.
            with contextlib.suppress(RuntimeError):
                self.start()
        # get() runs synchronously: between two awaits nothing else on this
        # loop can take the lock, so "not locked" is as good as acquiring it.
        return not self.modification_lock.locked()

    def leave(self) -> None:
        pass

    def notify_applied(self) -> None:
        self.waiters.notify()

    def after_fork_in_child(self) -> None:
        self._make()

    def resume_in_child(self) -> None:
        """The task restarts at the first ``get()``, ``reload()`` or ``set_as_main()`` inside a running
        loop: every setting is made stale, so that its next ``get()`` comes here (:meth:`try_enter`)."""
        assert self._feed is not None
        self._needs_restart = True
        self._feed.make_stale()

    # -- running ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Run the background task on the current loop (again, in a forked child, or on a new loop).

        Raises:
            RuntimeError: no event loop runs in this thread.
        """
        loop = asyncio.get_running_loop()
        if self._task is not None and self._loop is loop and not self._needs_restart:
            return
        if self._loop is not None and self._loop is not loop:
            # Connections belong to the loop that opened them: a new loop needs
            # a new client (the old one is abandoned, its loop being gone).
            self._http_client = None
        self._needs_restart = False
        self._loop = loop
        self._waker = LoopWaker(loop)
        self._task = loop.create_task(self._run(), name="heksher-shm")

    async def _run(self) -> None:
        assert self._background is not None
        try:
            engine = self._background.engine
            await drive_async(engine.run(), self, engine.closing_effects)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("the heksher background task stopped on an error")

    async def stop(self) -> None:
        """Cancel the task (and wait for it, on its own loop), and close the HTTP client."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            if task.get_loop() is asyncio.get_running_loop():
                # wait(), not `await task`: a cancellation of aclose() itself must not be swallowed.
                await asyncio.wait({task})
        if self._http_client is not None:
            await self._http_client.aclose()

    # -- the asyncio driver's hooks (heksher_shm._engine.drivers.AsyncHooks) ---------------------------------

    @property
    def host(self) -> LocalHost | SharedHost:
        """The host the engine's effects are performed on."""
        assert self._background is not None
        return self._background.host

    def housekeep(self) -> bool:
        assert self._background is not None
        return self._background.housekeep()

    def http(self) -> httpx.AsyncClient:
        """The client's one HTTP client, made on first use: a follower may never need one, and
        making one costs tens of milliseconds (TLS setup)."""
        client = self._http_client
        if client is None:
            client = self._http_client = httpx.AsyncClient(
                base_url=self._service_url, **self._http_client_args
            )
        return client

    async def wait(self, timeout: float | None, fds: tuple[int, ...]) -> set[int]:
        waker = self._waker
        assert waker is not None
        return await waker.wait(timeout, fds)

    async def apply(self, effect: Apply) -> None:
        """Apply under ``modification_lock``, in a worker thread: a big snapshot never stalls the loop."""
        assert self._feed is not None
        if effect.blocking or not self.modification_lock.locked():
            async with self.modification_lock:
                await in_thread(functools.partial(self._feed.apply_latest, notify=False))
        if effect.report:
            self.report(effect.error)
        self.notify_applied()

    def report(self, error: BaseException | None) -> None:
        self._report(error)


def _unbound(error: BaseException | None) -> None:
    raise AssertionError("the runner reports before it was bound to its client")


class _Waiters:
    """Coroutines waiting for a condition that any thread may make true (then calling :meth:`notify`).

    Futures are created on the waiter's own loop, so this works whichever loop
    (or thread) the client's work happens on.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    async def wait(self, done: Callable[[], bool], timeout: float) -> bool:
        """Until ``done()``; False if *timeout* seconds passed first. (One future and a timer, not
        ``asyncio.wait_for``, which swallows a cancellation before Python 3.12.)"""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            future: asyncio.Future[None] = loop.create_future()
            with self._lock:
                self._futures.append((loop, future))
            if done():  # made true between the check and the registration
                break
            timer = loop.call_later(remaining, _resolve, future)
            try:
                await future
            finally:
                timer.cancel()
        return True

    def notify(self) -> None:
        with self._lock:
            futures, self._futures = self._futures, []
        for loop, future in futures:
            with contextlib.suppress(RuntimeError):  # that loop is closed: no one waits there
                loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
