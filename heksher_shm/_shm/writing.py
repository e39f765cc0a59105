"""The writer of a segment: double-buffered publishing and the status block's writes.

Only the elected leader writes (the election guarantees one writer per
segment); within a process, one lock orders its threads.

**Double buffering.** The writer fills the slot that is *not* current, then
publishes it with one aligned 8-byte store of the generation word. A writer
killed at any point leaves the previous generation current and intact; a
corrupted or foreign header is reformatted in place by the next ``publish``,
with a generation floor that keeps generations from repeating.

**Fencing.** The election-lock holder calls :meth:`SegmentWriter.begin_term`
right after it takes the lock: the header's ``term`` word grows by one, and
every publish carries the publisher's term. ``publish`` refuses (raising
:class:`~heksher_shm.exceptions.SnapshotFencedError`) when the header names a
newer term, once before writing anything and once more right before the
descriptor claims the new generation. That check and the store after it are
two steps, so a leader stopped between them can still publish when it
resumes; readers refuse such a snapshot (see ``reading.py``), which is the
guarantee.

Every host operation (sizes, reserving space, mapping, the clock, yields,
the barrier) is the backing's (:mod:`~heksher_shm._shm.backing`): nothing
here touches the operating system directly.
"""

from __future__ import annotations

import array
import pathlib
import threading
import weakref
import zlib
from collections.abc import Callable, Sequence
from itertools import accumulate

from heksher_shm._shm import layout
from heksher_shm._shm.backing import Backing
from heksher_shm._shm.layout import (
    DESCRIPTOR_CRC_SPAN,
    DESCRIPTOR_OFFSETS,
    DESCRIPTOR_SIZE,
    HEADER_SIZE,
    MAGIC,
    OFF_STATUS,
    PAGE,
    SLOT_COUNT,
    STATUS_SIZE,
    TABLE_ENTRY_SIZE,
    WORD_ADOPTED,
    WORD_DAMAGE_REPORTS,
    WORD_DECLARATION_FAILURES,
    WORD_DECLARATIONS_OK,
    WORD_ERROR_COUNT,
    WORD_GENERATION,
    WORD_LEADER_CHANGES,
    WORD_PROGRESS,
    WORD_PROMISE,
    WORD_REGISTRY_SEQ,
    WORD_STATUS_SEQ,
    WORD_TERM,
    WORD_TERM_CHECK,
    WORD_UPDATES_OK,
    SlotDescriptor,
    StatusBlock,
    fence,
    term_check,
)
from heksher_shm._shm.reading import SegmentReader, prefix_problem
from heksher_shm.exceptions import SegmentError, SnapshotFencedError

__all__ = ["SegmentWriter"]

_GENERATION_LIMIT = 1 << 63  # generations (and terms) at or above this are treated as garbage

_U32_MAX = (1 << 32) - 1  # blob_count and head_length are u32 in the descriptor


_WORD_MASK = (1 << 64) - 1

_PLAUSIBLE_TERM = layout.PLAUSIBLE_TERM
"""A term below this survives a reformat: terms count elections, or start from microseconds since the
epoch after a lost header (about 2**51 today), while random garbage is almost never this small."""


_CRASH_STEPS = (
    "format-cleared",
    "format-body",
    "reserved",
    "unclaimed",
    "table",
    "head",
    "blobs",
    "descriptor",
    "claimed",
    "published",
)
"""The points between the writes of :meth:`Segment.publish` where :data:`_crash_point` is called, in order
(the ``format-*`` ones only when the header is reformatted)."""


_crash_point: Callable[[str], None] | None = None
"""Test hook, None in production: called with each name of :data:`_CRASH_STEPS` as publishing passes it, so
a test can kill the writer between any two writes (tests/test_faults_process.py). Unused, it costs one
global load and compare per step of a publish, and nothing on the read path."""


# array's "I" is the C unsigned int: 4 bytes on every platform CPython supports on Linux,
# but the blob table depends on it, so say so loudly rather than write a wrong table.
if array.array("I").itemsize != 4 or array.array("Q").itemsize != 8:  # pragma: no cover
    raise ImportError("heksher_shm needs 4-byte array('I') and 8-byte array('Q')")


def _region_usable(desc: SlotDescriptor, file_size: int) -> bool:
    """Whether a descriptor's region can be reused by the writer as is."""
    return (
        desc.offset >= HEADER_SIZE
        and desc.offset % PAGE == 0
        and desc.capacity > 0
        and desc.offset + desc.capacity <= file_size
    )


_live_segments: weakref.WeakSet[SegmentWriter] = weakref.WeakSet()


