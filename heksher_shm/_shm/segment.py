"""The shared-memory segment: create/open/grow, publish, verified read, status words.

The byte format is drawn in :mod:`heksher_shm._shm.layout`. This module adds the
I/O and the concurrency protocol:

* **One writer, lock-free readers.** Only the elected leader writes (the
  election guarantees one writer per segment). Readers never take a lock
  shared with another process, so a reader SIGKILLed at any instant blocks
  nobody.
* **Double buffering.** The writer fills the slot that is *not* current, then
  publishes it with one aligned 8-byte store of the generation word. A reader
  reads the generation ``g``, picks the slot whose descriptor carries ``g``,
  bounds-checks, copies, verifies the crc and re-reads the generation: if it
  is still ``g`` the writer cannot have touched that slot meanwhile (it only
  writes the non-current slot, and generations never repeat), so the copy is a
  complete snapshot. A writer killed at any point leaves the previous
  generation current and intact.
* **Seqlock for the status block.** Leader identity and the last error are not
  covered by the generation word; they sit behind a sequence counter (odd while
  being written). Readers retry a bounded number of times and then report the
  block as unavailable, so a writer killed mid-update cannot make them spin.
* **Only grow.** Shrinking or truncating a mapped file raises SIGBUS in every
  process that maps it, so the file never shrinks. Space is reserved with
  ``posix_fallocate`` before it is used, so a full disk is an error in the
  writer's ``publish``, never a SIGBUS in a reader.
* **Hostile input.** Every offset and length read from the file is checked
  against the mapping before use. Garbage yields :class:`SegmentCorruptedError`
  or "no snapshot", and the next ``publish`` reformats in place.

Memory ordering: CPython emits no fences. On x86-64 (TSO) stores become visible
in program order, which is what the protocol relies on; on weaker machines the
crc check is the backstop (a reader may retry, but never accepts a mix).
"""

from __future__ import annotations

import array
import contextlib
import errno
import mmap
import operator
import os
import pathlib
import struct
import sys
import tempfile
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from types import TracebackType
from typing import NamedTuple, TypeVar

from heksher_shm._shm import files, layout
from heksher_shm._shm.identity import pid_namespace
from heksher_shm._shm.layout import (
    DESCRIPTOR_CRC_SPAN,
    DESCRIPTOR_OFFSETS,
    DESCRIPTOR_SIZE,
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    OFF_STATUS,
    PAGE,
    SLOT_COUNT,
    STATUS_SIZE,
    TABLE_ENTRY_SIZE,
    WORD_ERROR_COUNT,
    WORD_GENERATION,
    WORD_PROGRESS,
    WORD_PROMISE,
    WORD_REGISTRY_SEQ,
    WORD_STATUS_SEQ,
    SlotDescriptor,
    StatusBlock,
)
from heksher_shm.exceptions import SegmentCorruptedError, SegmentError

__all__ = ["BlobCopy", "HeadRead", "HeaderStatus", "Segment", "SlotInfo", "resolve_shm_dir"]

ENV_SHM_DIR = "HEKSHER_SHM_DIR"
"""Environment variable naming the directory for segments and helper files."""

READ_ATTEMPTS = 100
"""Upper bound on snapshot read attempts while the writer keeps publishing."""

STABLE_FAILURES = 5
"""Failed checks with an unchanged generation before a reader calls it corruption.

A failure while the generation stays put cannot be a publish in progress on a
TSO machine; the few extra tries absorb store reordering on weaker ones.
"""

STATUS_ATTEMPTS = 200
"""Upper bound on seqlock read attempts for the status block (then "unavailable")."""

_DEV_SHM = "/dev/shm"
_DIR_PREFIX = "heksher_shm-"
_GENERATION_LIMIT = 1 << 63  # generations at or above this are treated as garbage
_WORD_MASK = (1 << 64) - 1
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")

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
assert WORD_GENERATION == 2  # generation() inlines the index

if array.array("I").itemsize != 4 or array.array("Q").itemsize != 8:  # pragma: no cover
    raise ImportError("heksher_shm needs 4-byte array('I') and 8-byte array('Q')")


class HeadRead(NamedTuple):
    """A verified copy of a snapshot's head."""

    generation: int
    """The generation the head belongs to; pass it to :meth:`Segment.read_blobs`."""
    head: bytes
    """The head bytes exactly as given to :meth:`Segment.publish`."""
    blob_count: int
    """How many blobs the snapshot holds."""


