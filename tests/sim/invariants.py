"""The invariants of ``design.md`` the simulation checks, as the run goes and at its end.

Each check raises :class:`~tests.sim.world.Violation` with the name below
(the number is design.md's invariant):

``monotonic-reads (13)``
    No process ever applies a setting's rules older than those it applied
    (its own leader's snapshots included). A setting's content version is the
    value of its clock rule (:data:`tests.sim.service.CLOCK`).
``replaced-leader-accepted (13)``
    No process accepts a snapshot that a leader published after it was
    replaced (a newer election had happened).
``one-term-at-a-time (13)``
    Once a process accepted a snapshot of one election, it never accepts one
    of an earlier election.
``declared-once-per-term (1)``
    A declaration the service answered (not a 5xx, not a failed connection)
    is not sent again in the same term, unless a query answered 404 since
    (the service lost settings: everything is declared again).
``one-poller (1, 11)``
    A leader that was replaced sends at most one update's queries (a query
    and its retry after a 404) before it notices.
``outage-backoff (1, 11)``
    After *n* failed queries in a row, a term's next query waits at least
    the least backoff step (:func:`heksher_shm._engine.health.backoff_delay`
    without its jitter), unless a declaration was answered meanwhile (a sign
    the service is back).
``set-as-main-covers (7)``
    A ``set_as_main()`` that returns without an error has applied a snapshot
    holding every one of the process's settings.
``reload-is-fresh (7)``
    A ``reload()`` that returns without an error has applied, for each of the
    process's settings, rules at least as new as the service had when it was
    called.
``requests-return (7)``
    Once faults stop, every ``set_as_main()`` and ``reload()`` returns
    (answered or with an error, never by timing out) within
    :func:`convergence_bound`.
``convergence (5, 7)``
    Once faults stop, every live process has applied the service's latest
    rules for each of its settings within :func:`convergence_bound`.
``quiet-when-idle (11)``
    Over a quiet stretch (from one update interval after convergence and
    after the latest election, once a leader stalled until the faults ended
    has shown progress or been replaced, and once the leader checked the
    segment after the last flipped byte), the service gets at most one query
    per update interval (plus two), no declarations, and no process wakes
    more than :func:`idle_bound` times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx
import msgspec

from heksher_shm._engine import policy
from heksher_shm._engine.effects import Call
from heksher_shm._engine.health import FIRST_DELAY
from heksher_shm._engine.shared import GONE_PATIENCE
from heksher_shm._model.protocol import DeclarationBody, declaration_digest
from heksher_shm._model.snapshot import Head
from tests.sim.client import Request
from tests.sim.service import Exchange, Rules, version_of
from tests.sim.world import Violation

if TYPE_CHECKING:
    from tests.sim.process import SimProcess
    from tests.sim.run import Sim

__all__ = ["INVARIANTS", "KNOWN", "Checks", "convergence_bound", "idle_bound"]

INVARIANTS = (
    "monotonic-reads (13)",
    "replaced-leader-accepted (13)",
    "one-term-at-a-time (13)",
    "declared-once-per-term (1)",
    "one-poller (1, 11)",
    "outage-backoff (1, 11)",
    "set-as-main-covers (7)",
    "reload-is-fresh (7)",
    "requests-return (7)",
    "convergence (5, 7)",
    "quiet-when-idle (11)",
)

KNOWN: dict[str, str] = {}
"""Open issues the checks recognise: an instance is reported and counted apart, not failed on. Each
entry goes once the engine is fixed (and the check then fails on any instance). None is open: the five
the simulation found (stale-leader-ack, refused-snapshot-counts-as-applied,
frozen-after-failed-declaration, leader-record-lost, stale-leader-formats-the-header) are fixed, and
their checks fail like any other."""

_declaration = msgspec.json.Decoder(DeclarationBody)


def convergence_bound(update_interval: float) -> float:
    """Seconds from the end of the faults by which every process has the service's latest rules.

    The leader's next update comes within 1.75 intervals (the longest draw after a first success,
    :data:`~heksher_shm._engine.health.DESYNC_SPREAD`) or 1.25 (a backoff step); a leader that was
    stopped until then may be replaced first (its promise plus ``UNRESPONSIVE_AFTER``), and the new
    term updates at once; a dead one is noticed at once (its exit handle) or within ``GONE_PATIENCE``;
    plus the requests' latencies and a declaration's retries. Counted twice over for the update, to
    cover a term that begins just after one.
    """
    return (
        2 * 1.75 * update_interval
        + 1.25 * update_interval
        + policy.UNRESPONSIVE_AFTER
        + policy.BUSY_PROMISE
        + GONE_PATIENCE
        + policy.DECLARE_ATTEMPTS * policy.DECLARE_RETRY_PAUSE
        + 2.0
    )


def idle_bound(seconds: float, update_interval: float) -> float:
    """The most waits a process may end in *seconds* of quiet: one per update, a quarter more, and three."""
    return 1.25 * seconds / update_interval + 3


def least_backoff(failures: int, update_interval: float) -> float:
    """The shortest wait :func:`heksher_shm._engine.health.backoff_delay` can draw after *failures*."""
    step = FIRST_DELAY * 2.0 ** min(max(failures, 1) - 1, 30)
    return step / 2 if step < update_interval else update_interval


@dataclass
class _Term:
    """What the checks remember of one election's queries and declarations."""

    queries: list[Exchange] = field(default_factory=list)
    settled: set[str] = field(default_factory=set)
    answered_since_query: bool = False
    stale_queries: int = 0


