"""A client's state, its engine, and the hooks its driver (thread or asyncio) fills in."""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import httpx

from heksher_shm._engine.context import Context, ErrorBook
from heksher_shm._engine.engine import Engine
from heksher_shm._engine.host import Wish
from heksher_shm._engine.local import LocalHost
from heksher_shm._engine.shared import (
    SEGMENT_NAME,
    Neighbours,
    SharedHost,
    SharedParts,
    open_shared,
    wish_key,
)
from heksher_shm._model.snapshot import Ack, Head, SettingEntry
from heksher_shm._shm.identity import current_identity
from heksher_shm._shm.lastgood import ENV_SNAPSHOT_FILE, KeptFile
from heksher_shm._shm.segment import Segment
from heksher_shm.clients._defaults import ContextDefaults
from heksher_shm.exceptions import SegmentError
from heksher_shm.setting import Setting, _ContextView

__all__ = ["ClientCore"]

logger = logging.getLogger("heksher_shm.client")

_bell_numbers = itertools.count(1)
"""Numbers this process's doorbells (one per client that joins a segment)."""


class _RequestNumbers:
    """This process's request numbers (``reload_seq``), shared by all its clients.

    The leader answers requests per process (one registration per process),
    so a client that becomes main after another must number its requests
    after the other's: else the answers the earlier client got would count as
    answers to the new one's requests.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.latest = 0
        """The last number given out (a new client starts its registration there: never backwards)."""

    def next(self) -> int:
        with self._lock:
            self.latest += 1
            return self.latest


request_numbers = _RequestNumbers()


class ClientCore(ContextDefaults):
    """The state the parts of a client share, and the engine it runs (see
    :mod:`heksher_shm.clients._base`)."""

    _is_stub = False
    _kind: Literal["async", "thread"]
    _http_class: type[httpx.Client] | type[httpx.AsyncClient]
    """What ``http_client_args`` are passed to (with ``base_url=service_url``)."""

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
        _check_arguments(
            service_url, update_interval, context_features, http_client_args, startup_timeout, segment_name
        )
        if http_client_args:
            _check_http_client_args(self._http_class, service_url, http_client_args)
        super().__init__()
        self._service_url = service_url
        self._update_interval = float(update_interval)
        self._context_features = tuple(context_features)
        self._http_client_args = dict(http_client_args or {})
        self._shared = bool(shared)
        self._shm_dir = None if shm_dir is None else os.fspath(shm_dir)
        self._segment_name = segment_name
        self._startup_timeout = float(startup_timeout)
        self._kept = _kept_file(snapshot_file, service_url, self._context_features)

        self._tracked: dict[str, str | set[str]] = {}
        self._warned_untracked: set[tuple[str, str]] = set()

        self._settings: weakref.WeakSet[Setting[Any]] = weakref.WeakSet()
        self._reapply_all = False
        """Set when every setting must be rebuilt from the next snapshot, whatever its blob digest."""
        self._peeked: tuple[int, Head, dict[str, SettingEntry]] | None = None
        """The head get() decoded to apply one setting (see _apply_one), until the full apply."""
        self._released_failures: dict[str, str] = {}
        """Declaration digest -> setting name, of settings released after their declaration failed."""
        self._failed_conversions: weakref.WeakKeyDictionary[Setting[Any], int] = weakref.WeakKeyDictionary()
        """Settings whose new rules a validator or on_coerce failed on, and the generation they came in."""
        # Reentrant: validators run while it is held, and may call get() on other settings.
        self._apply_lock = threading.RLock()
        # A list, not an int: settings' states share it, so get() compares the
        # segment's generation word with it without calling into the client.
        self._applied_box = [-1]
        self._queried = 0.0
        self._head: Head | None = None
        self._ack: Ack | None = None
        """The leader's latest answer to this process's requests, as of the last apply."""
        self._reload_seq = request_numbers.latest
        self._query_seq = 0
        self._wish_dirty = False
        """A setting was added since the registration was written: the background loop writes it."""
        self._errors = ErrorBook(os.getpid())
        self._main = False
        self._closed = False
        self._parts: SharedParts | None = None
        # Why this client serves without sharing although shared=True (the host's folder or files
        # could not be used), or None.
        self._unshared: str | None = None
        self._neighbours: Neighbours | None = None
        self._registered = b""
        """What this process last wrote as its registration (empty until set_as_main writes it)."""
        # Held while the registration is computed and written, from set_as_main/reload/track_contexts
        # and from the background loop's housekeeping: the last write carries the latest wish.
        self._register_lock = threading.Lock()
        self._local_host = LocalHost(self._wish, self._kept)
        self._host: LocalHost | SharedHost = self._local_host
        self._transport: LocalHost | Segment = self._local_host
        self._key = f"local-{id(self):x}"
        self._engine = self._make_engine()
        self._init_driver()
        _live_clients.add(self)

    def _make_engine(self) -> Engine:
        """The engine of this client (again after joining a segment, or in a forked child)."""
        ctx = Context(
            update_interval=self._update_interval,
            context_features=self._context_features,
            shared=self._parts is not None,
            clock=_SYSTEM_CLOCK,
            rng=random.Random(),
            errors=self._errors,
            service_url=self._service_url,
        )
        return Engine(ctx)

    def _join_shared(self) -> None:
        """Open the host's segment (once): from now on this client leads or follows there.

        A folder or file that must not be used (another user's, loosened, a
        full disk, a read-only ``/dev/shm``) does not stop the application:
        the client serves without sharing, as ``shared=False`` would, and says
        so once at ERROR, with the fix (see :attr:`_unshared`).
        """
        if not self._shared or self._parts is not None or self._unshared is not None:
            return
        try:
            parts = open_shared(
                self._service_url,
                self._context_features,
                shm_dir=self._shm_dir,
                segment_name=self._segment_name,
            )
            identity = current_identity()
            neighbours = Neighbours(parts, wish_key(identity), next(_bell_numbers))
        except SegmentError as error:
            self._unshared = str(error)
            _say_unshared(self._unshared)
            return
        self._key = wish_key(identity)
        self._neighbours = neighbours
        self._parts = parts
        self._host = SharedHost(parts, self._neighbours, identity, self._kept)
        self._transport = parts.segment
        self._applied_generation = -1
        self._engine = self._make_engine()

    def _init_driver(self) -> None:
        """Create what the driver owns: ``modification_lock``, the HTTP client, events.

        Called at construction and again in a forked child, where it replaces
        whatever the parent's threads may have held at fork time.
        """
        raise NotImplementedError

    def _restart_after_fork(self) -> None:
        """Resume background work in the child."""
        raise NotImplementedError

    def _close_driver_in_child(self) -> None:
        """In a forked child, before ``_init_driver``: close descriptors the parent's driver owned."""

    @property
    def _applied_generation(self) -> int:
        """The generation of the shared snapshot applied to this process's settings."""
        return self._applied_box[0]

    @_applied_generation.setter
    def _applied_generation(self, generation: int) -> None:
        self._applied_box[0] = generation

    def _watch(self) -> tuple[Any, list[int]]:
        """What get() compares: the transport's words (item 2 is the generation) and the applied box."""
        return self._transport.words, self._applied_box

    def _try_modification_lock(self) -> bool:
        raise NotImplementedError

    def _release_modification_lock(self) -> None:
        raise NotImplementedError

    def _notify_applied(self) -> None:
        """Wake whoever waits for an acknowledgement (set_as_main, reload)."""

    def _wake(self) -> None:
        """Wake the background loop (the driver's)."""
        raise NotImplementedError

    # -- what the parts provide each other (defined in the mixins of BaseHeksherClient) ---------------

    def _wish(self) -> Wish:  # clients._registering
        raise NotImplementedError

    def _setting_added(self, setting: Setting[Any]) -> None:  # clients._registering
        raise NotImplementedError

    def _flush_wish(self) -> None:  # clients._registering
        raise NotImplementedError

    def _housekeep(self) -> bool:  # clients._registering
        raise NotImplementedError

    def _segment_damaged(self) -> None:  # clients._registering
        raise NotImplementedError

    def _take_ack(self) -> None:  # clients._answers
        raise NotImplementedError

    def _already_served(self) -> bool:  # clients._answers
        raise NotImplementedError

    def _reinstall_all(self) -> None:  # clients._applying
        raise NotImplementedError

    def _refresh(self, setting: Setting[Any]) -> None:  # clients._applying
        raise NotImplementedError

    def _context_view(self) -> _ContextView:  # clients._base
        raise NotImplementedError

    def _after_fork_in_child(self) -> None:  # clients._base
        raise NotImplementedError

    def _replaced_as_main(self) -> None:  # clients._base
        raise NotImplementedError

    def on_update_error(self, exc: Exception) -> None:  # clients._base (public)
        raise NotImplementedError


