"""The ``heksher-shm serve`` command: run an in-memory Heksher service until SIGINT or SIGTERM.

The main thread sleeps until a signal arrives; nothing polls.  Stopping takes about a millisecond
(the service wakes its accept loop through a socket pair and cuts open connections), so the process
exits as soon as the interpreter has shut down.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from heksher_shm.testing import HeksherService

__all__ = ["serve"]


def serve(host: str, port: int, context_features: list[str]) -> int:
    """Serve until SIGINT/SIGTERM; print one line with the URL first.  Returns the exit status.

    Call it from the main thread: only there can it install its signal handlers.

    The line reads ``heksher-shm: in-memory Heksher service listening on http://HOST:PORT (context
    features: a, b)`` so that a parent process can read the port chosen for ``port=0``.  Once stopped,
    it prints ``heksher-shm: stopped on SIGTERM (2 settings and 1 rule discarded)`` (or SIGINT).
    """
    try:
        service = HeksherService(context_features=context_features, host=host, port=port).start()
    except (OSError, ValueError) as exc:
        print(f"heksher-shm: cannot serve on {host}:{port}: {exc}", file=sys.stderr, flush=True)
        return 1
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    previous = _install({signal.SIGINT: on_signal, signal.SIGTERM: on_signal})
    try:
        print(
            f"heksher-shm: in-memory Heksher service listening on {service.url} "
            f"(context features: {', '.join(context_features)})",
            flush=True,
        )
        # No timeout: on POSIX (the only platform heksher_shm runs on) a signal interrupts this wait and
        # its handler runs at once in this thread, so waking up to check would only cost CPU.
        stop.wait()
    finally:
        _install(previous)
        service.stop()
    cause = signal.Signals(received[0]).name if received else "signal"
    settings, rules = _count(len(service.settings), "setting"), _count(len(service.rules), "rule")
    print(f"heksher-shm: stopped on {cause} ({settings} and {rules} discarded)", flush=True)
    return 0


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


_SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def _install(handlers: dict[int, _SignalHandler]) -> dict[int, _SignalHandler]:
    """Install signal handlers; return the ones replaced, for putting back."""
    previous: dict[int, _SignalHandler] = {}
    for signum, handler in handlers.items():
        if handler is None:  # the old handler was not installed from Python: leave it alone
            continue
        # outside the main thread signal() raises ValueError: only the main thread may install handlers
        with contextlib.suppress(ValueError):
            previous[signum] = signal.signal(signum, handler)
    return previous
