"""The facade of the in-memory service: :class:`HeksherService` starts, stops and administers it.

It owns the store (:class:`~heksher_shm.testing.HeksherState`), the API over it, the fault table, the
request log and the declaration races, and runs the socket server (``_http.py``) on a thread.  The
layers point one way: this facade -> ``_http`` (sockets) -> ``_api`` (routes) -> ``_validation`` and
``_store`` -> ``_types``.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from heksher_shm.testing._api import HEKSHER_VERSION, Api
from heksher_shm.testing._errors import ServiceError
from heksher_shm.testing._faults import Fault, FaultTable, InjectedFault, RequestLog, RequestRecord
from heksher_shm.testing._http import Server
from heksher_shm.testing._race import DeclarationRace, RaceGate
from heksher_shm.testing._records import Declaration, RuleInfo, SettingInfo
from heksher_shm.testing._store import HeksherState
from heksher_shm.testing._types import parse_setting_type

__all__ = ["DEFAULT_CONTEXT_FEATURES", "HeksherService"]

_LOG = logging.getLogger("heksher_shm.testing")

DEFAULT_CONTEXT_FEATURES = ("user", "theme", "environment")
"""The context features :class:`HeksherService` starts with unless told otherwise."""


class HeksherService:
    """An in-memory Heksher service listening on a real socket, for tests.

    ::

        with HeksherService(context_features=["user", "theme", "environment"]) as service:
            service.declare("cache_size", "int", 10)
            service.add_rule("cache_size", {"user": "alice"}, 20)
            httpx.get(f"{service.url}/api/v1/query").json()
            # {"settings": {"cache_size": {"default_value": 10, "rules": [{"value": 20, ...}]}}}

    ``port=0`` picks a free port; once started, the service keeps that port across ``stop()``/``start()``
    so clients can reconnect after a simulated outage, and it keeps its settings and rules too.
    ``emulate_filter_bug`` reproduces the real server reading filter feature names as ``[a-z]+``
    (see ``GET /api/v1/query``).  The constructor takes plain values only, so a child process can build
    its own service from the same arguments.

    **Declaration races.**  A real Heksher creates a setting in two steps (look the name up, then insert
    it), so two clients declaring the same *new* setting at the same moment race: one gets
    ``200 {"outcome": "created"}``, the other a bare ``500`` (plain text ``Internal Server Error``, and the
    connection is closed); declaring again answers ``uptodate``.  This service answers declarations in one
    step, so it races only when a test asks: :meth:`race_declarations` holds the next declaration that
    would create a setting until ``parties`` declarations of that setting are held together (or a
    timeout), then the first to arrive creates it and each other one gets the 500, every time::

        race = service.race_declarations(parties=2)
        ...  # two clients declare the same new setting
        assert race.wait(10) and sorted(race.statuses) == [200, 500]

    The admin helper :meth:`declare` never races.
    """

    def __init__(
        self,
        context_features: Sequence[str] = DEFAULT_CONTEXT_FEATURES,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        emulate_filter_bug: bool = True,
        version: str = HEKSHER_VERSION,
    ) -> None:
        self.host = host
        """The address the service listens on."""
        self.port = port
        """The port the service listens on (the real one once started)."""
        self.state = HeksherState(context_features)
        """The model behind the service; tests may call it directly."""
        self._races = RaceGate()
        self._api = Api(self.state, emulate_filter_bug=emulate_filter_bug, version=version, races=self._races)
        self._faults = FaultTable()
        self._log = RequestLog()
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8123`` (valid once started)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the service is accepting connections."""
        return self._server is not None

    def start(self) -> HeksherService:
        """Start listening (no-op when running); returns ``self``."""
        if self._server is not None:
            return self
        self._stopping.clear()
        self._races.reopen()
        server = Server(
            (self.host, self.port), self._api, faults=self._faults, log=self._log, stopping=self._stopping
        )
        self.port = server.server_address[1]
        thread = threading.Thread(
            target=server.run,
            daemon=True,
            name=f"heksher-shm-testing-{self.port}",
        )
        thread.start()
        self._server, self._thread = server, thread
        _LOG.debug("in-memory Heksher service listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop listening and cut open connections; returns promptly even with keep-alive clients."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        self._stopping.set()  # wakes handlers sleeping in a delay fault
        self._races.close()  # and handlers holding a declaration for a race
        server.wake()
        thread.join()  # no new connections after this
        server.cut_connections()
        server.server_close()
        server.join_threads(timeout=1.0)
        _LOG.debug("in-memory Heksher service on port %s stopped", self.port)

    def __enter__(self) -> HeksherService:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- request records

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of the requests received so far, oldest first."""
        return self._log.snapshot()

    def count(self, method: str | None = None, path: str | None = None, status: int | None = None) -> int:
        """How many recorded requests match the method, path and status given (``None`` matches any)."""
        return self._log.count(method, path, status)

    def wait_for_requests(
        self,
        count: int,
        *,
        method: str | None = None,
        path: str | None = None,
        status: int | None = None,
        timeout: float = 5.0,
    ) -> bool:
        """Block until at least ``count`` matching requests are recorded; ``False`` on timeout."""
        return self._log.wait_for(count, method, path, status, timeout)

    def reset_requests(self) -> None:
        """Forget the recorded requests."""
        self._log.clear()

    # -- faults

    def inject_fault(
        self,
        fault: Fault,
        *,
        count: int | None = None,
        method: str | None = None,
        path: str | re.Pattern[str] | None = None,
        probability: float = 1.0,
        seed: int | None = None,
    ) -> InjectedFault:
        """Make matching requests misbehave as ``fault`` says.

        ``count`` limits how many requests are affected (no limit by default), ``method`` and ``path``
        (an exact path or a pattern matched in full) narrow the requests in scope, and ``probability``
        affects only that fraction of them, drawn from a generator seeded with ``seed``.  The first
        installed fault that applies wins.
        """
        return self._faults.install(
            fault, count=count, method=method, path=path, probability=probability, seed=seed
        )

    def clear_faults(self) -> None:
        """Remove every injected fault."""
        self._faults.clear()

    # -- declaration races

    def race_declarations(
        self, parties: int = 2, *, setting: str | None = None, timeout: float = 10.0
    ) -> DeclarationRace:
        """Make the next declarations of a new setting race, as they do on a real server.

        The next ``POST /api/v1/settings/declare`` that would create a setting (``setting``, when given) is
        held until ``parties`` declarations of that setting are held, or for ``timeout`` seconds at most;
        then the first to arrive creates the setting and each other one is answered with the real server's
        bare ``500``.  Returns a :class:`DeclarationRace` whose ``wait()`` and ``statuses`` tell how it
        went.  Several calls arm several races, caught in turn.
        """
        if parties < 1:
            raise ValueError("a race needs at least one party")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        race = DeclarationRace(parties, setting, timeout)
        self._races.arm(race)
        return race

    # -- admin helpers, straight on the state (no HTTP, not recorded)

    def declare(
        self,
        name: str,
        type: str,
        default_value: Any,
        configurable_features: Sequence[str] | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        alias: str | None = None,
        version: str = "1.0",
    ) -> dict[str, Any]:
        """Declare a setting as ``POST /api/v1/settings/declare`` would; returns the outcome body.

        ``configurable_features`` defaults to every context feature.  Raises :class:`ServiceError` where
        the endpoint would answer an error status (a 409 outcome included) and :class:`ValueError` for
        input the endpoint would reject with 422.
        """
        declaration = Declaration(
            name=name,
            configurable_features=tuple(
                self.state.context_features() if configurable_features is None else configurable_features
            ),
            type=parse_setting_type(type),
            default_value=default_value,
            metadata=dict(metadata or {}),
            alias=alias,
            version=version,
        )
        status, outcome = self.state.declare(declaration)
        if status != 200:
            raise ServiceError(status, "json", outcome)
        return outcome

    def add_rule(
        self,
        setting: str,
        feature_values: Mapping[str, str],
        value: Any,
        metadata: Mapping[str, Any] | None = None,
    ) -> int:
        """Add a rule (as ``POST /api/v1/rules``) and return its id; raises :class:`ServiceError`."""
        return self.state.add_rule(setting, feature_values, value, metadata)

    def set_rule_value(self, rule_id: int, value: Any) -> None:
        """Change a rule's value (as ``PUT /api/v1/rules/{id}/value``); raises :class:`ServiceError`."""
        self.state.set_rule_value(rule_id, value)

    def delete_rule(self, rule_id: int) -> None:
        """Delete a rule (as ``DELETE /api/v1/rules/{id}``); raises :class:`ServiceError`."""
        self.state.delete_rule(rule_id)

    def delete_setting(self, name: str) -> None:
        """Delete a setting and its rules (as ``DELETE /api/v1/settings/{name}``)."""
        self.state.delete_setting(name)

    @property
    def settings(self) -> dict[str, SettingInfo]:
        """A snapshot of the settings, keyed by canonical name."""
        return self.state.settings_snapshot()

    @property
    def rules(self) -> list[RuleInfo]:
        """A snapshot of the rules, by id."""
        return self.state.rules_snapshot()

    @property
    def context_features(self) -> list[str]:
        """The context features, in order."""
        return self.state.context_features()
