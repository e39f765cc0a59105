"""The background life of every client, written once for both clients.

The loop is a generator that yields *effects* instead of doing I/O: send a
request (or a batch of them), run a piece of CPU-heavy work, wait until
woken or a deadline passes, apply the latest snapshot, report an update's
outcome. The thread client runs it in a thread, the async client in an
asyncio task; both drivers live side by side in :mod:`heksher_shm._engine.drivers`.
The declare/update logic therefore exists once.

Nothing here wakes up unless something happened. A client is one of:

* **follower**: sleeps until one of these: its doorbell rings (the leader
  updated, published or changed; see :mod:`heksher_shm._shm.bell`), the
  leader process exits (a pidfd becomes readable), its own process asks for
  something (``set_as_main``, ``reload``), or the leader's *promise* runs out
  (below). Then it applies a new snapshot if one is out, reports the
  leader's update results to this process's callbacks, and sleeps again.
  ``get()`` itself notices a new snapshot with one shared-memory read.
* **leader**: holds the election lock; declares every distinct declaration
  of the live processes (once per term, concurrently), queries the union of
  their settings and tracked contexts every ``update_interval`` (at once when
  a process asks for it), publishes, and rings the processes. Between two
  steps it sleeps until its next update is due or its bell rings.

**Liveness: busy is not dead.** Before it sleeps, the leader writes two
words into the segment on the host-wide monotonic clock: *progress* (now)
and *promise* (when it will show progress again: its next update). While it
works (a request in flight, a long decode) a helper re-promises every
:data:`BEAT_INTERVAL`. A process that rings the leader expects progress
within :data:`UNRESPONSIVE_AFTER` too. A leader that breaks its promise by
more than :data:`UNRESPONSIVE_AFTER` seconds has stopped making progress
(``SIGSTOP``, a debugger, a blocked event loop): the kernel still sees its
lock, so a follower *replaces* it (one at a time, under a takeover lock): it
puts a new lock file in place of the old one and leads. The stopped leader,
when it resumes, finds the lock file is no longer the one it holds before its
next publish and steps down. A slow service or a starved CPU never breaks a
promise by seconds, and a wall-clock step cannot (the clock is monotonic).
"""

from __future__ import annotations

import functools
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import msgspec

from heksher_shm._engine.health import Trouble, backoff_delay, describe
from heksher_shm._model import protocol as proto
from heksher_shm._model.contexts import TRACK_ALL, context_filters
from heksher_shm._model.snapshot import (
    FORMAT,
    Ack,
    Head,
    Outcome,
    SettingEntry,
    blob_of,
    decode_head,
    encode_head,
)
from heksher_shm._process.gc import paused_gc
from heksher_shm.exceptions import HeksherProtocolError, LeaderUpdateError

__all__ = [
    "Apply",
    "Call",
    "Calls",
    "Compute",
    "Engine",
    "Report",
    "Wait",
    "Wish",
]

logger = logging.getLogger("heksher_shm.engine")


