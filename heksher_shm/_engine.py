"""The background loop every client runs, written once for both clients.

The loop is a generator that yields *effects* instead of doing I/O: an HTTP
call, a wait, "apply the latest snapshot", "report the update's outcome".
The async client runs it in an asyncio task with an ``httpx.AsyncClient``,
the thread client in a thread with an ``httpx.Client``; each driver is a few
lines (:func:`drive_sync` here, its twin in the async client). The
declare/update logic therefore exists once.

A client alternates between two roles:

* **follower**: every ``poll`` seconds, try to take the leader lock without
  blocking; otherwise apply a new snapshot when the generation word moved,
  and report the leader's update results to this process's callbacks.
* **leader**: holds the lock; declares every distinct declaration that live
  processes registered (once per term), queries the union of their settings
  and tracked contexts every ``update_interval`` (or at once when someone
  asks for a reload, declares something new or tracks other contexts),
  publishes, and heart-beats.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import msgspec

from heksher_shm import _protocol as proto
from heksher_shm._gc import paused_gc
from heksher_shm._snapshot import FORMAT, Ack, Head, Outcome, SettingEntry, blob_of, decode_head, encode_head
from heksher_shm.exceptions import HeksherProtocolError, LeaderUpdateError

__all__ = [
    "Apply",
    "Call",
    "Engine",
    "Report",
    "Wait",
    "Wish",
    "drive_sync",
]

logger = logging.getLogger("heksher_shm.engine")


# -- effects ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """Send an HTTP request; the driver sends back the :class:`httpx.Response` or throws its error.

    *beat*, when set, is called every :data:`BEAT_INTERVAL` while the request
    is in flight: a leader waiting on a slow service is not an unresponsive
    leader.
    """

    method: str
    path: str
    params: Mapping[str, str] | None = None
    content: bytes | None = None
    headers: Mapping[str, str] | None = None
    beat: Callable[[], object] | None = None


@dataclass(frozen=True)
class Wait:
    """Wait until woken or *timeout* seconds passed (``None``: until woken)."""

    timeout: float | None


@dataclass(frozen=True)
class Apply:
    """Apply the latest published snapshot to this process's settings, under ``modification_lock``.

    Not *blocking*: skip it when ``modification_lock`` is taken (it is tried
    again on the next tick), so that a process holding its lock never holds
    back the host's leader. *fallback*: apply this process's own fallback
    snapshot (see :attr:`Engine.fallback`) rather than the shared one.
    """

    blocking: bool
    fallback: bool = False


@dataclass(frozen=True)
class Report:
    """Call ``on_update_ok()`` (``error`` is None) or ``on_update_error(error)``."""

    error: BaseException | None


Effect = Call | Wait | Apply | Report


# -- what the engine works with ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wish:
    """One live process's registration, as the leader needs it."""

    key: str
    declarations: Sequence[proto.DeclarationBody]
    tracked: Mapping[str, str | Sequence[str]]
    reload_seq: int


class Blob(Protocol):
    """A blob taken from a snapshot to be decoded later (``Transport.copy_blobs``)."""

    def verified(self) -> bytes | memoryview:
        """Its bytes, checked; raises :class:`~heksher_shm.exceptions.SegmentCorruptedError` if damaged."""
        ...


class Transport(Protocol):
    """Where snapshots are published and read: the shared segment or an in-process stand-in."""

    def generation(self) -> int: ...

    def read_head(self) -> Any: ...

    def read_blobs(self, generation: int, indices: Sequence[int]) -> list[bytes] | None: ...

    def copy_blobs(self, generation: int, indices: Sequence[int]) -> Sequence[Blob] | None: ...

    def publish(self, head: bytes, blobs: Sequence[bytes]) -> int: ...

    def set_leader(self, pid: int, create_time: float) -> None: ...

    def beat(self, now: float | None = None) -> None: ...

    def record_update_ok(self, when: float) -> None: ...

    def record_error(self, message: str, when: float) -> None: ...


