"""A simulated process's client: its settings and wishes, and how it reads and accepts snapshots.

Each function that decides something a real client decides mirrors one
method of ``heksher_shm/clients`` and is named after it (``apply_from`` after
``Applying._apply_from``, ``acked`` after ``Answering._acked``...), so that a
change there shows which function here to change. The acceptance rule of a
snapshot lives in :meth:`SimClient.apply_from` alone: a snapshot the segment
refuses (a replaced leader's, a damaged one) is skipped, and so is one whose
rules were queried before those this process applied (``head.queried``).

Conversion is left out: a setting's rules are kept as (conditions, value)
pairs, filtered by what this process tracks, as ``Applying._install`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from heksher_shm._engine.effects import Apply
from heksher_shm._engine.host import Wish
from heksher_shm._model.contexts import covers
from heksher_shm._model.protocol import DeclarationBody, declaration_digest
from heksher_shm._model.snapshot import Ack, Head, decode_blob, decode_head
from heksher_shm.exceptions import SegmentError, SnapshotFencedError
from tests.sim.service import Rules

if TYPE_CHECKING:
    from tests.sim.process import SimProcess

__all__ = ["Request", "SimClient"]

_json = msgspec.json.Decoder()


@dataclass
class Request:
    """A ``set_as_main()`` or ``reload()`` call, and how it ended."""

    kind: str
    seq: int
    made: float
    deadline: float
    progress: float
    versions: dict[str, int] = field(default_factory=dict)
    """For a reload: the content version of each setting at the service when it was made."""
    ended: float = 0.0
    outcome: str = ""  # "ok", "error", "timeout"; "" while it waits


class SimClient:
    """One process's client (see the module docstring)."""

    def __init__(
        self,
        proc: SimProcess,
        declarations: dict[str, DeclarationBody],
        tracked: dict[str, list[str]],
        startup_timeout: float,
        on_applied: Callable[[int, Head, dict[str, Rules]], None],
    ) -> None:
        self._proc = proc
        self.declarations = declarations
        self.digests = {name: declaration_digest(body) for name, body in declarations.items()}
        self.tracked = tracked
        self.startup_timeout = startup_timeout
        self._on_applied = on_applied
        self.applied_generation = -1
        self.accepted_generation = -1
        self.queried = 0.0
        self.head: Head | None = None
        self.head_generation = 0
        """The generation of :attr:`head` (``applied_generation`` also moves past refused snapshots)."""
        self.rules: dict[str, Rules] = {}
        self.blob_digests: dict[str, bytes | None] = {}
        self.reapply_all = False
        self.ack: Ack | None = None
        self.reload_seq = 0
        self.query_seq = 0
        self.registered = False
        self.requests: list[Request] = []
        self.reports: list[str] = []

    # -- applying (clients/_applying.py) --------------------------------------------------------------------

    def apply_from(self) -> None:
        """``Applying._apply_from``: apply the newest snapshot, unless the segment refuses it, it is damaged,
        or it is older than what this process applied."""
        segment = self._proc.host.segment
        for _ in range(100):
            generation = segment.generation()
            if generation == self.applied_generation:
                return
            try:
                read = segment.read_head()
                if read is None or read.generation == self.applied_generation:
                    return
                head = decode_head(read.head)
            except SnapshotFencedError:
                # A replaced leader published late: never read it (the leader in charge republishes).
                self.applied_generation = generation
                self.segment_damaged()
                return
            except (SegmentError, ValueError, msgspec.DecodeError):
                self.applied_generation = generation
                self.segment_damaged()
                return
            if head.queried < self.queried and self._proc.sim.config.queried_rule:
                # Older than what this process applied: never go backwards.
                self.applied_generation = read.generation
                return
            entries = {entry.name: entry for entry in head.settings}
            todo = [
                (name, entry)
                for name in self.declarations
                if (entry := entries.get(name)) is not None
                and (self.reapply_all or self.blob_digests.get(name) != entry.digest)
            ]
            indices = sorted({entry.blob for _, entry in todo})
            try:
                blobs = segment.copy_blobs(read.generation, indices) if indices else []
                for blob in blobs or ():
                    blob.verified()  # _copy_checked: a damaged blob is not applied
            except SegmentError:
                self.applied_generation = generation
                self.segment_damaged()
                return
            if blobs is None:
                continue  # published again while we read: start over
            by_index = dict(zip(indices, blobs, strict=True))
            changed: dict[str, Rules] = {}
            for name, entry in todo:
                rules = self._install(name, by_index[entry.blob])
                if rules is None:
                    self.blob_digests[name] = None  # the next snapshot rebuilds it, whatever it holds
                else:
                    changed[name] = self.rules[name] = rules
                    self.blob_digests[name] = entry.digest
            self.reapply_all = False
            self.head, self.accepted_generation = head, read.generation
            self.head_generation = read.generation
            self.queried = head.queried
            self.applied_generation = read.generation
            self._on_applied(read.generation, head, changed)
            return

    def _install(self, name: str, blob: object) -> Rules | None:
        """``_PendingRules.__call__`` and ``Applying._install``: decode a blob, keep the tracked rules."""
        try:
            setting = decode_blob(blob.verified())  # type: ignore[attr-defined]
        except (SegmentError, ValueError, msgspec.DecodeError):
            self.segment_damaged()
            return None
        kept = set()
        for record in setting.rules:
            conditions = tuple((f, v) for f, v in record.conditions)
            if all(v in self.tracked.get(f, ()) for f, v in conditions):
                kept.add((conditions, _json.decode(record.value)))
        return frozenset(kept)

    def apply_latest(self) -> None:
        """``Applying._apply_latest``: apply, then take the leader's latest answer; wake the waiters."""
        self.apply_from()
        self.take_ack()
        self.check_requests()

    def apply_effect(self, effect: Apply) -> None:
        """``ThreadHeksherClient._apply``: the engine's :class:`Apply` (the callbacks, then the waiters)."""
        self.apply_from()
        self.take_ack()
        if effect.report:
            self.report(effect.error)
        self.check_requests()

    def report(self, error: BaseException | None) -> None:
        """``on_update_ok`` / ``on_update_error``."""
        self.reports.append("ok" if error is None else "error")

    def segment_damaged(self) -> None:
        """``BaseHeksherClient._segment_damaged``: report it in the segment, then have whoever leads
        check the segment."""
        self._proc.host.segment.report_damage()
        if self._proc.engine.leading:
            self._proc.wake()
        else:
            self._proc.host.ring_leader()

    # -- registering (clients/_registering.py) --------------------------------------------------------------

    def wish(self) -> Wish:
        """``Registering._wish``."""
        declarations = {self.digests[name]: body for name, body in self.declarations.items()}
        return Wish(self._proc.host.key, declarations, self.tracked, self.reload_seq, self.query_seq)

    def wish_changed(self) -> None:
        """``Registering._wish_changed``: write the registration, bump the counter, ring the leader."""
        proc = self._proc
        registry = proc.sim.registry
        registry.registrations[proc.host.key] = (proc.pid, proc.start, self.wish())
        self.registered = True
        proc.host.segment.bump_registry_seq()
        if not proc.engine.leading:
            proc.host.ring_leader()
        proc.wake()

    def request_reload(self, query: bool) -> int:
        """``Registering._request_reload``."""
        self.reload_seq += 1
        if query:
            self.query_seq = self.reload_seq
        self.wish_changed()
        return self.reload_seq

    def housekeep(self) -> bool:
        """``Registering._housekeep``: write the registration again if it vanished."""
        proc = self._proc
        if self.registered and proc.host.key not in proc.sim.registry.registrations:
            self.wish_changed()
        return False

    # -- answers (clients/_answers.py) ---------------------------------------------------------------------

    def take_ack(self) -> None:
        """``RequestAnswers.take``: the current term's answer."""
        proc = self._proc
        ack = proc.sim.registry.answer(proc.host.key, proc.host.segment.term())
        if ack is not None and (self.ack is None or ack.seq >= self.ack.seq):
            self.ack = ack

    def acked(self, seq: int) -> bool:
        """``RequestAnswers.acked``: answered with an error, or by a snapshot this process applied (not
        one it settled on without applying)."""
        ack = self.ack
        if ack is None or ack.seq < seq:
            return False
        if ack.error is not None:
            return True
        head = self.head
        return head is not None and head.term == ack.term and self.accepted_generation >= ack.generation

    def progress(self, seq: int) -> float:
        """``RequestAnswers.progress``: the leader's progress, until the current term answers the request."""
        proc = self._proc
        ack = proc.sim.registry.answer(proc.host.key, proc.host.segment.term())
        if ack is not None and ack.seq >= seq:
            return -1.0
        return self._proc.host.segment.liveness()[0]

    def already_served(self) -> bool:
        """``Answering._already_served``: the applied snapshot answers this process already."""
        head = self.head
        if head is None or not head.ok or head.filters is None:
            return False
        names = {entry.name for entry in head.settings}
        for name, digest in self.digests.items():
            outcome = head.outcomes.get(digest)
            if outcome is None or outcome.error is not None or name not in names:
                return False
        return covers(head.filters, self.tracked)

    def ack_error(self, seq: int, starting: bool) -> bool:
        """``Answering._ack_error``: whether request *seq* ended in an error."""
        head = self.head
        problems = False
        if head is not None:
            held = {entry.name for entry in head.settings}
            for name, digest in self.digests.items():
                outcome = head.outcomes.get(digest)
                if outcome is not None and outcome.error is not None:
                    problems = True
                elif outcome is not None and name not in held:
                    problems = True  # declared since the answer's snapshot; the query that followed failed
        ack = self.ack
        if ack is not None and ack.error is not None and ack.seq >= seq:
            problems = True
        if problems and starting and head is not None:
            names = {entry.name for entry in head.settings}
            if all(name in names for name in self.declarations):
                return False  # a snapshot from an earlier leader serves: a warning, not an error
        return problems

    # -- the documented calls (thread_client.py) ----------------------------------------------------------

    def set_as_main(self) -> None:
        """``ThreadHeksherClient.set_as_main``: apply, register, and wait unless already served."""
        self.applied_generation = -1
        self.apply_latest()
        if self.already_served():
            self.wish_changed()
            now = self._proc.sim.world.now
            self.requests.append(Request("set_as_main", 0, now, now, 0.0, ended=now, outcome="ok"))
            self._proc.sim.checks.request_ended(self._proc, self.requests[-1])
            return
        self._wait_for("set_as_main", self.request_reload(query=False))

    def reload(self) -> None:
        """``ThreadHeksherClient.reload``."""
        self._wait_for("reload", self.request_reload(query=True))

    def _wait_for(self, kind: str, seq: int) -> None:
        sim = self._proc.sim
        now = sim.world.now
        request = Request(kind, seq, now, now + self.startup_timeout, self.progress(seq))
        if kind == "reload":
            request.versions = sim.service_versions(self)
        self.requests.append(request)
        self._proc.at_deadline(request.deadline, self.check_requests)
        self.check_requests()

    def check_requests(self) -> None:
        """``ThreadHeksherClient._wait_for``'s loop, for every waiting request: answered, or timed out
        after ``startup_timeout`` without progress."""
        sim = self._proc.sim
        now = sim.world.now
        for request in self.requests:
            if request.outcome:
                continue
            if self.acked(request.seq):
                error = self.ack_error(request.seq, starting=request.kind == "set_as_main")
                request.outcome = "error" if error else "ok"
            elif now >= request.deadline:
                progress = self.progress(request.seq)
                if progress == request.progress:
                    request.outcome = "timeout"
                else:
                    request.progress, request.deadline = progress, now + self.startup_timeout
                    self._proc.at_deadline(request.deadline, self.check_requests)
                    continue
            else:
                continue
            request.ended = now
            sim.checks.request_ended(self._proc, request)
