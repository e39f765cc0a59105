"""The asynchronous client: its background work runs in one asyncio task."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import warnings
from collections.abc import Callable
from typing import Any

import httpx

from heksher_shm._engine.drivers import LoopWaker, drive_async, in_thread
from heksher_shm._engine.effects import Apply
from heksher_shm._model import protocol as proto
from heksher_shm.clients._base import BaseHeksherClient
from heksher_shm.clients._context import AsyncMainContext
from heksher_shm.setting import Setting

__all__ = ["AsyncHeksherClient"]

logger = logging.getLogger("heksher_shm.client")


class AsyncHeksherClient(AsyncMainContext, BaseHeksherClient):
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
            else a per-user folder under ``/dev/shm`` or the temp dir).
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

    def _init_driver(self) -> None:
        # Also run in a forked child: the parent's loop, task and HTTP client
        # (with its sockets) belong to the parent and are abandoned, never closed.
        self.modification_lock = asyncio.Lock()
        """Held while setting values change; hold it to keep them from changing."""
        self._http_client: httpx.AsyncClient | None = None
        self._waker: LoopWaker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._waiters = _Waiters()
        self._needs_restart = False

    # -- documented API ----------------------------------------------------------------------------------

    async def set_as_main(self) -> None:
        """Make this the main client: declare all settings, then wait for an initial update.

        Raises:
            httpx.HTTPError: a declaration or the initial update failed.
            TimeoutError: nothing progressed towards the update for ``startup_timeout`` seconds.
        """
        self._become_main()
        self._ensure_task()
        async with self.modification_lock:
            await in_thread(self._apply_latest)
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
        self._ensure_task()
        await self._wait_for(await in_thread(self._request_reload), starting=False)

    async def aclose(self) -> None:
        """Cancel the background task and close the HTTP client."""
        if self._closed:
            return
        self._closed = True
        self._engine.closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            if task.get_loop() is asyncio.get_running_loop():
                # wait(), not `await task`: a cancellation of aclose() itself must not be swallowed.
                await asyncio.wait({task})
        if self._http_client is not None:
            await self._http_client.aclose()
        self._leave_shared()
        self._waiters.notify()

    async def close(self) -> None:
        """Deprecated alias of :meth:`aclose` (since 0.2.0)."""
        warnings.warn("close() is deprecated, use aclose() instead", DeprecationWarning, stacklevel=2)
        await self.aclose()

    async def ping(self) -> None:
        """Check the health of the Heksher service.

        Raises:
            httpx.HTTPError: the ping failed.
        """
        (await self._http.get(proto.HEALTH)).raise_for_status()

    async def get_settings(self) -> dict[str, proto.SettingData]:
        """All settings declared on the service (not only this client's), by name."""
        response = await self._http.get(proto.SETTINGS, params={"include_additional_data": "true"})
        response.raise_for_status()
        data = proto.decode(proto.SETTINGS, response.status_code, response.content, proto.SettingsResponse)
        return {s.name: s for s in data.settings}

    # -- the driver --------------------------------------------------------------------------------------

    def _ensure_task(self) -> None:
        """Run the background task on the current loop (again, in a forked child)."""
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

    @property
    def _http(self) -> httpx.AsyncClient:
        """The client's one HTTP client, made on first use: a follower may never need one, and
        making one costs tens of milliseconds (TLS setup)."""
        client = self._http_client
        if client is None:
            client = self._http_client = httpx.AsyncClient(
                base_url=self._service_url, **self._http_client_args
            )
        return client

    async def _run(self) -> None:
        engine = self._engine
        try:
            await drive_async(engine.run(), _Hooks(self), engine.closing_effects)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("the heksher background task stopped on an error")

    def _wake(self) -> None:
        waker = self._waker
        if waker is not None:
            waker.wake()

    async def _apply(self, effect: Apply) -> None:
        """Apply under ``modification_lock``, in a worker thread: a big snapshot never stalls the loop."""
        if effect.blocking or not self.modification_lock.locked():
            async with self.modification_lock:
                await in_thread(functools.partial(self._apply_latest, notify=False))
        if effect.report:
            self._report(effect.error)
        self._notify_applied()

    def _report(self, error: BaseException | None) -> None:
        try:
            if error is None:
                self.on_update_ok()
            elif isinstance(error, Exception):
                self.on_update_error(error)
        except Exception:
            logger.exception("update callback raised")
        self._run_update_listeners(error)

    def _try_modification_lock(self) -> bool:
        # get() runs synchronously: between two awaits nothing else on this
        # loop can take the lock, so "not locked" is as good as acquiring it.
        return not self.modification_lock.locked()

    def _release_modification_lock(self) -> None:
        pass

    def _notify_applied(self) -> None:
        self._waiters.notify()

    def _refresh(self, setting: Setting[Any]) -> None:
        if self._needs_restart and not self._closed:
            # Without a running loop here, serve the segment passively for now.
            with contextlib.suppress(RuntimeError):
                self._ensure_task()
        super()._refresh(setting)

    def _restart_after_fork(self) -> None:
        self._needs_restart = True
        self._applied_generation = -2  # makes the next get() look stale, and try to restart

    async def _wait_for(self, seq: int, starting: bool) -> None:
        """Wait until request *seq* is answered; raise after ``startup_timeout`` without progress."""
        progress = self._progress(seq)
        while not await self._waiters.wait(lambda: self._acked(seq) or self._closed, self._startup_timeout):
            now_progress = self._progress(seq)
            if now_progress == progress:
                raise TimeoutError(self._timed_out("set_as_main" if starting else "reload"))
            progress = now_progress
        if self._closed:
            return
        error = self._ack_error(seq, starting)
        if error is not None:
            raise error


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


class _Hooks:
    """What the asyncio driver uses of a client (:class:`heksher_shm._engine.drivers.AsyncHooks`)."""

    def __init__(self, client: AsyncHeksherClient) -> None:
        self._client = client
        self.host = client._host

    def housekeep(self) -> bool:
        return self._client._housekeep()

    def http(self) -> httpx.AsyncClient:
        return self._client._http

    async def wait(self, timeout: float | None, fds: tuple[int, ...]) -> set[int]:
        waker = self._client._waker
        assert waker is not None
        return await waker.wait(timeout, fds)

    async def apply(self, effect: Apply) -> None:
        await self._client._apply(effect)

    def report(self, error: BaseException | None) -> None:
        self._client._report(error)
