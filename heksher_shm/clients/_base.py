"""What the async and thread clients are made of, and the API they share: :class:`BaseHeksherClient`.

A client is the front end of one process: it holds the context defaults and
tracked contexts, registers the process's wishes (declarations, tracked
contexts, requests) where the leader reads them, and applies published
snapshots to the process's settings. The background work itself is the
engine (:mod:`heksher_shm._engine`). A client *holds* its parts, one job
each; none inherits another, and each is handed the others it works with::

    contexts       Contexts            defaults and tracked contexts          _contexts.py
    link           HostLink            where snapshots live: in process, or   _link.py
                                       the host's segment, registry, doorbell
    feed           SettingsFeed        snapshots into the settings; the       _feed.py,
                                       applied generation (what Setting sees) _conversion.py
    registration   RegistrationWriter  what this process asks of the leader   _registration.py
    answers        RequestAnswers      what a request came to                 _answers.py
    background     Background          the engine, and what it asks of the    _background.py
                                       client between effects
    runner         a thread or a task  modification_lock, waking, waiting,    thread_client.py
                                       HTTP, and the driver's hooks           async_client.py

:class:`BaseHeksherClient` builds and wires them, and holds what the two
clients share: the documented methods that do not wait, becoming main, and
resuming after ``fork()``. The two clients, one level below, add how they
run and wait: their runner, and the methods that wait for the leader.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar

from heksher_shm._engine.context import ErrorBook
from heksher_shm._engine.engine import Engine
from heksher_shm._engine.host import Wish
from heksher_shm._engine.local import LocalHost
from heksher_shm._engine.shared import SharedParts
from heksher_shm._process import fork as _fork
from heksher_shm._process import main as _main
from heksher_shm._process.main import LiveSetting
from heksher_shm._process.servers import check_background_threads
from heksher_shm._shm.segment import Segment
from heksher_shm.clients._answers import RequestAnswers
from heksher_shm.clients._arguments import check_arguments, check_http_client_args, kept_file
from heksher_shm.clients._background import Background
from heksher_shm.clients._contexts import Contexts
from heksher_shm.clients._feed import Gate, SettingsFeed, settings_of
from heksher_shm.clients._link import HostLink
from heksher_shm.clients._registration import RegistrationWriter
from heksher_shm.exceptions import SegmentError
from heksher_shm.setting import Setting, _ContextView
from heksher_shm.status import SegmentStatus, segment_status

__all__ = ["BaseHeksherClient", "Runner"]

logger = logging.getLogger("heksher_shm.client")


class Runner(Gate, Protocol):
    """How a client runs its engine and waits (a thread, or an asyncio task): what the shared parts ask
    of it. Each client's runner lives in the client's module, made there from the service URL and the
    ``http_client_args``."""

    def bind(
        self, background: Background, feed: SettingsFeed, report: Callable[[BaseException | None], None]
    ) -> None:
        """What it runs: *background*'s engine, applying into *feed*, reporting through *report*
        (called once, when the client's parts are built)."""
        ...

    def wake(self) -> None:
        """Wake the background loop (from any thread)."""
        ...

    def after_fork_in_child(self) -> None:
        """In a forked child: abandon the parent's thread or task, loop and HTTP client (never closing
        them), close the inherited wake descriptors, and make new locks."""
        ...

    def resume_in_child(self) -> None:
        """In a forked child of a main client: resume the background work (now, or when it can)."""
        ...


R = TypeVar("R", bound=Runner)


class BaseHeksherClient(Generic[R]):
    """The parts of :class:`AsyncHeksherClient` and :class:`ThreadHeksherClient`, and the API they share."""

    _is_stub = False
    _kind: ClassVar[Literal["async", "thread"]]
    _http_class: ClassVar[Any]
    """What ``http_client_args`` are passed to (with ``base_url=service_url``)."""

    def __init__(
        self,
        service_url: str,
        update_interval: float,
        context_features: Sequence[str],
        *,
        http_client_args: Mapping[str, Any] | None,
        shared: bool,
        shm_dir: str | os.PathLike[str] | None,
        segment_name: str | None,
        startup_timeout: float,
        snapshot_file: str | os.PathLike[str] | None,
        runner: Callable[[str, dict[str, Any]], R],
    ) -> None:
        check_arguments(
            service_url, update_interval, context_features, http_client_args, startup_timeout, segment_name
        )
        if http_client_args:
            check_http_client_args(self._http_class, service_url, http_client_args)
        self._service_url = service_url
        self._update_interval = float(update_interval)
        self._context_features = tuple(context_features)
        self._http_client_args = dict(http_client_args or {})
        self._startup_timeout = float(startup_timeout)
        kept = kept_file(snapshot_file, service_url, self._context_features)
        self._closed = False
        self._errors = ErrorBook(os.getpid())
        """The exceptions this process's engine reported while leading, by id (see RequestAnswers)."""

        self._runner: R = runner(service_url, self._http_client_args)
        self._contexts = Contexts()
        self._registration: RegistrationWriter
        self._link = HostLink(
            self._wish,
            shared=bool(shared),
            shm_dir=None if shm_dir is None else os.fspath(shm_dir),
            segment_name=segment_name,
            kept=kept,
        )
        self._answers: RequestAnswers
        self._feed = SettingsFeed(
            self._contexts,
            self._link.transport,
            self._runner,
            is_main=lambda: _main.current() is self,
            damaged=self._segment_damaged,
            update_failed=self._update_failed,
            applied=self._take_answer,
        )
        self._answers = RequestAnswers(
            self._feed, self._contexts, self._link, self._errors, self._startup_timeout
        )
        self._registration = RegistrationWriter(
            self._feed,
            self._contexts,
            self._link,
            self._kind,
            wake=self._runner.wake,
            leading=lambda: self.leading,
        )
        self._background = Background(
            self._link,
            self._feed,
            self._registration,
            self._errors,
            service_url=service_url,
            update_interval=self._update_interval,
            context_features=self._context_features,
        )
        self._runner.bind(self._background, self._feed, self._report)
        _live_clients.add(self)

    # -- documented API shared by both clients ---------------------------------------------------------------

    @property
    def segment_path(self) -> str | None:
        """The shared segment's file, once this client joined one (``None`` with ``shared=False``)."""
        parts = self._link.parts
        return None if parts is None else str(parts.segment.path)

    @property
    def leading(self) -> bool:
        """Whether this client is currently its host's leader (always, alone with ``shared=False``)."""
        return self._engine.leading

    def shared_status(self) -> SegmentStatus:
        """The status of this client's shared segment: leader, generation, freshness, processes, counts.

        Raises:
            heksher_shm.exceptions.SegmentError: not joined to a segment (``shared=False``, before
                ``set_as_main``, or the host's folder could not be used: the message says why).
        """
        if self._link.unshared is not None:
            raise SegmentError(f"this client serves without sharing: {self._link.unshared}")
        return segment_status(self.segment_path)

    def track_contexts(self, **context_values: str | Collection[str]) -> None:
        """Track context feature values: a string, a collection of strings, or :data:`TRACK_ALL`.

        Only rules whose every condition is on tracked values are used.

        Raises:
            RuntimeError: mixing :data:`TRACK_ALL` and specific values for one feature.
            TypeError: a value that is not a string or a collection of strings.
        """
        self._contexts.track(context_values, self._context_features)
        if self._registration.main:
            self._feed.reapply_all()
            self._registration.changed()

    def set_defaults(self, **kwargs: str | ContextVar[str]) -> None:
        """Set default context feature values: a string, or a :class:`~contextvars.ContextVar` read per call.

        Raises:
            ValueError: a feature already has a default.
            TypeError: a value is neither a string nor a context variable.
        """
        self._contexts.add_defaults(kwargs, self._context_features)
        # Settings' cached answers must not outlive the defaults they used.
        self._feed.reinstall_all()

    def on_update_error(self, exc: Exception) -> None:
        """Called when a rule update fails. Override to handle errors."""

    def on_update_ok(self) -> None:
        """Called after a successful rule update (including when nothing changed). Override to add one."""

    # -- what the parts are, for tests that look inside ------------------------------------------------------

    @property
    def _engine(self) -> Engine:
        """The engine the runner drives (rebuilt when the client joins its host, or is forked)."""
        return self._background.engine

    @property
    def _parts(self) -> SharedParts | None:
        """The host's shared files, once joined."""
        return self._link.parts

    # -- becoming main, and leaving (heksher_shm._process.main.MainClient) -----------------------------------

    def _become_main(self) -> None:
        """Become the process's main client. ``set_as_main`` then registers what it needs, asking the
        leader for a query only if the current snapshot does not serve it already (see
        :meth:`_register_as_main`)."""
        if self._closed:
            raise RuntimeError("this client is closed")
        check_background_threads()
        if self._link.join(self._service_url, self._context_features):
            self._feed.move_to(self._link.transport)
            self._background.rebuild(self._context_features)
        settings = settings_of(_main.set_main(self))
        self._registration.main = True
        self._feed.adopt(settings)

    def _register_as_main(self) -> int | None:
        """Write this process's registration, once the current snapshot is applied.

        Returns the request number to wait for, or None when the snapshot
        already serves this process (then nobody queries on its behalf, so a
        new preforked worker costs the service nothing).
        """
        if self._answers.already_served():
            self._registration.changed()
            return None
        return self._registration.request(query=False)

    def _setting_added(self, setting: LiveSetting) -> None:
        """A setting was created while this client is main: serve it, and declare it."""
        self._feed.adopt(settings_of([setting]))
        self._registration.setting_added()

    def _replaced_as_main(self) -> None:
        """Another client of this process became main (:func:`heksher_shm._process.main.set_main`).

        The process has one registration, and it is the new main client's now:
        this one stops writing it, defending it, and removing it on close. (If
        it leads the host, it goes on leading until it closes.)
        """
        self._registration.stop()

    def _mark_closed(self) -> None:
        """The first step of closing: nothing is started or written from here on."""
        self._closed = True
        self._engine.closed = True
        self._registration.closed = True

    def _leave_shared(self) -> None:
        """On close: take this process's registration and doorbell away (the segment stays for the others)."""
        self._registration.withdraw()
        self._link.close()

    # -- what the parts ask of the client --------------------------------------------------------------------

    def _report(self, error: BaseException | None) -> None:
        """Report an update's outcome to the callbacks (whose own errors are logged, never raised), then
        to the integrations' listeners."""
        try:
            if error is None:
                self.on_update_ok()
            elif isinstance(error, Exception):
                self.on_update_error(error)
        except Exception:
            logger.exception("update callback raised")
        for listener in self._update_listeners:
            try:
                listener(error)
            except Exception:
                logger.exception("update listener raised")

    # -- for the integrations (heksher_shm.openfeature): the one surface they use; keep it -----------------

    _update_listeners: tuple[Callable[[BaseException | None], None], ...] = ()

    def _add_update_listener(self, listener: Callable[[BaseException | None], None]) -> None:
        """Call ``listener(error)`` at every wake-up that runs :meth:`on_update_ok` (``error`` None) or
        :meth:`on_update_error`, right after it, in this process, leader or follower. It runs in the
        client's background thread or event loop: it must return quickly; what it raises is logged."""
        self._update_listeners = (*self._update_listeners, listener)

    def _remove_update_listener(self, listener: Callable[[BaseException | None], None]) -> None:
        """Stop calling *listener* (nothing if it was not added)."""
        self._update_listeners = tuple(known for known in self._update_listeners if known != listener)

    def _snapshot_source(self) -> LocalHost | Segment:
        """What this client reads snapshots from: ``words`` (item 2 is the generation), ``generation()``,
        ``read_head()``, ``read_blobs()``, ``update_marks()``. It changes when the segment file is
        reopened: ask again rather than keep it."""
        return self._link.transport

    def _context_view(self) -> _ContextView:
        """The defaults and tracked values a setting's answer is made with."""
        return self._contexts.view()

    @property
    def _defaults_version(self) -> int:
        """Bumped when the defaults change: answers made with older defaults are stale."""
        return self._contexts.version

    def _sharing_problem(self) -> str | None:
        """Why this client serves without sharing although sharing is on (its host's folder or files
        could not be used), or None."""
        return self._link.unshared

    def _feeds(self, setting: Setting[Any]) -> bool:
        """Whether *setting*'s rules come from this client."""
        return setting._state.feed is self._feed

    def _wish(self) -> Wish:
        """What this process asks for now (read by the in-process host, alone)."""
        return self._registration.wish()

    def _take_answer(self) -> None:
        """The feed applied a snapshot: take the leader's latest answer to this process's requests."""
        self._answers.take()

    def _update_failed(self, error: Exception) -> None:
        """A validator or ``on_coerce`` failed on new values (the feed logs it, and callback errors)."""
        self.on_update_error(error)

    def _segment_damaged(self) -> None:
        """A snapshot failed its checks: report it in the segment, then have whoever leads check the
        segment (it publishes again)."""
        if self._link.neighbours is None:
            return
        self._link.report_damage()
        if self.leading:
            self._runner.wake()
        else:
            self._link.ring_leader()

    # -- fork ------------------------------------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        """In a forked child: forget the parent's threads, loop and HTTP client, and join as a follower.

        Nothing here unlocks or unlinks anything of the parent's: the election
        lock's descriptor is closed (not unlocked) by its own fork hook, and the
        parent's doorbell and leader watch are closed, never removed.
        """
        self._background.renew_locks()
        self._runner.after_fork_in_child()
        self._link.after_fork_in_child(listen=not self._closed)
        self._background.rebuild(self._context_features)
        if self._link.passive:
            return  # get() applies what the leader publishes; nothing runs in the background
        if self._registration.main and not self._closed:
            self._registration.changed()
            self._runner.resume_in_child()


_live_clients: weakref.WeakSet[BaseHeksherClient[Any]] = weakref.WeakSet()
"""Every client of this process (each resumes after fork)."""


def _reset_after_fork() -> None:
    """In a forked child (run by :mod:`heksher_shm._process.fork`, after the lower layers' resets): every
    live client resumes."""
    for client in list(_live_clients):
        try:
            client._after_fork_in_child()
        except Exception:
            logger.exception("heksher client could not resume after fork")


_fork.register_child_reset(__name__, _reset_after_fork)