def _check_arguments(
    service_url: object,
    update_interval: object,
    context_features: object,
    http_client_args: object,
    startup_timeout: object,
    segment_name: object,
) -> None:
    """Refuse a wrong constructor argument at once, naming it (not later, in the background)."""
    if not isinstance(service_url, str) or not service_url:
        raise TypeError(f"service_url must be a non-empty string, got {service_url!r}")
    _check_seconds("update_interval", update_interval)
    if (
        isinstance(context_features, str)
        or not isinstance(context_features, Sequence)
        or not all(isinstance(f, str) for f in context_features)
    ):
        raise TypeError(f"context_features must be a sequence of names, got {context_features!r}")
    if http_client_args is not None and not isinstance(http_client_args, Mapping):
        raise TypeError(f"http_client_args must be a mapping, got {http_client_args!r}")
    _check_seconds("startup_timeout", startup_timeout)
    if segment_name is not None and not (
        isinstance(segment_name, str) and SEGMENT_NAME.fullmatch(segment_name)
    ):
        raise ValueError(f"segment_name must match {SEGMENT_NAME.pattern}, got {segment_name!r}")


class _NoTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Stands in for the real transport while ``http_client_args`` are tried (nothing is sent)."""


def _check_http_client_args(
    http_class: type[httpx.Client] | type[httpx.AsyncClient], service_url: str, args: Mapping[str, Any]
) -> None:
    """Refuse ``http_client_args`` the HTTP client would refuse, now rather than in the background.

    Only the leader builds its HTTP client (followers never send a request), and building one costs
    30-50 ms (its TLS context), so the arguments are tried on a client with a stand-in transport: a
    misspelled keyword or a wrong type fails here, naming it. What only the real transport reads
    (``verify``, ``cert``, proxies) is checked when the leader builds it; a failure then is the
    update's error (``on_update_error``, the log).
    """
    if "base_url" in args:
        raise ValueError("http_client_args must not hold base_url: service_url is the base URL")
    trial = {**args, "transport": args.get("transport", _NoTransport())}
    try:
        http_class(base_url=service_url, **trial)  # not closed: closing would close a transport of theirs
    except (TypeError, ValueError) as error:
        raise type(error)(f"http_client_args are refused by {http_class.__qualname__}: {error}") from error


_said_unshared: set[str] = set()


def _say_unshared(problem: str) -> None:
    """Once per process and problem, at ERROR: why this process polls on its own, and the fix."""
    if problem in _said_unshared or len(_said_unshared) > 64:
        return
    _said_unshared.add(problem)
    logger.error(
        "cannot share the host's rule cache: %s; this process serves its settings on its own, polling "
        "the service itself as heksher 0.2.2 does. To share again, make that folder or file this user's "
        "own and private (or remove it: it is made again), or point HEKSHER_SHM_DIR (or shm_dir) at a "
        "private folder of this user's, and restart the processes",
        problem,
        extra={"problem": problem},
    )


def _kept_file(
    snapshot_file: str | os.PathLike[str] | None, service_url: str, context_features: tuple[str, ...]
) -> KeptFile | None:
    """The client's last-known-good file: ``snapshot_file``, else ``HEKSHER_SHM_SNAPSHOT_FILE``, else none."""
    if snapshot_file is None:
        snapshot_file = os.environ.get(ENV_SNAPSHOT_FILE) or None
    if snapshot_file is None:
        return None
    if not isinstance(snapshot_file, (str, os.PathLike)) or not os.fspath(snapshot_file):
        raise TypeError(f"snapshot_file must be a path, got {snapshot_file!r}")
    return KeptFile(Path(os.path.abspath(os.fspath(snapshot_file))), service_url, context_features)


def _check_seconds(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


class _SystemClock:
    """The engine's clock in a real process."""

    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)


_SYSTEM_CLOCK = _SystemClock()

_live_clients: weakref.WeakSet[ClientCore] = weakref.WeakSet()
"""Every client of this process (each resumes after fork, see :mod:`heksher_shm.clients._base`)."""