# -- effects ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """Send an HTTP request; the driver sends back the :class:`httpx.Response` or throws its error.

    *beat*, when set, is called every :data:`BEAT_INTERVAL` while the request
    is in flight: a leader waiting on a slow service is busy, not stuck.
    """

    method: str
    path: str
    params: Mapping[str, str] | None = None
    content: bytes | None = None
    headers: Mapping[str, str] | None = None
    beat: Callable[[], object] | None = None


@dataclass(frozen=True)
class Calls:
    """Send several requests, at most *limit* at a time over one connection pool.

    The driver sends back a list with, for each call in order, its
    :class:`httpx.Response` or the exception it raised.
    """

    calls: Sequence[Call]
    limit: int
    beat: Callable[[], object] | None = None


@dataclass(frozen=True)
class Compute:
    """Run ``fn()`` and send back its result (or throw its error).

    For CPU-heavy or file work: the async driver runs it in a worker thread,
    so the event loop never stalls for it; the thread driver runs it in place.
    """

    fn: Callable[[], Any]
    beat: Callable[[], object] | None = None


@dataclass(frozen=True)
class Wait:
    """Sleep until woken (by this process, or a descriptor in *fds* becoming readable) or *timeout* passed.

    ``timeout`` None waits until woken. The driver sends back the set of
    descriptors of *fds* that were readable (empty after a timeout or a local
    wake).
    """

    timeout: float | None
    fds: tuple[int, ...] = ()


@dataclass(frozen=True)
class Apply:
    """Apply the latest published snapshot to this process's settings, under ``modification_lock``.

    Not *blocking*: skip it when ``modification_lock`` is taken (the next
    wake, or the next ``get()``, applies it), so that a process holding its
    lock never holds back the host's leader. With *report*, then report the
    update's outcome *error* (as :class:`Report`). Only after both does the
    driver wake this process's waiters (``set_as_main``, ``reload``), so that
    they return after the callbacks ran, as with heksher 0.2.2.
    """

    blocking: bool
    report: bool = False
    error: BaseException | None = None


@dataclass(frozen=True)
class Report:
    """Call ``on_update_ok()`` (``error`` is None) or ``on_update_error(error)``."""

    error: BaseException | None


Effect = Call | Calls | Compute | Wait | Apply | Report


# -- what the engine works with ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wish:
    """One live process's registration, as the leader needs it.

    ``declarations`` is keyed by :func:`~heksher_shm._model.protocol.declaration_digest`
    (computed once per registration, not per use). ``reload_seq`` numbers the
    process's requests; ``query_seq`` is the latest request that needs a fresh
    query (a ``reload()``), where other requests (``set_as_main``) only need
    their declarations made and a snapshot that covers them.
    """

    key: str
    declarations: Mapping[str, proto.DeclarationBody]
    tracked: Mapping[str, str | Sequence[str]]
    reload_seq: int
    query_seq: int = 0


class Blob(Protocol):
    """A blob taken from a snapshot to be decoded later (``Transport.copy_blobs``)."""

    def verified(self) -> bytes | memoryview:
        """Its bytes, checked; raises :class:`~heksher_shm.exceptions.SegmentCorruptedError` if damaged."""
        ...


class HeadRead(Protocol):
    """A verified copy of a snapshot's head (the segment's and the in-process transport's)."""

    @property
    def generation(self) -> int: ...

    @property
    def head(self) -> bytes: ...


class Transport(Protocol):
    """Where snapshots are published and read: the shared segment or an in-process stand-in."""

    @property
    def words(self) -> Any: ...

    def generation(self) -> int: ...

    def read_head(self) -> HeadRead | None: ...

    def read_blobs(self, generation: int, indices: Sequence[int]) -> list[bytes] | None: ...

    def copy_blobs(self, generation: int, indices: Sequence[int]) -> Sequence[Blob] | None: ...

    def publish(self, head: bytes, blobs: Sequence[bytes]) -> int: ...

    def set_leader(self, pid: int, create_time: float, bell: int, pidns: int) -> None: ...

    def beat(self, progress: float, promise: float) -> None: ...

    def liveness(self) -> tuple[float, float]: ...

    def record_update_ok(self, when: float) -> None: ...

    def record_error(self, message: str, when: float) -> None: ...

    def update_marks(self) -> tuple[float, int, str | None]:
        """(time of the last successful update, count of errors, last error text)."""
        ...


class Lock(Protocol):
    """The leader election lock."""

    def try_acquire(self) -> bool: ...

    def release(self) -> None: ...

    def verify(self) -> bool: ...

    def seize(self) -> bool: ...

    @property
    def held(self) -> bool: ...


class WishSource(Protocol):
    """The registrations of every live process (the registry, or this process alone)."""

    def changed(self) -> bool:
        """Whether a registration may have changed since the last :meth:`wishes` (cheap)."""
        ...

    def wishes(self, prune: bool) -> list[Wish]:
        """Every live process's wish; *prune*: also look for dead processes (a full scan)."""
        ...

    @property
    def bells(self) -> Sequence[str]:
        """The doorbells of the live processes, as of the last :meth:`wishes`."""
        ...


