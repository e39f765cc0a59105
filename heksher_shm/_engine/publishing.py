"""The leader's updates: query, publish, acknowledge, back off, check its own work."""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Sequence
from typing import Any

import httpx

from heksher_shm._engine import policy
from heksher_shm._engine.answers import Fresh, ServiceLostSettings, digest_query
from heksher_shm._engine.declaring import Declaring
from heksher_shm._engine.effects import Call, Compute, Effect
from heksher_shm._engine.health import backoff_delay, describe
from heksher_shm._engine.ports import Wish
from heksher_shm._engine.term import LeaderLost, Term, acknowledgements, query_spec
from heksher_shm._model import protocol as proto
from heksher_shm._model.snapshot import FORMAT, Head, encode_head
from heksher_shm.exceptions import SnapshotFencedError

__all__ = ["Publishing"]

logger = logging.getLogger("heksher_shm.engine")


class Publishing(Declaring):
    """What a leader does with the service's answers and the segment."""

    def _update(
        self, term: Term, wishes: Sequence[Wish], spec: tuple[tuple[str, ...], str]
    ) -> Generator[Effect, Any, BaseException | None]:
        """Query and publish; returns the error, if any. The update timer restarts here.

        A 404 means the service lost a setting this host still uses (its data
        was reset, or someone deleted the setting): declare everything again,
        then query once more. Failures back off (see :mod:`heksher_shm._engine.health`).
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
                    term.declared = {d: o for d, o in term.declared.items() if o.error is not None}
                    term.etag = ""
                    yield from self._declare(term, wishes)
                    spec = query_spec(term, wishes)
                    continue
                try:
                    lost.response.raise_for_status()
                except httpx.HTTPStatusError as e:
                    error = e
            except Exception as e:  # transport, protocol, and anything unexpected: reported, never fatal
                error = e
            break
        if error is None:
            term.spec = spec
            self._service.resolved()
        else:
            extra: dict[str, Any] = {"settings": len(spec[0])}
            if isinstance(error, httpx.HTTPStatusError):
                extra["response_content"] = error.response.content[:200]
            self._service.failed(error, **extra)
        ack_error: str | None = None
        error_id = ""
        if error is not None:
            error_id = self._remember(error)
            ack_error = describe(error)
        failed = yield from self._publish_update(term, wishes, fresh, error, ack_error, error_id)
        if error is None and failed is not None:
            # The service answered, but readers do not have it: the update failed all the same.
            error = failed
            error_id, ack_error = self._remember(failed), describe(failed)
        self._settle(term, error, ack_error, error_id)
        return error

    def _settle(self, term: Term, error: BaseException | None, text: str | None, error_id: str) -> None:
        """The end of an update: the next one is due an interval from now, or after a backoff step."""
        now = time.monotonic()
        if error is None:
            term.failures = 0
            term.error = None
            term.next_update = now + self.update_interval
            term.transport.record_update_ok(time.time())
        else:
            term.failures += 1
            term.next_update = now + backoff_delay(term.failures, self.update_interval)
            term.error = (text or describe(error), error_id)
            term.transport.record_error(text or describe(error), time.time())

    def _publish_acks(self, term: Term, wishes: Sequence[Wish]) -> Generator[Effect, Any, None]:
        """Publish the same rules with new acknowledgements (no query was needed, or it would fail).

        A publish that fails counts as a failed update: the next update (a
        backoff step later) queries and publishes again.
        """
        text, error_id = term.error if term.error is not None else (None, "")
        failed = yield from self._publish_update(term, wishes, None, None, text, error_id)
        if failed is not None:
            self._settle(term, failed, None, self._remember(failed))

    def _publish_update(
        self,
        term: Term,
        wishes: Sequence[Wish],
        fresh: Fresh | None,
        error: BaseException | None,
        ack_error: str | None,
        error_id: str,
    ) -> Generator[Effect, Any, BaseException | None]:
        """Publish what changed (rules, acknowledgements); returns why publishing failed, if it did."""
        acks = acknowledgements(term, wishes, ack_error, error_id)
        entries, blobs, queried = term.entries, term.blobs, term.queried
        changed = False
        if fresh is not None:
            queried = fresh.queried
            if fresh.entries is not None and fresh.entries != term.entries:
                entries, blobs, changed = fresh.entries, fresh.blobs, True
        if not (changed or acks != term.served or not term.published):
            if fresh is not None:
                term.etag, term.queried = fresh.etag, queried
            return None
        self._check_lock()  # a leader that was replaced while it was stopped must not write
        head = Head(
            format=FORMAT,
            term=term.id,
            published=time.time(),
            context_features=term.context_features or self.context_features,
            settings=entries,
            outcomes=dict(term.declared),
            acks=acks,
            ok=error is None and ack_error is None,
            error=ack_error,
            update_interval=self.update_interval,
            queried=queried,
            filters=term.spec[1] if term.spec is not None else None,
        )
        failed = yield Compute(lambda: self._publish(term, encode_head(head), blobs), beat=self._busy_beat)
        if failed is None:
            term.entries, term.blobs, term.queried = entries, blobs, queried
            term.served = acks
            term.published = True
            if fresh is not None:
                term.etag = fresh.etag
        else:
            term.etag = ""  # what the service answered is not what readers have: fetch again
        return failed  # type: ignore[no-any-return]

    def _publish(self, term: Term, head: bytes, blobs: list[bytes]) -> BaseException | None:
        """Publish; on failure (a full disk...) the previous snapshot stays and the error is returned.

        A newer term fenced this one (it was replaced while stopped): step down.
        """
        try:
            term.generation = term.transport.publish(head, blobs, term.token)
        except SnapshotFencedError as e:
            logger.warning("a newer leader took over (%s); stepping down", e)
            raise LeaderLost from e
        except Exception as e:
            self._publishing.failed(e)
            return e
        self._publishing.resolved()
        term.head = head
        return None

    def _check_lock(self) -> None:
        """Step down if the lock file was removed or replaced: someone else may lock the new one (or
        already did, having judged this leader stuck)."""
        if not self.lock.verify():
            logger.warning("the election lock file was removed or replaced; stepping down")
            raise LeaderLost

    def _verify(self, term: Term) -> Generator[Effect, Any, None]:
        """Republish if what readers would find is not what this leader published (damaged, overwritten).

        Called at every wake; checks at most once per :data:`VERIFY_INTERVAL`
        (reading back a big snapshot costs), and a check wanted sooner is made
        when that time comes (the leader wakes for it).
        """
        if term.transport is not self.transport or not term.generation:
            term.verify_wanted = False  # nothing of this term's to check
            return
        term.verify_wanted = True
        now = time.monotonic()
        if now - term.verified < policy.VERIFY_INTERVAL:
            return
        term.verify_wanted = False
        term.verified = now

        def check() -> bool:
            try:
                read = term.transport.read_head()
                return (
                    read is not None
                    and read.generation == term.generation
                    and read.head == term.head
                    and term.transport.read_blobs(read.generation, range(len(term.blobs))) == term.blobs
                )
            except Exception:
                return False

        if not (yield Compute(check, beat=self._busy_beat)):
            logger.warning("the shared segment was damaged or overwritten; publishing again")
            self._check_lock()
            yield Compute(lambda: self._publish(term, term.head, term.blobs), beat=self._busy_beat)

    def _query(self, term: Term, spec: tuple[tuple[str, ...], str]) -> Generator[Effect, Any, Fresh | None]:
        """Ask the service; None when there is nothing to ask. Commits nothing to the term."""
        names, filters = spec
        if not names:
            return None
        response = yield Call(
            "GET",
            proto.QUERY,
            params=proto.query_params(names, filters),
            headers={"If-None-Match": term.etag} if term.etag else None,
            beat=self._busy_beat,
        )
        if response.status_code == 304:
            logger.debug("heksher reload not necessary")
            return Fresh(None, [], term.etag, time.monotonic())
        if response.status_code == 404:
            raise ServiceLostSettings(response)
        response.raise_for_status()
        fresh: Fresh = yield Compute(lambda: digest_query(response), beat=self._busy_beat)
        logger.info("heksher reload done", extra={"settings": len(fresh.entries or ())})
        return fresh
