"""Checks for the application servers heksher_shm runs under (prefork servers, process pools).

Only uwsgi needs any. It embeds Python and forks it with its own C code, and
two of its settings decide whether a client's background work can run at all:

* **Python threads.** Before uwsgi 2.0.27, uwsgi keeps the GIL while a worker
  waits for requests unless ``--enable-threads`` (or ``--threads``) is given.
  A :class:`~heksher_shm.ThreadHeksherClient`'s thread then runs only while a
  request is being served: a leader stops polling when traffic stops, and
  idle followers never take over. (From 2.0.27 on threads are always on.)
* **Fork hooks.** Without ``--lazy-apps`` the app, and so the client, is
  loaded in the master, which forks the workers with ``fork(2)`` directly.
  Unless ``--py-call-uwsgi-fork-hooks`` is given (and threads are on, or
  uwsgi ignores it), Python's fork hooks (``os.register_at_fork``) do not
  run: the workers keep a copy of the master's client with no background
  thread, claiming to lead, with an inherited descriptor of the leader lock;
  and a worker forked while the master's client thread held the GIL hangs
  before serving anything (uwsgi issue 2387). With the flag, the hooks run
  and the workers' clients resume as followers.

:func:`check_background_threads` runs whenever a client becomes main, and
names the option that fixes each problem. Missing threads are logged as a
warning (once per process, on the ``heksher_shm.servers`` logger): values are
still served, only late. Missing fork hooks raise :class:`RuntimeError`, so
the app fails to load at once instead of hanging some starts: in trials with
uwsgi 2.0.31 and a leader's thread in the master, every worker of one start
in six hung. The ``uwsgi`` module exists only inside uwsgi, so it is looked
up in :data:`sys.modules`, never imported.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["check_background_threads", "uwsgi_problems"]

logger = logging.getLogger("heksher_shm.servers")

THREADS_BY_DEFAULT = (2, 0, 27)
"""The first uwsgi release that runs Python threads without ``--enable-threads``."""

_FALSE = {b"", b"0", b"false", b"no", b"off", "", "0", "false", "no", "off"}

_warned: set[str] = set()


def check_background_threads() -> None:
    """Say so when this process's clients cannot run their background work. Does nothing outside uwsgi.

    Called when a client becomes main.

    Raises:
        RuntimeError: uwsgi will fork the workers from this process without
            running Python's fork hooks (no ``--lazy-apps``, no
            ``--py-call-uwsgi-fork-hooks``).
    """
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
    if "fork-hooks" in problems:
        raise RuntimeError(problems["fork-hooks"])


def uwsgi_problems(uwsgi: Any) -> dict[str, str]:
    """What keeps heksher_shm's background work from running under this uwsgi, by short key.

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
    # Without threads, uwsgi skips the fork hooks even when asked to call them.
    if _forks_workers_from_here(uwsgi, opt) and not (threads and _on(opt, "py-call-uwsgi-fork-hooks")):
        problems["fork-hooks"] = (
            "uwsgi loaded the app in the master and will fork the workers from it without running "
            "Python's fork hooks: the workers' heksher_shm clients cannot resume after the fork, and a "
            "worker forked while the master's client thread holds the GIL hangs. Start uwsgi with "
            "--py-call-uwsgi-fork-hooks (py-call-uwsgi-fork-hooks = true; before uwsgi 2.0.27 it also "
            "needs --enable-threads), or with --lazy-apps."
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
