"""The lock-free reader of a segment: verified snapshot copies and the status seqlock.

Readers never take a lock shared with another process, so a reader SIGKILLed
at any instant blocks nobody.

* **Verified copies.** A reader reads the generation ``g``, picks the slot
  whose descriptor carries ``g``, bounds-checks, copies, verifies the crc and
  re-reads the generation: if it is still ``g`` the writer cannot have touched
  that slot meanwhile (it only writes the non-current slot, and generations
  never repeat), so the copy is a complete snapshot.
* **Seqlock for the status block.** Leader identity and the last error are not
  covered by the generation word; they sit behind a sequence counter (odd
  while being written). Readers retry a bounded number of times and then
  report the block as unavailable, so a writer killed mid-update cannot make
  them spin.
* **Fencing.** After the verified copy (and the second look at the generation
  word) a reader reads the header's ``term`` and ``adopted`` words; a
  snapshot whose descriptor carries an older term, and that is not the one
  the current term adopted, was published by a replaced leader: it raises
  :class:`~heksher_shm.exceptions.SnapshotFencedError`. The writer checks
  the term too, but its check and its store are two steps; this check is
  the guarantee (see ``docs/shared-cache.rst``).
* **Hostile input.** Every offset and length read from the file is checked
  against the mapping before use. Garbage yields
  :class:`~heksher_shm.exceptions.SegmentCorruptedError` or "no snapshot",
  never a crash or a read out of bounds.
"""

from __future__ import annotations

import operator
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import TypeVar

from heksher_shm._shm import layout
from heksher_shm._shm.backing import SharedMemory
from heksher_shm._shm.layout import (
    DESCRIPTOR_CRC_SPAN,
    DESCRIPTOR_OFFSETS,
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    OFF_STATUS,
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
    WORD_UPDATES_OK,
    SlotDescriptor,
    StatusBlock,
    fence,
)
from heksher_shm._shm.mapped import MappedFile
from heksher_shm._shm.records import BlobCopy, HeaderStatus, HeadRead, SlotInfo
from heksher_shm.exceptions import SegmentCorruptedError, SegmentError, SnapshotFencedError

__all__ = ["BlobCopy", "HeadRead", "HeaderStatus", "SegmentReader", "SlotInfo", "prefix_problem"]

READ_ATTEMPTS = 100
"""Upper bound on snapshot read attempts while the writer keeps publishing."""


STABLE_FAILURES = 5
"""Failed checks with an unchanged generation before a reader calls it corruption.

A failure while the generation stays put cannot be a publish in progress on a
TSO machine; the few extra tries absorb store reordering on weaker ones.
"""


STATUS_ATTEMPTS = 200
"""Upper bound on seqlock read attempts for the status block (then "unavailable")."""


assert WORD_GENERATION == 2  # generation() inlines the index


_Read = TypeVar("_Read", bytes, BlobCopy)


_ONE_COPY_SLACK = 64 * 1024
"""copy_blobs copies the span its blobs cover at once unless that holds more than twice their size
plus this many bytes of other blobs."""


def _time_or_none(value: float) -> float | None:
    # 0.0 marks "never"; NaN or negative values can only come from a scribbled header.
    return value if value > 0.0 else None


def prefix_problem(header: bytes) -> str | None:
    """Why a header copy (at least 16 bytes) is not a usable formatted header, or None."""
    magic = header[:8]
    if magic != MAGIC:
        if magic == bytes(8):
            return "not formatted"
        return f"bad magic {magic!r} (expected {MAGIC!r})"
    version, header_size = struct.unpack_from("<II", header, 8)
    if version != FORMAT_VERSION:
        return f"unsupported format version {version} (this library reads version {FORMAT_VERSION})"
    if header_size != HEADER_SIZE:
        return f"bad header size {header_size} (expected {HEADER_SIZE})"
    return None


def _slot_problem(index: int, desc: SlotDescriptor) -> str | None:
    """Bounds problems of a descriptor that do not depend on the file size."""
    if desc.offset < HEADER_SIZE:
        return f"slot {index} offset {desc.offset} lies inside the header"
    if desc.length > desc.capacity:
        return f"slot {index} length {desc.length} exceeds its capacity {desc.capacity}"
    if desc.blob_count * TABLE_ENTRY_SIZE + desc.head_length > desc.length:
        return f"slot {index} blob table and head ({desc.blob_count} blobs) exceed its length {desc.length}"
    return None


