"""Declaration races: the real server's two-step creation of a setting, reproduced on purpose.

A real Heksher 0.5.7 creates a setting in two steps: it looks the name up, finds nothing, then inserts
the setting.  When two declarations of the same new setting both look before either inserts, both
insert, and the second insert breaks the unique setting name: that client gets a bare 500 (uvicorn's
``Internal Server Error``, and the connection is closed).  Declaring again then answers ``uptodate``.

:class:`~heksher_shm.testing._store.HeksherState` answers a declaration in one step under one lock, so
the in-memory service never races by itself.  :class:`RaceGate` makes it race when a test arms a
:class:`DeclarationRace`: the next declaration that would create a setting is held between the look-up
and the insert, and the declarations of the same setting that arrive meanwhile are held with it (they
looked and found nothing too).  When the group is released,
its members insert one after another in the order they arrived: the first creates the setting, each later
one gets the 500.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from heksher_shm.testing._errors import ServiceError
from heksher_shm.testing._records import Declaration
from heksher_shm.testing._store import HeksherState

__all__ = ["DeclarationRace", "RaceGate"]


class DeclarationRace:
    """A race armed by :meth:`heksher_shm.testing.HeksherService.race_declarations`.

    The first declaration after arming that would create a setting (the setting ``setting``, when given)
    opens the race and is held.  Declarations of the same setting that arrive while it is held join it.
    All are released together once ``parties`` of them are held, or ``timeout`` seconds after the first
    arrived, whichever comes first; then the first creates the setting (``200 created``) and every other
    one gets the real server's bare ``500``.
    """

    def __init__(self, parties: int, setting: str | None, timeout: float) -> None:
        self.parties = parties
        """How many declarations the race waits for."""
        self.setting = setting
        """The setting raced for (``None`` until the race opens, unless it was given)."""
        self.timeout = timeout
        """How long the first declaration is held at most, in seconds."""
        self.statuses: list[int] = []
        """The HTTP statuses answered so far, in the order they were answered."""
        self._held = 0
        self._changed = threading.Condition()
        self._done = threading.Event()

    @property
    def held(self) -> int:
        """How many declarations joined the race so far (held, or answered since)."""
        with self._changed:
            return self._held

    def wait_held(self, count: int = 1, timeout: float | None = None) -> bool:
        """Block until ``count`` declarations joined the race; ``False`` when ``timeout`` passed first.

        The first to join wins, so a test that lets one client declare, waits for ``wait_held(1)``, then
        lets the other declare decides which of the two gets the 500.
        """
        with self._changed:
            return self._changed.wait_for(lambda: self._held >= count, timeout)

    @property
    def done(self) -> bool:
        """Whether the race opened and every declaration in it was answered."""
        return self._done.is_set()

    def _join(self) -> None:
        with self._changed:
            self._held += 1
            self._changed.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :attr:`done`; ``False`` when ``timeout`` seconds passed first."""
        return self._done.wait(timeout)


class _Group:
    """Declarations of one new setting held together."""

    def __init__(self, race: DeclarationRace, deadline: float) -> None:
        self.race = race
        self.deadline = deadline
        self.arrived = 0
        self.released = False
        self.turn = 0  # the position (in arrival order) allowed to insert now


class RaceGate:
    """Holds declarations of new settings so that they race; see the module docstring.

    Only declarations caught by an armed :class:`DeclarationRace` are held; the others pass straight
    through.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: list[DeclarationRace] = []
        self._groups: dict[str, _Group] = {}
        self._closed = False

    def arm(self, race: DeclarationRace) -> None:
        """Let ``race`` catch the next declaration that would create a setting (its setting, if given)."""
        with self._cond:
            self._armed.append(race)

    def close(self) -> None:
        """Release every held declaration now and hold none until :meth:`reopen` (the service stops)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reopen(self) -> None:
        """Hold declarations again after :meth:`close`."""
        with self._cond:
            self._closed = False

    def declare(self, state: HeksherState, declaration: Declaration) -> tuple[int, dict[str, Any]]:
        """:meth:`HeksherState.declare`, held and raced when the declaration would create a setting."""
        joined = self._join(state, declaration)
        if joined is None:
            return state.declare(declaration)
        group, _ = joined
        status = 500
        try:
            result = state.declare(declaration, expect_new=True)
            status = result[0]
            return result
        except ServiceError as error:
            status = error.status
            raise
        finally:
            self._leave(group, status)

    def _join(self, state: HeksherState, declaration: Declaration) -> tuple[_Group, int] | None:
        with self._cond:
            if self._closed or (not self._armed and not self._groups):
                return None
        if not state.creates(declaration):
            return None
        name = declaration.name
        with self._cond:
            if self._closed:
                return None
            group = self._groups.get(name)
            if group is None:
                race = next((r for r in self._armed if r.setting in (None, name)), None)
                if race is None:
                    return None
                self._armed.remove(race)
                race.setting = name
                group = self._groups[name] = _Group(race, time.monotonic() + race.timeout)
            position = group.arrived
            group.arrived += 1
            group.race._join()
            self._cond.notify_all()
            while not group.released:
                remaining = group.deadline - time.monotonic()
                if group.arrived >= group.race.parties or remaining <= 0 or self._closed:
                    group.released = True
                    if self._groups.get(name) is group:
                        del self._groups[name]
                    self._cond.notify_all()
                    break
                self._cond.wait(remaining)
            while group.turn != position:
                self._cond.wait()
            return group, position

    def _leave(self, group: _Group, status: int) -> None:
        with self._cond:
            group.race.statuses.append(status)
            group.turn += 1
            if group.turn == group.arrived:
                group.race._done.set()
            self._cond.notify_all()
