"""The simulated Heksher service: the in-memory service's API without sockets, on simulated time.

Requests are answered by :class:`heksher_shm.testing._api.Api`, the same
routes, outcomes, ETags and error bodies as the socket service (and as a real
Heksher 0.5.7, which ``tests/test_service_contract.py`` checks): declarations
are ``created``, ``uptodate``, ``upgraded``, ``outdated``, ``mismatch`` or
``rejected``; a query for an unknown setting is a 404; a query whose ETag
matches is a 304. What is simulated around it:

* **time**: a request reaches the service after a latency, is handled, and
  its answer comes back after another; a declaration of a new setting looks
  the name up when it arrives and inserts when it is handled, so two
  declarations of one new setting at once race as on the real server (the
  second gets a bare 500);
* **faults**: outages (connection refused, a hang until the client's timeout,
  or 503s), slowness, random 5xx and dropped connections, and data resets
  (every setting and rule gone: queries answer 404 until declared again);
* **rules that change**: every change stores a new value from one counter
  (a *stamp*) that only grows, so the value a process reads tells how old
  its rules are. A setting created (again, after a reset) gets its rules back
  with new stamps at once, as an operator restoring them would.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from heksher_shm._engine.effects import Call
from heksher_shm._model import protocol as proto
from heksher_shm.testing._api import Api, Request
from heksher_shm.testing._records import Declaration
from heksher_shm.testing._store import HeksherState
from tests.sim.world import World

__all__ = ["BASE_URL", "CLOCK_KEY", "FEATURES", "Exchange", "Rules", "SimService", "rules_of", "version_of"]

FEATURES = ("user", "theme")
"""The service's context features, in order."""

BASE_URL = "http://heksher.sim"

CLOCK = {"theme": "dark"}
"""The conditions of every setting's clock rule: kept by every process, its value is the setting's
content version (see :meth:`SimService.change_rule`)."""

CLOCK_KEY = (("theme", "dark"),)
"""The clock rule's conditions as a process keeps them."""

CLIENT_TIMEOUT = 5.0
"""httpx's default timeout: a request that gets no answer fails after it."""

Rules = frozenset[tuple[tuple[tuple[str, str], ...], int]]
"""A setting's rules as a process keeps them: (conditions, value) pairs."""


@dataclass
class Exchange:
    """One request, as the service's log keeps it."""

    pid: int
    epoch: int
    kind: str  # "query", "declare" or "other"
    sent: float
    answered: float = 0.0
    status: int = 0  # 0: no answer (an error)
    name: str = ""  # the setting declared


_REQUESTS: dict[tuple[str, str], httpx.Request] = {}
"""The request each response is attached to, by method and path."""


def rules_of(setting: dict[str, Any], tracked: dict[str, list[str]]) -> Rules:
    """The rules of a query result's *setting* that a process tracking *tracked* keeps."""
    kept = set()
    for rule in setting["rules"]:
        conditions = tuple((f, v) for f, v in rule["context_features"])
        if all(v in tracked.get(f, ()) for f, v in conditions):
            kept.add((conditions, rule["value"]))
    return frozenset(kept)


def version_of(rules: Rules) -> int | None:
    """The content version in a setting's kept rules: its clock rule's value (None: not there)."""
    for conditions, value in rules:
        if conditions == CLOCK_KEY:
            return value
    return None


class _Gate:
    """The real server's two-step creation: a declaration that found no setting when it arrived inserts
    one when it is handled, and fails with a bare 500 if another one was inserted meanwhile."""

    looked_new = False

    def declare(self, state: HeksherState, declaration: Declaration) -> tuple[int, dict[str, Any]]:
        return state.declare(declaration, expect_new=self.looked_new)


