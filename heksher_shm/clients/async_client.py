"""The asynchronous client: its background work runs in one asyncio task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import warnings
from collections.abc import Callable, Generator
from typing import Any

import httpx

from heksher_shm import _protocol as proto
from heksher_shm._engine import BEAT_INTERVAL, Apply, Call, Effect, Wait
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
        startup_timeout: seconds ``set_as_main()`` and ``reload()`` wait for
            their update before raising :class:`TimeoutError`.

    After ``fork()`` (e.g. gunicorn ``--preload``), a child's copy resumes its
    background task on the first ``get()``, ``reload()`` or ``set_as_main()``
    made inside a running event loop; until then it serves the shared segment.
    """

    _kind = "async"

    def _init_driver(self) -> None:
        # Also run in a forked child: the parent's loop, task and HTTP client
        # (with its sockets) belong to the parent and are abandoned, never closed.
        self.modification_lock = asyncio.Lock()
        """Held while setting values change; hold it to keep them from changing."""
        self._http_client: httpx.AsyncClient | None = None
        self._wake_event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._waiters = _Waiters()
        self._needs_restart = False

    # -- documented API ----------------------------------------------------------------------------------

    async def set_as_main(self) -> None:
        """Make this the main client: declare all settings, then wait for an initial update.

        Raises:
            httpx.HTTPError: a declaration or the initial update failed.
            TimeoutError: no update arrived within ``startup_timeout``.
        """
        self._become_main()
        self._ensure_task()
        async with self.modification_lock:
            self._apply_latest()
        seq = self._register_as_main()
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
        await self._wait_for(self._request_reload(), starting=False)

    async def aclose(self) -> None:
        """Cancel the background task and close the HTTP client."""
        if self._closed:
            return
        self._closed = True
        self._engine.closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
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
        self._wake_event = asyncio.Event()
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
        try:
            await self._drive(self._engine.run())
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("the heksher background task stopped on an error")

    async def _drive(self, steps: Generator[Effect, Any, Any]) -> Any:
        """The async twin of :func:`heksher_shm._engine.drive_sync`."""
        to_send: Any = None
        to_throw: BaseException | None = None
        while True:
            try:
                effect = steps.throw(to_throw) if to_throw is not None else steps.send(to_send)
            except StopIteration as stop:
                return stop.value
            to_send, to_throw = None, None
            try:
                if isinstance(effect, Call):
                    beating = asyncio.create_task(_beat_every(effect.beat)) if effect.beat else None
                    try:
                        to_send = await self._http.request(
                            effect.method,
                            effect.path,
                            params=effect.params,
                            content=effect.content,
                            headers=effect.headers,
                        )
                    finally:
                        if beating is not None:
                            beating.cancel()
                elif isinstance(effect, Wait):
                    to_send = await self._wait(effect.timeout)
                elif isinstance(effect, Apply):
                    if effect.blocking:
                        async with self.modification_lock:
                            self._apply_latest(fallback=effect.fallback)
                    elif not self.modification_lock.locked():
                        self._apply_latest(fallback=effect.fallback)
                else:
                    self._report(effect.error)
            except asyncio.CancelledError:
                steps.close()
                raise
            except Exception as e:
                to_throw = e

    async def _wait(self, timeout: float | None) -> bool:
        assert self._wake_event is not None
        try:
            await asyncio.wait_for(self._wake_event.wait(), timeout)
            woke = True
        except asyncio.TimeoutError:
            woke = False
        self._wake_event.clear()
        return woke

    def _wake(self) -> None:
        self._set_event(self._wake_event)

    def _report(self, error: BaseException | None) -> None:
        try:
            if error is None:
                self.on_update_ok()
            elif isinstance(error, Exception):
                self.on_update_error(error)
        except Exception:
            logger.exception("update callback raised")

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

    def _set_event(self, event: asyncio.Event | None) -> None:
        """Set an event of this client's loop from any thread (``get()`` may run anywhere)."""
        loop = self._loop
        if event is None or loop is None:
            return
        if _on_loop_thread(loop):
            event.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: no one is waiting
                loop.call_soon_threadsafe(event.set)

    async def _wait_for(self, seq: int, starting: bool) -> None:
        try:
            await asyncio.wait_for(self._until_acked(seq), self._startup_timeout)
        except asyncio.TimeoutError:  # not the built-in TimeoutError before Python 3.11
            raise TimeoutError(f"no update within startup_timeout={self._startup_timeout}s") from None
        if self._closed:
            return
        error = self._ack_error(seq, starting)
        if error is not None:
            raise error

    async def _until_acked(self, seq: int) -> None:
        await self._waiters.wait(lambda: self._acked(seq) or self._closed)


async def _beat_every(beat: Callable[[], object]) -> None:
    """Heart-beat while a request is in flight (see :class:`heksher_shm._engine.Call`)."""
    while True:
        await asyncio.sleep(BEAT_INTERVAL)
        beat()


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class _Waiters:
    """Coroutines waiting for a condition that any thread may make true (then calling :meth:`notify`).

    Futures are created on the waiter's own loop, so this works whichever loop
    (or thread) the client's work happens on.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    async def wait(self, done: Callable[[], bool]) -> None:
        loop = asyncio.get_running_loop()
        while not done():
            future: asyncio.Future[None] = loop.create_future()
            with self._lock:
                self._futures.append((loop, future))
            if done():  # made true between the check and the registration
                break
            await future

    def notify(self) -> None:
        with self._lock:
            futures, self._futures = self._futures, []
        for loop, future in futures:
            with contextlib.suppress(RuntimeError):  # that loop is closed: no one waits there
                loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
