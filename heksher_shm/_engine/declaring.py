"""A leader's declarations: concurrent, never one setting twice at once, retried when worth it.

This module does no I/O: it yields effects.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Mapping
from typing import Any

import msgspec

from heksher_shm._engine import policy
from heksher_shm._engine.answers import declaration_outcome
from heksher_shm._engine.context import Context
from heksher_shm._engine.effects import Call, Calls, CountDeclarations, Effect, Wait
from heksher_shm._engine.health import backoff_delay
from heksher_shm._engine.host import Wish
from heksher_shm._engine.term import Term, keep_lead, transient
from heksher_shm._model import protocol as proto
from heksher_shm._model.snapshot import Outcome

__all__ = ["Declarer"]


class Declarer:
    """Declares what the live processes need, once per term (see :meth:`declare`)."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def declare(self, term: Term, wishes: Iterable[Wish]) -> Generator[Effect, Any, bool]:
        """Declare what was not declared yet this term (concurrently); retry transient failures.

        Returns whether any declaration succeeded (new settings to query).
        """
        ctx = self._ctx
        now = ctx.clock.monotonic()
        pending: dict[str, proto.DeclarationBody] = {}
        for wish in wishes:
            for digest, body in wish.declarations.items():
                done = term.declared.get(digest)
                if done is None or (
                    done.error is not None and transient(done) and now >= term.declare_retry_at
                ):
                    pending[digest] = body
        if not pending:
            return False
        any_ok = False
        succeeded = 0
        failed: list[Outcome] = []
        for attempt in range(policy.DECLARE_ATTEMPTS):
            outcomes = yield from self._batch(pending)
            retry: dict[str, proto.DeclarationBody] = {}
            failed = []
            for digest, outcome in outcomes.items():
                term.declared[digest] = outcome
                if outcome.error is None:
                    any_ok = True
                    succeeded += 1
                elif transient(outcome):
                    retry[digest] = pending[digest]
                    failed.append(outcome)
                else:
                    failed.append(outcome)
            if not retry or attempt == policy.DECLARE_ATTEMPTS - 1:
                break
            pending = retry
            yield Wait(policy.DECLARE_RETRY_PAUSE * ctx.rng.uniform(0.5, 1.0))
        yield CountDeclarations(succeeded, len(failed))
        if any(transient(o) for o in failed):
            term.declare_failures += 1
            delay = backoff_delay(term.declare_failures, ctx.update_interval, ctx.rng)
            term.declare_retry_at = ctx.clock.monotonic() + delay
        else:
            term.declare_failures = 0
        if failed:
            first = failed[0]
            ctx.declaring.failed(
                f"{len(failed)} declaration(s) failed, e.g. {first.name}: {first.error}",
                setting_name=first.name,
            )
        else:
            ctx.declaring.resolved()
        return any_ok

    def _batch(
        self, bodies: Mapping[str, proto.DeclarationBody]
    ) -> Generator[Effect, Any, dict[str, Outcome]]:
        """One try of each declaration, concurrently, never the same setting name twice at once."""
        outcomes: dict[str, Outcome] = {}
        rounds: list[list[tuple[str, proto.DeclarationBody]]] = []
        seen: dict[str, int] = {}  # name -> how many declarations of it went into rounds so far
        for digest, body in bodies.items():
            # Two processes may declare one setting differently (two versions): one at a time, the
            # n-th declaration of a name in the n-th round.
            n = seen.get(body.name, 0)
            seen[body.name] = n + 1
            if n == len(rounds):
                rounds.append([])
            rounds[n].append((digest, body))
        for batch in rounds:
            calls = [
                Call(
                    "POST",
                    proto.DECLARE,
                    content=msgspec.json.encode(body),
                    headers={"Content-Type": "application/json"},
                )
                for _, body in batch
            ]
            # A leader replaced while it could not run (stopped after its registry scan) must not
            # declare what it read then: a process gone since could create a setting that the new
            # term's own declarations found missing, and that term would never learn of it.
            yield from keep_lead()
            results = yield Calls(calls, policy.DECLARE_CONCURRENCY, busy=True)
            for (digest, body), result in zip(batch, results, strict=True):
                outcomes[digest] = declaration_outcome(body, result, self._ctx.failed)
        return outcomes