class Host(Protocol):
    """The other processes of the host: doorbells, the leader's watch, the takeover lock."""

    @property
    def takeover(self) -> Lock:
        """Taken (without waiting) by the one process that replaces a stuck leader."""
        ...

    rang_at: float
    """When this process last rang the leader for something still unanswered (0.0: nothing)."""

    def bell_fd(self) -> int: ...

    def drain(self) -> None: ...

    def ring(self, bells: Iterable[str]) -> None:
        """Ring these doorbells (never this process's own)."""
        ...

    def watch(self) -> tuple[tuple[int, float] | None, int | None, bool]:
        """(the leader's identity from the status block or None, a descriptor readable once it exits
        or None, whether it is known to be gone)."""
        ...

    def leader_exited(self) -> None:
        """The watched descriptor fired: the leader process is gone."""
        ...


@dataclass
class _Term:
    """A leader's state for one term: what it declared, queried and published."""

    transport: Transport
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    declared: dict[str, Outcome] = field(default_factory=dict)
    declare_failures: int = 0
    declare_retry_at: float = 0.0
    context_features: list[str] | None = None
    etag: str = ""
    spec: tuple[tuple[str, ...], str] | None = None
    next_update: float = 0.0
    """time.monotonic() of the next query (regular, or a retry after a failure)."""
    failures: int = 0
    """Failed updates in a row (the backoff step)."""
    error: tuple[str, str] | None = None
    """The standing error (text, id) while updates fail: what a reload() gets during the backoff."""
    next_prune: float = 0.0
    queried_for: dict[str, int] = field(default_factory=dict)
    """Per process, the latest ``query_seq`` a query (or a standing error) has answered."""
    served: dict[str, Ack] = field(default_factory=dict)
    entries: list[SettingEntry] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)
    published: bool = False
    queried: float = 0.0
    generation: int = 0
    head: bytes = b""
    verified: float = 0.0
    verify_wanted: bool = False


VERIFY_INTERVAL = 2.0
"""Least seconds between a leader's checks that the segment still holds what it published (made when
it is awake anyway: at an update, or when rung)."""

BEAT_INTERVAL = 0.5
"""Seconds between a busy leader's re-promises (a request in flight, a long decode)."""

BUSY_PROMISE = 2 * BEAT_INTERVAL
"""How far ahead a busy leader promises its next sign of progress."""

UNRESPONSIVE_AFTER = 5.0
"""Seconds a leader may overrun its promise (or leave a ring unanswered) before it counts as stuck."""

SUCCESSOR_WAIT = 0.5
"""Seconds a follower waits for the new leader's ring after the leader exited and another process took
the lock, before it looks again (only in that moment)."""

DECLARE_CONCURRENCY = 12
"""Declarations in flight at once."""

DECLARE_ATTEMPTS = 3
"""Tries of one declaration in one run when the service answers 5xx or not at all (the service's
concurrent-declaration race answers 500, and a retry gets ``uptodate``)."""

DECLARE_RETRY_PAUSE = 0.2
"""Seconds (at most, jittered) between two tries of a declaration in one run."""


class LeaderLost(Exception):
    """The lock was lost (or the engine closed) during a term."""