def _reset_after_fork() -> None:
    """In a forked child (called by :mod:`heksher_shm._process.fork`): new writer locks for every open
    segment."""
    # A thread of the parent may hold a writer lock at fork time; the child has no such
    # thread, so an inherited locked Lock would deadlock a child that later becomes leader.
    for segment in list(_live_segments):
        segment._write_lock = threading.Lock()


class SegmentWriter(SegmentReader):
    """The reading side plus the writes; only the elected leader calls the writing methods."""

    def __init__(self, path: pathlib.Path, backing: Backing) -> None:
        """Map the file behind *backing*; use :meth:`open` (or :meth:`over`) instead."""
        super().__init__(path, backing)
        self._write_lock = threading.Lock()
        self._term = 0  # the last term this writer began or published under (for a reformat)
        _live_segments.add(self)

    def close(self) -> None:
        """Unmap and close the file. Idempotent; other methods raise afterwards."""
        _live_segments.discard(self)
        super().close()

    def begin_term(self) -> int:
        """Take the next term (the fencing token) and return it. Election-lock holder only.

        Called right after the lock is taken (or seized from a stuck leader):
        from then on ``publish`` refuses any older term, and readers refuse
        what an older term publishes, except the snapshot current (and
        readable) now, which the new term *adopts*: what it inherits stays
        readable until it publishes its own. Formats the header first when it
        is missing or corrupted. Counts the change in ``leader_changes``.
        """
        self._check_open()
        with self._write_lock:
            words = self._words
            header = self._mm[:OFF_STATUS]
            old, damaged = fence(words)
            descs = [layout.unpack_descriptor(header, i) for i in range(SLOT_COUNT)]
            # Above every term this file or this writer has seen, so a stale leader's is always older.
            seen = [t for t in (old, self._term, *(d.term for d in descs)) if t < _GENERATION_LIMIT]
            term = max(seen, default=0) + 1
            usable = prefix_problem(header) is None
            if old >= _GENERATION_LIMIT or damaged or (not usable and self._used_before()):
                # The term word is garbage or damaged (its copies disagree: one of them may have been
                # lowered), or the header was lost with it: microseconds since the epoch exceed any
                # count of earlier terms (as the generation floor does for generations).
                term = max(term, int(self._backing.wall() * 1_000_000) + 1)
            if usable:
                # Nothing is adopted under a damaged term: what was readable cannot be judged.
                judged = _GENERATION_LIMIT if damaged else old
                words[WORD_ADOPTED] = self._adoptable(layout.unpack_prefix(header).generation, descs, judged)
                words[WORD_TERM] = term  # after adopted: a reader that sees this term sees what it adopted
                words[WORD_TERM_CHECK] = term_check(term)  # then its copy (until then, they disagree)
            else:
                self._format(term)
            words[WORD_LEADER_CHANGES] = (words[WORD_LEADER_CHANGES] + 1) & _WORD_MASK
            self._term = term
            # The store must be visible to every process before this one reads the segment again:
            # a stale publisher's check then sees it, or this leader sees that publish.
            self._backing.barrier()
            return term

    def _adoptable(self, generation: int, descs: list[SlotDescriptor], term: int) -> int:
        """The generation a new term adopts: the current one if readers may read it now, else 0."""
        if not generation or term >= _GENERATION_LIMIT:
            return 0  # nothing published, or a garbage term word: nothing can be judged readable
        for desc in descs:
            if desc.generation == generation:
                # Readable under the term now ending: published by it (or later), or adopted by it.
                if desc.term >= term or generation == self._words[WORD_ADOPTED]:
                    return generation
                return 0  # a replaced leader published it: it stays refused
        return 0

    def _check_term(self, term: int) -> None:
        """Refuse to publish under *term* when the header names a newer one (best effort: see module)."""
        words = self._words
        current, damaged = fence(words)
        if damaged and current == term:
            # One copy of this leader's own term was damaged (lowered): put both back.
            words[WORD_TERM] = term
            words[WORD_TERM_CHECK] = term_check(term)
        if current > term:
            raise SnapshotFencedError(
                f"segment file {self.path}: term {term} was replaced by term {current}; not publishing"
            )

    def publish(self, head: bytes, blobs: Sequence[bytes], term: int = 0) -> int:  # noqa: PLR0915 (the crash-point hooks)
        """Publish a new snapshot (``head`` and ``blobs``) under *term* and return its generation.

        Writer only. Fills the slot that is not current, then makes it current
        with one aligned store of the generation word. Formats the header first
        when it is missing or corrupted (its term word is then *term*: the
        publisher formats under its own authority), and grows the file (never
        shrinks it) when the slot is too small, reserving the space before
        using it: a full disk raises :class:`SegmentError` here rather than
        SIGBUS anywhere. On any error the previously published snapshot stays
        intact and readable.

        *term* is the fencing token :meth:`begin_term` gave the leader (0, the
        default, is a publisher outside any election: tools and tests). Raises
        :class:`SnapshotFencedError`, publishing nothing, when the header names
        a newer term.
        """
        self._check_open()
        count = len(blobs)
        if count > _U32_MAX or len(head) > _U32_MAX:
            raise SegmentError(
                f"segment file {self.path}: cannot publish {count} blobs and a head of {len(head)} bytes"
                f" (at most {_U32_MAX} of each)"
            )
        # Built by C loops (map/accumulate/array) so 100k blobs cost milliseconds, not a
        # Python-level loop per entry.
        ends = array.array("Q", accumulate(map(len, blobs)))
        crcs = array.array("I", map(zlib.crc32, blobs))
        blob_bytes = ends[-1] if count else 0
        table_length = count * TABLE_ENTRY_SIZE
        needed = table_length + len(head) + blob_bytes
        with self._write_lock:
            if prefix_problem(self._mm[:16]) is None:
                # Before anything is written. A damaged header's term word is not trusted (it may
                # be garbage): the publisher formats the header anew under its own term.
                self._check_term(term)
            self._term = max(self._term, term)
            self._ensure_formatted(term)
            mapping = self._refresh_mapping()
            header = mapping[:OFF_STATUS]
            prefix = layout.unpack_prefix(header)
            descs = [layout.unpack_descriptor(header, i) for i in range(SLOT_COUNT)]
            if prefix.generation >= _GENERATION_LIMIT or prefix.generation_floor >= _GENERATION_LIMIT:
                # No sane successor generation exists: start over with a fresh floor.
                self._format(term)
                header = mapping[:OFF_STATUS]
                prefix = layout.unpack_prefix(header)
                descs = [layout.unpack_descriptor(header, i) for i in range(SLOT_COUNT)]
            current = self._current_slot(prefix.generation, descs, len(mapping))
            target = 0 if current is None else 1 - current
            offset, capacity, fresh = self._place(target, current, descs, needed, len(mapping))
            # Reserve before use: posix_fallocate makes the pages exist now, so writing them
            # cannot fail later with SIGBUS, and readers only map what the file really holds.
            # A fresh region is reserved whole; a reused one at least where we write (a hostile
            # process might have punched holes).
            self._backing.reserve(offset, capacity if fresh else max(needed, 1))
            mapping = self._refresh_mapping()
            if _crash_point is not None:
                _crash_point("reserved")
            # Descriptors count too: if the generation word was scribbled backwards, a reader
            # may still hold the higher generation a descriptor remembers. Never repeat one.
            seen = [d.generation for d in descs if d.generation < _GENERATION_LIMIT]
            generation = max(prefix.generation, prefix.generation_floor, *seen) + 1
            words = self._words
            descriptor_word = DESCRIPTOR_OFFSETS[target] // 8
            # 1. Un-claim the target slot. Readers only pick a slot whose descriptor carries
            #    the published generation, and that was never this one, but a slow reader of
            #    an older generation now fails fast instead of checksumming half-new data.
            words[descriptor_word] = 0
            if _crash_point is not None:
                _crash_point("unclaimed")
            # 2. The payload, into the non-current slot. Readers of the current generation
            #    never look here, so partial bytes are invisible.
            position = offset
            for chunk in (ends, crcs):
                raw = chunk.tobytes()
                mapping[position : position + len(raw)] = raw
                position += len(raw)
            if _crash_point is not None:
                _crash_point("table")
            mapping[position : position + len(head)] = head
            position += len(head)
            if _crash_point is not None:
                _crash_point("head")
            mapping[position : position + blob_bytes] = b"".join(blobs)
            if _crash_point is not None:
                _crash_point("blobs")
            # 3. The descriptor body, still invisible: its generation word is 0.
            desc = SlotDescriptor(
                generation, offset, capacity, needed, count, len(head), term, self._backing.wall(), 0
            )
            raw_desc = layout.pack_descriptor(desc)
            crc = zlib.crc32(raw_desc[:DESCRIPTOR_CRC_SPAN])
            crc = zlib.crc32(ends, crc)
            crc = zlib.crc32(crcs, crc)
            crc = zlib.crc32(head, crc)
            raw_desc = layout.pack_descriptor(desc._replace(crc=crc))
            start = DESCRIPTOR_OFFSETS[target]
            mapping[start + 8 : start + DESCRIPTOR_SIZE] = raw_desc[8:]
            if _crash_point is not None:
                _crash_point("descriptor")
            # 4. Once more, as late as possible: a leader stopped while it wrote may have been
            #    replaced meanwhile. (Stopped after this check, it still publishes: readers refuse it.)
            self._check_term(term)
            # ... the slot claims the new generation (one aligned word) ...
            words[descriptor_word] = generation
            if _crash_point is not None:
                _crash_point("claimed")
            # 5. ... and this single aligned store publishes it. Killed before it, readers
            #    keep the previous snapshot; after it, they see the complete new one.
            words[WORD_GENERATION] = generation
            if _crash_point is not None:
                _crash_point("published")
            return generation

    @staticmethod
    def _current_slot(generation: int, descs: list[SlotDescriptor], file_size: int) -> int | None:
        """The slot readers use now (the writer must not touch it), or None."""
        if generation == 0:
            return None
        for index, desc in enumerate(descs):
            if (
                desc.generation == generation
                and desc.offset >= HEADER_SIZE
                and desc.offset + max(desc.capacity, desc.length) <= file_size
            ):
                return index
        return None

    @staticmethod
    def _place(
        target: int, current: int | None, descs: list[SlotDescriptor], needed: int, file_size: int
    ) -> tuple[int, int, bool]:
        """Choose (offset, capacity, fresh) for the target slot's region.

        Reuse the target's region when it fits. Otherwise take the gap between
        the header and the current slot if it is big enough, or else place the
        region right after the current slot, which is the end of the file or
        becomes it. So the file holds at most the header, the current region
        and the target region, plus a gap smaller than the target region.
        """
        if current is None:
            busy_start = busy_end = HEADER_SIZE
        else:
            cur = descs[current]
            busy_start, busy_end = cur.offset, cur.offset + max(cur.capacity, cur.length)
        desc = descs[target]
        if (
            _region_usable(desc, file_size)
            and desc.capacity >= needed
            and (desc.offset + desc.capacity <= busy_start or desc.offset >= busy_end)
        ):
            return desc.offset, desc.capacity, False
        capacity = layout.slot_capacity_for(needed)
        gap = busy_start - HEADER_SIZE
        if gap >= capacity:
            return HEADER_SIZE, gap, True
        offset = layout.align_up(busy_end)
        # Space already in the file past the current slot is free: take it as slack.
        return offset, max(capacity, file_size - offset), True

    def _ensure_formatted(self, term: int | None = None) -> None:
        """Format the header in place when it is not a valid header of this version.

        The fresh header's term is the highest of *term* (a publisher's own),
        this writer's last term and the term word if it is sane (see :meth:`_format`).
        """
        if prefix_problem(self._mm[:16]) is not None:
            self._format(max(self._term, term or 0))

    def _used_before(self) -> bool:
        """Whether something was in the file before (maybe a garbage generation a reader saw)."""
        return self._backing.size() > HEADER_SIZE or self._mm[:HEADER_SIZE] != bytes(HEADER_SIZE)

    def _format(self, term: int) -> None:
        """Write a fresh header: no snapshot, no leader, a generation floor that keeps generations from
        repeating (a reader may still hold an old one), and the given term, or the term word if it is
        plausible and newer (a replaced leader formatting a damaged header must not erase its
        successor's term: its publish would then pass the fencing check)."""
        words = self._words
        current, _ = fence(words)
        if current < _PLAUSIBLE_TERM:
            term = max(term, current)
        old = [
            w
            for w in (words[WORD_GENERATION], words[layout.OFF_GENERATION_FLOOR // 8])
            if w < _GENERATION_LIMIT
        ]
        floor = max(old, default=0)
        if self._used_before():
            # Something was here before, maybe with a garbage generation word a reader saw.
            # Microseconds since the epoch exceed any count of earlier publishes.
            floor = max(floor, int(self._backing.wall() * 1_000_000))
        words[WORD_GENERATION] = 0  # first: readers see "nothing published" from here on
        if _crash_point is not None:
            _crash_point("format-cleared")
        fresh = layout.format_header(floor, term)
        self._mm[8:HEADER_SIZE] = fresh[8:]
        if _crash_point is not None:
            _crash_point("format-body")
        self._mm[:8] = fresh[:8]  # the magic last: a header with our magic is complete

    def _update_status(self, change: Callable[[StatusBlock], StatusBlock], count: int | None = None) -> None:
        """Rewrite the status block under its seqlock (writer only); then add one to the word *count*."""
        self._check_open()
        with self._write_lock:
            self._ensure_formatted()
            words = self._words
            mapping = self._mm
            seq = words[WORD_STATUS_SEQ]
            # Odd means "being written". If a killed writer left it odd, step over it to the
            # next odd value: a reader that saw the old value must not match the new one.
            begin = (seq + (1 if seq % 2 == 0 else 2)) & _WORD_MASK
            words[WORD_STATUS_SEQ] = begin
            block = change(layout.unpack_status(mapping[OFF_STATUS : OFF_STATUS + STATUS_SIZE]))
            raw = layout.pack_status(block)
            count_at = layout.OFF_ERROR_COUNT - OFF_STATUS
            mapping[OFF_STATUS : layout.OFF_ERROR_COUNT] = raw[:count_at]
            mapping[layout.OFF_ERROR_COUNT + 8 : OFF_STATUS + STATUS_SIZE] = raw[count_at + 8 :]
            # error_count on its own aligned store, so error_count() never sees it half written.
            words[WORD_ERROR_COUNT] = block.error_count
            words[WORD_STATUS_SEQ] = (begin + 1) & _WORD_MASK
            if count is not None:
                words[count] = (words[count] + 1) & _WORD_MASK

    def set_leader(self, pid: int, create_time: float, bell: int = 0, pidns: int = 0) -> None:
        """Record the leader: (pid, create_time, pidns) survives pid reuse and names its PID
        namespace; *bell* numbers its doorbell. Writer only."""
        self._update_status(
            lambda block: block._replace(
                leader_pid=pid, leader_create_time=create_time, leader_bell=bell, leader_pidns=pidns
            )
        )

    def beat(self, progress: float, promise: float) -> None:
        """Store the leader's liveness words (monotonic seconds): progress now, more by *promise*.

        Two aligned 8-byte stores, the promise first, so a reader that sees the
        new progress also sees a promise at least as late. Writer only.
        """
        self._check_open()
        if self._mm[:8] != MAGIC:
            with self._write_lock:
                self._ensure_formatted()
        floats = self._floats
        floats[WORD_PROMISE] = promise
        floats[WORD_PROGRESS] = progress

    def record_update_ok(self, when: float) -> None:
        """Record the time of the last successful update from the service, and count it. Writer only."""
        self._update_status(lambda block: block._replace(last_update_ok=when), count=WORD_UPDATES_OK)

    def count_declarations(self, ok: int, failed: int) -> None:
        """Add to the counts of declarations the service accepted (*ok*) and that failed. Writer only.

        Each count is one aligned word that only the leader writes, so a reader
        reads it whole without a lock.
        """
        self._check_open()
        with self._write_lock:
            self._ensure_formatted()
            words = self._words
            words[WORD_DECLARATIONS_OK] = (words[WORD_DECLARATIONS_OK] + ok) & _WORD_MASK
            words[WORD_DECLARATION_FAILURES] = (words[WORD_DECLARATION_FAILURES] + failed) & _WORD_MASK

    def record_error(self, message: str, when: float) -> None:
        """Record an error (text cut to 1 KiB of UTF-8) and increase the error count. Writer only."""
        text = layout.encode_error_text(message)
        self._update_status(
            lambda block: block._replace(
                error_text=text, last_error_time=when, error_count=(block.error_count + 1) & _WORD_MASK
            )
        )

    def report_damage(self) -> None:
        """Say "the published snapshot is damaged" to the leader: any process may call it, before it
        rings the leader (which checks the segment when the counter moved, and only then when a ring
        woke it: rings that registrations explain cost it no check).

        Not atomic across processes, as :meth:`bump_registry_seq`: a bump lost to a concurrent one
        came from a process that read the counter before the other wrote it, so it found the damage
        before the leader saw the counter move, and the check that follows covers it. Written even in
        a header whose magic is damaged (the word is the leader's to judge, not the reporter's).
        """
        self._check_open()
        words = self._words
        words[WORD_DAMAGE_REPORTS] = (words[WORD_DAMAGE_REPORTS] + 1) & _WORD_MASK

    def bump_registry_seq(self) -> None:
        """Say "a registration changed" to the leader: any process may call it, after writing its file.

        Not atomic across processes, and it need not be: two processes that bump
        at once may leave the counter one higher instead of two, but the leader
        only asks whether it moved since it last looked, and each file was
        written before its writer read the counter, so a scan that follows any
        value the leader sees also finds every file written before it.
        """
        self._check_open()
        if self._mm[:8] != MAGIC:
            return  # not formatted yet: no leader has scanned anything, and the first one will
        words = self._words
        words[WORD_REGISTRY_SEQ] = (words[WORD_REGISTRY_SEQ] + 1) & _WORD_MASK
