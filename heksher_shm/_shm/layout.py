"""Byte layout of a heksher_shm segment file (pure: no I/O, no mapping).

A segment is one regular file, mapped ``MAP_SHARED`` by every process on the
host that uses it. It starts with a fixed 4096-byte header, followed by the
regions of two *slots*. The elected writer fills the slot that is not current,
then publishes it by storing one aligned 8-byte word (the generation). All
integers are little-endian; times are IEEE-754 doubles, ``0.0`` meaning
"never": epoch seconds, except the two liveness words, which hold
``CLOCK_MONOTONIC`` seconds (host-wide on Linux, and immune to wall-clock steps).

Header (offsets in bytes)::

    offset  size  field                  notes
    ------  ----  ---------------------  ---------------------------------------------
         0     8  magic                  b"HKSHMSEG"
         8     4  format_version  u32    FORMAT_VERSION
        12     4  header_size     u32    HEADER_SIZE (4096)
        16     8  generation      u64    THE publish word; 0 = nothing published
        24     8  progress        f64    monotonic: the leader's last sign of progress
        32     8  status_seq      u64    seqlock over the status block (odd = writing)
        40     8  generation_floor u64   set on (re)format; the next generation exceeds it
        48     8  promise         f64    monotonic: the leader shows progress again by then
        56     8  registry_seq    u64    bumped by any process after it changed its registration
        64    64  slot descriptor 0      see below
       128    64  slot descriptor 1      see below
       192     8  leader_pid      u64    --- status block, guarded by status_seq ---
       200     8  leader_create_time f64  (psutil create_time, so (pid, time) is unique)
       208     8  last_update_ok  f64
       216     8  last_error_time f64
       224     8  error_count     u64    only ever increases
       232     4  error_length    u32    bytes of error text used (<= ERROR_TEXT_MAX)
       236     4  leader_bell     u32    the number of the leader's doorbell (see _shm/bell.py)
       240     8  leader_pidns    u64    the leader's PID namespace (0: unknown)
       248  1024  error_text             UTF-8, truncated on a character boundary
      1272     8  reserved               zero (keeps the words below 8-byte aligned)
      1280     8  term            u64    --- leader words: single aligned stores, no seqlock ---
                                         the fencing token: the term that may publish
      1288     8  adopted         u64    the generation current when the term began (readable
                                         although an older term published it; 0: none)
      1296     8  leader_changes  u64    incremented each time a term begins
      1304     8  updates_ok      u64    successful updates (with last_update_ok)
      1312     8  declarations_ok u64    declarations the service accepted
      1320     8  declaration_failures u64  declarations that failed
      1328     8  term_check      u64    the term times an odd constant (mod 2**64), stored after it
      1336     8  damage_reports  u64    bumped by any process that found the published snapshot
                                         damaged, before it rings the leader (format 5)
      1344  2752  reserved               zero, up to HEADER_SIZE

**Fencing.** A leader takes a term (``term + 1``) right after it takes the
election lock, and every descriptor records the term that published it. A
snapshot whose descriptor carries a lower term than the header's ``term``
word was published by a replaced leader, unless it is the ``adopted`` one
(the snapshot that was current, and readable, when the term began: what the
new leader inherits). Readers refuse the others (see ``reading.py``).
The term is kept twice, as ``term`` and encoded as ``term_check`` (a
bijection of 64-bit words that maps 0 to 0, so a zeroed header agrees with
itself; :func:`fence`): where the two disagree (a damaged byte, or a term
begun half-way by a process killed between the two stores), the higher of
the plausible ones (below 2**53) counts, so that no damage lowers the fence;
the next term is then taken above any count of earlier terms (see
``writing.py``).

Slot descriptor (64 bytes, at ``64 + 64 * index``)::

    offset  size  field                  notes
    ------  ----  ---------------------  ---------------------------------------------
        +0     8  generation      u64    0 while the writer fills the slot
        +8     8  offset          u64    absolute file offset of the slot region
       +16     8  capacity        u64    bytes reserved for the region
       +24     8  length          u64    bytes used: table + head + blobs
       +32     4  blob_count      u32
       +36     4  head_length     u32
       +40     8  term            u64    the term of the leader that published it
       +48     8  published_at    f64
       +56     4  crc             u32    crc32 of bytes +0..+56, then table, then head
       +60     4  reserved

Slot region (at ``descriptor.offset``, ``n = blob_count``)::

    offset        size        field
    ------------  ----------  --------------------------------------------------
    0             8 * n       blob ends: u64 end offset of blob i in the blob area
    8 * n         4 * n       blob crcs: u32 crc32 of blob i
    12 * n        head_length head (opaque bytes supplied by the caller)
    12 * n + h    ...         blob area: the blobs back to back

Blob ``i`` is ``blob_area[ends[i - 1]:ends[i]]`` (``ends[-1]`` read as 0). The
table is a structure of arrays rather than an array of structs so the writer
can build it with two ``array.tobytes()`` calls instead of a Python loop over
100k entries; a reader looks up one blob with three small reads.

The slot crc covers the descriptor, the table and the head; each blob carries
its own crc, so reading a few blobs never touches the data of the others.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

__all__ = [
    "BLOB_CRC_SIZE",
    "BLOB_END_SIZE",
    "DESCRIPTOR_CRC_SPAN",
    "DESCRIPTOR_OFFSETS",
    "DESCRIPTOR_SIZE",
    "ERROR_TEXT_MAX",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "OFF_ADOPTED",
    "OFF_DAMAGE_REPORTS",
    "OFF_DECLARATIONS_OK",
    "OFF_DECLARATION_FAILURES",
    "OFF_ERROR_COUNT",
    "OFF_GENERATION",
    "OFF_GENERATION_FLOOR",
    "OFF_LEADER_CHANGES",
    "OFF_PROGRESS",
    "OFF_PROMISE",
    "OFF_REGISTRY_SEQ",
    "OFF_STATUS",
    "OFF_STATUS_SEQ",
    "OFF_TERM",
    "OFF_TERM_CHECK",
    "OFF_UPDATES_OK",
    "PAGE",
    "PLAUSIBLE_TERM",
    "SLOT_COUNT",
    "STATUS_SIZE",
    "TABLE_ENTRY_SIZE",
    "WORD_ADOPTED",
    "WORD_DAMAGE_REPORTS",
    "WORD_DECLARATIONS_OK",
    "WORD_DECLARATION_FAILURES",
    "WORD_ERROR_COUNT",
    "WORD_GENERATION",
    "WORD_LEADER_CHANGES",
    "WORD_MASK",
    "WORD_PROGRESS",
    "WORD_PROMISE",
    "WORD_REGISTRY_SEQ",
    "WORD_STATUS_SEQ",
    "WORD_TERM",
    "WORD_TERM_CHECK",
    "WORD_UPDATES_OK",
    "HeaderPrefix",
    "SlotDescriptor",
    "StatusBlock",
    "align_up",
    "encode_error_text",
    "fence",
    "format_header",
    "pack_descriptor",
    "pack_status",
    "slot_capacity_for",
    "term_check",
    "unpack_descriptor",
    "unpack_prefix",
    "unpack_status",
]

MAGIC = b"HKSHMSEG"
"""First 8 bytes of every formatted segment."""

FORMAT_VERSION = 5
"""Bumped on any incompatible layout change; readers refuse other versions."""

HEADER_SIZE = 4096
"""Fixed header size; slot regions start at or after this offset."""

PAGE = 4096
"""Alignment of slot regions (and the unit in which capacity is reserved)."""

SLOT_COUNT = 2
"""Double buffering: one current slot readers use, one the writer fills."""

# Header field offsets. Every word that is read or written on its own sits on an
# 8-byte boundary so one aligned load/store moves it whole (see segment.py).
OFF_MAGIC = 0
OFF_VERSION = 8
OFF_HEADER_SIZE = 12
OFF_GENERATION = 16
OFF_PROGRESS = 24
OFF_STATUS_SEQ = 32
OFF_GENERATION_FLOOR = 40
OFF_PROMISE = 48
OFF_REGISTRY_SEQ = 56
OFF_DESCRIPTORS = 64
DESCRIPTOR_SIZE = 64
OFF_STATUS = 192
OFF_ERROR_COUNT = 224
ERROR_TEXT_MAX = 1024
STATUS_SIZE = 56 + ERROR_TEXT_MAX
"""Bytes of the status block, fixed part plus error text."""
# The leader words: each written whole by the leader alone, read whole by anyone.
OFF_TERM = 1280
OFF_ADOPTED = 1288
OFF_LEADER_CHANGES = 1296
OFF_UPDATES_OK = 1304
OFF_DECLARATIONS_OK = 1312
OFF_DECLARATION_FAILURES = 1320
OFF_TERM_CHECK = 1328
OFF_DAMAGE_REPORTS = 1336

# Indices into the header viewed as an array of 8-byte words.
WORD_GENERATION = OFF_GENERATION // 8
WORD_PROGRESS = OFF_PROGRESS // 8
WORD_PROMISE = OFF_PROMISE // 8
WORD_REGISTRY_SEQ = OFF_REGISTRY_SEQ // 8
WORD_STATUS_SEQ = OFF_STATUS_SEQ // 8
WORD_ERROR_COUNT = OFF_ERROR_COUNT // 8
WORD_TERM = OFF_TERM // 8
WORD_ADOPTED = OFF_ADOPTED // 8
WORD_LEADER_CHANGES = OFF_LEADER_CHANGES // 8
WORD_UPDATES_OK = OFF_UPDATES_OK // 8
WORD_DECLARATIONS_OK = OFF_DECLARATIONS_OK // 8
WORD_DECLARATION_FAILURES = OFF_DECLARATION_FAILURES // 8
WORD_TERM_CHECK = OFF_TERM_CHECK // 8
WORD_DAMAGE_REPORTS = OFF_DAMAGE_REPORTS // 8
WORD_MASK = (1 << 64) - 1
PLAUSIBLE_TERM = 1 << 53
"""Terms are counts, or microseconds since the epoch: a term word at or above this is damaged."""
_CHECK_FACTOR = 0x9E3779B97F4A7C15  # odd, so multiplying by it is a bijection of 64-bit words
_CHECK_INVERSE = pow(_CHECK_FACTOR, -1, 1 << 64)

BLOB_END_SIZE = 8
BLOB_CRC_SIZE = 4
TABLE_ENTRY_SIZE = BLOB_END_SIZE + BLOB_CRC_SIZE
"""Bytes of blob table per blob (end offset + crc)."""

DESCRIPTOR_CRC_SPAN = 56
"""The descriptor bytes (from its start) that its crc covers."""

# magic, version, header_size, generation, progress, status seq, floor, promise, registry seq
_PREFIX = struct.Struct("<8sIIQdQQdQ")
_DESCRIPTOR = struct.Struct("<QQQQIIQdI4x")
_LEADER_WORDS = struct.Struct("<QQ")  # term and adopted, as a fresh header holds them
_STATUS_FIXED = struct.Struct("<QdddQIIQ")

assert _PREFIX.size == 64
assert _DESCRIPTOR.size == DESCRIPTOR_SIZE
assert _STATUS_FIXED.size == 56
assert OFF_STATUS + STATUS_SIZE <= HEADER_SIZE
assert OFF_DESCRIPTORS + SLOT_COUNT * DESCRIPTOR_SIZE == OFF_STATUS
assert _DESCRIPTOR.size - 8 == DESCRIPTOR_CRC_SPAN  # the crc and the reserved word are not covered
assert OFF_STATUS + STATUS_SIZE <= OFF_TERM
assert OFF_TERM % 8 == 0
assert OFF_DAMAGE_REPORTS + 8 <= HEADER_SIZE

DESCRIPTOR_OFFSETS = tuple(OFF_DESCRIPTORS + i * DESCRIPTOR_SIZE for i in range(SLOT_COUNT))
"""Header offset of each slot descriptor."""


class HeaderPrefix(NamedTuple):
    """The first 64 header bytes, decoded."""

    magic: bytes
    version: int
    header_size: int
    generation: int
    progress: float
    status_seq: int
    generation_floor: int
    promise: float
    registry_seq: int


class SlotDescriptor(NamedTuple):
    """One decoded slot descriptor; every field is untrusted until checked."""

    generation: int
    offset: int
    capacity: int
    length: int
    blob_count: int
    head_length: int
    term: int
    published_at: float
    crc: int


class StatusBlock(NamedTuple):
    """The decoded status block (without its seqlock)."""

    leader_pid: int
    leader_create_time: float
    last_update_ok: float
    last_error_time: float
    error_count: int
    error_text: bytes
    leader_bell: int = 0
    leader_pidns: int = 0


def unpack_prefix(header: bytes) -> HeaderPrefix:
    """Decode the first 64 bytes of a header copy."""
    return HeaderPrefix._make(_PREFIX.unpack_from(header, 0))


def unpack_descriptor(header: bytes, index: int) -> SlotDescriptor:
    """Decode slot descriptor ``index`` from a copy of (at least) the first 192 header bytes."""
    return SlotDescriptor._make(_DESCRIPTOR.unpack_from(header, DESCRIPTOR_OFFSETS[index]))


def pack_descriptor(desc: SlotDescriptor) -> bytes:
    """Encode a slot descriptor (64 bytes)."""
    return _DESCRIPTOR.pack(*desc)


def unpack_status(block: bytes) -> StatusBlock:
    """Decode a copy of the status block; the error text length is clamped to what fits."""
    pid, create_time, update_ok, error_time, count, length, bell, pidns = _STATUS_FIXED.unpack_from(block, 0)
    length = min(length, ERROR_TEXT_MAX)
    start = _STATUS_FIXED.size
    text = block[start : start + length]
    return StatusBlock(pid, create_time, update_ok, error_time, count, text, bell, pidns)


def pack_status(status: StatusBlock) -> bytes:
    """Encode the status block, error text padded with zeros to its fixed size."""
    text = status.error_text[:ERROR_TEXT_MAX]
    fixed = _STATUS_FIXED.pack(
        status.leader_pid,
        status.leader_create_time,
        status.last_update_ok,
        status.last_error_time,
        status.error_count,
        len(text),
        status.leader_bell,
        status.leader_pidns,
    )
    return fixed + text.ljust(ERROR_TEXT_MAX, b"\0")


def format_header(generation_floor: int, term: int = 0) -> bytes:
    """A freshly formatted header: no snapshot, no leader, the given generation floor and term
    (nothing adopted, every counter zero)."""
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, 0, 0.0, 0, generation_floor, 0.0, 0)
    header = bytearray(HEADER_SIZE)
    header[: len(prefix)] = prefix
    _LEADER_WORDS.pack_into(header, OFF_TERM, term, 0)
    struct.pack_into("<Q", header, OFF_TERM_CHECK, term_check(term))
    return bytes(header)


def term_check(term: int) -> int:
    """The ``term_check`` word of *term*."""
    return (term * _CHECK_FACTOR) & WORD_MASK


def fence(words: Sequence[int]) -> tuple[int, bool]:
    """The fencing term the header's words (an array of 8-byte words) name, and whether its two copies
    disagree. Agreeing, they are the term (whatever its size). Disagreeing, the higher plausible copy
    counts, so that a damaged copy never lowers the fence (and ``WORD_MASK``, which fences every term,
    when neither is plausible)."""
    term = int(words[WORD_TERM])
    copy = (int(words[WORD_TERM_CHECK]) * _CHECK_INVERSE) & WORD_MASK
    if term == copy:
        return term, False
    plausible = [t for t in (term, copy) if t < PLAUSIBLE_TERM]
    return max(plausible, default=WORD_MASK), True


def encode_error_text(message: str) -> bytes:
    """UTF-8 of ``message``, cut to at most ERROR_TEXT_MAX bytes without splitting a character."""
    # backslashreplace: lone surrogates (e.g. from os.fsdecode) must not make error reporting fail.
    raw = message.encode("utf-8", "backslashreplace")
    if len(raw) <= ERROR_TEXT_MAX:
        return raw
    # Dropping a partial trailing sequence is all "ignore" can do here: the rest is valid UTF-8.
    return raw[:ERROR_TEXT_MAX].decode("utf-8", "ignore").encode("utf-8")


def align_up(value: int, alignment: int = PAGE) -> int:
    """Round ``value`` up to a multiple of ``alignment``."""
    return -(-value // alignment) * alignment


def slot_capacity_for(needed: int) -> int:
    """Capacity to reserve for a slot that must hold ``needed`` bytes.

    One eighth of slack (then page rounding) absorbs the small size changes of
    steady-state republishing without growing the file, while two slots stay
    close to 2x the payload.
    """
    return max(PAGE, align_up(needed + needed // 8))
