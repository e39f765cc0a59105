"""What heksher_shm needs to know about the application server it runs under.

Only uwsgi needs anything. It embeds Python and forks it with its own C code,
and two of its settings decide how a client's background work runs:

* **Python threads.** Before uwsgi 2.0.27, uwsgi keeps the GIL while a worker
  waits for requests unless ``--enable-threads`` (or ``--threads``) is given.
  A :class:`~heksher_shm.ThreadHeksherClient`'s thread then runs only while a
  request is being served: a leader stops polling when traffic stops. (From
  2.0.27 on threads are always on.) This is logged as a warning, once.
* **Fork hooks.** Without ``--lazy-apps`` the app, and so the client, is
  loaded in the master, which forks the workers with ``fork(2)`` directly;
  Python's fork hooks (``os.register_at_fork``) run there only with
  ``--py-call-uwsgi-fork-hooks``. heksher_shm needs neither: it chains its
  own reset to ``uwsgi.post_fork_hook`` (which uwsgi always calls in a new
  worker, as ``uwsgidecorators.postfork`` does), and in the master
  ``set_as_main()`` makes its first update in the calling thread, starts no
  background thread, and lets go of the leadership before any worker is
  forked: a worker forked while a thread of the master holds the GIL would
  hang before serving anything (uwsgi issue 2387). The workers then resume
  their copies of the client and elect a leader among themselves.

What cannot work is refused with a :class:`RuntimeError` naming the fix: a
client whose background thread already runs in a uwsgi master.

The ``uwsgi`` module exists only inside uwsgi, so it is looked up in
:data:`sys.modules`, never imported.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["check_background_threads", "forking_uwsgi_master", "uwsgi_problems"]

logger = logging.getLogger("heksher_shm.servers")

THREADS_BY_DEFAULT = (2, 0, 27)
"""The first uwsgi release that runs Python threads without ``--enable-threads``."""

_FALSE = {b"", b"0", b"false", b"no", b"off", "", "0", "false", "no", "off"}

_warned: set[str] = set()
_hooked: list[Any] = []
"""The uwsgi module whose post_fork_hook carries our reset (at most one)."""


def check_background_threads() -> None:
    """Say so when this process's clients cannot run their background work well. Does nothing outside
    uwsgi. Called when a client becomes main (warnings only; see :func:`forking_uwsgi_master`)."""
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is None:
        return
    try:
        problems = uwsgi_problems(uwsgi)
    except Exception:  # a stranger's module named uwsgi must not stop a client from starting
        logger.debug("could not inspect the uwsgi module", exc_info=True)
        return
    if "threads" in problems and "threads" not in _warned:
        _warned.add("threads")
        logger.warning(problems["threads"])


def forking_uwsgi_master() -> bool:
    """Whether this process is a uwsgi master that will fork workers from its current state.

    When it is, heksher_shm's reset is chained to ``uwsgi.post_fork_hook``
    (once), so that every worker resumes its clients with or without
    ``--py-call-uwsgi-fork-hooks``.
    """
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is None:
        return False
    try:
        forks = _forks_workers_from_here(uwsgi, getattr(uwsgi, "opt", None) or {})
    except Exception:
        logger.debug("could not inspect the uwsgi module", exc_info=True)
        return False
    if forks and not _hooked:
        _chain_post_fork_hook(uwsgi)
    return forks


def _chain_post_fork_hook(uwsgi: Any) -> None:
    from heksher_shm._process import fork as _fork

    previous: Callable[[], object] | None = getattr(uwsgi, "post_fork_hook", None)

    def post_fork_hook() -> None:
        # Ours first: the hook that was there may use anything, heksher_shm's clients included.
        _fork.after_fork_in_child()
        if callable(previous):
            previous()

    uwsgi.post_fork_hook = post_fork_hook
    _hooked.append(uwsgi)


def uwsgi_problems(uwsgi: Any) -> dict[str, str]:
    """What keeps heksher_shm's background work from running well under this uwsgi, by short key.

    Args:
        uwsgi: the ``uwsgi`` module that uwsgi gives the Python it embeds
            (``has_threads``, ``opt``, ``version_info``, ``worker_id()``).
    """
    opt: Mapping[str, Any] = getattr(uwsgi, "opt", None) or {}
    problems: dict[str, str] = {}
    threads = _threads_enabled(uwsgi, opt)
    if not threads:
        problems["threads"] = (
            "uwsgi runs this process without Python threads: heksher_shm's background thread only runs "
            "while a request is being served, so this process stops polling, following and taking over "
            "when traffic stops. Start uwsgi with --enable-threads (enable-threads = true in its ini "
            "file), or upgrade to uwsgi 2.0.27 or later."
        )
    return problems


def _on(opt: Mapping[str, Any], name: str) -> bool:
    """Whether a uwsgi option is set and not explicitly false (values are bytes, or True for flags)."""
    if name not in opt:
        return False
    value = opt[name]
    if isinstance(value, list):  # an option given several times
        value = value[-1] if value else b""
    if isinstance(value, (bytes, str)):
        return value.strip().lower() not in _FALSE
    return bool(value)


def _threads_enabled(uwsgi: Any, opt: Mapping[str, Any]) -> bool:
    has_threads = getattr(uwsgi, "has_threads", None)
    if has_threads is not None:  # the running server's own flag
        return bool(has_threads)
    version = tuple(getattr(uwsgi, "version_info", ())[:3])
    return version >= THREADS_BY_DEFAULT or _on(opt, "enable-threads") or "threads" in opt


def _forks_workers_from_here(uwsgi: Any, opt: Mapping[str, Any]) -> bool:
    """Whether this process loads the app before uwsgi forks workers from it (no lazy apps)."""
    if _on(opt, "lazy-apps") or _on(opt, "lazy"):
        return False
    worker_id = getattr(uwsgi, "worker_id", None)
    if worker_id is None or worker_id() != 0:  # 0: the master (or first process) before forking
        return False
    return _on(opt, "master") or _count(opt, "processes", "workers") > 1


def _count(opt: Mapping[str, Any], *names: str) -> int:
    for name in names:
        value = opt.get(name)
        if isinstance(value, list):
            value = value[-1] if value else None
        if isinstance(value, (bytes, str)):
            try:
                return int(value)
            except ValueError:
                continue
    return 1