class BlobCopy(NamedTuple):
    """A blob copied out of a snapshot (see :meth:`Segment.copy_blobs`), not yet checked."""

    data: memoryview
    crc: int
    """The checksum the snapshot's table gives for it."""
    number: int
    """Its index in the snapshot."""
    where: str
    """The segment file and generation it came from, for the error message."""

    def verified(self) -> memoryview:
        """The blob's bytes; raises :class:`SegmentCorruptedError` if they fail their checksum."""
        if zlib.crc32(self.data) != self.crc:
            raise SegmentCorruptedError(f"{self.where}: checksum mismatch in blob {self.number}")
        return self.data


_Read = TypeVar("_Read", bytes, BlobCopy)

_ONE_COPY_SLACK = 64 * 1024
"""copy_blobs copies the span its blobs cover at once unless that holds more than twice their size
plus this many bytes of other blobs."""


@dataclass(frozen=True)
class SlotInfo:
    """What a slot descriptor says (for observability; not verified against the data)."""

    index: int
    generation: int
    offset: int
    capacity: int
    length: int
    blob_count: int
    published_at: float | None


@dataclass(frozen=True)
class HeaderStatus:
    """A consistent view of a segment's header, for status displays and staleness checks.

    Time fields are epoch seconds, ``None`` meaning "never", except ``progress``
    and ``promise``, which are ``time.monotonic()`` seconds. Leader and error
    fields are ``None`` (and ``status_available`` is false) when the status
    block could not be read consistently, which happens when a writer died in
    the middle of updating it; the next writer update repairs it.
    """

    path: pathlib.Path
    file_size: int
    formatted: bool
    header_problem: str | None
    """Why the header is unusable (``None`` when it is fine)."""
    format_version: int | None
    generation: int
    current_slot: int | None
    slots: tuple[SlotInfo, ...]
    progress: float | None
    """When the leader last showed progress (monotonic seconds)."""
    promise: float | None
    """When the leader promised to show progress again at the latest (monotonic seconds)."""
    registry_seq: int
    status_available: bool
    leader_pid: int | None
    leader_create_time: float | None
    leader_pidns: int
    last_update_ok: float | None
    last_error: str | None
    last_error_time: float | None
    error_count: int


def _time_or_none(value: float) -> float | None:
    # 0.0 marks "never"; NaN or negative values can only come from a scribbled header.
    return value if value > 0.0 else None


def _prefix_problem(header: bytes) -> str | None:
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


def _region_usable(desc: SlotDescriptor, file_size: int) -> bool:
    """Whether a descriptor's region can be reused by the writer as is."""
    return (
        desc.offset >= HEADER_SIZE
        and desc.offset % PAGE == 0
        and desc.capacity > 0
        and desc.offset + desc.capacity <= file_size
    )


_live_segments: weakref.WeakSet[Segment] = weakref.WeakSet()


def _reset_after_fork() -> None:
    """In a forked child (called by :mod:`heksher_shm._process.fork`): new writer locks for every open
    segment."""
    # A thread of the parent may hold a writer lock at fork time; the child has no such
    # thread, so an inherited locked Lock would deadlock a child that later becomes leader.
    for segment in list(_live_segments):
        segment._write_lock = threading.Lock()