class Lock(Protocol):
    """The leader election lock."""

    def try_acquire(self) -> bool: ...

    def release(self) -> None: ...

    def verify(self) -> bool: ...

    @property
    def held(self) -> bool: ...


class WishSource(Protocol):
    """The registrations of every live process (the registry, or this process alone)."""

    def wishes(self) -> list[Wish]: ...

    def changed(self) -> bool: ...


class Observer(Protocol):
    """What a follower watches for update results in the segment header."""

    def update_marks(self) -> tuple[float, int, str | None]:
        """(time of the last successful update, count of errors, last error text)."""
        ...

    def heartbeat(self) -> float | None:
        """The leader's last heartbeat (epoch seconds), None if it never beat."""
        ...


@dataclass
class _Term:
    """A leader's state for one term: what it declared and what it last queried."""

    transport: Transport
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    declared: dict[str, Outcome] = field(default_factory=dict)
    context_features: list[str] | None = None
    etag: str = ""
    spec: tuple[tuple[str, ...], str] | None = None
    next_update: float = 0.0
    served: dict[str, Ack] = field(default_factory=dict)
    entries: list[SettingEntry] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)
    published: bool = False
    queried: float = 0.0
    generation: int = 0
    head: bytes = b""
    verified: float = 0.0


VERIFY_INTERVAL = 2.0
"""Seconds between a leader's checks that the segment still holds what it published."""

BEAT_INTERVAL = 0.5
"""Seconds between a leader's heartbeats while it waits on the service."""

HOUSEKEEPING_INTERVAL = 1.0
"""Seconds between housekeeping calls (see :class:`Engine`)."""

UNRESPONSIVE_AFTER = 3.0
"""Seconds without a heartbeat after which followers consider the leader unresponsive and poll themselves."""


class LeaderLost(Exception):
    """The lock was lost (or the engine closed) during a term."""


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


