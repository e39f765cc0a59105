"""The synchronous client: its background work runs in one daemon thread.

:class:`ThreadHeksherClient` is the parts every client holds (see
:mod:`heksher_shm.clients._base`) and a :class:`_ThreadRunner`: the thread
that drives the engine with blocking calls, and the blocking driver's hooks
(:class:`heksher_shm._engine.drivers.SyncHooks`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

import httpx

from heksher_shm._engine.drivers import WakePipe, drive_sync
from heksher_shm._engine.effects import Apply
from heksher_shm._engine.health import Trouble
from heksher_shm._engine.local import LocalHost
from heksher_shm._engine.shared import SharedHost
from heksher_shm._model import protocol as proto
from heksher_shm._process.monkey import watch_monkey_patching
from heksher_shm._process.servers import forking_uwsgi_master
from heksher_shm._process.threads import block_signals, start_thread
from heksher_shm.clients._answers import RequestAnswers
from heksher_shm.clients._background import Background
from heksher_shm.clients._base import BaseHeksherClient
from heksher_shm.clients._feed import SettingsFeed

__all__ = ["ThreadHeksherClient"]

logger = logging.getLogger("heksher_shm.client")

S = TypeVar("S", bound="ThreadHeksherClient")

HANDOVER_TIMEOUT = 10.0
"""Seconds gevent's patching waits for the thread to reach its next wait (a follower: milliseconds; a
leader: the end of its request). Past that, the thread goes on as it is, and a warning says so."""


class ThreadHeksherClient(BaseHeksherClient["_ThreadRunner"]):
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
            else a per-user folder in a private ``$XDG_RUNTIME_DIR``, under ``/dev/shm`` or in the temp dir).
        segment_name: the shared segment's name (default: derived from the
            service URL and the context features).
        startup_timeout: seconds ``set_as_main()`` and ``reload()`` wait without
            any progress towards their update (a leader that neither answers nor
            works on it) before logging an error and returning.
        snapshot_file: a last-known-good file: the leader keeps the latest
            snapshot there, and a host with no snapshot that cannot reach the
            service starts from it (default: ``HEKSHER_SHM_SNAPSHOT_FILE``, else
            none; see :doc:`/last-known-good`).
    """

    _kind = "thread"
    _http_class = httpx.Client

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
            runner=_ThreadRunner,
        )

    # -- documented API --------------------------------------------------------------------------------------

    @property
    def modification_lock(self) -> threading.Lock:
        """Held while setting values change; hold it to keep them from changing."""
        return self._runner.modification_lock

    def __enter__(self: S) -> S:
        # ``with client:`` makes the client main on entry and closes it on exit.
        self.set_as_main()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def set_as_main(self) -> None:
        """Make this the main client: declare all settings, then wait for an initial update."""
        self._become_main()
        if forking_uwsgi_master():
            self._start_in_uwsgi_master()
            return
        self._runner.start()
        self._runner.apply(Apply(blocking=True))
        seq = self._register_as_main()
        if seq is not None:
            self._wait_for(seq, "set_as_main")

    def reload(self) -> None:
        """Update all rules now, and wait until done; also resets the update timer."""
        self._wait_for(self._registration.request(), "reload")

    def close(self) -> None:
        """Stop the background thread and close the HTTP client."""
        if self._closed:
            return
        self._mark_closed()
        self._runner.stop()
        self._leave_shared()
        self._runner.close()

    def ping(self) -> None:
        """Check the health of the Heksher service.

        Raises:
            httpx.HTTPError: the ping failed.
        """
        self._runner.http().get(proto.HEALTH).raise_for_status()

    def get_settings(self) -> dict[str, proto.SettingData]:
        """All settings declared on the service (not only this client's), by name."""
        response = self._runner.http().get(proto.SETTINGS, params={"include_additional_data": "true"})
        response.raise_for_status()
        data = proto.decode(proto.SETTINGS, response.status_code, response.content, proto.SettingsResponse)
        return {s.name: s for s in data.settings}

    # -- waiting for the leader ------------------------------------------------------------------------------

    def _wait_for(self, seq: int, what: str) -> None:
        """Wait until request *seq* is answered; give up after ``startup_timeout`` without progress."""
        answers = self._answers
        progress = answers.progress(seq)
        deadline = time.monotonic() + self._startup_timeout
        with self._runner.applied:
            while not (answers.acked(seq) or self._closed):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    now_progress = answers.progress(seq)
                    if now_progress == progress:
                        break
                    progress, deadline = now_progress, time.monotonic() + self._startup_timeout
                    continue
                self._runner.applied.wait(remaining)
        self._report_wait(seq, what, timed_out=not answers.acked(seq))

    def _report_wait(self, seq: int, what: str, timed_out: bool) -> None:
        """Log how request *seq* ended (the thread client never raises from the background)."""
        if self._closed:
            return
        trouble = self._runner.failing[what]
        if timed_out:
            trouble.failed(self._answers.timed_out(what), timeout=self._startup_timeout)
            return
        error = self._answers.error(seq, starting=what == "set_as_main")
        if error is None:
            trouble.resolved()
        else:
            trouble.failed(error)

    def _start_in_uwsgi_master(self) -> None:
        """``set_as_main`` in a uwsgi master that forks the workers from here (no ``--lazy-apps``).

        The first update is made in this thread, with no background thread at
        all: uwsgi forks with ``fork(2)``, and a worker forked while another
        thread holds the GIL hangs (uwsgi issue 2387). Then the master lets go
        of everything shared (the lock, its registration and doorbell): it
        serves no requests, and each worker resumes its copy of this client
        from uwsgi's post-fork hook (see :mod:`heksher_shm._process.servers`).
        """
        if self._runner.thread is not None:
            raise RuntimeError(
                "this client's background thread already runs in a uwsgi master that will fork the "
                "workers from it: a worker forked while that thread holds the GIL hangs. Make the client "
                "main before uwsgi forks (at import), or start uwsgi with --lazy-apps."
            )
        self._runner.apply(Apply(blocking=True))
        seq = self._register_as_main()
        if seq is not None:
            timed_out = self._runner.run_here_until(seq, self._answers, self._startup_timeout)
            self._report_wait(seq, "set_as_main", timed_out=timed_out)
        self._leave_shared()

    # -- what tests look at ----------------------------------------------------------------------------------

    @property
    def _http(self) -> httpx.Client:
        return self._runner.http()

    @property
    def _thread(self) -> threading.Thread | None:
        return self._runner.thread

    def _pause_for_monkey_patch(self) -> bool:
        return self._runner._pause_for_monkey_patch()

    def _resume_after_monkey_patch(self) -> None:
        self._runner._resume_after_monkey_patch()


