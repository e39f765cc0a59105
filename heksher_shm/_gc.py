"""Pausing the garbage collector around bulk decoding.

Decoding a large rule set allocates many small containers, which triggers
the cyclic garbage collector again and again although none of them form
cycles worth collecting; measured, that was most of the time spent decoding
a 100k-rule snapshot. Pausing it for the duration is safe: nothing is
leaked, collection simply runs later.
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


@contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic GC inside the block (re-entrant and thread-safe: the last one out restores it)."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