class Checks:
    """The invariants (see the module docstring), fed by the simulation as things happen."""

    def __init__(self, sim: Sim, skip: frozenset[str] = frozenset()) -> None:
        self._sim = sim
        self._skip = skip
        self.skipped: dict[str, int] = {}
        """How often each skipped invariant did not hold."""
        self._terms: dict[int, _Term] = {}
        self._versions: dict[tuple[int, float], dict[str, int]] = {}
        self._epochs: dict[tuple[int, float], int] = {}
        self.quiet_since: float | None = None
        self.applies = 0

    def _violate(self, name: str, detail: str, known: str | None = None) -> None:
        """An invariant does not hold: raise, unless it is one of those to skip (then count it)."""
        if any(name.startswith(prefix) for prefix in self._skip):
            self.skipped[name] = self.skipped.get(name, 0) + 1
            return
        raise Violation(name, detail, known if known in KNOWN else None)

    def _term(self, epoch: int) -> _Term:
        term = self._terms.get(epoch)
        if term is None:
            term = self._terms[epoch] = _Term()
        return term

    # -- reading ------------------------------------------------------------------------------------------

    def applied_by(self, proc: SimProcess) -> Callable[[int, Head, dict[str, Rules]], None]:
        """The hook :class:`~tests.sim.client.SimClient` calls once it accepted a snapshot."""
        who = (proc.pid, proc.start)

        def applied(generation: int, head: Head, changed: dict[str, Rules]) -> None:
            self.applies += 1
            sim = self._sim
            published = sim.generations.get(generation)
            if published is not None:
                if published.stale:
                    self._violate(
                        "replaced-leader-accepted (13)",
                        f"pid {proc.pid} accepted generation {generation}, published by pid {published.pid} "
                        f"(election {published.epoch}) after it was replaced"
                        + ("; its publish formatted a damaged header anew" if published.over_damage else ""),
                        "stale-leader-formats-the-header" if published.over_damage else None,
                    )
                seen = self._epochs.get(who, 0)
                if published.epoch < seen:
                    self._violate(
                        "one-term-at-a-time (13)",
                        f"pid {proc.pid} accepted generation {generation} of election {published.epoch} "
                        f"after one of election {seen}",
                    )
                self._epochs[who] = published.epoch
            versions = self._versions.setdefault(who, {})
            for name, rules in changed.items():
                version = version_of(rules)
                if version is None:
                    continue
                before = versions.get(name, 0)
                if version < before:
                    self._violate(
                        "monotonic-reads (13)",
                        f"pid {proc.pid} applied {name} at version {version} after version {before} "
                        f"(generation {generation}"
                        + (
                            f", published by pid {published.pid}, election {published.epoch})"
                            if published
                            else ")"
                        ),
                    )
                versions[name] = version
            sim.world.note(proc.pid, "applied generation %d (term %d)", generation, head.term)

        return applied

    # -- the service's traffic ------------------------------------------------------------------------------

    def sent(self, proc: SimProcess, call: Call, exchange: Exchange) -> None:
        """A request left *proc* (its leader's term is ``exchange.epoch``)."""
        sim = self._sim
        term = self._term(exchange.epoch)
        if exchange.kind == "declare" and call.content:
            digest = declaration_digest(_declaration.decode(call.content))
            if digest in term.settled:
                self._violate(
                    "declared-once-per-term (1)",
                    f"pid {proc.pid} declared {exchange.name} again in election {exchange.epoch} "
                    "after the service had answered it",
                )
        if exchange.kind != "query":
            return
        if exchange.epoch < sim.epoch:
            term.stale_queries += 1
            if term.stale_queries > 2:
                self._violate(
                    "one-poller (1, 11)",
                    f"pid {proc.pid}, replaced (election {exchange.epoch}, now {sim.epoch}), "
                    f"sent {term.stale_queries} queries",
                )
        failures = 0
        for previous in reversed(term.queries):
            if not _failed(previous):
                break
            failures += 1
        if failures and not term.answered_since_query:
            previous = term.queries[-1]
            least = least_backoff(failures, sim.config.update_interval)
            if exchange.sent - previous.answered < least - 1e-9:
                self._violate(
                    "outage-backoff (1, 11)",
                    f"pid {proc.pid} queried {exchange.sent - previous.answered:.3f} s after the last of "
                    f"{failures} failed queries in a row (the least backoff step: {least:.3f} s)",
                )
        term.queries.append(exchange)
        term.answered_since_query = False

    def answered(self, call: Call, exchange: Exchange, answer: httpx.Response | Exception) -> None:
        """The answer to a request came back."""
        term = self._term(exchange.epoch)
        if exchange.kind == "declare" and 0 < exchange.status < 500 and call.content:
            term.settled.add(declaration_digest(_declaration.decode(call.content)))
            term.answered_since_query = True
        elif exchange.kind == "query" and exchange.status == 404:
            term.settled.clear()  # the service lost settings: everything is declared again

    # -- requests -----------------------------------------------------------------------------------------

    def request_ended(self, proc: SimProcess, request: Request) -> None:
        """A ``set_as_main()`` or ``reload()`` returned."""
        client = proc.client
        sim = self._sim
        sim.world.note(proc.pid, "%s #%d: %s", request.kind, request.seq, request.outcome)
        if request.outcome == "ok" and request.kind == "set_as_main":
            names = {entry.name for entry in client.head.settings} if client.head else set()
            missing = sorted(set(client.declarations) - names)
            if missing:
                refused = client.applied_generation != client.head_generation
                self._violate(
                    "set-as-main-covers (7)",
                    f"pid {proc.pid}'s set_as_main returned without an error, its applied snapshot "
                    f"(generation {client.head_generation}) lacking {missing}"
                    + (f"; generation {client.applied_generation} was refused" if refused else ""),
                    "refused-snapshot-counts-as-applied" if refused else None,
                )
        if request.outcome == "ok" and request.kind == "reload":
            for name, wanted in request.versions.items():
                have = version_of(client.rules.get(name, frozenset()))
                if have is None or have < wanted:
                    refused = client.applied_generation != client.head_generation
                    self._violate(
                        "reload-is-fresh (7)",
                        f"pid {proc.pid}'s reload returned with {name} at version {have}, older than the "
                        f"service's {wanted} when it was called"
                        + (f"; generation {client.applied_generation} was refused" if refused else ""),
                        "refused-snapshot-counts-as-applied" if refused else None,
                    )
        quiet = self.quiet_since
        if quiet is not None and request.outcome == "timeout":
            self._violate(
                "requests-return (7)",
                f"pid {proc.pid}'s {request.kind} (made at {request.made - quiet:+.2f} s from the end "
                "of the faults) timed out",
                self._stale_ack(proc),
            )

    def requests_done(self) -> bool:
        """Whether no live process waits for a request."""
        return all(request.outcome for proc in self._sim.live() for request in proc.client.requests)

    def pending_requests(self, deadline: float) -> None:
        """At the convergence deadline: no request still waits (every one was answered in time)."""
        for proc in self._sim.live():
            for request in proc.client.requests:
                if not request.outcome:
                    self._violate(
                        "requests-return (7)",
                        f"pid {proc.pid}'s {request.kind} #{request.seq} made at "
                        f"{request.made - (self.quiet_since or 0.0):+.2f} s from the end of the faults has "
                        "not returned by the convergence bound",
                        self._stale_ack(proc),
                    )

    def _stale_ack(self, proc: SimProcess) -> str | None:
        """``stale-leader-ack`` if *proc*'s answer comes from an older term than the snapshot it applied."""
        ack = self._sim.registry.answer(proc.host.key, proc.host.segment.term())
        head = proc.client.head
        if ack is not None and head is not None and ack.error is None and ack.term < head.term:
            return "stale-leader-ack"
        return None

    # -- the end ------------------------------------------------------------------------------------------

    def converged(self, strict: bool = True) -> bool:
        """Every live process has the service's current rules for each of its settings (if not *strict*,
        say whether it is so rather than raise)."""
        sim = self._sim
        service = sim.service
        for proc in sim.live():
            client = proc.client
            for name in client.declarations:
                current = service.current(name, client.tracked)
                if current is None:
                    creatable = any(
                        other.client.declarations.get(name) is not None
                        and other.client.declarations[name].version == "1.0"
                        for other in sim.live()
                    )
                    if creatable:
                        if not strict:
                            return False
                        self._violate(
                            "convergence (5, 7)",
                            f"setting {name} is missing from the service though pid {proc.pid}... could "
                            "create it (nobody declared it again)",
                        )
                    continue
                have = client.rules.get(name)
                if have != current:
                    if not strict:
                        return False
                    outcome = client.head.outcomes.get(client.digests[name]) if client.head else None
                    failed = outcome is not None and outcome.error is not None and outcome.settled
                    self._violate(
                        "convergence (5, 7)",
                        f"pid {proc.pid} has {name} at version {version_of(have or frozenset())}, the "
                        f"service at {version_of(current)} ({len(have or ())} rules against {len(current)})"
                        + (f"; its declaration failed: {outcome.error}" if failed and outcome else ""),
                        "frozen-after-failed-declaration" if failed else None,
                    )
        return True

    def idle(self, since: float, seconds: float) -> None:
        """Over the last *seconds* of quiet: the service's traffic and the processes' wakes."""
        sim = self._sim
        interval = sim.config.update_interval
        exchanges = [e for e in sim.service.exchanges if e.sent >= since]
        queries = sum(e.kind == "query" for e in exchanges)
        declarations = sum(e.kind == "declare" for e in exchanges)
        if queries > seconds / interval + 2 or declarations:
            self._violate(
                "quiet-when-idle (11)",
                f"{queries} queries and {declarations} declarations in {seconds:.0f} s of quiet "
                f"(update interval {interval:g} s)",
            )
        bound = idle_bound(seconds, interval)
        for proc in sim.live():
            woke = proc.wakes - sim.wakes_at_idle.get(proc.pid, 0)
            if woke > bound:
                recorded = proc.host.segment.leader()
                leaders = {(p.pid, p.start) for p in sim.live() if p.engine.leading}
                lost = bool(leaders) and (recorded is None or (recorded[0], recorded[1]) not in leaders)
                self._violate(
                    "quiet-when-idle (11)",
                    f"pid {proc.pid} woke {woke} times in {seconds:.0f} s of quiet (at most {bound:.0f})"
                    + (f"; the segment names {recorded and recorded[0]} as the leader" if lost else ""),
                    "leader-record-lost" if lost else None,
                )


def _failed(exchange: Exchange) -> bool:
    """Whether a query failed in the engine's eyes (a 404 is answered by declaring again, not a failure)."""
    return exchange.status == 0 or (exchange.status >= 400 and exchange.status != 404)