class _ServiceLostSettings(Exception):
    """The query answered 404: the service does not know (any more) a setting we query."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response.text[:200] or "404 Not Found")
        self.response = response


class Engine:
    """One client's background loop (see the module docstring).

    Args:
        transport: where snapshots go.
        lock: the election lock.
        source: the live processes' wishes.
        update_interval: seconds between two regular queries.
        context_features: the client's context features, used for ordering
            when the service's cannot be fetched.
        identity: (pid, create_time, PID namespace) recorded as the leader.
        errors: where the leader keeps the exceptions it reported, by id, so
            that its own process can raise the original exception.
        key: this process's key among the wishes.
        host: the other processes (None when alone: ``shared=False``).
        bell: this client's doorbell number, recorded with its identity when it leads.
        housekeeping: called now and then while awake (the client re-registers
            if its registration vanished).
        service_url: for log messages.
    """

    def __init__(
        self,
        *,
        transport: Transport,
        lock: Lock,
        source: WishSource,
        update_interval: float,
        context_features: Sequence[str],
        identity: tuple[int, float, int],
        errors: dict[str, BaseException],
        key: str = "",
        host: Host | None = None,
        bell: int = 0,
        housekeeping: Callable[[], None] | None = None,
        service_url: str = "",
    ) -> None:
        self.transport = transport
        self.lock = lock
        self.source = source
        self.update_interval = update_interval
        self.context_features = list(context_features)
        self.identity = identity
        self.errors = errors
        self.key = key
        self.host = host
        self.bell = bell
        self.housekeeping = housekeeping
        self._lock_failed = False
        self._error_ids = 0
        self.closed = False
        self.leading = False
        self.term: _Term | None = None
        self.applied_generation: Callable[[], int] = lambda: -1
        self._marks: tuple[float, int, str | None] | None = None
        self._wishes: list[Wish] = []
        self._service = Trouble(logger, "the Heksher service is failing", service_url=service_url)
        self._declaring = Trouble(logger, "declaring settings fails", service_url=service_url)
        self._stuck = Trouble(logger, "the leader is not making progress")
        self._publishing = Trouble(logger, "publishing snapshots fails; the previous one stays")

    # -- the loop ---------------------------------------------------------------------------------------

    def replace_transport(self, transport: Transport) -> None:
        """Publish to and watch another file from now on (the segment file was replaced)."""
        self.transport = transport
        self._marks = None
        if self.term is not None:
            self.term.transport = transport
            self.term.published = False  # the new file has nothing yet: publish at the next wake
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
                    if self.host is not None:
                        self.host.ring(self.source.bells)  # the lock is free: whoever is first takes over
                continue
            yield from self._follow_once()

    def _housekeep(self) -> None:
        """At every wake (a few cheap checks: wakes are rare, and housekeeping needs no timer)."""
        if self.housekeeping is not None:
            try:
                self.housekeeping()
            except Exception:
                logger.exception("housekeeping failed")

    # -- following --------------------------------------------------------------------------------------

    def _follow_once(self) -> Generator[Effect, Any, None]:
        """One wake of a follower: apply, report, judge the leader, then sleep until something happens."""
        host = self.host
        assert host is not None, "alone in the process, a client always leads"
        if self.transport.generation() != self.applied_generation():
            yield Apply(blocking=False)
        yield from self._report_marks()
        self._housekeep()
        leader, exit_fd, gone = host.watch()
        now = time.monotonic()
        deadline = self._stuck_deadline(host)
        if leader is not None and not gone and deadline is not None and now >= deadline:
            if self._replace_stuck_leader(host, leader):
                return  # the run loop leads with the seized lock
            deadline = None
        elif self._stuck.active and deadline is not None and now < deadline:
            self._stuck.resolved("it shows progress again")
        fds = (host.bell_fd(),) if exit_fd is None else (host.bell_fd(), exit_fd)
        if gone:
            # The leader exited and someone else took the lock before us: its ring is on the way.
            timeout = SUCCESSOR_WAIT
        elif deadline is not None:
            timeout = max(0.0, deadline - now) + 0.01
        else:
            timeout = self.update_interval  # nobody to watch (no leader yet, or no pidfd): look again
        if exit_fd is None and not gone:
            timeout = min(timeout, self.update_interval)
        fired = yield Wait(timeout, fds)
        host.drain()
        if exit_fd is not None and exit_fd in fired:
            host.leader_exited()

    def _stuck_deadline(self, host: Host) -> float | None:
        """When the leader counts as stuck if it shows no progress before: its promise, or a ring of
        ours it left unanswered, plus :data:`UNRESPONSIVE_AFTER`. None: no promise to judge by."""
        progress, promise = self.transport.liveness()
        deadline = promise + UNRESPONSIVE_AFTER if promise > 0 else None
        rang = host.rang_at
        if rang:
            if progress >= rang:
                host.rang_at = 0.0  # answered
            else:
                answer_by = rang + UNRESPONSIVE_AFTER
                deadline = answer_by if deadline is None else min(deadline, answer_by)
        return deadline

    def _replace_stuck_leader(self, host: Host, leader: tuple[int, float]) -> bool:
        """Take over from a leader that holds the lock but makes no progress; True once this one leads."""
        if not host.takeover.try_acquire():
            return False  # another process is replacing it; its ring will tell
        try:
            progress_before = self.transport.liveness()[0]
            # Judged under the takeover lock, again: the leader may have resumed, or been replaced.
            watched, _, gone = host.watch()
            deadline = self._stuck_deadline(host)
            if watched != leader or gone or deadline is None or time.monotonic() < deadline:
                return False
            self._stuck.failed(
                f"pid {leader[0]} showed no progress for "
                f"{time.monotonic() - progress_before:.1f} s; this process replaces it",
                leader_pid=leader[0],
            )
            if not self.lock.seize():
                return False
            now = time.monotonic()
            # Before anyone else judges the old leader again: the segment shows progress from here on.
            self.transport.beat(now, now + BUSY_PROMISE)
            host.rang_at = 0.0
            self._stuck.resolved("replaced")
            return True
        finally:
            host.takeover.release()

    def _report_marks(self) -> Generator[Effect, Any, None]:
        """Report the leader's update results (seen in the segment header) to this process's callbacks."""
        marks = self.transport.update_marks()
        previous, self._marks = self._marks, marks
        if previous is None or marks == previous:
            return
        ok_time, errors, message = marks
        if errors != previous[1]:
            yield Report(LeaderUpdateError(message or "the leader's update failed"))
        elif ok_time != previous[0]:
            yield Report(None)

    # -- leading ----------------------------------------------------------------------------------------

    def _busy_beat(self) -> None:
        """While the leader works: progress now, more within :data:`BUSY_PROMISE`."""
        term = self.term
        if term is not None and self.leading:
            now = time.monotonic()
            term.transport.beat(now, now + BUSY_PROMISE)

    def _lead(self) -> Generator[Effect, Any, None]:
        self.leading = True
        term = self.term = _Term(self.transport)
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
                wake_at = min(wake_at, term.verified + VERIFY_INTERVAL)
            now = time.monotonic()
            term.transport.beat(now, max(now, wake_at))
            fds = (self.host.bell_fd(),) if self.host is not None else ()
            yield Wait(max(0.0, wake_at - now), fds)
            if self.host is not None:
                self.host.drain()
            self._busy_beat()
            if not self.lock.held:
                raise LeaderLost

    def _refresh_inherited(self, term: _Term) -> Generator[Effect, Any, None]:
        """A new term's first update, before its declarations: the settings the previous leader
        served (and live processes still want) existed, so they can be queried at once."""
        if not term.entries:
            return
        wanted = {body.name for wish in self._wishes for body in wish.declarations.values()}
        names = tuple(sorted(wanted & {entry.name for entry in term.entries}))
        if not names:
            return
        filters = self._spec(term, self._wishes)[1]
        error = yield from self._update(term, self._wishes, (names, filters))
        yield Apply(blocking=self.host is None, report=True, error=error)
        if self.host is not None:
            self.host.ring(self.source.bells)

    def _inherit(self, term: _Term) -> None:
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
        self, term: _Term, wishes: list[Wish]
    ) -> Generator[Effect, Any, tuple[bool, BaseException | None]]:
        """Declare what is new, then query when due or asked; returns (updated, error).

        During a backoff (updates failing), a process that asks for a query gets
        the standing error at once instead of a query: an outage costs the
        service one query per backoff step, however often processes reload.
        """
        # A declaration the service answered is a sign it is back (during a backoff); whether it
        # brought a setting to query is for the spec to say (an ``uptodate`` one usually does not).
        answered = yield from self._declare(term, wishes)
        spec = self._spec(term, wishes)
        now = time.monotonic()
        asking = [w for w in wishes if w.query_seq > term.queried_for.get(w.key, 0)]
        due = now >= term.next_update
        if not (asking or due or spec != term.spec):
            if self._acks(term, wishes) != term.served or not term.published:
                yield from self._publish_acks(term, wishes)
            return False, None
        if term.failures and not due and not answered:
            for wish in asking:
                term.queried_for[wish.key] = wish.query_seq  # answered: with the standing error
            if self._acks(term, wishes) != term.served:
                yield from self._publish_acks(term, wishes)
            return False, None
        for wish in wishes:
            term.queried_for[wish.key] = wish.query_seq  # requests seen now are answered by this query
        error = yield from self._update(term, wishes, spec)
        return True, error

    def _declare(self, term: _Term, wishes: Iterable[Wish]) -> Generator[Effect, Any, bool]:
        """Declare what was not declared yet this term (concurrently); retry transient failures.

        Returns whether any declaration succeeded (new settings to query).
        """
        now = time.monotonic()
        pending: dict[str, proto.DeclarationBody] = {}
        for wish in wishes:
            for digest, body in wish.declarations.items():
                done = term.declared.get(digest)
                if done is None or (
                    done.error is not None and _transient(done) and now >= term.declare_retry_at
                ):
                    pending[digest] = body
        if not pending:
            return False
        any_ok = False
        failed: list[Outcome] = []
        for attempt in range(DECLARE_ATTEMPTS):
            outcomes = yield from self._declare_batch(pending)
            retry: dict[str, proto.DeclarationBody] = {}
            failed = []
            for digest, outcome in outcomes.items():
                term.declared[digest] = outcome
                if outcome.error is None:
                    any_ok = True
                elif _transient(outcome):
                    retry[digest] = pending[digest]
                    failed.append(outcome)
                else:
                    failed.append(outcome)
            if not retry or attempt == DECLARE_ATTEMPTS - 1:
                break
            pending = retry
            yield Wait(DECLARE_RETRY_PAUSE * random.uniform(0.5, 1.0))
        if any(_transient(o) for o in failed):
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
            results = yield Calls(calls, DECLARE_CONCURRENCY, beat=self._busy_beat)
            for (digest, body), result in zip(batch, results, strict=True):
                outcomes[digest] = self._declared(body, result)
        return outcomes

    def _declared(self, body: proto.DeclarationBody, result: httpx.Response | BaseException) -> Outcome:
        """What one declaration's answer (or error) means."""
        if isinstance(result, BaseException):
            logger.debug("setting declaration failed", exc_info=result, extra={"setting_name": body.name})
            return self._failed(body.name, 0, result)
        response = result
        status = response.status_code
        if status == 409:
            logger.error(
                "conflict when declaring setting",
                extra={"setting_name": body.name, "response_content": response.content},
            )
        elif response.is_error:
            try:
                response.raise_for_status()
            except httpx.HTTPStatusError as e:
                logger.debug(
                    "error when declaring setting",
                    extra={"setting_name": body.name, "response_content": response.content},
                )
                return self._failed(body.name, status, e)
        try:
            answer = proto.decode(proto.DECLARE, status, response.content, proto.DeclareResponse)
        except HeksherProtocolError as e:
            return self._failed(body.name, status, e)
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

    def _failed(self, name: str, status: int, exc: BaseException) -> Outcome:
        return Outcome(name, None, status, describe(exc), None, self._remember(exc))

    def _spec(self, term: _Term, wishes: Sequence[Wish]) -> tuple[tuple[str, ...], str]:
        """What to query: settings whose declaration got an answer, and the union of tracked contexts.

        A setting whose declaration failed for want of an answer (the service
        is down) is still queried if the snapshot already had it: it existed.
        """
        names: set[str] = set()
        known = {entry.name for entry in term.entries}
        for wish in wishes:
            for digest, body in wish.declarations.items():
                outcome = term.declared.get(digest)
                if outcome is None:
                    continue
                if outcome.error is None or (_transient(outcome) and body.name in known):
                    names.add(body.name)
        union: dict[str, str | set[str]] = {}
        for wish in wishes:
            for feature, values in wish.tracked.items():
                if values == TRACK_ALL or union.get(feature) == TRACK_ALL:
                    union[feature] = TRACK_ALL
                else:
                    current = union.setdefault(feature, set())
                    assert isinstance(current, set)
                    current.update(values)
        if not all(_FILTERABLE.fullmatch(feature) for feature in union):
            # Heksher 0.5.7 parses filter feature names as [a-z]+: a feature
            # like trust_level cannot appear in a filter at all, and would
            # break the query for every process. Ask for every rule instead;
            # each process keeps only its own tracked values anyway.
            return tuple(sorted(names)), TRACK_ALL
        return tuple(sorted(names)), context_filters(union)

    def _update(
        self, term: _Term, wishes: Sequence[Wish], spec: tuple[tuple[str, ...], str]
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
        fresh: _Fresh | None = None
        for attempt in range(2):
            try:
                fresh = yield from self._query(term, spec)
            except _ServiceLostSettings as lost:
                if attempt == 0:
                    logger.warning(
                        "the service does not know a setting this host uses; declaring everything again",
                        extra={"response_content": lost.response.content[:200]},
                    )
                    term.declared = {d: o for d, o in term.declared.items() if o.error is not None}
                    term.etag = ""
                    yield from self._declare(term, wishes)
                    spec = self._spec(term, wishes)
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

    def _settle(self, term: _Term, error: BaseException | None, text: str | None, error_id: str) -> None:
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

    def _publish_acks(self, term: _Term, wishes: Sequence[Wish]) -> Generator[Effect, Any, None]:
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
        term: _Term,
        wishes: Sequence[Wish],
        fresh: _Fresh | None,
        error: BaseException | None,
        ack_error: str | None,
        error_id: str,
    ) -> Generator[Effect, Any, BaseException | None]:
        """Publish what changed (rules, acknowledgements); returns why publishing failed, if it did."""
        acks = self._acks(term, wishes, ack_error, error_id)
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

    def _acks(
        self, term: _Term, wishes: Sequence[Wish], error: str | None = None, error_id: str = ""
    ) -> dict[str, Ack]:
        """The acknowledgements to publish, for live processes only.

        A process's request is acknowledged once each of its declarations got
        an answer in this term and, if it asked for a query, a query (or the
        standing error) answered it.
        """
        if error is None and term.error is not None:
            error, error_id = term.error
        acks = dict(term.served)
        for wish in wishes:
            served = acks.get(wish.key)
            if served is not None and served.seq >= wish.reload_seq and (not served.error or error):
                continue  # nothing new to say (the common case: no work per process)
            if wish.query_seq > term.queried_for.get(wish.key, 0):
                continue  # a query is still to come for it
            if not all(digest in term.declared for digest in wish.declarations):
                continue  # its set_as_main waits for its declarations, not just for any update
            acks[wish.key] = Ack(wish.reload_seq, error, error_id)
        live = {w.key for w in wishes}
        return {k: v for k, v in acks.items() if k in live}

    def _publish(self, term: _Term, head: bytes, blobs: list[bytes]) -> BaseException | None:
        """Publish; on failure (a full disk...) the previous snapshot stays and the error is returned."""
        try:
            term.generation = term.transport.publish(head, blobs)
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

    def _verify(self, term: _Term) -> Generator[Effect, Any, None]:
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
        if now - term.verified < VERIFY_INTERVAL:
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
            beat=self._busy_beat,
        )
        if response.status_code == 304:
            logger.debug("heksher reload not necessary")
            return _Fresh(None, [], term.etag, time.monotonic())
        if response.status_code == 404:
            raise _ServiceLostSettings(response)
        response.raise_for_status()
        fresh: _Fresh = yield Compute(lambda: _digest(response), beat=self._busy_beat)
        logger.info("heksher reload done", extra={"settings": len(fresh.entries or ())})
        return fresh