class _ThreadRunner:
    """How the thread client runs its engine: a daemon thread drives it with blocking calls, woken
    through a pipe. Holds ``modification_lock``, the HTTP client and the declaration pool, and is the
    blocking driver's hooks (:class:`heksher_shm._engine.drivers.SyncHooks`): every point where the
    engine touches the thread client is a method here or in :mod:`heksher_shm.clients._background`.
    """

    def __init__(self, service_url: str, http_client_args: dict[str, Any]) -> None:
        self._service_url = service_url
        self._http_client_args = http_client_args
        self._background: Background | None = None
        self._feed: SettingsFeed | None = None
        self._report: Callable[[BaseException | None], None] = _unbound
        self._make()

    def _make(self, wake_pipe: WakePipe | None = None) -> None:
        # Also run in a forked child: nothing of the parent's threads is kept,
        # and the parent's HTTP client (with its sockets) is abandoned, never closed.
        self.modification_lock = threading.Lock()
        """Held while setting values change; hold it to keep them from changing."""
        self._http_client: httpx.Client | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._wake_pipe = wake_pipe if wake_pipe is not None else WakePipe()
        self.applied = threading.Condition()
        """Notified whenever a snapshot was applied (or the client closed): waiters look at the answers."""
        self.thread: threading.Thread | None = None
        # Stopping the thread before gevent patches the process (heksher_shm._process.monkey): asked
        # by the patching thread, granted by the client's thread at its next wait, under this lock.
        self._handover = threading.Lock()
        self._pause_asked = False
        self._paused = False
        # One error line when requests start failing, not one (with a traceback) per call.
        self.failing = {
            what: Trouble(
                logger, f"{what} failed", time.monotonic, logging.ERROR, service_url=self._service_url
            )
            for what in ("set_as_main", "reload")
        }

    def bind(
        self, background: Background, feed: SettingsFeed, report: Callable[[BaseException | None], None]
    ) -> None:
        self._background, self._feed, self._report = background, feed, report

    @property
    def closed(self) -> bool:
        """Whether the client closed (its engine is closed first)."""
        return self._background is not None and self._background.engine.closed

    # -- what the shared parts ask of it (heksher_shm.clients._base.Runner) ----------------------------------

    def wake(self) -> None:
        self._wake_pipe.wake()

    def try_enter(self) -> bool:
        return self.modification_lock.acquire(blocking=False)

    def leave(self) -> None:
        self.modification_lock.release()

    def notify_applied(self) -> None:
        with self.applied:
            self.applied.notify_all()

    def after_fork_in_child(self) -> None:
        # The parent's copies go. A closed client's pipe was closed already, and its numbers may be
        # anyone's by now (closing them again, a child lost two of its own descriptors); it gets no
        # new one: nothing waits or wakes in a closed client.
        pipe = self._wake_pipe
        closed = pipe.closed
        pipe.close()
        self._make(pipe if closed else None)

    def resume_in_child(self) -> None:
        self.start()

    # -- running ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Run the engine in the background thread (once)."""
        if self.thread is None:
            self.thread = start_thread(self._run, "heksher-shm")
            # A real OS thread in a process that gevent may patch later (a gunicorn --preload worker):
            # stopped before the patch, started again after it as a greenlet.
            watch_monkey_patching(self)

    def _run(self) -> None:
        assert self._background is not None
        paused = False
        try:
            engine = self._background.engine
            # Stopped by _Pause (gevent patches the process now): the driver lets go of the lock and
            # rings the others, and _resume_after_monkey_patch starts anew.
            drive_sync(engine.run(), self, engine.closing_effects)
        except _Pause:
            paused = True
        except Exception:
            logger.exception("the heksher background thread stopped on an error")
        finally:
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.shutdown(wait=paused)  # no thread of ours may live through the patch

    # -- gevent's monkey-patching (heksher_shm._process.monkey.Pausable) -------------------------------------

    def _pause_point(self) -> None:
        """Where the thread stops when gevent is about to patch the process (at a wait, before and after)."""
        if self._pause_asked:
            with self._handover:
                if self._pause_asked:
                    self._paused = True
                    raise _Pause

    def _pause_for_monkey_patch(self) -> bool:
        """gevent is about to patch this process: stop the thread at its next wait. True when it stopped."""
        thread = self.thread
        if thread is None or self.closed or thread is threading.current_thread() or not thread.is_alive():
            return False
        with self._handover:
            self._pause_asked = True
        self.wake()
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
        self.thread = None
        return True

    def _resume_after_monkey_patch(self) -> None:
        """gevent patched this process: start the thread again, as the process's threads now start (a
        greenlet of the main thread), with locks, conditions and an HTTP client of the patched kind."""
        if self.closed:
            return
        assert self._background is not None
        http = self._http_client
        self._wake_pipe.close()
        self._background.renew_locks()
        self._make()
        if http is not None:
            http.close()  # its sockets are the kernel's: they would block every greenlet
        self.start()

    def run_here_until(self, seq: int, answers: RequestAnswers, startup_timeout: float) -> bool:
        """Run the engine in the calling thread until request *seq* is answered, or ``startup_timeout``
        passed without progress (then returns True: timed out). The engine lets go of the lock, and rings
        the others, when the run ends."""
        assert self._background is not None
        hooks = _UntilAcked(self, seq, answers, startup_timeout)
        engine = self._background.engine
        try:
            # Stopped by _Pause: the driver then lets go of the lock and rings the others.
            drive_sync(engine.run(), hooks, engine.closing_effects)
        except _Pause:
            pass
        finally:
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.shutdown(wait=True)
        return hooks.timed_out

    def stop(self) -> None:
        """Wake the thread (the engine is closed: it ends), wait for it, and close the HTTP client."""
        self.wake()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._http_client is not None:
            self._http_client.close()

    def close(self) -> None:
        """The last step of closing: no more wakes, and no more waiting."""
        self._wake_pipe.close()
        self.notify_applied()

    # -- the blocking driver's hooks (heksher_shm._engine.drivers.SyncHooks) ---------------------------------

    @property
    def host(self) -> LocalHost | SharedHost:
        """The host the engine's effects are performed on."""
        assert self._background is not None
        return self._background.host

    def housekeep(self) -> bool:
        assert self._background is not None
        return self._background.housekeep()

    def http(self) -> httpx.Client:
        """The client's one HTTP client, made on first use: a follower may never need one, and
        making one costs tens of milliseconds (TLS setup)."""
        client = self._http_client
        if client is None:
            client = self._http_client = httpx.Client(base_url=self._service_url, **self._http_client_args)
        return client

    def pool(self, limit: int) -> ThreadPoolExecutor:
        """The threads that send concurrent declarations (made on first use, kept while leading)."""
        pool = self._pool
        if pool is None:
            pool = self._pool = ThreadPoolExecutor(
                limit, thread_name_prefix="heksher-shm-declare", initializer=block_signals
            )
        return pool

    def wait(self, timeout: float | None, fds: tuple[int, ...]) -> set[int]:
        self._pause_point()
        ready = self._wake_pipe.wait(timeout, fds)
        self._pause_point()  # woken to stop: what woke it is looked at again after the restart
        return ready

    def apply(self, effect: Apply) -> None:
        assert self._feed is not None
        if self.modification_lock.acquire(blocking=effect.blocking):
            try:
                self._feed.apply_latest(notify=False)
            finally:
                self.modification_lock.release()
        if effect.report:
            self.report(effect.error)
        self.notify_applied()

    def report(self, error: BaseException | None) -> None:
        self._report(error)


