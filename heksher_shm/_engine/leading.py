"""The leader's side of the engine: its term, its declarations, and when it queries."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Generator
from typing import Any

from heksher_shm._engine import policy
from heksher_shm._engine.effects import Apply, Call, Compute, Effect, Wait
from heksher_shm._engine.health import describe
from heksher_shm._engine.ports import Wish
from heksher_shm._engine.publishing import Publishing
from heksher_shm._engine.term import LeaderLost, Term, acknowledgements, query_spec
from heksher_shm._model import protocol as proto
from heksher_shm._model.snapshot import SettingEntry, decode_head
from heksher_shm._process.gc import paused_gc

__all__ = ["Leading"]

logger = logging.getLogger("heksher_shm.engine")


class Leading(Publishing):
    """How a leader starts its term, declares, and decides when to query."""

    def _lead(self) -> Generator[Effect, Any, None]:
        self.leading = True
        token, self._seized_token = self._seized_token or self.transport.begin_term(), 0
        term = self.term = Term(self.transport, token)
        pid, create_time, pidns = self.identity
        # Who leads comes first: a process that rings from now on rings this one.
        self.transport.set_leader(pid, create_time, self.bell, pidns)
        self._busy_beat()
        logger.info("became the leader", extra={"term": term.id, "pid": pid})
        self._wishes = yield Compute(functools.partial(self.source.wishes, True), beat=self._busy_beat)
        term.next_prune = time.monotonic() + self.update_interval
        if self.host is not None:
            self.host.ring(self.source.bells)  # followers watch this process from now on
        yield Compute(lambda: self._inherit(term), beat=self._busy_beat)
        term.context_features = (yield from self._fetch_context_features()) or term.context_features
        yield from self._refresh_inherited(term)
        while not self.closed:
            self._check_lock()
            now = time.monotonic()
            prune = now >= term.next_prune
            if prune or self.source.changed():
                scan = functools.partial(self.source.wishes, prune)
                self._wishes = yield Compute(scan, beat=self._busy_beat)
                if prune:
                    term.next_prune = now + self.update_interval
            wishes = self._wishes
            generation = term.generation
            updated, error = yield from self._cycle(term, wishes)
            if not updated and term.generation != generation and self.host is not None:
                self.host.ring(self.source.bells)  # new acknowledgements: their waiters are woken
            if updated:
                # Alone in the process (no sharing), the update waits for
                # modification_lock as heksher 0.2.2's does; a host's leader
                # must not, and the next wake (or get()) applies it instead.
                yield Apply(blocking=self.host is None, report=True, error=error)
                if self.host is not None:
                    self.host.ring(self.source.bells)
            elif self.transport.generation() != self.applied_generation():
                yield Apply(blocking=False)
            self._housekeep()
            # Whatever woke it (an update, a ring from a process that found the segment damaged...),
            # check the segment now and then; never on a timer of its own.
            yield from self._verify(term)
            wake_at = term.next_update
            if term.declare_retry_at > now:
                wake_at = min(wake_at, term.declare_retry_at)
            if term.verify_wanted:
                wake_at = min(wake_at, term.verified + policy.VERIFY_INTERVAL)
            now = time.monotonic()
            term.transport.beat(now, max(now, wake_at))
            fds = (self.host.bell_fd(),) if self.host is not None else ()
            yield Wait(max(0.0, wake_at - now), fds)
            if self.host is not None:
                self.host.drain()
            self._busy_beat()
            if not self.lock.held:
                raise LeaderLost

    def _refresh_inherited(self, term: Term) -> Generator[Effect, Any, None]:
        """A new term's first update, before its declarations: the settings the previous leader
        served (and live processes still want) existed, so they can be queried at once."""
        if not term.entries:
            return
        wanted = {body.name for wish in self._wishes for body in wish.declarations.values()}
        names = tuple(sorted(wanted & {entry.name for entry in term.entries}))
        if not names:
            return
        filters = query_spec(term, self._wishes)[1]
        error = yield from self._update(term, self._wishes, (names, filters))
        yield Apply(blocking=self.host is None, report=True, error=error)
        if self.host is not None:
            self.host.ring(self.source.bells)

    def _inherit(self, term: Term) -> None:
        """Start from the snapshot the previous leader left, so a failing first update loses nothing."""
        for _ in range(10):
            try:
                read = self.transport.read_head()
                if read is None:
                    return
                with paused_gc():
                    head = decode_head(read.head)
                blobs = self.transport.read_blobs(read.generation, [e.blob for e in head.settings])
                term.queried = head.queried
            except Exception:
                logger.warning("the previous snapshot is unreadable; starting afresh", exc_info=True)
                return
            if blobs is not None:
                term.entries = [
                    SettingEntry(e.name, i, e.digest, e.rule_count) for i, e in enumerate(head.settings)
                ]
                term.blobs = blobs
                term.served = dict(head.acks)
                if head.context_features:
                    term.context_features = head.context_features
                return

    def _fetch_context_features(self) -> Generator[Effect, Any, list[str] | None]:
        try:
            response = yield Call("GET", proto.CONTEXT_FEATURES, beat=self._busy_beat)
            response.raise_for_status()
            features = proto.decode(
                proto.CONTEXT_FEATURES, response.status_code, response.content, proto.ContextFeaturesResponse
            ).context_features
        except Exception as e:  # whatever went wrong, the term goes on with the client's order
            logger.warning("failed to get context features from the service: %s", describe(e))
            logger.debug("failed to get context features: details", exc_info=True)
            return None
        if features != self.context_features:
            logger.warning(
                "context feature mismatch",
                extra={"features_in_service": features, "features_in_client": self.context_features},
            )
        return features

    def _cycle(
        self, term: Term, wishes: list[Wish]
    ) -> Generator[Effect, Any, tuple[bool, BaseException | None]]:
        """Declare what is new, then query when due or asked; returns (updated, error).

        During a backoff (updates failing), a process that asks for a query gets
        the standing error at once instead of a query: an outage costs the
        service one query per backoff step, however often processes reload.
        """
        # A declaration the service answered is a sign it is back (during a backoff); whether it
        # brought a setting to query is for the spec to say (an ``uptodate`` one usually does not).
        answered = yield from self._declare(term, wishes)
        spec = query_spec(term, wishes)
        now = time.monotonic()
        asking = [w for w in wishes if w.query_seq > term.queried_for.get(w.key, 0)]
        due = now >= term.next_update
        if not (asking or due or spec != term.spec):
            if acknowledgements(term, wishes) != term.served or not term.published:
                yield from self._publish_acks(term, wishes)
            return False, None
        if term.failures and not due and not answered:
            for wish in asking:
                term.queried_for[wish.key] = wish.query_seq  # answered: with the standing error
            if acknowledgements(term, wishes) != term.served:
                yield from self._publish_acks(term, wishes)
            return False, None
        for wish in wishes:
            term.queried_for[wish.key] = wish.query_seq  # requests seen now are answered by this query
        error = yield from self._update(term, wishes, spec)
        return True, error
