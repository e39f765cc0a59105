"""Pausing the garbage collector around bulk decoding.

Decoding a large rule set allocates many small containers, which triggers
the cyclic garbage collector again and again although none of them form
cycles worth collecting; measured, that was most of the time spent decoding
a 100k-rule snapshot. Pausing it for the duration is safe: nothing is
leaked, collection simply runs later.

Fork: a child forked while another thread is inside a pause would inherit a
disabled collector that only that thread (absent in the child) would enable
again, and possibly a held lock. :func:`_reset_after_fork` (run by
:mod:`heksher_shm._process.fork`) enables the collector again if a pause of ours had
disabled it, and starts a new *epoch*: pauses entered before the fork leave
the child's count alone when they end.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["paused_gc"]

_lock = threading.Lock()
_depth = 0
_was_enabled = False
_epoch = 0


@contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic GC inside the block (re-entrant and thread-safe: the last one out restores it)."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
        epoch = _epoch
    try:
        yield
    finally:
        with _lock:
            if epoch == _epoch:  # else a fork reset the count since this pause began
                _depth -= 1
                if _depth == 0 and _was_enabled:
                    gc.enable()


def _reset_after_fork() -> None:
    """In a forked child: no pause is active; the collector is on again if a pause of ours turned it off."""
    global _lock, _depth, _was_enabled, _epoch
    _lock = threading.Lock()
    if _depth > 0 and _was_enabled:
        gc.enable()
    _depth = 0
    _was_enabled = False
    _epoch += 1