class Segment:
    """One memory-mapped segment file: a lock-free reader, and the writer when elected.

    Create instances with :meth:`open`. Reading methods may be called from any
    number of threads and processes (also in a child after ``fork()``: the
    ``MAP_SHARED`` mapping is inherited). Writing methods must only be called
    by the elected leader; the election guarantees one writer per file.
    """

    path: pathlib.Path
    """The segment file."""

    def __init__(self, path: pathlib.Path, fd: int, mapping: mmap.mmap) -> None:
        """Wrap an open, checked descriptor and its mapping; use :meth:`open` instead."""
        self.path = path
        self._fd = fd
        self._closed = False
        self._write_lock = threading.Lock()
        self._install(mapping)
        _live_segments.add(self)

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: os.PathLike[str] | str, *, create: bool = True) -> Segment:
        """Open the segment file at ``path``, creating it (mode 0600) if missing.

        With ``create=False`` a missing file raises :class:`SegmentError`
        instead (for status tools that must not leave files behind).

        Never blocks and never follows a symlink. Raises :class:`SegmentError`
        (naming the path and the reason) for a symlink, FIFO, directory or other
        non-regular file, a file owned by another user, or one with group/other
        permission bits. A new, empty or unformatted file is fine: it simply has
        no snapshot yet (:meth:`generation` is 0).
        """
        if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
            # The hot path reads the generation as a native word; the layout is little-endian.
            raise SegmentError(f"segment file {path}: big-endian hosts are not supported")
        seg_path = pathlib.Path(os.path.abspath(os.fspath(path)))
        fd = files.open_private_file("segment file", seg_path, create=create, writable=True)
        try:
            st = os.fstat(fd)
            if st.st_size < HEADER_SIZE:
                # Every opener, reader or writer, makes sure the header exists, so every
                # mapping covers it and generation() is a plain load with no size check.
                # fallocate only ever extends; it never cuts what another process wrote.
                _reserve(seg_path, fd, 0, HEADER_SIZE)
                st = os.fstat(fd)
            mapping = _map(seg_path, fd, st.st_size)
        except BaseException:
            os.close(fd)
            raise
        return cls(seg_path, fd, mapping)

    def _install(self, mapping: mmap.mmap) -> None:
        # The old mapping is not closed: another thread may still be reading through it.
        # It is unmapped when the last reference goes.
        header = memoryview(mapping)[:HEADER_SIZE]
        self._words = header.cast("Q")
        self._floats = header.cast("d")
        self._mm = mapping

    def _remap(self, min_size: int) -> mmap.mmap | None:
        """Map the file anew if it now holds ``min_size`` bytes; None if it does not."""
        try:
            size = os.fstat(self._fd).st_size
        except OSError:
            return None
        if size < min_size:
            # Check the real file size first: mapping beyond the end of the file and
            # touching it would SIGBUS.
            return None
        current = self._mm
        if len(current) >= min_size:
            return current
        mapping = _map(self.path, self._fd, size)
        self._install(mapping)
        return mapping

    def is_replaced(self) -> bool:
        """Whether the path no longer names the file this segment maps (removed or replaced).

        A process that keeps using an unlinked segment talks to nobody new: a
        newcomer creates a fresh file at the path. One ``lstat`` and one
        ``fstat``; meant for periodic checks, not the hot path.
        """
        self._check_open()
        try:
            named = os.lstat(self.path)
        except FileNotFoundError:
            return True
        except OSError as exc:
            raise SegmentError(f"segment file {self.path}: cannot inspect it: {exc.strerror}") from exc
        mapped = os.fstat(self._fd)
        return (named.st_dev, named.st_ino) != (mapped.st_dev, mapped.st_ino)

    def _check_open(self) -> None:
        if self._closed:
            raise SegmentError(f"segment file {self.path}: segment is closed")

    def close(self) -> None:
        """Unmap and close the file. Idempotent; other methods raise afterwards."""
        if self._closed:
            return
        self._closed = True
        _live_segments.discard(self)
        mapping = self._mm
        try:
            self._words.release()
            self._floats.release()
            mapping.close()
        except BufferError:
            # A thread still holds a view; the mapping goes away with the last reference.
            pass
        os.close(self._fd)

    def __del__(self) -> None:
        """Close a segment that was dropped without :meth:`close`, so its descriptor is not leaked."""
        # getattr: __init__ may have failed before _closed was set.
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):  # nothing useful to do while being collected
                self.close()

    def __enter__(self) -> Segment:
        """Return self; the segment is closed on exit."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the segment."""
        self.close()

    def __repr__(self) -> str:
        """Path and state, for logs."""
        state = "closed" if self._closed else f"generation={self._words[WORD_GENERATION]}"
        return f"<Segment {str(self.path)!r} {state}>"

    # ------------------------------------------------------------------ reading

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

    def registry_seq(self) -> int:
        """The registry change counter (see :meth:`bump_registry_seq`). One aligned load."""
        return self._words[WORD_REGISTRY_SEQ]

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

    def error_count(self) -> int:
        """How many errors the leader recorded; only ever increases. One aligned load."""
        return self._words[WORD_ERROR_COUNT]

    def read_head(self) -> HeadRead | None:
        """A verified copy of the current snapshot's head, or None when nothing was published.

        Retries while the writer publishes (at most :data:`READ_ATTEMPTS` times).
        Raises :class:`SegmentCorruptedError` when the header, the descriptor or
        the checksum keeps failing with the generation unchanged, and
        :class:`SegmentError` if the writer republishes faster than this
        process can copy.
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
                return result
            problem = result
            if self._words[WORD_GENERATION] == generation:
                stable_failures += 1
                if stable_failures >= STABLE_FAILURES:
                    raise SegmentCorruptedError(
                        f"segment file {self.path}: {problem} (generation {generation})"
                    )
                os.sched_yield()
        raise SegmentError(
            f"segment file {self.path}: no consistent snapshot after {READ_ATTEMPTS} attempts"
            f" (last problem: {problem}); the writer republishes faster than this process reads"
        )

    def _select_slot(self, generation: int) -> tuple[mmap.mmap, bytes, int, SlotDescriptor] | str:
        """Find and bounds-check the slot of ``generation``; a problem string if that fails."""
        mapping = self._mm
        header = mapping[:OFF_STATUS]  # one copy: every field below comes from the same bytes
        problem = _prefix_problem(header)
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
            size = os.fstat(self._fd).st_size
        except OSError as exc:  # pragma: no cover - the descriptor is ours and open
            return f"cannot stat the segment file: {exc.strerror}"
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
        return HeadRead(generation, head, desc.blob_count)

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
            os.sched_yield()
        raise SegmentCorruptedError(f"segment file {self.path}: {problem} (generation {generation})")

    def _blob_spans(
        self, generation: int, indices: Sequence[int]
    ) -> tuple[mmap.mmap, int, list[tuple[int, int, int, int]]] | str | None:
        """The mapping, the start of the blob area, and (index, begin, end, crc) of each blob asked for."""
        selected = self._select_slot(generation)
        if isinstance(selected, str):
            return selected
        mapping, _, slot, desc = selected
        count = desc.blob_count
        table_at = desc.offset
        area = table_at + count * TABLE_ENTRY_SIZE + desc.head_length
        area_length = desc.offset + desc.length - area
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
        try:
            file_size = os.fstat(self._fd).st_size
        except OSError as exc:  # pragma: no cover - the descriptor is ours and open
            raise SegmentError(f"segment file {self.path}: cannot stat: {exc.strerror}") from exc
        words = self._words
        mapping = self._mm
        # The descriptors change only with the generation word: retry until both ends agree.
        for _ in range(READ_ATTEMPTS):
            generation = words[WORD_GENERATION]
            header = mapping[:OFF_STATUS]
            if words[WORD_GENERATION] == generation:
                break
        problem = _prefix_problem(header)
        prefix = layout.unpack_prefix(header)
        descs = [layout.unpack_descriptor(header, i) for i in range(SLOT_COUNT)]
        slots = tuple(
            SlotInfo(
                i, d.generation, d.offset, d.capacity, d.length, d.blob_count, _time_or_none(d.published_at)
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
                time.sleep(50e-6)
        return None

    # ------------------------------------------------------------------ writing

    def publish(self, head: bytes, blobs: Sequence[bytes]) -> int:  # noqa: PLR0915 (the crash-point hooks)
        """Publish a new snapshot (``head`` and ``blobs``) and return its generation.

        Writer only. Fills the slot that is not current, then makes it current
        with one aligned store of the generation word. Formats the header first
        when it is missing or corrupted, and grows the file (never shrinks it)
        when the slot is too small, reserving the space before using it: a full
        disk raises :class:`SegmentError` here rather than SIGBUS anywhere. On
        any error the previously published snapshot stays intact and readable.
        """
        self._check_open()
        count = len(blobs)
        # Built by C loops (map/accumulate/array) so 100k blobs cost milliseconds, not a
        # Python-level loop per entry.
        ends = array.array("Q", accumulate(map(len, blobs)))
        crcs = array.array("I", map(zlib.crc32, blobs))
        blob_bytes = ends[-1] if count else 0
        table_length = count * TABLE_ENTRY_SIZE
        needed = table_length + len(head) + blob_bytes
        with self._write_lock:
            self._ensure_formatted()
            mapping = self._refresh_mapping()
            header = mapping[:OFF_STATUS]
            prefix = layout.unpack_prefix(header)
            descs = [layout.unpack_descriptor(header, i) for i in range(SLOT_COUNT)]
            if prefix.generation >= _GENERATION_LIMIT or prefix.generation_floor >= _GENERATION_LIMIT:
                # No sane successor generation exists: start over with a fresh floor.
                self._format()
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
            _reserve(self.path, self._fd, offset, capacity if fresh else max(needed, 1))
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
            desc = SlotDescriptor(generation, offset, capacity, needed, count, len(head), time.time(), 0)
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
            # 4. The slot claims the new generation (one aligned word) ...
            words[descriptor_word] = generation
            if _crash_point is not None:
                _crash_point("claimed")
            # 5. ... and this single aligned store publishes it. Killed before it, readers
            #    keep the previous snapshot; after it, they see the complete new one.
            words[WORD_GENERATION] = generation
            if _crash_point is not None:
                _crash_point("published")
            return generation

    def _refresh_mapping(self) -> mmap.mmap:
        """The writer's mapping, remapped when another process (a dead leader) grew the file."""
        try:
            size = os.fstat(self._fd).st_size
        except OSError as exc:  # pragma: no cover - the descriptor is ours and open
            raise SegmentError(f"segment file {self.path}: cannot stat: {exc.strerror}") from exc
        if size > len(self._mm):
            self._install(_map(self.path, self._fd, size))
        return self._mm

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

    def _ensure_formatted(self) -> None:
        """Format the header in place when it is not a valid header of this version."""
        if _prefix_problem(self._mm[:16]) is not None:
            self._format()

    def _format(self) -> None:
        """Write a fresh header: no snapshot, no leader, and a generation floor that
        keeps generations from repeating (a reader may still hold an old one)."""
        words = self._words
        old = [
            w
            for w in (words[WORD_GENERATION], words[layout.OFF_GENERATION_FLOOR // 8])
            if w < _GENERATION_LIMIT
        ]
        floor = max(old, default=0)
        size = os.fstat(self._fd).st_size
        if size > HEADER_SIZE or self._mm[:HEADER_SIZE] != bytes(HEADER_SIZE):
            # Something was here before, maybe with a garbage generation word a reader saw.
            # Microseconds since the epoch exceed any count of earlier publishes.
            floor = max(floor, time.time_ns() // 1000)
        words[WORD_GENERATION] = 0  # first: readers see "nothing published" from here on
        if _crash_point is not None:
            _crash_point("format-cleared")
        fresh = layout.format_header(floor)
        self._mm[8:HEADER_SIZE] = fresh[8:]
        if _crash_point is not None:
            _crash_point("format-body")
        self._mm[:8] = fresh[:8]  # the magic last: a header with our magic is complete

    # ------------------------------------------------------------------ status fields (writer)

    def _update_status(self, change: Callable[[StatusBlock], StatusBlock]) -> None:
        """Rewrite the status block under its seqlock (writer only)."""
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

    def set_leader(self, pid: int, create_time: float, bell: int = 0, pidns: int = 0) -> None:
        """Record the leader: (pid, create_time, pidns) survives pid reuse and names its PID
        namespace; *bell* numbers its doorbell. Writer only."""
        self._update_status(
            lambda block: block._replace(
                leader_pid=pid, leader_create_time=create_time, leader_bell=bell, leader_pidns=pidns
            )
        )

    def leader(self) -> tuple[int, float, int, int] | None:
        """(pid, create_time, pidns, bell) of the leader recorded in the status block, or None (none
        recorded, or no consistent read: a writer died in the middle of an update)."""
        self._check_open()
        if _prefix_problem(self._mm[:16]) is not None:
            return None
        block = self._read_status_block()
        if block is None or not block.leader_pid or block.leader_create_time <= 0:
            return None
        return block.leader_pid, block.leader_create_time, block.leader_pidns, block.leader_bell

    def update_marks(self) -> tuple[float, int, str | None]:
        """(last successful update, error count, last error text) from the status block, for followers'
        callbacks; (0.0, 0, None) when it cannot be read consistently."""
        self._check_open()
        block = self._read_status_block() if _prefix_problem(self._mm[:16]) is None else None
        if block is None:
            return 0.0, 0, None
        text = block.error_text.decode("utf-8", "replace") if block.error_count else None
        return block.last_update_ok, block.error_count, text

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
        """Record the time of the last successful update from the service. Writer only."""
        self._update_status(lambda block: block._replace(last_update_ok=when))

    def record_error(self, message: str, when: float) -> None:
        """Record an error (text cut to 1 KiB of UTF-8) and increase the error count. Writer only."""
        text = layout.encode_error_text(message)
        self._update_status(
            lambda block: block._replace(
                error_text=text, last_error_time=when, error_count=(block.error_count + 1) & _WORD_MASK
            )
        )


# ---------------------------------------------------------------------- helpers


def _reserve(path: pathlib.Path, fd: int, offset: int, length: int) -> None:
    """posix_fallocate, with errors (ENOSPC above all) turned into SegmentError."""
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        raise SegmentError(
            f"segment file {path}: cannot reserve {length} bytes at offset {offset}: {exc.strerror}"
        ) from exc


def _map(path: pathlib.Path, fd: int, size: int) -> mmap.mmap:
    try:
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError, OverflowError) as exc:
        raise SegmentError(f"segment file {path}: cannot map {size} bytes: {exc}") from exc


def shm_dir_path(shm_dir: str | os.PathLike[str] | None = None) -> tuple[pathlib.Path, bool]:
    """Where the segment directory is, and whether it was given explicitly; checks and creates nothing.

    ``shm_dir`` if given, else the ``HEKSHER_SHM_DIR`` environment variable
    (either exactly as given), else ``/dev/shm/heksher_shm-<euid>-<pidns>``
    when ``/dev/shm`` is a directory, else ``<tempdir>/heksher_shm-<euid>-<pidns>``.
    ``<pidns>`` is the PID namespace (:func:`~heksher_shm._shm.identity.pid_namespace`):
    containers that share ``/dev/shm`` but not their PIDs get a folder
    each by default, as they cannot tell each other's processes apart. It is
    left out (``heksher_shm-<euid>``) where the namespace cannot be read.
    """
    if shm_dir is None:
        shm_dir = os.environ.get(ENV_SHM_DIR) or None
    if shm_dir is not None:
        return pathlib.Path(os.path.abspath(os.fspath(shm_dir))), True
    base = _DEV_SHM if os.path.isdir(_DEV_SHM) else tempfile.gettempdir()
    namespace = pid_namespace()
    suffix = f"-{namespace}" if namespace else ""
    return pathlib.Path(base) / f"{_DIR_PREFIX}{os.geteuid()}{suffix}", False


def resolve_shm_dir(shm_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """The private directory for segments and helper files, created 0700 if missing.

    Choice: ``shm_dir`` if given, else the ``HEKSHER_SHM_DIR`` environment
    variable, else ``/dev/shm/heksher_shm-<euid>-<pidns>`` when ``/dev/shm``
    is a directory, else ``<tempdir>/heksher_shm-<euid>-<pidns>`` (see
    :func:`shm_dir_path`). Raises
    :class:`SegmentError` (naming the path and the reason) when it is a
    symlink, not a directory, or owned by another user. A default directory of
    ours with group/other bits is tightened to 0700; an explicit one is refused
    if group or others may write to it.
    """
    path, explicit = shm_dir_path(shm_dir)
    if explicit:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SegmentError(f"segment directory {path}: cannot create its parent: {exc.strerror}") from exc
    created = False
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        pass  # created by us earlier or by a concurrent process; checked below either way
    except OSError as exc:
        raise SegmentError(f"segment directory {path}: cannot create it: {exc.strerror}") from exc
    try:
        # O_NOFOLLOW + O_DIRECTORY: the checks and the chmod apply to the directory itself,
        # never to what a symlink planted under this name points to.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):
            reason = "is a symbolic link; refusing to follow it"
        elif exc.errno == errno.ENOTDIR:
            reason = "is not a directory"
        else:
            reason = f"cannot open it: {exc.strerror}"
        raise SegmentError(f"segment directory {path}: {reason}") from exc
    try:
        problem, tighten = files.directory_problem(os.fstat(fd), ours=not explicit)
        if problem is not None and not created:
            raise SegmentError(f"segment directory {path}: {problem}")
        if created or tighten:
            # Ours and meant to be private: the umask may have widened or narrowed it.
            os.fchmod(fd, 0o700)
    except OSError as exc:
        raise SegmentError(f"segment directory {path}: cannot check or set its mode: {exc.strerror}") from exc
    finally:
        os.close(fd)
    return path
