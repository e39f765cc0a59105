"""A leader's updates: query, publish, acknowledge, back off, and check its own work.

This module does no I/O: it yields effects.
"""

from __future__ import annotations

import datetime
import functools
import logging
from collections.abc import Generator, Sequence
from typing import Any

import httpx

from heksher_shm._engine import policy
from heksher_shm._engine.answers import Fresh, ServiceLostSettings
from heksher_shm._engine.context import Context
from heksher_shm._engine.declaring import Declarer
from heksher_shm._engine.effects import (
    Acknowledge,
    Announce,
    Call,
    Calls,
    Compute,
    Digest,
    Effect,
    KeepSnapshot,
    Publish,
    ReadBlobs,
    ReadHead,
    RecordError,
    RecordOk,
)
from heksher_shm._engine.health import DESYNC_WAVES, backoff_delay, error_text, update_delay
from heksher_shm._engine.host import Wish
from heksher_shm._engine.term import (
    LeaderLost,
    Spec,
    Term,
    acknowledgements,
    keep_lead,
    query_spec,
    refused_as_new,
)
from heksher_shm._model import protocol as proto
from heksher_shm._model.snapshot import FORMAT, Head, Outcome, encode_head
from heksher_shm.exceptions import SnapshotFencedError

__all__ = ["Updater"]

logger = logging.getLogger("heksher_shm.engine")