_END = struct.Struct("<Q")
_CRC = struct.Struct("<I")


class _Entries:
    """One column of a slot's blob table, read an entry at a time where it lies (no copy)."""

    __slots__ = ("_at", "_buffer", "_unpack")

    def __init__(self, buffer: SharedMemory, at: int, entry: struct.Struct) -> None:
        self._buffer, self._at, self._unpack = buffer, at, entry

    def __getitem__(self, index: int) -> int:
        unpack, size = self._unpack.unpack_from, self._unpack.size
        return int(unpack(self._buffer, self._at + index * size)[0])


class SegmentReader(MappedFile):
    """The reading side of a segment; any number of threads and processes may use it at once."""

    @property
    def words(self) -> memoryview:
        """The header as 8-byte words; item 2 is the generation word (see :meth:`generation`).

        For the hottest path (``Setting.get``), which reads the word without a
        call. The view stays valid while the segment is open, across growth.
        """
        return self._words

    def generation(self) -> int:
        """The published generation; 0 when nothing was published or the file is unformatted.

        This is the hot path: one aligned 8-byte load from the mapping, no
        syscall, no lock. Treat a change as a hint and confirm it with
        :meth:`read_head` (a scribbled header can show any number). Raises
        ``ValueError`` after :meth:`close`.
        """
        # A memoryview cast to "Q" reads the 8 bytes with one aligned load, so a concurrent
        # publish is seen either before or after, never half written.
        return self._words[2]  # WORD_GENERATION, inlined: a global lookup costs ~10% here

    def liveness(self) -> tuple[float, float]:
        """(progress, promise): when the leader last showed progress, and by when it promised to show
        progress again, in ``time.monotonic()`` seconds (0.0: never). Two aligned loads."""
        floats = self._floats
        return floats[WORD_PROGRESS], floats[WORD_PROMISE]

    def term(self) -> int:
        """The segment's fencing token: the term of the latest leader (0: none yet), from its two copies
        (:func:`heksher_shm._shm.layout.fence`). Two aligned loads."""
        return fence(self._words)[0]

    def registry_seq(self) -> int:
        """The registry change counter (see :meth:`bump_registry_seq`). One aligned load."""
        return self._words[WORD_REGISTRY_SEQ]

    def damage_reports(self) -> int:
        """The damage report counter (see :meth:`report_damage`). One aligned load."""
        return self._words[WORD_DAMAGE_REPORTS]

    def error_count(self) -> int:
        """How many errors the leader recorded; only ever increases. One aligned load."""
        return self._words[WORD_ERROR_COUNT]

    def read_head(self) -> HeadRead | None:
        """A verified copy of the current snapshot's head, or None when nothing was published.

        Retries while the writer publishes (at most :data:`READ_ATTEMPTS` times).
        Raises :class:`SegmentCorruptedError` when the header, the descriptor or
        the checksum keeps failing with the generation unchanged,
        :class:`SnapshotFencedError` (at once: the generation is stable) when
        a replaced leader published the snapshot, and :class:`SegmentError`
        if the writer republishes faster than this process can copy.
        """
        self._check_open()
        stable_failures = 0
        problem = ""
        for _ in range(READ_ATTEMPTS):
            generation = self._words[WORD_GENERATION]
            if generation == 0:
                return None
            result = self._try_read_head(generation)
            if isinstance(result, HeadRead):
                self._check_fence(result)
                return result
            problem = result
            if self._words[WORD_GENERATION] == generation:
                stable_failures += 1
                if stable_failures >= STABLE_FAILURES:
                    raise SegmentCorruptedError(
                        f"segment file {self.path}: {problem} (generation {generation})"
                    )
                self._backing.pause()
        raise SegmentError(
            f"segment file {self.path}: no consistent snapshot after {READ_ATTEMPTS} attempts"
            f" (last problem: {problem}); the writer republishes faster than this process reads"
        )

    def _check_fence(self, read: HeadRead) -> None:
        """Raise :class:`SnapshotFencedError` if a replaced leader published *read* (verified, and its
        generation seen again after the copy)."""
        # Loaded after the verified copy and the second look at the generation word (x86-64 keeps
        # loads in order). A new leader stores adopted, then term, so a reader that sees the new
        # term sees what it adopted. A reader that still finds the older term word saw the stale
        # publish land before the new term was stored, so it counts as published before the
        # replacement (the new leader's loads after its barrier see it too).
        words = self._words
        term, _ = fence(words)  # a damaged copy never lowers it
        if read.term < term and read.generation != words[WORD_ADOPTED]:
            raise SnapshotFencedError(
                f"segment file {self.path}: generation {read.generation} was published by term {read.term},"
                f" which term {term} replaced; refusing it"
            )

    def _select_slot(self, generation: int) -> tuple[SharedMemory, bytes, int, SlotDescriptor] | str:
        """Find and bounds-check the slot of ``generation``; a problem string if that fails."""
        mapping = self._mm
        header = mapping[:OFF_STATUS]  # one copy: every field below comes from the same bytes
        problem = prefix_problem(header)
        if problem is not None:
            return problem
        for index in range(SLOT_COUNT):
            desc = layout.unpack_descriptor(header, index)
            if desc.generation == generation:
                break
        else:
            return "no slot descriptor carries the published generation"
        problem = _slot_problem(index, desc)
        if problem is not None:
            return problem
        end = desc.offset + desc.length
        try:
            size = self._backing.size()
        except SegmentError as exc:  # pragma: no cover - the descriptor is ours and open
            return str(exc)
        if end > size:
            # Someone truncated the file: touching a mapped page past its end
            # would raise SIGBUS, so check against the file, not the mapping.
            return f"slot {index} ends at byte {end}, beyond the end of the file ({size} bytes)"
        if end > len(mapping):
            # The writer reserved and grew the file before publishing this descriptor, so a
            # larger file is expected; re-fstat and remap rather than read past our mapping.
            remapped = self._remap(end)
            if remapped is None:
                return f"slot {index} ends at byte {end}, beyond the end of the file"
            mapping = remapped
        return mapping, header, index, desc

    def _try_read_head(self, generation: int) -> HeadRead | str:
        selected = self._select_slot(generation)
        if isinstance(selected, str):
            return selected
        mapping, header, index, desc = selected
        table_end = desc.offset + desc.blob_count * TABLE_ENTRY_SIZE
        head_end = table_end + desc.head_length
        start = DESCRIPTOR_OFFSETS[index]
        crc = zlib.crc32(header[start : start + DESCRIPTOR_CRC_SPAN])
        # The table is checked in place (no copy: it may be large); the head is copied
        # first and the copy is what gets verified and returned.
        crc = zlib.crc32(memoryview(mapping)[desc.offset : table_end], crc)
        head = mapping[table_end:head_end]
        if zlib.crc32(head, crc) != desc.crc:
            return f"checksum mismatch in slot {index}"
        if self._words[WORD_GENERATION] != generation:
            return "the generation changed during the read"
        return HeadRead(generation, head, desc.blob_count, desc.term)

    def read_blobs(self, generation: int, indices: Sequence[int]) -> list[bytes] | None:
        """Verified copies of the blobs at ``indices`` of snapshot ``generation``.

        Only the selected blobs are read; each is checked against its own crc.
        Returns None when the segment has moved on to another generation (read
        the head again). Raises :class:`SegmentCorruptedError` for an index
        outside the snapshot or for data that fails its checks.
        """
        return self._read_stable(generation, indices, self._try_read_blobs)

    def copy_blobs(self, generation: int, indices: Sequence[int]) -> list[BlobCopy] | None:
        """Copies of the blobs at ``indices`` of snapshot ``generation``, checked when used.

        What a follower takes from a new snapshot for its settings, to decode
        later: blobs close together are copied with one copy of the span they
        cover, and each blob's checksum is compared by :meth:`BlobCopy.verified`
        when it is decoded rather than here. Returns None and raises as
        :meth:`read_blobs` does.
        """
        return self._read_stable(generation, indices, self._try_copy_blobs)

    def _read_stable(
        self,
        generation: int,
        indices: Sequence[int],
        attempt: Callable[[int, Sequence[int]], list[_Read] | str | None],
    ) -> list[_Read] | None:
        """Run *attempt* until it succeeds, the generation moves (None), or it keeps failing (raise)."""
        self._check_open()
        problem = ""
        for _ in range(STABLE_FAILURES):
            if self._words[WORD_GENERATION] != generation:
                return None
            result = attempt(generation, indices)
            if not isinstance(result, str):
                return result
            if self._words[WORD_GENERATION] != generation:
                return None
            problem = result
            self._backing.pause()
        raise SegmentCorruptedError(f"segment file {self.path}: {problem} (generation {generation})")

    def _blob_spans(
        self, generation: int, indices: Sequence[int]
    ) -> tuple[SharedMemory, int, list[tuple[int, int, int, int]]] | str | None:
        """The mapping, the start of the blob area, and (index, begin, end, crc) of each blob asked for."""
        selected = self._select_slot(generation)
        if isinstance(selected, str):
            return selected
        mapping, _, slot, desc = selected
        count = desc.blob_count
        table_at = desc.offset
        area = table_at + count * TABLE_ENTRY_SIZE + desc.head_length
        area_length = desc.offset + desc.length - area
        crcs_at = table_at + count * layout.BLOB_END_SIZE
        ends: _Entries | tuple[int, ...]
        crcs: _Entries | tuple[int, ...]
        if len(indices) * 8 < count:
            # A few blobs of many (a get() applying its own setting): three small reads each, not a
            # copy and an unpacking of the whole table (25 ms at 100k blobs).
            ends = _Entries(mapping, table_at, _END)
            crcs = _Entries(mapping, crcs_at, _CRC)
        else:
            table = mapping[table_at : table_at + count * TABLE_ENTRY_SIZE]
            ends = struct.unpack_from(f"<{count}Q", table)
            crcs = struct.unpack_from(f"<{count}I", table, count * layout.BLOB_END_SIZE)
        spans = []
        for raw_index in indices:
            i = operator.index(raw_index)
            if not 0 <= i < count:
                if self._words[WORD_GENERATION] != generation:
                    return None
                raise SegmentCorruptedError(
                    f"segment file {self.path}: blob index {i} out of range"
                    f" (generation {generation} has {count} blobs)"
                )
            begin, end = ends[i - 1] if i else 0, ends[i]
            if not begin <= end <= area_length:
                return f"blob {i} spans {begin}..{end}, outside the blob area of slot {slot}"
            spans.append((i, area + begin, area + end, crcs[i]))
        return mapping, area, spans

    def _try_read_blobs(self, generation: int, indices: Sequence[int]) -> list[bytes] | str | None:
        found = self._blob_spans(generation, indices)
        if found is None or isinstance(found, str):
            return found
        mapping, _, spans = found
        blobs = []
        for i, begin, end, crc in spans:
            data = mapping[begin:end]
            if zlib.crc32(data) != crc:
                return f"checksum mismatch in blob {i}"
            blobs.append(data)
        if self._words[WORD_GENERATION] != generation:
            return None
        return blobs

    def _try_copy_blobs(self, generation: int, indices: Sequence[int]) -> list[BlobCopy] | str | None:
        found = self._blob_spans(generation, indices)
        if found is None or isinstance(found, str):
            return found
        mapping, _, spans = found
        where = f"segment file {self.path}, generation {generation}"
        if not spans:
            return []
        low = min(begin for _, begin, _, _ in spans)
        high = max(end for _, _, end, _ in spans)
        if high - low <= 2 * sum(end - begin for _, begin, end, _ in spans) + _ONE_COPY_SLACK:
            whole = memoryview(mapping[low:high])
            blobs = [BlobCopy(whole[b - low : e - low], crc, i, where) for i, b, e, crc in spans]
        else:  # a few blobs far apart: copying what lies between them would waste memory
            blobs = [BlobCopy(memoryview(mapping[b:e]), crc, i, where) for i, b, e, crc in spans]
        if self._words[WORD_GENERATION] != generation:
            return None
        return blobs

    def status(self) -> HeaderStatus:
        """A consistent snapshot of the header fields, for status displays.

        Never raises for a corrupted header: the problem is reported in
        ``header_problem``.
        """
        self._check_open()
        file_size = self._backing.size()
        words = self._words
        mapping = self._mm
        # The descriptors change only with the generation word: retry until both ends agree.
        for _ in range(READ_ATTEMPTS):
            generation = words[WORD_GENERATION]
            header = mapping[:OFF_STATUS]
            if words[WORD_GENERATION] == generation:
                break
        problem = prefix_problem(header)
        prefix = layout.unpack_prefix(header)
        descs = [layout.unpack_descriptor(header, i) for i in range(SLOT_COUNT)]
        slots = tuple(
            SlotInfo(
                i,
                d.generation,
                d.offset,
                d.capacity,
                d.length,
                d.blob_count,
                _time_or_none(d.published_at),
                d.term,
            )
            for i, d in enumerate(descs)
        )
        current = next((i for i, d in enumerate(descs) if generation and d.generation == generation), None)
        block = self._read_status_block() if problem is None else None
        return HeaderStatus(
            path=self.path,
            file_size=file_size,
            formatted=problem is None,
            header_problem=problem,
            format_version=prefix.version if prefix.magic == MAGIC else None,
            generation=generation,
            current_slot=current,
            slots=slots,
            progress=_time_or_none(prefix.progress) if problem is None else None,
            promise=_time_or_none(prefix.promise) if problem is None else None,
            registry_seq=prefix.registry_seq,
            status_available=block is not None,
            leader_pid=(block.leader_pid or None) if block else None,
            leader_create_time=_time_or_none(block.leader_create_time) if block else None,
            leader_pidns=block.leader_pidns if block else 0,
            last_update_ok=_time_or_none(block.last_update_ok) if block else None,
            last_error=block.error_text.decode("utf-8", "replace") if block and block.error_count else None,
            last_error_time=_time_or_none(block.last_error_time) if block else None,
            error_count=block.error_count if block else 0,
            # Single aligned words the leader alone writes: each read whole, no seqlock.
            term=fence(words)[0],
            adopted=words[WORD_ADOPTED],
            leader_changes=words[WORD_LEADER_CHANGES],
            updates_ok=words[WORD_UPDATES_OK],
            declarations_ok=words[WORD_DECLARATIONS_OK],
            declaration_failures=words[WORD_DECLARATION_FAILURES],
            damage_reports=words[WORD_DAMAGE_REPORTS],
        )

    def _read_status_block(self) -> StatusBlock | None:
        """The status block read under its seqlock; None when no consistent copy was seen."""
        words = self._words
        mapping = self._mm
        for attempt in range(STATUS_ATTEMPTS):
            before = words[WORD_STATUS_SEQ]
            if not before & 1:
                block = mapping[OFF_STATUS : OFF_STATUS + STATUS_SIZE]
                if words[WORD_STATUS_SEQ] == before:
                    return layout.unpack_status(block)
            # Bounded: a writer killed mid-update leaves the counter odd for good, and readers
            # must give up rather than spin (invariant 2). Past the first spins, yield the CPU
            # so a live writer that was descheduled can finish (~10 ms in all at most).
            if attempt >= 16:
                self._backing.nap(50e-6)
        return None

    def leader(self) -> tuple[int, float, int, int] | None:
        """(pid, create_time, pidns, bell) of the leader recorded in the status block, or None (none
        recorded, or no consistent read: a writer died in the middle of an update)."""
        self._check_open()
        if prefix_problem(self._mm[:16]) is not None:
            return None
        block = self._read_status_block()
        if block is None or not block.leader_pid or block.leader_create_time <= 0:
            return None
        return block.leader_pid, block.leader_create_time, block.leader_pidns, block.leader_bell

    def update_marks(self) -> tuple[float, int, str | None]:
        """(last successful update, error count, last error text) from the status block, for followers'
        callbacks; (0.0, 0, None) when it cannot be read consistently."""
        self._check_open()
        block = self._read_status_block() if prefix_problem(self._mm[:16]) is None else None
        if block is None:
            return 0.0, 0, None
        text = block.error_text.decode("utf-8", "replace") if block.error_count else None
        return block.last_update_ok, block.error_count, text
