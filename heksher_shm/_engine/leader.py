"""A term of leadership: begin it, then declare, query, publish and sleep until the next thing to do.

This module does no I/O: it yields effects.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Generator
from typing import Any

from heksher_shm._engine import policy
from heksher_shm._engine.context import Context
from heksher_shm._engine.declaring import Declarer
from heksher_shm._engine.effects import (
    Announce,
    Apply,
    Beat,
    Call,
    Compute,
    DamageReports,
    Effect,
    ReadBlobs,
    ReadHead,
    RestoreKept,
    RingAll,
    ScanWishes,
    Wait,
)
from heksher_shm._engine.health import error_text
from heksher_shm._engine.host import Restored, Wish
from heksher_shm._engine.term import LeaderLost, Term, keep_lead, query_spec
from heksher_shm._engine.updating import Updater
from heksher_shm._model import protocol as proto
from heksher_shm._model.snapshot import Head, Outcome, SettingEntry, decode_head

__all__ = ["Leader"]

logger = logging.getLogger("heksher_shm.engine")


class Leader:
    """One term of this process's leadership (see :mod:`heksher_shm._engine.engine`).

    Args:
        ctx: the engine's context.
        number: the term's fencing token, taken with the lock.
        closed: tells whether the client closed (the term then ends).
    """

    def __init__(self, ctx: Context, number: int, closed: Callable[[], bool]) -> None:
        self._ctx = ctx
        self.term = Term(number)
        self._closed = closed
        self._updater = Updater(ctx, Declarer(ctx))
        self._wishes: list[Wish] = []
        self._inherited_outcomes: dict[str, Outcome] = {}

    def run(self) -> Generator[Effect, Any, None]:
        """The term, until the client closes; raises :class:`~heksher_shm._engine.term.LeaderLost` when it
        is lost."""
        ctx, term = self._ctx, self.term
        # Who leads comes first: a process that rings from now on rings this one.
        yield Announce()
        yield self._busy_beat()
        logger.info("became the leader", extra={"term": term.number})
        self._wishes = yield ScanWishes(prune=True, busy=True)
        term.next_prune = ctx.clock.monotonic() + ctx.update_interval
        yield RingAll()  # followers watch this process from now on
        yield from self._inherit()
        if term.next_update > ctx.clock.monotonic():
            # Rules as fresh as a query would make them: the term's first snapshot needs no call to
            # the service (the first costs tens of milliseconds: the HTTP client is made then).
            yield from self._updater.carry_over(term, self._inherited_outcomes)
        self._inherited_outcomes = {}
        term.context_features = (yield from self._fetch_context_features()) or term.context_features
        yield from self._refresh_inherited()
        while not self._closed():
            yield from self._step()

    def _step(self) -> Generator[Effect, Any, None]:
        """One wake: look at the registrations, do what is due, then sleep until the next thing to do."""
        ctx, term = self._ctx, self.term
        yield from keep_lead()
        now = ctx.clock.monotonic()
        prune = now >= term.next_prune
        self._wishes = yield ScanWishes(prune, busy=True)
        if prune:
            term.next_prune = now + ctx.update_interval
        reports = yield DamageReports()
        if reports != term.damage_seen:
            # A process found the snapshot damaged (the counter moves before it rings): check. A ring
            # that the registrations explain asks for no check (a thousand blobs read back, 3 ms).
            term.damage_seen = reports
            term.verify_wanted = True
        updated, error = yield from self._updater.cycle(term, self._wishes)
        if updated:
            # Alone in the process (no sharing), the update waits for modification_lock as
            # heksher 0.2.2's does; a host's leader must not, and the next wake (or get()) applies it.
            yield Apply(blocking=not ctx.shared, report=True, error=error)
            yield RingAll()
        else:
            yield Apply(blocking=False)
        if (yield from ctx.housekeep()):
            # The segment file was removed or replaced: its successor holds no term. Take the lead
            # again, in the new file, under a term of its own (a process answered in the old file's
            # term would look for its answer under the new one's).
            logger.warning("the segment file was replaced; leading again in the new one")
            raise LeaderLost
        # Check the segment at an update that published nothing (now and then, on its own schedule)
        # and when a process reported damage; never on a timer of its own.
        yield from self._updater.verify(term, updated)
        wake_at = term.next_update
        if term.declare_retry_at > now:
            wake_at = min(wake_at, term.declare_retry_at)
        if term.verify_wanted and wake_at > term.verified + 2 * policy.VERIFY_INTERVAL:
            # A check put off (one was made lately) waits for the next wake if that comes within two
            # intervals; only a longer sleep is cut short for it. Waking for it every time, a leader
            # whose updates and checks drift apart wakes twice per update while nothing happens.
            wake_at = min(wake_at, term.verified + policy.VERIFY_INTERVAL)
        now = ctx.clock.monotonic()
        yield Beat(now, max(now, wake_at))
        yield Wait(max(0.0, wake_at - now))
        yield self._busy_beat()

    def _busy_beat(self) -> Beat:
        """Progress now, more within :data:`BUSY_PROMISE`: the leader is at work."""
        now = self._ctx.clock.monotonic()
        return Beat(now, now + policy.BUSY_PROMISE)

    def _inherit(self) -> Generator[Effect, Any, None]:
        """Start from the snapshot the previous leader left, so a failing first update loses nothing;
        with no usable snapshot in the segment, from the last-known-good file, if there is one.

        Read after this term began (its fencing token is in the segment): a
        replaced leader's late snapshot is either in what this reads, or
        refused by every reader.
        """
        for _ in range(10):
            try:
                read = yield ReadHead(busy=True)
                if read is None:
                    break
                head = yield Compute(functools.partial(decode_head, read.head), busy=True)
                blobs = yield ReadBlobs(read.generation, [e.blob for e in head.settings], busy=True)
            except Exception as e:
                logger.warning("the previous snapshot is unreadable; starting afresh: %s", error_text(e))
                logger.debug("the previous snapshot is unreadable: details", exc_info=True)
                break
            if blobs is not None:
                self._adopt(head, blobs, head.queried, head.restored)
                return
        yield from self._restore()

    def _restore(self) -> Generator[Effect, Any, None]:
        """Start from the last-known-good file (its rules are older than any this host had: readers
        that applied newer ones keep theirs)."""
        restored: Restored | None = yield RestoreKept(busy=True)
        if restored is None:
            return
        try:
            head = yield Compute(functools.partial(decode_head, restored.head), busy=True)
            blobs = [restored.blobs[entry.blob] for entry in head.settings]
        except Exception as e:
            logger.warning("the last-known-good file %s is unusable: %s", restored.where, error_text(e))
            return
        logger.info(
            "no snapshot on this host; starting from the last-known-good file %s until the service answers",
            restored.where,
            extra={"snapshot_file": restored.where, "as_of": head.as_of},
        )
        self._adopt(head, blobs, 0.0, restored.where)

    def _adopt(self, head: Head, blobs: list[bytes], queried: float, restored: str | None) -> None:
        """Take *head*'s settings with their *blobs* (in the head's order) as this term's rules.

        Rules the previous leader queried successfully less than an interval ago are as fresh as its
        schedule would have kept them: this term queries when that leader would have, with its ETag
        (a takeover, or a new main client in a process, costs the service nothing extra).
        """
        term = self.term
        term.queried, term.as_of, term.restored = queried, head.as_of, restored
        term.entries = [SettingEntry(e.name, i, e.digest, e.rule_count) for i, e in enumerate(head.settings)]
        term.blobs = blobs
        if head.context_features:
            term.context_features = head.context_features
        if head.ok and restored is None and queried and head.filters is not None:
            term.etag = head.etag
            term.spec = (tuple(sorted(entry.name for entry in head.settings)), head.filters)
            term.next_update = queried + self._ctx.update_interval
            self._inherited_outcomes = dict(head.outcomes)

    def _refresh_inherited(self) -> Generator[Effect, Any, None]:
        """A new term's first update, before its declarations: the settings the previous leader
        served (and live processes still want) existed, so they can be queried at once (unless the
        previous leader queried them less than an interval ago)."""
        term = self.term
        if not term.entries or term.next_update > self._ctx.clock.monotonic():
            return  # nothing inherited, or as fresh as a query now would make it
        wanted = {body.name for wish in self._wishes for body in wish.declarations.values()}
        names = tuple(sorted(wanted & {entry.name for entry in term.entries}))
        if not names:
            return
        filters = query_spec(term, self._wishes)[1]
        error = yield from self._updater.update(term, self._wishes, (names, filters))
        yield Apply(blocking=not self._ctx.shared, report=True, error=error)
        yield RingAll()

    def _fetch_context_features(self) -> Generator[Effect, Any, list[str] | None]:
        try:
            response = yield Call("GET", proto.CONTEXT_FEATURES, busy=True)
            response.raise_for_status()
            features = proto.decode(
                proto.CONTEXT_FEATURES, response.status_code, response.content, proto.ContextFeaturesResponse
            ).context_features
        except Exception as e:  # whatever went wrong, the term goes on with the client's order
            logger.warning("failed to get context features from the service: %s", error_text(e))
            logger.debug("failed to get context features: details", exc_info=True)
            return None
        if features != self._ctx.context_features:
            logger.warning(
                "context feature mismatch",
                extra={"features_in_service": features, "features_in_client": self._ctx.context_features},
            )
        return features
