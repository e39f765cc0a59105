"""The leader's declarations: concurrent, never one setting twice at once, retried when worth it."""

from __future__ import annotations

import random
import time
from collections.abc import Generator, Iterable, Mapping
from typing import Any

import msgspec

from heksher_shm._engine import policy
from heksher_shm._engine.answers import declaration_outcome
from heksher_shm._engine.core import EngineCore
from heksher_shm._engine.effects import Call, Calls, Effect, Wait
from heksher_shm._engine.health import backoff_delay
from heksher_shm._engine.ports import Wish
from heksher_shm._engine.term import Term, transient
from heksher_shm._model import protocol as proto
from heksher_shm._model.snapshot import Outcome

__all__ = ["Declaring"]


class Declaring(EngineCore):
    """Declaring what the live processes need, once per term."""

    def _declare(self, term: Term, wishes: Iterable[Wish]) -> Generator[Effect, Any, bool]:
        """Declare what was not declared yet this term (concurrently); retry transient failures.

        Returns whether any declaration succeeded (new settings to query).
        """
        now = time.monotonic()
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
        failed: list[Outcome] = []
        for attempt in range(policy.DECLARE_ATTEMPTS):
            outcomes = yield from self._declare_batch(pending)
            retry: dict[str, proto.DeclarationBody] = {}
            failed = []
            for digest, outcome in outcomes.items():
                term.declared[digest] = outcome
                if outcome.error is None:
                    any_ok = True
                elif transient(outcome):
                    retry[digest] = pending[digest]
                    failed.append(outcome)
                else:
                    failed.append(outcome)
            if not retry or attempt == policy.DECLARE_ATTEMPTS - 1:
                break
            pending = retry
            yield Wait(policy.DECLARE_RETRY_PAUSE * random.uniform(0.5, 1.0))
        if any(transient(o) for o in failed):
            term.declare_failures += 1
            delay = backoff_delay(term.declare_failures, self.update_interval)
            term.declare_retry_at = time.monotonic() + delay
        else:
            term.declare_failures = 0
        if failed:
            first = failed[0]
            self._declaring.failed(
                f"{len(failed)} declaration(s) failed, e.g. {first.name}: {first.error}",
                setting_name=first.name,
            )
        else:
            self._declaring.resolved()
        return any_ok

    def _declare_batch(
        self, bodies: Mapping[str, proto.DeclarationBody]
    ) -> Generator[Effect, Any, dict[str, Outcome]]:
        """One try of each declaration, concurrently, never the same setting name twice at once."""
        outcomes: dict[str, Outcome] = {}
        rounds: list[list[tuple[str, proto.DeclarationBody]]] = []
        for digest, body in bodies.items():
            # Two processes may declare one setting differently (two versions): one at a time.
            for batch in rounds:
                if all(other.name != body.name for _, other in batch):
                    batch.append((digest, body))
                    break
            else:
                rounds.append([(digest, body)])
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
            results = yield Calls(calls, policy.DECLARE_CONCURRENCY, beat=self._busy_beat)
            for (digest, body), result in zip(batch, results, strict=True):
                outcomes[digest] = declaration_outcome(body, result, self._failed)
        return outcomes
