"""The synchronous client: its background work runs in one daemon thread."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from heksher_shm._engine.drivers import WakePipe, drive_sync
from heksher_shm._engine.effects import Apply
from heksher_shm._engine.health import Trouble
from heksher_shm._model import protocol as proto
from heksher_shm._process.monkey import watch_monkey_patching
from heksher_shm._process.servers import forking_uwsgi_master
from heksher_shm._process.threads import block_signals, start_thread
from heksher_shm.clients._base import BaseHeksherClient
from heksher_shm.clients._context import SyncMainContext

__all__ = ["ThreadHeksherClient"]

logger = logging.getLogger("heksher_shm.client")

HANDOVER_TIMEOUT = 10.0
"""Seconds gevent's patching waits for the thread to reach its next wait (a follower: milliseconds; a
leader: the end of its request). Past that, the thread goes on as it is, and a warning says so."""


class ThreadHeksherClient(SyncMainContext, BaseHeksherClient):
    """A synchronous client for Heksher. Declares and updates settings in a background thread.

    Errors in the background are logged, never raised: ``set_as_main()`` and
    ``reload()`` log a failed declaration or update and return.

    Args:
        service_url: the URL of the Heksher service.
        update_interval: seconds between two updates.
        context_features: the context features to check for existence.
        http_client_args: keyword arguments for the underlying :class:`httpx.Client`.
        shared: share one poller with the host's other processes (the default);
            ``False`` makes this a plain single-process client.
        shm_dir: the folder of the shared files (default: ``HEKSHER_SHM_DIR``,
            else a per-user folder under ``/dev/shm`` or the temp dir).
        segment_name: the shared segment's name (default: derived from the
            service URL and the context features).
        startup_timeout: seconds ``set_as_main()`` and ``reload()`` wait without
            any progress towards their update (a leader that neither answers nor
            works on it) before logging an error and returning.
    """

    _kind = "thread"
    _http_class = httpx.Client

    def _init_driver(self) -> None:
        # Also run in a forked child: nothing of the parent's threads is kept,
        # and the parent's HTTP client (with its sockets) is abandoned, never closed.
        self.modification_lock = threading.Lock()
        """Held while setting values change; hold it to keep them from changing."""
        self._http_client: httpx.Client | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._wake_pipe = WakePipe()
        self._applied_cond = threading.Condition()
        self._thread: threading.Thread | None = None
        # Stopping the thread before gevent patches the process (heksher_shm._process.monkey): asked
        # by the patching thread, granted by the client's thread at its next wait, under this lock.
        self._handover = threading.Lock()
        self._pause_asked = False
        self._paused = False
        # One error line when requests start failing, not one (with a traceback) per call.
        self._failing = {
            what: Trouble(
                logger, f"{what} failed", time.monotonic, logging.ERROR, service_url=self._service_url
            )
            for what in ("set_as_main", "reload")
        }

    def _close_driver_in_child(self) -> None:
        self._wake_pipe.close()

    # -- documented API ----------------------------------------------------------------------------------

    def set_as_main(self) -> None:
        """Make this the main client: declare all settings, then wait for an initial update."""
        self._become_main()
        if forking_uwsgi_master():
            self._start_in_uwsgi_master()
            return
        if self._thread is None:
            self._start_thread()
        self._apply(Apply(blocking=True))
        seq = self._register_as_main()
        if seq is not None:
            self._wait_for(seq, "set_as_main")

    def reload(self) -> None:
        """Update all rules now, and wait until done; also resets the update timer."""
        self._wait_for(self._request_reload(), "reload")

    def close(self) -> None:
        """Stop the background thread and close the HTTP client."""
        if self._closed:
            return
        self._closed = True
        self._engine.closed = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._http_client is not None:
            self._http_client.close()
        self._leave_shared()
        self._wake_pipe.close()
        with self._applied_cond:
            self._applied_cond.notify_all()

    def ping(self) -> None:
        """Check the health of the Heksher service.

        Raises:
            httpx.HTTPError: the ping failed.
        """
        self._http.get(proto.HEALTH).raise_for_status()

    def get_settings(self) -> dict[str, proto.SettingData]:
        """All settings declared on the service (not only this client's), by name."""
        response = self._http.get(proto.SETTINGS, params={"include_additional_data": "true"})
        response.raise_for_status()
        data = proto.decode(proto.SETTINGS, response.status_code, response.content, proto.SettingsResponse)
        return {s.name: s for s in data.settings}

    # -- the driver ----------------------------------------------------------------------------------------

    @property
    def _http(self) -> httpx.Client:
        """The client's one HTTP client, made on first use: a follower may never need one, and
        making one costs tens of milliseconds (TLS setup)."""
        client = self._http_client
        if client is None:
            client = self._http_client = httpx.Client(base_url=self._service_url, **self._http_client_args)
        return client

    def _declare_pool(self, limit: int) -> ThreadPoolExecutor:
        """The threads that send concurrent declarations (made on first use, kept while leading)."""
        pool = self._pool
        if pool is None:
            pool = self._pool = ThreadPoolExecutor(
                limit, thread_name_prefix="heksher-shm-declare", initializer=block_signals
            )
        return pool

    def _start_thread(self) -> None:
        self._thread = start_thread(self._run, "heksher-shm")
        # A real OS thread in a process that gevent may patch later (a gunicorn --preload worker):
        # stopped before the patch, started again after it as a greenlet.
        watch_monkey_patching(self)

    def _run(self) -> None:
        engine = self._engine
        paused = False
        try:
            # Stopped by _Pause (gevent patches the process now): the driver lets go of the lock and
            # rings the others, and _resume_after_monkey_patch starts anew.
            drive_sync(engine.run(), _Hooks(self), engine.closing_effects)
        except _Pause:
            paused = True
        except Exception:
            logger.exception("the heksher background thread stopped on an error")
        finally:
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.shutdown(wait=paused)  # no thread of ours may live through the patch

    def _pause_point(self) -> None:
        """Where the thread stops when gevent is about to patch the process (at a wait, before and after)."""
        if self._pause_asked:
            with self._handover:
                if self._pause_asked:
                    self._paused = True
                    raise _Pause

    def _pause_for_monkey_patch(self) -> bool:
        """gevent is about to patch this process: stop the thread at its next wait (see
        :mod:`heksher_shm._process.monkey`). True when it stopped."""
        thread = self._thread
        if thread is None or self._closed or thread is threading.current_thread() or not thread.is_alive():
            return False
        with self._handover:
            self._pause_asked = True
        self._wake()
        thread.join(HANDOVER_TIMEOUT)
        with self._handover:
            if not self._paused:
                self._pause_asked = False
                logger.warning(
                    "the heksher background thread did not reach a wait within %s s of gevent's patching; "
                    "it goes on as a real thread of a patched process",
                    HANDOVER_TIMEOUT,
                )
                return False
        thread.join()  # past its last wait: it only closes the engine's run
        self._thread = None
        return True

    def _resume_after_monkey_patch(self) -> None:
        """gevent patched this process: start the thread again, as the process's threads now start (a
        greenlet of the main thread), with locks, conditions and an HTTP client of the patched kind."""
        if self._closed:
            return
        http = self._http_client
        self._wake_pipe.close()
        self._renew_locks()
        self._init_driver()
        if http is not None:
            http.close()  # its sockets are the kernel's: they would block every greenlet
        self._start_thread()

    def _wake(self) -> None:
        self._wake_pipe.wake()

    def _apply(self, effect: Apply) -> None:
        if self.modification_lock.acquire(blocking=effect.blocking):
            try:
                self._apply_latest(notify=False)
            finally:
                self.modification_lock.release()
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

    def _restart_after_fork(self) -> None:
        self._start_thread()

    def _try_modification_lock(self) -> bool:
        return self.modification_lock.acquire(blocking=False)

    def _release_modification_lock(self) -> None:
        self.modification_lock.release()

    def _notify_applied(self) -> None:
        with self._applied_cond:
            self._applied_cond.notify_all()

    def _start_in_uwsgi_master(self) -> None:
        """``set_as_main`` in a uwsgi master that forks the workers from here (no ``--lazy-apps``).

        The first update is made in this thread, with no background thread at
        all: uwsgi forks with ``fork(2)``, and a worker forked while another
        thread holds the GIL hangs (uwsgi issue 2387). Then the master lets go
        of everything shared (the lock, its registration and doorbell): it
        serves no requests, and each worker resumes its copy of this client
        from uwsgi's post-fork hook (see :mod:`heksher_shm._process.servers`).
        """
        if self._thread is not None:
            raise RuntimeError(
                "this client's background thread already runs in a uwsgi master that will fork the "
                "workers from it: a worker forked while that thread holds the GIL hangs. Make the client "
                "main before uwsgi forks (at import), or start uwsgi with --lazy-apps."
            )
        self._apply(Apply(blocking=True))
        seq = self._register_as_main()
        if seq is not None:
            hooks = _UntilAcked(self, seq)
            engine = self._engine
            try:
                # Stopped by _Pause: the driver then lets go of the lock and rings the others.
                drive_sync(engine.run(), hooks, engine.closing_effects)
            except _Pause:
                pass
            finally:
                pool, self._pool = self._pool, None
                if pool is not None:
                    pool.shutdown(wait=True)
            self._report_wait(seq, "set_as_main", timed_out=hooks.timed_out)
        self._leave_shared()

    def _wait_for(self, seq: int, what: str) -> None:
        """Wait until request *seq* is answered; give up after ``startup_timeout`` without progress."""
        progress = self._progress(seq)
        deadline = time.monotonic() + self._startup_timeout
        with self._applied_cond:
            while not (self._acked(seq) or self._closed):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    now_progress = self._progress(seq)
                    if now_progress == progress:
                        break
                    progress, deadline = now_progress, time.monotonic() + self._startup_timeout
                    continue
                self._applied_cond.wait(remaining)
        self._report_wait(seq, what, timed_out=not self._acked(seq))

    def _report_wait(self, seq: int, what: str, timed_out: bool) -> None:
        """Log how request *seq* ended (the thread client never raises from the background)."""
        if self._closed:
            return
        trouble = self._failing[what]
        if timed_out:
            trouble.failed(self._timed_out(what), timeout=self._startup_timeout)
            return
        error = self._ack_error(seq, starting=what == "set_as_main")
        if error is None:
            trouble.resolved()
        else:
            trouble.failed(error)


class _Hooks:
    """What the blocking driver uses of a client (:class:`heksher_shm._engine.drivers.SyncHooks`)."""

    def __init__(self, client: ThreadHeksherClient) -> None:
        self._client = client
        self.host = client._host

    def housekeep(self) -> bool:
        return self._client._housekeep()

    def http(self) -> httpx.Client:
        return self._client._http

    def pool(self, limit: int) -> ThreadPoolExecutor:
        return self._client._declare_pool(limit)

    def wait(self, timeout: float | None, fds: tuple[int, ...]) -> set[int]:
        client = self._client
        client._pause_point()
        ready = client._wake_pipe.wait(timeout, fds)
        client._pause_point()  # woken to stop: what woke it is looked at again after the restart
        return ready

    def apply(self, effect: Apply) -> None:
        self._client._apply(effect)

    def report(self, error: BaseException | None) -> None:
        self._client._report(error)


class _Pause(BaseException):
    """Ends a run of the engine in the calling thread, or the background thread before gevent patches
    the process (not an error: nothing may catch it on the way)."""


class _UntilAcked(_Hooks):
    """The driver's hooks for a run in the calling thread that ends once request *seq* is answered,
    or after ``startup_timeout`` without progress (``timed_out`` then says so)."""

    def __init__(self, client: ThreadHeksherClient, seq: int) -> None:
        super().__init__(client)
        self._seq = seq
        self._progress = client._progress(seq)
        self._deadline = time.monotonic() + client._startup_timeout
        self.timed_out = False

    def wait(self, timeout: float | None, fds: tuple[int, ...]) -> set[int]:
        client = self._client
        if client._acked(self._seq) or client._closed:
            raise _Pause
        now = time.monotonic()
        progress = client._progress(self._seq)
        if progress != self._progress:
            self._progress, self._deadline = progress, now + client._startup_timeout
        if now >= self._deadline:
            self.timed_out = True
            raise _Pause
        left = self._deadline - now
        return client._wake_pipe.wait(left if timeout is None else min(timeout, left), fds)
