"""The provider's events, driven by the client's wake-ups (no thread or poll of their own).

The provider registers :meth:`Events.on_update` with its client as an update
listener: the client calls it at every wake-up that runs ``on_update_ok`` or
``on_update_error``, in every process, leader or follower. At each call:

* ``PROVIDER_CONFIGURATION_CHANGED``, with the names of the settings whose
  default or rules changed (or that appeared or went away), when a new
  snapshot was published since the last call;
* ``PROVIDER_ERROR`` when an update failed (once, until the next success or
  staleness), ``PROVIDER_STALE`` when the rules are older than the staleness
  bound (:func:`heksher_shm.status.stale_after`), and ``PROVIDER_READY`` on
  the first successful update after either.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from openfeature.event import ProviderEventDetails
from openfeature.exception import ErrorCode

from heksher_shm._process import fork as _fork
from heksher_shm.exceptions import SegmentError
from heksher_shm.openfeature.flags import SnapshotView, read_view
from heksher_shm.status import stale_after

__all__ = ["Events"]

logger = logging.getLogger("heksher_shm.openfeature")


class _Provider(Protocol):
    """What the events use of their provider (:class:`heksher_shm.openfeature.provider.HeksherProvider`,
    which holds the events: it is not imported here)."""

    _view: SnapshotView | None
    _stale_at: float

    def _source(self, client: Any) -> Any: ...

    def emit_provider_configuration_changed(self, details: ProviderEventDetails) -> None: ...

    def emit_provider_error(self, details: ProviderEventDetails) -> None: ...

    def emit_provider_ready(self, details: ProviderEventDetails) -> None: ...

    def emit_provider_stale(self, details: ProviderEventDetails) -> None: ...


class Events:
    """The provider's status (``ready``, ``error``, ``stale``, ``unshared``) and the listener that moves
    it."""

    def __init__(self, provider: _Provider) -> None:
        self._provider = provider
        self._lock = threading.Lock()
        self.client: Any = None
        self.state = "ready"
        self.digests: dict[str, bytes] | None = None
        """Each setting's blob digest in the snapshot last looked at (None: not looked yet)."""
        self.generation = -1

    def bind(self, client: Any) -> None:
        """Listen to *client* (and no longer to the previous one); read where it stands, emitting nothing."""
        with self._lock:
            if client is self.client:
                return
            self._unbind()
            self.client = client
            self.digests, self.generation = None, -1
            if hasattr(client, "_add_update_listener"):
                client._add_update_listener(self.on_update)
            self._look()

    def unbind(self) -> None:
        """Stop listening."""
        with self._lock:
            self._unbind()
            self.client = None

    def _unbind(self) -> None:
        if self.client is not None and hasattr(self.client, "_remove_update_listener"):
            self.client._remove_update_listener(self.on_update)

    def on_update(self, error: BaseException | None) -> None:
        """The update listener: runs right after ``on_update_ok`` (``error`` None) or ``on_update_error``."""
        with self._lock:
            changed = self._look()
            provider = self._provider
            if changed:
                provider.emit_provider_configuration_changed(
                    ProviderEventDetails(flags_changed=sorted(changed))
                )
            stale = time.monotonic() >= provider._stale_at
            problem = self.client._sharing_problem() if hasattr(self.client, "_sharing_problem") else None
            if error is None and not stale and problem is not None:
                # Values are served, but by a process that polls the service on its own: say so (an
                # operator reads the status; the evaluations go on as usual).
                if self.state != "unshared":
                    self.state = "unshared"
                    provider.emit_provider_error(
                        ProviderEventDetails(
                            message=f"serving without sharing: {problem}", error_code=ErrorCode.GENERAL
                        )
                    )
            elif error is None and not stale:
                if self.state != "ready":
                    self.state = "ready"
                    provider.emit_provider_ready(ProviderEventDetails(message="the rules are up to date"))
            elif stale:
                if self.state != "stale":
                    self.state = "stale"
                    why = f"; the last update failed: {error}" if error is not None else ""
                    provider.emit_provider_stale(
                        ProviderEventDetails(message=f"the rules are older than the staleness bound{why}")
                    )
            elif self.state != "error":
                self.state = "error"
                provider.emit_provider_error(
                    ProviderEventDetails(
                        message=f"updating the rules failed: {error}", error_code=ErrorCode.GENERAL
                    )
                )

    def _look(self) -> set[str]:
        """Read the client's snapshot if it changed, and the freshness of its rules; the names of the
        settings that changed since the last look (none at the first)."""
        provider = self._provider
        source = provider._source(self.client)
        if source is None:
            provider._stale_at = math.inf
            return set()
        changed: set[str] = set()
        view = provider._view
        if view is None or view.generation != source.generation():
            try:
                view = provider._view = read_view(source)
            except (SegmentError, ValueError):
                logger.warning("the OpenFeature provider cannot read the snapshot", exc_info=True)
                view = None
        if view is not None and view.generation != self.generation:
            new, old = view.digests, self.digests
            if old is not None:
                changed = {name for name in new.keys() | old.keys() if new.get(name) != old.get(name)}
            self.digests, self.generation = dict(new), view.generation
        provider._stale_at = _stale_at(source, view, self.client)
        return changed


def _stale_at(source: Any, view: SnapshotView | None, client: Any) -> float:
    """When (``time.monotonic()``) the rules turn stale: the last successful update plus the bound."""
    last_ok, _, _ = source.update_marks()
    interval = None
    if view is not None and view.head is not None and view.head.update_interval:
        interval = view.head.update_interval
    else:
        interval = getattr(client, "_update_interval", None)
    bound = stale_after(interval)
    if bound is None:
        return math.inf
    if not last_ok:
        return -math.inf  # no update ever succeeded here: whatever is served is not fresh
    return time.monotonic() + (float(last_ok) + bound - time.time())


def _reset_after_fork() -> None:
    """In a forked child (registered with :mod:`heksher_shm._process.fork`): a pool for the SDK's handlers.

    The OpenFeature SDK (0.10) runs event handlers in a thread pool made when it is imported. A
    forked child has none of its threads, but the pool still counts the idle one it had, makes no
    new thread, and the handlers of the child's events never run. The child gets a pool of its own.
    """
    support = sys.modules.get("openfeature._event_support")
    if isinstance(getattr(support, "_event_executor", None), ThreadPoolExecutor):
        support._event_executor = ThreadPoolExecutor(thread_name_prefix="openfeature-event-handler")  # type: ignore[union-attr]


_fork.register_child_reset(__name__, _reset_after_fork)