@dataclass(frozen=True)
class _Fresh:
    """What one query brought: its settings (None: unchanged, a 304) with their blobs, and its ETag."""

    entries: list[SettingEntry] | None
    blobs: list[bytes]
    etag: str
    queried: float


def _digest(response: httpx.Response) -> _Fresh:
    """Turn a query's answer into snapshot entries and blobs (CPU-heavy: run as a :class:`Compute`).

    Settings are decoded and encoded one at a time (see
    :func:`~heksher_shm._model.protocol.query_settings`), and every millisecond of
    that the GIL is offered to other threads: an event loop waiting for it
    never waits for the whole answer.
    """
    found: dict[str, tuple[bytes, bytes, int]] = {}
    with paused_gc():
        yield_at = time.perf_counter() + 0.001
        for name, setting in proto.query_settings(response.status_code, response.content):
            found[name] = blob_of(setting)
            if time.perf_counter() >= yield_at:
                time.sleep(0)  # let a waiting thread (an event loop) run
                yield_at = time.perf_counter() + 0.001
    entries: list[SettingEntry] = []
    blobs: list[bytes] = []
    for name in sorted(found):
        blob, digest, count = found[name]
        entries.append(SettingEntry(name, len(blobs), digest, count))
        blobs.append(blob)
    return _Fresh(entries, blobs, response.headers.get("ETag", ""), time.monotonic())


_FILTERABLE = re.compile(r"[a-z]+")


def _transient(outcome: Outcome) -> bool:
    """Worth declaring again: no answer at all, or a server error."""
    return not outcome.settled
