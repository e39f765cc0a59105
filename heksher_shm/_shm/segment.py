"""The shared-memory segment: one file, its lock-free readers and its one writer.

The byte format is drawn in :mod:`heksher_shm._shm.layout`. The I/O and the
concurrency protocol are split by job:

* :mod:`~heksher_shm._shm.mapped`: opening the file safely, mapping it
  ``MAP_SHARED``, growing it (never shrinking: that would SIGBUS every reader);
* :mod:`~heksher_shm._shm.reading`: lock-free verified reads of a snapshot and
  the bounded seqlock read of the status block;
* :mod:`~heksher_shm._shm.writing`: the one writer, double-buffered, whose
  single aligned store of the generation word publishes a snapshot;
* :mod:`~heksher_shm._shm.folder`: the private folder the files live in.

Memory ordering: CPython emits no fences. On x86-64 (TSO) stores become visible
in program order, which is what the protocol relies on; on weaker machines the
crc check is the backstop (a reader may retry, but never accepts a mix).
"""

from __future__ import annotations

from heksher_shm._shm.folder import ENV_SHM_DIR, resolve_shm_dir, shm_dir_path
from heksher_shm._shm.reading import READ_ATTEMPTS, BlobCopy, HeaderStatus, HeadRead, SlotInfo
from heksher_shm._shm.writing import SegmentWriter

__all__ = [
    "ENV_SHM_DIR",
    "READ_ATTEMPTS",
    "BlobCopy",
    "HeadRead",
    "HeaderStatus",
    "Segment",
    "SlotInfo",
    "resolve_shm_dir",
    "shm_dir_path",
]


class Segment(SegmentWriter):
    """One memory-mapped segment file: a lock-free reader, and the writer when elected.

    Create instances with :meth:`open`. Reading methods may be called from any
    number of threads and processes (also in a child after ``fork()``: the
    ``MAP_SHARED`` mapping is inherited). Writing methods must only be called
    by the elected leader; the election guarantees one writer per file.

    The layers: :class:`~heksher_shm._shm.mapped.MappedFile` (opening, mapping,
    growing, closing), :class:`~heksher_shm._shm.reading.SegmentReader` (the
    verified reads and the status seqlock) and
    :class:`~heksher_shm._shm.writing.SegmentWriter` (publishing and the status
    writes).
    """