class SimService:
    """A Heksher service on simulated time (see the module docstring)."""

    def __init__(self, world: World, rng: random.Random, setting_names: list[str]) -> None:
        self._world = world
        self._rng = rng
        self._gate = _Gate()
        self.state = HeksherState(FEATURES)
        self._api = Api(self.state, emulate_filter_bug=True, version="0.5.7", races=self._gate)
        self.stamp = 0
        """The value of the latest rule change (values only grow)."""
        self.conditions: dict[str, list[dict[str, str]]] = {}
        """The rules each setting has (or gets when created), by their conditions."""
        for name in setting_names:
            # One rule every process keeps (they all track theme "dark"), and some others.
            self.conditions[name] = [dict(CLOCK)]
            for _ in range(rng.randrange(3)):
                self._new_condition(name)
        self.exchanges: list[Exchange] = []
        self._known: set[str] = set()
        """The settings the service has (created by a declaration, and not lost since)."""
        self._answers: dict[object, httpx.Response] = {}
        self._current: dict[tuple[str, int], dict[str, Any]] = {}
        self.changes = 0
        """Bumped by every change to the data (what the cache of answers is keyed by)."""
        self.down_until = 0.0
        self.down_mode = "refused"
        self.slow_until = 0.0
        self.slow_factor = 1.0
        self.error_rate = 0.0

    # -- what the operator does -----------------------------------------------------------------------------

    def change_rule(self) -> str | None:
        """Change one rule of an existing setting (or add one); the setting's name.

        The setting's *clock* rule (``theme: dark``, which every process keeps) takes the same new
        value, so that its value is the version of the setting's whole content.
        """
        names = [n for n in self.conditions if self._exists(n)]
        if not names:
            return None
        name = self._rng.choice(names)
        if self._rng.random() < 0.1:
            self._new_condition(name)
        conditions = self._rng.choice(self.conditions[name])
        self.stamp += 1
        self._set(name, conditions, self.stamp)
        if conditions != CLOCK:
            self._set(name, CLOCK, self.stamp)
        return name

    def _set(self, name: str, conditions: dict[str, str], value: int) -> None:
        self.changes += 1
        rule = self.state.search_rule(name, conditions)
        if rule is None:
            self.state.add_rule(name, conditions, value)
        else:
            self.state.set_rule_value(rule, value)

    def reset(self) -> None:
        """The service's data is lost (a database restored from nothing): every setting and rule."""
        self.state = HeksherState(FEATURES)
        self._api.state = self.state
        self._known.clear()
        self.changes += 1

    def current(self, name: str, tracked: dict[str, list[str]]) -> Rules | None:
        """The rules of *name* a process tracking *tracked* should have now (None: no such setting)."""
        if not self._exists(name):
            return None
        key = (name, self.changes)
        setting = self._current.get(key)
        if setting is None:
            setting = self._current[key] = self.state.query([name], None, include_metadata=False)["settings"][
                name
            ]
        return rules_of(setting, tracked)

    def _exists(self, name: str) -> bool:
        return name in self._known

    def _new_condition(self, name: str) -> None:
        rng = self._rng
        options = [{"user": f"u{i}"} for i in range(3)] + [
            {"user": f"u{i}", "theme": t} for i in range(3) for t in ("dark", "light")
        ]
        options.append({"theme": "light"})
        fresh = [o for o in options if o not in self.conditions[name]]
        if fresh:
            self.conditions[name].append(rng.choice(fresh))

    def _restore(self, name: str) -> None:
        """A setting was created: it gets its rules (with new values) at once."""
        for conditions in self.conditions.get(name, ()):
            if conditions != CLOCK:
                self.stamp += 1
                self.state.add_rule(name, conditions, self.stamp)
        self.changes += 1
        self.stamp += 1
        self.state.add_rule(name, CLOCK, self.stamp)  # last: its value is the content's version

    # -- requests -------------------------------------------------------------------------------------------

    def send(
        self, pid: int, epoch: int, call: Call, done: Callable[[httpx.Response | Exception], None]
    ) -> Exchange:
        """Send *call*; *done* gets the answer (or the error) when it comes back."""
        world, rng = self._world, self._rng
        kind = {proto.QUERY: "query", proto.DECLARE: "declare"}.get(call.path, "other")
        exchange = Exchange(pid, epoch, kind, world.now)
        if kind == "declare" and call.content:
            exchange.name = json.loads(call.content)["name"]
        self.exchanges.append(exchange)
        request = _REQUESTS.get((call.method, call.path))
        if request is None:
            # One per endpoint: building a request parses its URL, which costs more than the whole
            # simulated exchange; what the engine reads of it (its method and URL) is the same.
            request = _REQUESTS[call.method, call.path] = httpx.Request(call.method, BASE_URL + call.path)
        slow = self.slow_factor if world.now < self.slow_until else 1.0
        out, back = (rng.uniform(0.0005, 0.005) * slow for _ in range(2))
        work = rng.uniform(0.001, 0.02 if kind == "declare" else 0.03) * slow

        def fail(error: Exception, after: float) -> None:
            def deliver() -> None:
                exchange.answered = world.now
                done(error)

            world.after(after, deliver)

        if world.now + out < self.down_until:
            if self.down_mode == "refused":
                fail(httpx.ConnectError("connection refused", request=request), out)
                return exchange
            if self.down_mode == "hang":
                fail(httpx.ReadTimeout("timed out", request=request), CLIENT_TIMEOUT)
                return exchange
        if rng.random() < self.error_rate / 2:
            fail(httpx.ReadError("connection reset by peer", request=request), out + work)
            return exchange
        if out + work + back > CLIENT_TIMEOUT:
            fail(httpx.ReadTimeout("timed out", request=request), CLIENT_TIMEOUT)
            # The service still handles it (a declaration may be made although the client gave up).
            world.after(out, lambda: self._arrive(call, request, exchange, work, None))
            return exchange

        def answered(response: httpx.Response) -> None:
            def deliver() -> None:
                exchange.answered = world.now
                exchange.status = response.status_code
                done(response)

            world.after(back, deliver)

        world.after(out, lambda: self._arrive(call, request, exchange, work, answered))
        return exchange

    def _arrive(
        self,
        call: Call,
        request: httpx.Request,
        exchange: Exchange,
        work: float,
        answered: Callable[[httpx.Response], None] | None,
    ) -> None:
        looked_new = exchange.kind == "declare" and not self._exists(exchange.name)
        self._world.after(work, lambda: self._handle(call, request, exchange, looked_new, answered))

    def _answer(self, call: Call, request: httpx.Request, looked_new: bool) -> httpx.Response:
        """The API's answer, from a cache while the data did not change (a declaration that changes
        nothing, ``uptodate`` say, is answered alike every time)."""
        headers = {k.lower(): v for k, v in (call.headers or {}).items()}
        params = tuple(sorted((call.params or {}).items()))
        key = (
            call.method,
            call.path,
            params,
            headers.get("if-none-match"),
            call.content,
            looked_new,
            self.changes,
        )
        cached = self._answers.get(key)
        if cached is not None:
            return cached  # the engine only reads a response: one object serves every reader
        self._gate.looked_new = looked_new
        answer = self._api.handle(
            Request(call.method, call.path, dict(call.params or {}), headers, call.content or b"")
        )
        response = httpx.Response(answer.status, headers=answer.headers, content=answer.body, request=request)
        if call.method == "POST" and answer.status == 200 and b'"uptodate"' not in answer.body:
            self.changes += 1  # created, upgraded (or outdated, which changes nothing: one more miss)
        elif len(self._answers) > 256:
            self._answers.clear()
        self._answers[key] = response
        return response

    def _handle(
        self,
        call: Call,
        request: httpx.Request,
        exchange: Exchange,
        looked_new: bool,
        answered: Callable[[httpx.Response], None] | None,
    ) -> None:
        world, rng = self._world, self._rng
        if world.now < self.down_until and self.down_mode == "503":
            response = httpx.Response(503, text="Service Unavailable", request=request)
        elif rng.random() < self.error_rate / 2:
            response = httpx.Response(rng.choice((500, 502, 503)), text="oops", request=request)
        else:
            response = self._answer(call, request, looked_new)
            created = response.status_code == 200 and b'"created"' in response.content
            if exchange.kind == "declare" and created:
                self._known.add(exchange.name)
                self._restore(exchange.name)
        if answered is not None:
            answered(response)