class Engine:
    """One client's background loop (see the module docstring).

    Args:
        transport: where snapshots go.
        lock: the election lock.
        source: the live processes' wishes.
        observer: header marks a follower watches (None when alone in the process).
        update_interval: seconds between two regular queries.
        context_features: the client's context features, used for ordering
            when the service's cannot be fetched.
        identity: (pid, create_time) recorded as the leader.
        poll: seconds between a follower's checks, and a leader's registry scans.
        errors: where the leader keeps the exceptions it reported, by id, so
            that its own process can raise the original exception.
        key: this process's key among the wishes.
        fallback_transport: makes the in-process transport a follower polls
            into while the leader is unresponsive.
        housekeeping: called about once a second in either role (the client
            re-registers if its registration vanished).

    **Unresponsive leader.** A leader that holds the lock but stopped beating
    (SIGSTOP, a debugger, a starved VM) for :data:`UNRESPONSIVE_AFTER`
    seconds cannot be replaced: the kernel still sees its lock. Each follower
    then polls the service itself, for its own settings only, into
    :attr:`fallback` (never into the shared segment: the leader may resume in
    the middle of a write). When the heartbeat resumes, followers stop.
    Snapshots carry the (host-wide, monotonic) time their query answered, and
    a process never applies one older than what it has: a leader resuming
    with a result fetched before it stopped cannot move values backwards.
    """

    def __init__(
        self,
        *,
        transport: Transport,
        lock: Lock,
        source: WishSource,
        observer: Observer | None,
        update_interval: float,
        context_features: Sequence[str],
        identity: tuple[int, float],
        poll: float | None,
        errors: dict[str, BaseException],
        key: str = "",
        fallback_transport: Callable[[], Transport] | None = None,
        housekeeping: Callable[[], None] | None = None,
    ) -> None:
        self.transport = transport
        self.lock = lock
        self.source = source
        self.observer = observer
        self.update_interval = update_interval
        self.context_features = list(context_features)
        self.identity = identity
        self.poll = poll
        self.errors = errors
        self.key = key
        self.fallback_transport = fallback_transport
        self.fallback: _Term | None = None
        self.housekeeping = housekeeping
        self._housekept = 0.0
        self._lock_failed = False
        self._lock_checked = 0.0
        self._error_ids = 0
        self.closed = False
        self.leading = False
        self.term: _Term | None = None
        self.applied_generation: Callable[[], int] = lambda: -1
        self._marks: tuple[float, int, str | None] | None = None

    # -- the loop ---------------------------------------------------------------------------------------

    def replace_transport(self, transport: Transport, observer: Observer | None) -> None:
        """Publish to and watch another file from now on (the segment file was replaced)."""
        self.transport = transport
        self.observer = observer
        self._marks = None
        if self.term is not None:
            self.term.transport = transport
            self.term.published = False  # the new file has nothing yet: publish at the next tick
            self.term.generation = 0
            self.term.next_update = 0.0

    def _try_lead(self) -> bool:
        try:
            return self.lock.try_acquire()
        except Exception:
            # An unusable lock file (replaced by a directory, another user's...):
            # keep following, keep serving; say so once.
            if not self._lock_failed:
                self._lock_failed = True
                logger.exception("cannot use the election lock; this process will not lead")
            return False

    def run(self) -> Generator[Effect, Any, None]:
        """The whole background life of a client, until :attr:`closed` is set."""
        while not self.closed:
            if self._try_lead():
                try:
                    yield from self._lead()
                except LeaderLost:
                    pass
                finally:
                    self.leading = False
                    self.term = None
                    self._marks = None
                    if self.lock.held:
                        self.lock.release()
                continue
            yield from self._follow_once()
            yield Wait(self.poll)

    def _housekeep(self) -> None:
        now = time.monotonic()
        if self.housekeeping is not None and now - self._housekept >= HOUSEKEEPING_INTERVAL:
            self._housekept = now
            try:
                self.housekeeping()
            except Exception:
                logger.exception("housekeeping failed")

    def _follow_once(self) -> Generator[Effect, Any, None]:
        self._housekeep()
        if self.transport.generation() != self.applied_generation():
            yield Apply(blocking=False)
        if self.observer is None:
            return
        beat = self.observer.heartbeat()
        if (
            beat is not None
            and time.time() - beat > UNRESPONSIVE_AFTER
            and self.fallback_transport is not None
        ):
            if self.fallback is None:
                logger.warning(
                    "the leader is unresponsive; this process polls the service itself until it recovers",
                    extra={"heartbeat_age": time.time() - (beat or 0.0)},
                )
                self.fallback = _Term(self.fallback_transport())
            yield from self._fall_back(self.fallback)
            return
        if self.fallback is not None:
            logger.warning("the leader is responsive again; this process stopped polling the service")
            self.fallback = None
        marks = self.observer.update_marks()
        previous, self._marks = self._marks, marks
        if previous is None or marks == previous:
            return
        ok_time, errors, message = marks
        if errors != previous[1]:
            yield Report(LeaderUpdateError(message or "the leader's update failed"))
        elif ok_time != previous[0]:
            yield Report(None)

    # -- leading ----------------------------------------------------------------------------------------

    def _fall_back(self, term: _Term) -> Generator[Effect, Any, None]:
        """One tick of polling for this process alone (see "Unresponsive leader" above)."""
        wishes = [w for w in self.source.wishes() if w.key == self.key]
        if term.context_features is None:
            term.context_features = self.context_features
        updated, error = yield from self._cycle(term, wishes)
        if updated:
            yield Apply(blocking=False, fallback=True)
            yield Report(error)

    def _cycle(
        self, term: _Term, wishes: list[Wish]
    ) -> Generator[Effect, Any, tuple[bool, BaseException | None]]:
        """Declare what is new, and update when due; returns (updated, error)."""
        declared_new = yield from self._declare(term, wishes)
        spec = self._spec(term, wishes)
        asked = any(w.reload_seq > term.served.get(w.key, Ack(0)).seq for w in wishes)
        if declared_new or asked or spec != term.spec or time.time() >= term.next_update:
            error = yield from self._update(term, wishes, spec)
            return True, error
        return False, None

    def _lead(self) -> Generator[Effect, Any, None]:
        self.leading = True
        self.fallback = None
        term = self.term = _Term(self.transport)
        pid, create_time = self.identity
        self.transport.set_leader(pid, create_time)
        self.transport.beat()
        logger.info("became the leader", extra={"term": term.id, "pid": pid})
        self._inherit(term)
        term.context_features = (yield from self._fetch_context_features()) or term.context_features
        yield from self._refresh_inherited(term)
        while not self.closed:
            updated, error = yield from self._cycle(term, self.source.wishes())
            if updated:
                # Alone in the process (no sharing), the update waits for
                # modification_lock as heksher 0.2.2's does; a host's leader
                # must not, and retries on its next tick instead.
                yield Apply(blocking=self.poll is None)
                yield Report(error)
            elif self.transport.generation() != self.applied_generation():
                yield Apply(blocking=False)
            self.transport.beat()
            self._housekeep()
            self._verify(term)
            self._check_lock()
            timeout = max(0.0, term.next_update - time.time())
            if self.poll is not None:
                timeout = min(timeout, self.poll)
            yield Wait(timeout)
            if not self.lock.held:
                raise LeaderLost

    def _refresh_inherited(self, term: _Term) -> Generator[Effect, Any, None]:
        """A new term's first update, before its declarations: the settings the previous leader
        served (and live processes still want) existed, so they can be queried at once. Declaring
        a thousand settings one request at a time must not keep every process on old rules."""
        if not term.entries:
            return
        wishes = self.source.wishes()
        wanted = {body.name for wish in wishes for body in wish.declarations}
        names = tuple(sorted(wanted & {entry.name for entry in term.entries}))
        if not names:
            return
        error = yield from self._update(term, wishes, (names, self._spec(term, wishes)[1]))
        yield Apply(blocking=self.poll is None)
        yield Report(error)

    def _inherit(self, term: _Term) -> None:
        """Start from the snapshot the previous leader left, so a failing first update loses nothing."""
        for _ in range(10):
            try:
                read = self.transport.read_head()
                if read is None:
                    return
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
            response = yield Call("GET", proto.CONTEXT_FEATURES, beat=self.transport.beat)
            response.raise_for_status()
            features = proto.decode(
                proto.CONTEXT_FEATURES, response.status_code, response.content, proto.ContextFeaturesResponse
            ).context_features
        except Exception:  # whatever went wrong, the term goes on with the client's order
            logger.exception("failed to get context features from the service")
            return None
        if features != self.context_features:
            logger.warning(
                "context feature mismatch",
                extra={"features_in_service": features, "features_in_client": self.context_features},
            )
        return features

    def _declare(self, term: _Term, wishes: Iterable[Wish]) -> Generator[Effect, Any, bool]:
        """Declare what was not declared yet this term, retrying transient failures.

        Returns whether any declaration succeeded (new settings to query).
        """
        pending: dict[str, proto.DeclarationBody] = {}
        now = time.time()
        for wish in wishes:
            for body in wish.declarations:
                digest = proto.declaration_digest(body)
                done = term.declared.get(digest)
                if done is None or (done.error is not None and _transient(done) and now >= term.next_update):
                    pending[digest] = body
        any_ok = False
        for digest, body in pending.items():
            outcome = yield from self._declare_one(term, body)
            term.declared[digest] = outcome
            any_ok = any_ok or outcome.error is None
        return any_ok

    def _declare_one(self, term: _Term, body: proto.DeclarationBody) -> Generator[Effect, Any, Outcome]:
        try:
            response = yield Call(
                "POST",
                proto.DECLARE,
                content=msgspec.json.encode(body),
                headers={"Content-Type": "application/json"},
                beat=self._beat_for(term),
            )
        except Exception as e:  # transport errors, and anything unexpected: the loop must survive
            logger.exception("setting declaration failed", extra={"setting": body.name})
            return self._failed(term, body.name, 0, e)
        status = response.status_code
        if status == 409:
            logger.error(
                "conflict when declaring setting",
                extra={"setting_name": body.name, "response_content": response.content},
            )
        elif response.is_error:
            logger.error(
                "error when declaring setting",
                extra={"setting_name": body.name, "response_content": response.content},
            )
            try:
                response.raise_for_status()
            except httpx.HTTPStatusError as e:
                return self._failed(term, body.name, status, e)
        try:
            answer = proto.decode(proto.DECLARE, status, response.content, proto.DeclareResponse)
        except HeksherProtocolError as e:
            logger.exception("unexpected declaration response", extra={"setting_name": body.name})
            return self._failed(term, body.name, status, e)
        default = None
        if answer.outcome == "outdated":
            logger.info(
                "setting is outdated",
                extra={
                    "setting_name": body.name,
                    "declared_version": body.version,
                    "latest_version": answer.latest_version,
                },
            )
            for difference in answer.differences:
                if difference.attribute == "default_value" and bytes(difference.latest_value):
                    default = bytes(difference.latest_value)
        elif answer.outcome not in ("created", "uptodate", "upgraded", "mismatch", "rejected"):
            logger.warning(
                "unexpected declaration outcome", extra={"setting_name": body.name, "outcome": answer.outcome}
            )
        return Outcome(body.name, answer.outcome, status, None, default)

    def _beat_for(self, term: _Term) -> Callable[[], object] | None:
        """Heart-beat during requests made for the shared segment (not a follower's own fallback polls)."""
        return self.transport.beat if term is self.term else None

    def _remember(self, exc: BaseException) -> str:
        """Keep *exc* under a new id, so this process can raise the very exception it reported.

        The id names this process: another process that finds it in a
        snapshot cannot mistake it for one of its own.
        """
        self._error_ids += 1
        key = f"{os.getpid()}.{self._error_ids}"
        self.errors[key] = exc
        self.errors.pop(f"{os.getpid()}.{self._error_ids - 100}", None)
        return key

    def _failed(self, term: _Term, name: str, status: int, exc: BaseException) -> Outcome:
        return Outcome(name, None, status, f"{_describe(exc)} (error #{self._remember(exc)})")

    def _spec(self, term: _Term, wishes: Sequence[Wish]) -> tuple[tuple[str, ...], str]:
        """What to query: settings whose declaration got an answer, and the union of tracked contexts.

        A setting whose declaration failed for want of an answer (the service
        is down) is still queried if the snapshot already had it: it existed.
        """
        names: set[str] = set()
        known = {entry.name for entry in term.entries}
        for wish in wishes:
            for body in wish.declarations:
                outcome = term.declared.get(proto.declaration_digest(body))
                if outcome is None:
                    continue
                if outcome.error is None or (_transient(outcome) and body.name in known):
                    names.add(body.name)
        union: dict[str, str | set[str]] = {}
        for wish in wishes:
            for feature, values in wish.tracked.items():
                if values == proto.TRACK_ALL or union.get(feature) == proto.TRACK_ALL:
                    union[feature] = proto.TRACK_ALL
                else:
                    current = union.setdefault(feature, set())
                    assert isinstance(current, set)
                    current.update(values)
        if not all(_FILTERABLE.fullmatch(feature) for feature in union):
            # Heksher 0.5.7 parses filter feature names as [a-z]+: a feature
            # like trust_level cannot appear in a filter at all, and would
            # break the query for every process. Ask for every rule instead;
            # each process keeps only its own tracked values anyway.
            return tuple(sorted(names)), proto.TRACK_ALL
        return tuple(sorted(names)), proto.context_filters(union)

    def _update(
        self, term: _Term, wishes: Sequence[Wish], spec: tuple[tuple[str, ...], str]
    ) -> Generator[Effect, Any, BaseException | None]:
        """Query and publish; returns the error, if any. The update timer restarts here.

        What the query brought is committed to the term only once published:
        a publish that fails (a full disk) leaves the term describing what
        readers have, and the next update fetches again.
        """
        if spec != term.spec:
            term.etag = ""
        error: BaseException | None = None
        fresh: _Fresh | None = None
        try:
            fresh = yield from self._query(term, spec)
        except Exception as e:  # transport, protocol, and anything unexpected: reported, never fatal
            error = e
            log_extra: dict[str, Any] = {}
            if isinstance(e, httpx.HTTPStatusError):
                log_extra["response_content"] = e.response.content
            logger.exception("error during heksher update", extra=log_extra)
        else:
            term.spec = spec
        now = time.time()
        term.next_update = now + self.update_interval
        ack_error: str | None = None
        error_id = ""
        if error is not None:
            error_id = self._remember(error)
            ack_error = _describe(error)
        acks = self._acks(term, wishes, ack_error, error_id)
        entries, blobs, queried = term.entries, term.blobs, term.queried
        changed = False
        if fresh is not None:
            queried = fresh.queried
            if fresh.entries is not None and fresh.entries != term.entries:
                entries, blobs, changed = fresh.entries, fresh.blobs, True
        if changed or acks != term.served or not term.published:
            head = Head(
                format=FORMAT,
                term=term.id,
                published=now,
                context_features=term.context_features or self.context_features,
                settings=entries,
                outcomes=dict(term.declared),
                acks=acks,
                ok=error is None,
                error=ack_error,
                update_interval=self.update_interval,
                queried=queried,
                filters=term.spec[1] if term.spec is not None else None,
            )
            failed = self._publish(term, encode_head(head), blobs)
            if failed is None:
                term.entries, term.blobs, term.queried = entries, blobs, queried
                term.served = acks
                term.published = True
                if fresh is not None:
                    term.etag = fresh.etag
            else:
                term.etag = ""  # what the service answered is not what readers have: fetch again
                error = error or failed
                ack_error = ack_error or _describe(failed)
        elif fresh is not None:
            term.etag, term.queried = fresh.etag, queried
        if error is None:
            term.transport.record_update_ok(now)
        else:
            term.transport.record_error(ack_error or "", now)
        return error

    @staticmethod
    def _acks(term: _Term, wishes: Sequence[Wish], error: str | None, error_id: str) -> dict[str, Ack]:
        """The acknowledgements to publish with this update, for live processes only."""
        acks = dict(term.served)
        for wish in wishes:
            if not all(proto.declaration_digest(body) in term.declared for body in wish.declarations):
                continue  # its set_as_main waits for its declarations, not just for any update
            served = acks.get(wish.key)
            if served is None or served.seq < wish.reload_seq or (served.error and error is None):
                acks[wish.key] = Ack(wish.reload_seq, error, error_id)
        live = {w.key for w in wishes}
        return {k: v for k, v in acks.items() if k in live}

    def _publish(self, term: _Term, head: bytes, blobs: list[bytes]) -> BaseException | None:
        """Publish; on failure (a full disk...) the previous snapshot stays and the error is returned."""
        try:
            term.generation = term.transport.publish(head, blobs)
        except Exception as e:
            logger.exception("publishing the snapshot failed; the previous one stays")
            return e
        term.head = head
        return None

    def _check_lock(self) -> None:
        """Step down if the lock file was removed or replaced: someone else may lock the new one."""
        now = time.monotonic()
        if now - self._lock_checked < HOUSEKEEPING_INTERVAL:
            return
        self._lock_checked = now
        if not self.lock.verify():
            logger.warning("the election lock file was removed or replaced; stepping down")
            raise LeaderLost

    def _verify(self, term: _Term) -> None:
        """Republish if what readers would find is not what this leader published (damaged, overwritten)."""
        now = time.monotonic()
        if (
            term.transport is not self.transport
            or not term.generation
            or now - term.verified < VERIFY_INTERVAL
        ):
            return
        term.verified = now
        try:
            read = term.transport.read_head()
            intact = (
                read is not None
                and read.generation == term.generation
                and read.head == term.head
                and term.transport.read_blobs(read.generation, range(len(term.blobs))) == term.blobs
            )
        except Exception:
            intact = False
        if not intact:
            logger.warning("the shared segment was damaged or overwritten; publishing again")
            self._publish(term, term.head, term.blobs)

    def _query(self, term: _Term, spec: tuple[tuple[str, ...], str]) -> Generator[Effect, Any, _Fresh | None]:
        """Ask the service; None when there is nothing to ask. Commits nothing to the term."""
        names, filters = spec
        if not names:
            return None
        response = yield Call(
            "GET",
            proto.QUERY,
            params=proto.query_params(names, filters),
            headers={"If-None-Match": term.etag} if term.etag else None,
            beat=self._beat_for(term),
        )
        if response.status_code == 304:
            logger.debug("heksher reload not necessary")
            return _Fresh(None, [], term.etag, time.monotonic())
        response.raise_for_status()
        entries: list[SettingEntry] = []
        blobs: list[bytes] = []
        with paused_gc():
            result = proto.decode(proto.QUERY, response.status_code, response.content, proto.QueryResponse)
            for name in sorted(result.settings):
                blob, digest, count = blob_of(result.settings[name])
                entries.append(SettingEntry(name, len(blobs), digest, count))
                blobs.append(blob)
            del result
        logger.info("heksher reload done", extra={"settings": len(entries)})
        return _Fresh(entries, blobs, response.headers.get("ETag", ""), time.monotonic())


