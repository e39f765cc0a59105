"""The effects the engine yields, and that the drivers (:mod:`heksher_shm._engine.drivers`) perform.

The engine does no I/O: it yields an effect and is sent back its result (or
has its error thrown in). A wait that something can interrupt is just
another effect.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Apply", "Call", "Calls", "Compute", "Effect", "Report", "Wait"]


@dataclass(frozen=True)
class Call:
    """Send an HTTP request; the driver sends back the :class:`httpx.Response` or throws its error.

    *beat*, when set, is called every :data:`BEAT_INTERVAL` while the request
    is in flight: a leader waiting on a slow service is busy, not stuck.
    """

    method: str
    path: str
    params: Mapping[str, str] | None = None
    content: bytes | None = None
    headers: Mapping[str, str] | None = None
    beat: Callable[[], object] | None = None


@dataclass(frozen=True)
class Calls:
    """Send several requests, at most *limit* at a time over one connection pool.

    The driver sends back a list with, for each call in order, its
    :class:`httpx.Response` or the exception it raised.
    """

    calls: Sequence[Call]
    limit: int
    beat: Callable[[], object] | None = None


@dataclass(frozen=True)
class Compute:
    """Run ``fn()`` and send back its result (or throw its error).

    For CPU-heavy or file work: the async driver runs it in a worker thread,
    so the event loop never stalls for it; the thread driver runs it in place.
    """

    fn: Callable[[], Any]
    beat: Callable[[], object] | None = None


@dataclass(frozen=True)
class Wait:
    """Sleep until woken (by this process, or a descriptor in *fds* becoming readable) or *timeout* passed.

    ``timeout`` None waits until woken. The driver sends back the set of
    descriptors of *fds* that were readable (empty after a timeout or a local
    wake).
    """

    timeout: float | None
    fds: tuple[int, ...] = ()


@dataclass(frozen=True)
class Apply:
    """Apply the latest published snapshot to this process's settings, under ``modification_lock``.

    Not *blocking*: skip it when ``modification_lock`` is taken (the next
    wake, or the next ``get()``, applies it), so that a process holding its
    lock never holds back the host's leader. With *report*, then report the
    update's outcome *error* (as :class:`Report`). Only after both does the
    driver wake this process's waiters (``set_as_main``, ``reload``), so that
    they return after the callbacks ran, as with heksher 0.2.2.
    """

    blocking: bool
    report: bool = False
    error: BaseException | None = None


@dataclass(frozen=True)
class Report:
    """Call ``on_update_ok()`` (``error`` is None) or ``on_update_error(error)``."""

    error: BaseException | None


Effect = Call | Calls | Compute | Wait | Apply | Report


# -- what the engine works with ------------------------------------------------------------------------------