class Updater:
    """What a leader does with the service's answers and the segment."""

    def __init__(self, ctx: Context, declarer: Declarer) -> None:
        self._ctx = ctx
        self._declarer = declarer

    def cycle(
        self, term: Term, wishes: list[Wish]
    ) -> Generator[Effect, Any, tuple[bool, BaseException | None]]:
        """Declare what is new, then query when due or asked; returns (updated, error).

        During a backoff (updates failing), a process that asks for a query gets
        the standing error at once instead of a query: an outage costs the
        service one query per backoff step, however often processes reload.
        """
        # A declaration the service answered is a sign it is back (during a backoff); whether it
        # brought a setting to query is for the spec to say (an ``uptodate`` one usually does not).
        answered = yield from self._declarer.declare(term, wishes)
        now = self._ctx.clock.monotonic()
        due = now >= term.next_update
        if due:
            yield from self._look_for_refused(term, wishes)
        spec = query_spec(term, wishes)
        asking = [w for w in wishes if w.query_seq > term.queried_for.get(w.key, 0)]
        if not (asking or due or spec != term.spec):
            if not term.published or term.declared != term.published_outcomes:
                # The term's first snapshot, or new outcomes: a process reads its declarations'
                # outcomes in the snapshot its acknowledgement names, so they must be in one.
                yield from self._republish(term)
            yield from self.acknowledge(term, wishes)
            return False, None
        if term.failures and not due and not answered:
            for wish in asking:
                term.queried_for[wish.key] = wish.query_seq  # answered: with the standing error
            yield from self.acknowledge(term, wishes)
            return False, None
        for wish in wishes:
            term.queried_for[wish.key] = wish.query_seq  # requests seen now are answered by this query
        error = yield from self.update(term, wishes, spec, scheduled=due)
        return True, error

    def _look_for_refused(self, term: Term, wishes: Sequence[Wish]) -> Generator[Effect, Any, None]:
        """Ask the service whether the settings refused as new exist now (see :func:`refused_as_new`):
        those it has are queried from this update on."""
        names = refused_as_new(term, wishes)
        if not names:
            return
        results = yield Calls(
            [Call("GET", f"{proto.SETTINGS}/{name}") for name in names], policy.DECLARE_CONCURRENCY, busy=True
        )
        for name, result in zip(names, results, strict=True):
            if isinstance(result, httpx.Response) and result.status_code == 200:
                term.found.add(name)
                logger.info(
                    "a setting whose declaration was refused as new exists now; its rules are queried",
                    extra={"setting_name": name},
                )

    def update(
        self, term: Term, wishes: Sequence[Wish], spec: Spec, scheduled: bool = True
    ) -> Generator[Effect, Any, BaseException | None]:
        """Query, publish and acknowledge; returns the error, if any. The update timer restarts here
        (*scheduled*: the update was due, rather than asked for by a process).

        A 404 means the service lost a setting this host still uses (its data
        was reset, or someone deleted the setting): declare everything again,
        then query once more, without the settings the 404 named that no
        declaration brought back (asked for, they would fail every query of
        the term). Failures back off (see :mod:`heksher_shm._engine.health`).
        What the query brought is committed to the term only once published:
        a publish that fails (a full disk) leaves the term describing what
        readers have, and the next update fetches again.
        """
        if spec != term.spec:
            term.etag = ""
        error: BaseException | None = None
        fresh: Fresh | None = None
        for attempt in range(2):
            try:
                fresh = yield from self._query(term, spec)
            except ServiceLostSettings as lost:
                if attempt == 0:
                    logger.warning(
                        "the service does not know a setting this host uses; declaring everything again",
                        extra={"response_content": lost.response.content[:200]},
                    )
                    term.lost |= lost.unknown(spec[0])  # not asked for again unless declared anew
                    term.found -= term.lost  # nor found again unless the service shows it again
                    term.declared = {d: o for d, o in term.declared.items() if o.error is not None}
                    term.etag = ""
                    yield from self._declarer.declare(term, wishes)
                    spec = query_spec(term, wishes)
                    continue
                try:
                    lost.response.raise_for_status()
                except httpx.HTTPStatusError as e:
                    error = e
            except Exception as e:  # transport, protocol, and anything unexpected: reported, never fatal
                error = e
            break
        if error is None and not spec[0] and term.failures:
            # Nothing to ask (no live process wants a setting the service has) says nothing of the
            # service: a run of failures goes on as it was, neither recovered nor reset.
            return (yield from self._nothing_asked(term, wishes, spec))
        if error is None:
            term.spec = spec
            self._ctx.service.resolved()
        else:
            extra: dict[str, Any] = {"settings": len(spec[0])}
            if isinstance(error, httpx.HTTPStatusError):
                extra["response_content"] = error.response.content[:200]
            self._ctx.service.failed(error, **extra)
            fresh = None
        failed = yield from self._publish(term, fresh, None if error is None else error_text(error))
        if error is None and failed is not None:
            error = failed  # the service answered, but readers do not have it: the update failed all the same
        yield from self._settle(term, error, scheduled)
        yield from self.acknowledge(term, wishes)
        return error

    def _nothing_asked(
        self, term: Term, wishes: Sequence[Wish], spec: Spec
    ) -> Generator[Effect, Any, BaseException | None]:
        """An update with no setting to ask for while updates fail: publish what changed (declaration
        outcomes) with the standing error, and sleep an interval, as a leader with nothing to ask does.

        The run of failures stays: a process that wants a setting again meanwhile is answered as during
        a backoff (the standing error at once, and a query when the next update is due, or as soon as a
        declaration of its gets an answer), never by a query sooner than the backoff allows.
        """
        ctx = self._ctx
        term.spec = spec
        failed = yield from self._republish(term)
        if failed is None:
            term.next_update = ctx.clock.monotonic() + ctx.update_interval
        yield from self.acknowledge(term, wishes)
        return failed

    def acknowledge(self, term: Term, wishes: Sequence[Wish]) -> Generator[Effect, Any, None]:
        """Answer the requests that this term's work answered and that were not answered yet."""
        acks = acknowledgements(term, wishes)
        changed = {key: ack for key, ack in acks.items() if term.served.get(key) != ack}
        term.served = acks
        if changed:
            yield Acknowledge(changed)

    def _settle(
        self, term: Term, error: BaseException | None, scheduled: bool = True
    ) -> Generator[Effect, Any, None]:
        """The end of an update: the next one is due an interval from now, or after a backoff step."""
        ctx = self._ctx
        now = ctx.clock.monotonic()
        if error is None:
            # The first success of a term, or the first after failures: hosts that got here together
            # (a fleet's start, the end of an outage) must not stay in lockstep. The waits after it and
            # after the next few successes are drawn (see DESYNC_WAVES).
            # An update a process asked for (a reload) restarts the timer at a whole interval, as
            # clients.rst says; the draws are for the scheduled ones.
            if not term.updated_once or term.failures > 0:
                term.desync_left = DESYNC_WAVES
            desync = scheduled and term.desync_left > 0
            if desync:
                term.desync_left -= 1
            term.failures = 0
            term.error = None
            term.updated_once = True
            term.next_update = now + update_delay(ctx.update_interval, ctx.rng, desync)
            yield RecordOk(ctx.clock.wall())
        else:
            term.failures += 1
            term.next_update = now + backoff_delay(term.failures, ctx.update_interval, ctx.rng)
            text = error_text(error)
            term.error = (text, ctx.errors.remember(error))
            yield RecordError(text, ctx.clock.wall())

    def carry_over(self, term: Term, outcomes: dict[str, Outcome]) -> Generator[Effect, Any, None]:
        """A new term's first snapshot, before its declarations: the rules it adopted (queried less than
        an interval ago, so a query now would bring nothing), under its own term.

        Declaring every setting again takes a while (1,000 settings: about a
        second), and the term's first snapshot should not wait for it: from
        this one on, the segment holds a snapshot of the live term (readers
        no longer rely on the adopted one, and :meth:`verify` has something
        to check). It carries the previous term's declaration *outcomes*
        (what readers already had), until the term's own declarations
        replace them in its next snapshot.
        """
        yield from self._republish(term, outcomes)

    def _republish(
        self, term: Term, inherited: dict[str, Outcome] | None = None
    ) -> Generator[Effect, Any, BaseException | None]:
        """Publish what the term holds, without a query (new outcomes, or its first snapshot), with the
        standing error while updates fail; a publish that fails is a failed update (a backoff step)."""
        standing = term.error[0] if term.error is not None else None
        failed = yield from self._publish(term, None, standing, inherited)
        if failed is not None:
            yield from self._settle(term, failed)
        return failed

    def _publish(
        self, term: Term, fresh: Fresh | None, error: str | None, inherited: dict[str, Outcome] | None = None
    ) -> Generator[Effect, Any, BaseException | None]:
        """Publish what changed (or the term's first snapshot); returns why publishing failed, if it did.

        *error* describes the failure of the update behind it (the head says whether its rules come
        from a successful query). *inherited*: the previous term's outcomes, for the term's first
        snapshot (see :meth:`carry_over`).
        """
        ctx = self._ctx
        entries, blobs, queried, as_of = term.entries, term.blobs, term.queried, term.as_of
        restored = term.restored
        changed = False
        if fresh is not None:
            queried, as_of, restored = fresh.queried, ctx.clock.wall(), None
            if fresh.entries is not None and fresh.entries != term.entries:
                entries, blobs, changed = fresh.entries, fresh.blobs, True
            # Rules restored from the last-known-good file, now confirmed by the service: say so.
            changed = changed or term.restored is not None
        # New declaration outcomes are published too: an answer names a snapshot that carries them.
        if not (changed or not term.published or term.declared != term.published_outcomes):
            if fresh is not None:
                term.etag, term.queried, term.as_of = fresh.etag, queried, as_of
            return None
        yield from keep_lead()  # a leader that was replaced while it was stopped must not write
        head = Head(
            format=FORMAT,
            term=term.number,
            published=ctx.clock.wall(),
            context_features=term.context_features or ctx.context_features,
            settings=entries,
            outcomes={**inherited, **term.declared} if inherited is not None else dict(term.declared),
            ok=error is None,
            error=error,
            update_interval=ctx.update_interval,
            queried=queried,
            filters=term.spec[1] if term.spec is not None else None,
            as_of=as_of,
            restored=restored,
            etag=fresh.etag if fresh is not None else term.etag,
        )
        encoded: bytes = yield Compute(functools.partial(encode_head, head), busy=True)
        failed = yield from self._write(term, encoded, blobs)
        if failed is not None:
            term.etag = ""  # what the service answered is not what readers have: fetch again
            return failed
        term.entries, term.blobs, term.queried = entries, blobs, queried
        term.as_of, term.restored = as_of, restored
        term.published = True
        term.published_outcomes = dict(term.declared)
        if fresh is not None:
            term.etag = fresh.etag
        if changed:
            yield KeepSnapshot(encoded, blobs, busy=True)  # at most once per update, only when it changed
        elif restored is not None:
            logger.warning(
                "no snapshot on this host and the service cannot be reached: serving the rules of the "
                "last-known-good file %s (as of %s); they are stale until the service answers",
                restored,
                _when(as_of),
                extra={"snapshot_file": restored, "as_of": as_of},
            )
        return None

    def _write(
        self, term: Term, head: bytes, blobs: list[bytes]
    ) -> Generator[Effect, Any, BaseException | None]:
        """Publish into the segment; on failure (a full disk...) the previous snapshot stays."""
        try:
            term.generation = yield Publish(head, blobs, term.number, busy=True)
        except SnapshotFencedError as e:
            logger.warning("a newer leader took over while this one could not run; stepping down: %s", e)
            raise LeaderLost from e
        except Exception as e:
            self._ctx.publishing.failed(e)
            return e
        self._ctx.publishing.resolved()
        term.head = head
        term.fresh = True
        return None

    def verify(self, term: Term, updated: bool) -> Generator[Effect, Any, None]:
        """Republish if what readers would find is not what this leader published (damaged, overwritten,
        or fenced off: a replaced leader's late snapshot).

        Called at every wake; a check is wanted after an update (*updated*)
        that published nothing, and when a process reported damage (the
        leader saw the segment's damage report counter move: ``verify_wanted``).
        It checks at most once per :data:`VERIFY_INTERVAL` (reading back a big
        snapshot costs). A check wanted sooner is made at the next wake, and the
        leader wakes for it when that time comes only if it would otherwise
        sleep more than two intervals.
        """
        if not term.generation or term.fresh:
            # Nothing of this term's to check, or it just published: what it wrote is what is there.
            term.fresh = False
            term.verify_wanted = False
            term.verified = self._ctx.clock.monotonic()
            return
        term.verify_wanted = term.verify_wanted or updated
        if not term.verify_wanted:
            return  # woken by a registration, a request answered without a query...: nothing to check
        now = self._ctx.clock.monotonic()
        if now - term.verified < policy.VERIFY_INTERVAL:
            return
        term.verify_wanted = False
        term.verified = now
        # The leader's record (its identity and doorbell) is written again too: a damaged header
        # formatted anew lost it, and followers could no longer watch this leader's exit.
        yield Announce()
        if (yield from self._intact(term)):
            return
        logger.warning("the shared segment was damaged or overwritten; publishing again")
        yield from keep_lead()
        yield from self._write(term, term.head, term.blobs)

    def _intact(self, term: Term) -> Generator[Effect, Any, bool]:
        try:
            read = yield ReadHead(busy=True)
            if read is None or read.generation != term.generation or read.head != term.head:
                return False
            blobs = yield ReadBlobs(read.generation, range(len(term.blobs)), busy=True)
        except Exception:
            return False
        return bool(blobs == term.blobs)

    def _query(self, term: Term, spec: Spec) -> Generator[Effect, Any, Fresh | None]:
        """Ask the service; None when there is nothing to ask. Commits nothing to the term."""
        names, filters = spec
        if not names:
            return None
        response = yield Call(
            "GET",
            proto.QUERY,
            params=proto.query_params(names, filters),
            headers={"If-None-Match": term.etag} if term.etag else None,
            busy=True,
        )
        clock = self._ctx.clock
        if response.status_code == 304:
            logger.debug("heksher reload not necessary")
            return Fresh(None, [], term.etag, clock.monotonic())
        if response.status_code == 404:
            raise ServiceLostSettings(response)
        response.raise_for_status()
        fresh: Fresh = yield Digest(response, clock.monotonic(), busy=True)
        logger.info("heksher reload done", extra={"settings": len(fresh.entries or ())})
        return fresh


def _when(epoch: float) -> str:
    """An epoch time for a log line (converted, not read: the core reads no clock)."""
    if not epoch:
        return "an unknown time"
    return datetime.datetime.fromtimestamp(epoch, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