@dataclass(frozen=True)
class _Fresh:
    """What one query brought: its settings (None: unchanged, a 304) with their blobs, and its ETag."""

    entries: list[SettingEntry] | None
    blobs: list[bytes]
    etag: str
    queried: float


_FILTERABLE = re.compile(r"[a-z]+")


def _transient(outcome: Outcome) -> bool:
    """Worth declaring again: no answer at all, or a server error."""
    return outcome.status == 0 or outcome.status >= 500


@contextlib.contextmanager
def beating(beat: Callable[[], object] | None) -> Iterator[None]:
    """Call *beat* every :data:`BEAT_INTERVAL` from a helper thread while the block runs."""
    if beat is None:
        yield
        return
    done = threading.Event()

    def run() -> None:
        while not done.wait(BEAT_INTERVAL):
            beat()

    thread = threading.Thread(target=run, name="heksher-shm-beat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def drive_sync(
    steps: Generator[Effect, Any, Any],
    http: Callable[[], httpx.Client],
    wait: Callable[[float | None], object],
    apply: Callable[[Apply], None],
    report: Callable[[BaseException | None], None],
) -> Any:
    """Run *steps* to completion with blocking I/O (the thread client's driver)."""
    to_send: Any = None
    to_throw: BaseException | None = None
    while True:
        try:
            effect = steps.throw(to_throw) if to_throw is not None else steps.send(to_send)
        except StopIteration as stop:
            return stop.value
        to_send, to_throw = None, None
        try:
            if isinstance(effect, Call):
                with beating(effect.beat):
                    to_send = http().request(
                        effect.method,
                        effect.path,
                        params=effect.params,
                        content=effect.content,
                        headers=effect.headers,
                    )
            elif isinstance(effect, Wait):
                to_send = wait(effect.timeout)
            elif isinstance(effect, Apply):
                apply(effect)
            else:
                report(effect.error)
        except Exception as e:
            to_throw = e
