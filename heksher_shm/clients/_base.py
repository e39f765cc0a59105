"""What the async and thread clients share: everything but how they wait and do HTTP.

A client here is the *front end* of one process: it holds the context
defaults and tracked contexts, registers the process's wishes (declarations,
tracked contexts, requests) where the leader reads them, and applies
published snapshots to the process's settings. The background work itself is
the engine (:mod:`heksher_shm._engine`), driven by each client in its own way
(:mod:`heksher_shm.clients.thread_client`, :mod:`heksher_shm.clients.async_client`).

The parts, one module each, over one shared state::

    _base.py          BaseHeksherClient: the documented API, becoming main, fork
    _registering.py     telling the leader what this process needs; keeping the files in place
    _answers.py         what a request came to: acknowledged, failed, timed out, already served
    _applying.py        applying snapshots to the settings, and compiling their rules lazily
    _core.py            the state, the engine, and the driver's hooks
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection

from heksher_shm._engine.shared import Neighbours, SharedHost, wish_key
from heksher_shm._model.contexts import TRACK_ALL
from heksher_shm._process import main as _main
from heksher_shm._process.servers import check_background_threads
from heksher_shm._shm.identity import current_identity
from heksher_shm.clients._answers import Answering
from heksher_shm.clients._applying import Applying
from heksher_shm.clients._core import _bell_numbers, _live_clients
from heksher_shm.clients._registering import Registering
from heksher_shm.exceptions import SegmentError
from heksher_shm.setting import _ContextView
from heksher_shm.status import SegmentStatus, segment_status

__all__ = ["BaseHeksherClient"]

logger = logging.getLogger("heksher_shm.client")

_UNTRACKED_WARNINGS = 1024
"""Distinct untracked context values warned about (once each) before falling silent."""


class BaseHeksherClient(Registering, Answering, Applying):
    """State and logic shared by :class:`AsyncHeksherClient` and :class:`ThreadHeksherClient`."""

    @property
    def segment_path(self) -> str | None:
        """The shared segment's file, once this client joined one (``None`` with ``shared=False``)."""
        return None if self._parts is None else str(self._parts.segment.path)

    @property
    def leading(self) -> bool:
        """Whether this client is currently its host's leader (always, alone with ``shared=False``)."""
        return self._engine.leading

    def shared_status(self) -> SegmentStatus:
        """The status of this client's shared segment: leader, generation, freshness, processes, counts.

        Raises:
            heksher_shm.exceptions.SegmentError: not joined to a segment (``shared=False``, or before
                ``set_as_main``).
        """
        return segment_status(self.segment_path)

    def track_contexts(self, **context_values: str | Collection[str]) -> None:
        """Track context feature values: a string, a collection of strings, or :data:`TRACK_ALL`.

        Only rules whose every condition is on tracked values are used.

        Raises:
            RuntimeError: mixing :data:`TRACK_ALL` and specific values for one feature.
            TypeError: a value that is not a string or a collection of strings.
        """
        unknown = context_values.keys() - set(self._context_features)
        if unknown:
            logger.warning("context features are not specified in server", extra={"redundant_keys": unknown})
        for feature, values in context_values.items():
            existing = self._tracked.get(feature)
            if values == TRACK_ALL:
                if existing is not None and existing != TRACK_ALL:
                    raise RuntimeError("cannot set TRACK_ALL to a feature that's already been used to track")
                self._tracked[feature] = TRACK_ALL
                continue
            new = {values} if isinstance(values, str) else set(values)
            if not all(isinstance(v, str) for v in new):
                raise TypeError(f"tracked values of {feature} must be strings, got {values!r}")
            if existing == TRACK_ALL:
                raise RuntimeError("cannot track a specific value after the feature's been set to TRACK_ALL")
            if existing is None:
                self._tracked[feature] = new
            else:
                assert isinstance(existing, set)
                existing.update(new)
        self._warned_untracked.clear()
        if self._main:
            self._force_reapply()
            self._wish_changed()

    def on_update_error(self, exc: Exception) -> None:
        """Called when a rule update fails. Override to handle errors."""

    def on_update_ok(self) -> None:
        """Called after a successful rule update (including when nothing changed). Override to add one."""

    def _context_view(self) -> _ContextView:
        return _ContextView(
            self._const_defaults, tuple(self._var_defaults.items()), self._tracked, self._warn_untracked
        )

    def _warn_untracked(self, feature: str, value: str) -> None:
        warned = self._warned_untracked
        if (feature, value) in warned or len(warned) > _UNTRACKED_WARNINGS:
            return
        warned.add((feature, value))
        if len(warned) > _UNTRACKED_WARNINGS:
            logger.warning("too many untracked context values; no more warnings about them")
            return
        logger.warning(
            "context feature value is not tracked by client",
            extra={"context_feature": feature, "context_feature_value": value},
        )

    def _after_fork_in_child(self) -> None:
        """In a forked child: forget the parent's threads, loop and HTTP client, and join as a follower.

        Nothing here unlocks or unlinks anything of the parent's: the election
        lock's descriptor is closed (not unlocked) by its own fork hook, and the
        parent's doorbell and leader watch are closed, never removed.
        """
        self._renew_locks()
        self._close_driver_in_child()
        if self._neighbours is not None:
            self._neighbours.forget_inherited()
            self._neighbours = None
        self._host = self._local_host
        if self._parts is not None:
            identity = current_identity()
            self._key = wish_key(identity)
            if not self._closed:
                try:
                    self._neighbours = Neighbours(self._parts, self._key, next(_bell_numbers))
                    self._host = SharedHost(self._parts, self._neighbours, identity)
                except SegmentError:
                    logger.exception("cannot listen for the leader after fork; rules still come on get()")
        self._engine = self._make_engine()
        self._init_driver()
        if self._parts is not None and self._neighbours is None:
            return  # passive: get() applies what the leader publishes; nothing runs in the background
        if self._main and not self._closed:
            self._wish_changed()
            self._restart_after_fork()

    def _renew_locks(self) -> None:
        """New locks of this client's own: in a forked child (the parent's threads may have held the old
        ones) and after gevent patched the process (the old ones are the kernel's, and a greenlet that
        switches while holding one would block every other greenlet of the process)."""
        self._apply_lock = threading.RLock()
        self._register_lock = threading.Lock()

    def _become_main(self) -> None:
        """Become the process's main client. ``set_as_main`` then registers what it needs, asking the
        leader for a query only if the current snapshot does not serve it already (see
        :meth:`_register_as_main`)."""
        if self._closed:
            raise RuntimeError("this client is closed")
        check_background_threads()
        self._join_shared()
        settings = _main.set_main(self)
        self._main = True
        for setting in settings:
            self._settings.add(setting)
            setting._install_state(self, None)
        self._applied_generation = -1

    def _replaced_as_main(self) -> None:
        """Another client of this process became main (:func:`heksher_shm._process.main.set_main`).

        The process has one registration, and it is the new main client's now:
        this one stops writing it, defending it, and removing it on close. (If
        it leads the host, it goes on leading until it closes.)
        """
        with self._register_lock:
            self._main = False
            self._registered = b""


def _reset_after_fork() -> None:
    """In a forked child (called by :mod:`heksher_shm._process.fork`, last): every live client resumes."""
    for client in list(_live_clients):
        try:
            client._after_fork_in_child()
        except Exception:
            logger.exception("heksher client could not resume after fork")
