"""No thread of heksher_shm lives through a gevent monkey-patch: it stops before, and starts again after.

gevent patches a running process by replacing what ``threading``, ``time``,
``socket``, ``select`` and ``logging``'s locks are; the OS threads already
running are left as they are, and whatever they make or take afterwards is
gevent's. gevent's own rule is to patch before starting any thread: a real
thread in a patched process starts "threads" that are greenlets of a hub of
its own (they run only while it waits in gevent), makes conditions over
gevent locks on top of native ones it made before, and shares gevent locks
(every ``logging`` handler's) with the main thread's greenlets.

A gunicorn ``--preload`` gevent worker breaks that rule without any fault
of the application: the arbiter imports the app unpatched, and
:mod:`heksher_shm._process.fork` restarts a client's thread in each worker
right after the fork, a few milliseconds *before* the worker calls
``gevent.monkey.patch_all()``. Seen there (issue 15, with py-spy and gevent's
greenlet dump from the prefork harness):

* a worker that took over as leader lost its thread at once: the beat
  "thread" it started was a greenlet on that same OS thread, which entered
  the native ``RLock`` of the beat's condition (re-entrant per OS thread),
  and whose ``wait()`` released it from under the starter (``RuntimeError:
  cannot notify on un-acquired lock``);
* an orphaned worker then hung at exit, forever, in ``logging.shutdown()``:
  gevent had made every logging handler's lock its own, the thread logged
  its error through one of them while the main greenlet waited for it, and
  that wake-up never came (the dump showed the lock free, the main greenlet
  still parked in it, and the thread gone with a hub of its own: gevent's
  locks are not made to be shared between OS threads). 11 runs in 200 of the
  gunicorn test hung so, on a loaded 2-core machine.

So a client that starts a real OS thread in a process that imported gevent
but has not patched ``threading`` yet registers here, and this module
subscribes to gevent's announcements (``gevent.events``, delivered through
``zope.event.subscribers``, which gevent installs): before ``patch_all()``
patches ``threading``, each such client stops its thread at its next wait
(its engine lets go of what it held, as when it closes); after
``patch_all()``, it starts again the way the patched process starts threads:
a greenlet of the main thread's hub, with gevent's locks, exactly as in a
worker that patched before importing the app (gunicorn without
``--preload``). gevent is never imported here.
"""

from __future__ import annotations

import importlib
import logging
import sys
import weakref
from typing import Any, Protocol

__all__ = ["Pausable", "patch_pending", "watch_monkey_patching"]

logger = logging.getLogger("heksher_shm.threads")


class Pausable(Protocol):
    """What a client with a background thread offers this module."""

    def _pause_for_monkey_patch(self) -> bool:
        """Stop the background thread at its next wait; True when it stopped (and must start again)."""

    def _resume_after_monkey_patch(self) -> None:
        """Start the background thread again, now that the process is patched."""


_watched: weakref.WeakSet[Any] = weakref.WeakSet()
"""Clients whose thread is a real OS thread in a process that may still be patched."""

_paused: list[Pausable] = []
"""Clients stopped before the patch now in progress, to start again after it."""

_subscribed = False


def patch_pending() -> bool:
    """Whether gevent is imported and has not patched ``threading`` (yet)."""
    if "gevent" not in sys.modules:
        return False
    monkey = sys.modules.get("gevent.monkey")
    return monkey is None or not monkey.is_module_patched("threading")


def watch_monkey_patching(client: Pausable) -> None:
    """Have *client*'s thread stopped before gevent patches ``threading`` and started after.

    Nothing when gevent is not imported (a process that patches imports it
    first, and patches before starting threads), or already patched
    ``threading`` (the thread is a greenlet, as the process's threads are).
    """
    global _subscribed
    if not patch_pending():
        return
    _watched.add(client)
    if _subscribed:
        return
    try:
        # gevent announces its patching through zope.event (one of its dependencies)
        subscribers = importlib.import_module("zope.event").subscribers
    except (ImportError, AttributeError):  # pragma: no cover - a gevent that announces nothing
        return
    subscribers.append(_on_gevent_event)
    _subscribed = True


def _on_gevent_event(event: object) -> None:
    events = sys.modules.get("gevent.events")
    if events is None:
        return
    if isinstance(event, events.GeventWillPatchAllEvent):
        if event.will_patch_module("thread") and patch_pending():
            for client in list(_watched):
                if _quietly(client._pause_for_monkey_patch, "stop"):
                    _paused.append(client)
    elif isinstance(event, events.GeventDidPatchAllEvent):
        paused = list(_paused)
        _paused.clear()
        for client in paused:
            _quietly(client._resume_after_monkey_patch, "restart")


def _quietly(step: Any, what: str) -> bool:
    # An exception raised here would stop gevent's patching half-way (subscribers' errors propagate).
    try:
        return bool(step())
    except Exception:
        logger.exception("heksher_shm could not %s its background thread around gevent's patching", what)
        return False