def _unbound(error: BaseException | None) -> None:
    raise AssertionError("the runner reports before it was bound to its client")


class _Pause(BaseException):
    """Ends a run of the engine in the calling thread, or the background thread before gevent patches
    the process (not an error: nothing may catch it on the way)."""


class _UntilAcked:
    """The blocking driver's hooks for a run in the calling thread that ends once request *seq* is
    answered or the client closes, or after ``startup_timeout`` without progress (``timed_out`` then
    says so). The rest is the runner's."""

    def __init__(
        self, runner: _ThreadRunner, seq: int, answers: RequestAnswers, startup_timeout: float
    ) -> None:
        self._runner = runner
        self._seq = seq
        self._answers = answers
        self._startup_timeout = startup_timeout
        self._progress = answers.progress(seq)
        self._deadline = time.monotonic() + startup_timeout
        self.timed_out = False

    @property
    def host(self) -> LocalHost | SharedHost:
        return self._runner.host

    def housekeep(self) -> bool:
        return self._runner.housekeep()

    def http(self) -> httpx.Client:
        return self._runner.http()

    def pool(self, limit: int) -> ThreadPoolExecutor:
        return self._runner.pool(limit)

    def apply(self, effect: Apply) -> None:
        self._runner.apply(effect)

    def report(self, error: BaseException | None) -> None:
        self._runner.report(error)

    def wait(self, timeout: float | None, fds: tuple[int, ...]) -> set[int]:
        answers = self._answers
        if answers.acked(self._seq) or self._runner.closed:
            raise _Pause
        now = time.monotonic()
        progress = answers.progress(self._seq)
        if progress != self._progress:
            self._progress, self._deadline = progress, now + self._startup_timeout
        if now >= self._deadline:
            self.timed_out = True
            raise _Pause
        left = self._deadline - now
        return self._runner.wait(left if timeout is None else min(timeout, left), fds)
