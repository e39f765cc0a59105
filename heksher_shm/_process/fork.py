"""Everything heksher_shm resets in a forked child: one hook, one fixed order.

After ``fork()`` the child runs only the thread that forked, with a copy of
the parent's memory as it was at that instant: a lock another thread held
stays held forever, a flag that said "a thread is inside" stays set (design,
"Known traps"). Every module with such process-wide state has a reset, and
this module, the only caller of :func:`os.register_at_fork` in the package,
runs them in a fixed order: first the lower layers' (those of
:data:`CHILD_RESETS`), then the upper layers' (those registered with
:func:`register_child_reset`).

The lower layers (``_process`` and ``_shm``: this layer and the one below)
are named in :data:`CHILD_RESETS`, each module's ``_reset_after_fork()``
called in this order:

1. ``heksher_shm._process.gc``: the pause counter and its lock; the cyclic GC is
   enabled again if a pause of ours had disabled it. First, so that nothing
   after it runs with the collector off.
2. ``heksher_shm._process.main``: the lock around the process's settings and main client.
3. ``heksher_shm._shm.election``: the gate, and every inherited leader lock
   descriptor (closed, never unlocked).
4. ``heksher_shm._shm.writing``: the writer locks of the open segments.
5. ``heksher_shm._shm.identity``: the cached identity of this process (the
   child has a new PID and start time, and may be in a new PID namespace).
6. ``heksher_shm._shm.bell``: the socket this process rings others' doorbells
   with (the child makes its own).

The upper layers are not named here (this module would then point up the
layers): each registers its reset with :func:`register_child_reset` when it
is imported, and the resets registered run after all of the above, in the
order they were registered. A module imports what it relies on before it
registers, so what it relies on has registered first. Today two modules
register:

7. ``heksher_shm.clients._base``: every live client rebuilds its engine,
   locks and driver, and rejoins as a follower (it uses all of the above: it
   takes ``_main``'s lock, opens leader locks, reads the identity).
8. ``heksher_shm.openfeature.events`` (when the OpenFeature provider is
   imported): the SDK's thread pool for event handlers, whose threads the
   child does not have.

**Adding a fork-sensitive piece** is a one-line change. Its reset takes no
arguments, runs in the child's only thread, must not wait for anything
another thread could hold, and must tolerate being the first code to touch
its state. In a lower layer, give the module a ``_reset_after_fork()`` and
add its name to :data:`CHILD_RESETS` before every module that relies on it
(modules not imported yet are skipped: they have no state to reset). In an
upper layer, call :func:`register_child_reset` at the module's import. A
module that must also hold something across the ``fork()`` call itself (as
the election gate is held, so that no descriptor is half-recorded at that
instant) adds ``_before_fork()`` and ``_after_fork_in_parent()`` and its name
to :data:`PARENT_GUARDS`.

uwsgi forks its workers from C, and runs Python's fork hooks only with
``--py-call-uwsgi-fork-hooks``; :func:`after_fork_in_child` is the same
reset as a plain function, for ``uwsgi.post_fork_hook``. It does nothing the
second time in one process, so both paths may run in one worker.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Final

__all__ = ["CHILD_RESETS", "PARENT_GUARDS", "after_fork_in_child", "child_resets", "register_child_reset"]

logger = logging.getLogger("heksher_shm.fork")

CHILD_RESETS: Final[tuple[str, ...]] = (
    "heksher_shm._process.gc",
    "heksher_shm._process.main",
    "heksher_shm._shm.election",
    "heksher_shm._shm.writing",
    "heksher_shm._shm.identity",
    "heksher_shm._shm.bell",
)
"""Lower-layer modules whose ``_reset_after_fork()`` runs first in a forked child, in this order (see the
module docstring)."""

_registered: list[tuple[str, Callable[[], None]]] = []
"""The upper layers' resets, by the name of the module that registered each, in registration order."""

PARENT_GUARDS: Final[tuple[str, ...]] = ("heksher_shm._shm.election",)
"""Modules whose ``_before_fork()`` runs before ``fork()``, and ``_after_fork_in_parent()`` after it in the
parent (in reverse order); in the child their ``_reset_after_fork()`` replaces what was held."""

_reset_pid = os.getpid()
"""The process the modules' state belongs to: the reset has run for it (or it is the original process)."""

_held = threading.local()
"""Per forking thread: (pid, modules whose ``_before_fork()`` ran), for the matching parent hook."""


def register_child_reset(module: str, reset: Callable[[], None]) -> None:
    """Run *reset* in every forked child, after the resets of :data:`CHILD_RESETS` and of the modules
    that registered before (see the module docstring).

    For the layers above this one, which this module must not name. Call it
    once, at the import of *module* (the name the log gives if the reset
    fails); registering the same module again replaces its reset in place.
    """
    for index, (name, _) in enumerate(_registered):
        if name == module:
            _registered[index] = (module, reset)
            return
    _registered.append((module, reset))


def child_resets() -> list[str]:
    """The modules whose resets run in a forked child, in their order: :data:`CHILD_RESETS` then the
    registered ones."""
    return [*CHILD_RESETS, *(name for name, _ in _registered)]


def after_fork_in_child() -> None:
    """Reset heksher_shm's process-wide state in a forked child (see the module docstring).

    Safe to call from a fork hook of a server (``uwsgi.post_fork_hook``):
    it does nothing in the process it was imported in, nor a second time in
    one child, so it never resets state that threads of this process use.
    """
    if os.getpid() == _reset_pid:
        return
    _reset_in_child()


def _reset_in_child() -> None:
    global _reset_pid
    # Recorded first: a reset that forks (none does) or fails half-way must not run twice.
    _reset_pid = os.getpid()
    resets: list[tuple[str, Callable[[], None]]] = []
    for name in CHILD_RESETS:
        module = sys.modules.get(name)
        if module is not None:
            resets.append((name, module._reset_after_fork))
    resets.extend(_registered)
    for name, reset in resets:
        try:
            reset()
        except Exception:
            # One broken piece must not leave the others (locks!) as the parent's threads left them.
            logger.exception("heksher_shm could not reset its state after fork", extra={"module": name})


def _before_fork() -> None:
    taken: list[ModuleType] = []
    _held.taken = (os.getpid(), taken)
    for name in PARENT_GUARDS:
        module = sys.modules.get(name)
        if module is not None:
            module._before_fork()
            taken.append(module)


def _after_fork_in_parent() -> None:
    held = getattr(_held, "taken", None)
    _held.taken = None
    # Only what this thread took before this fork: a server that runs this hook without the
    # before-fork one (some uwsgi versions) must not release what it never acquired.
    if held is None or held[0] != os.getpid():
        return
    for module in reversed(held[1]):
        module._after_fork_in_parent()


def _after_fork_in_child() -> None:
    # A fork certainly happened (a process in a new PID namespace can even see its parent's PID
    # number again), so this runs even where after_fork_in_child() would see nothing new.
    _held.taken = None
    _reset_in_child()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
)
