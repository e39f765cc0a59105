"""The shared-memory segment: one file, its lock-free readers and its one writer.

The byte format is drawn in :mod:`heksher_shm._shm.layout`. The I/O and the
concurrency protocol are split by job:

* :mod:`~heksher_shm._shm.backing`: every host operation (the checked file
  descriptor, ``posix_fallocate``, ``mmap``, the clock, yields, the barrier),
  behind one small protocol a simulation can implement;
* :mod:`~heksher_shm._shm.mapped`: the mapping over a backing, grown (never
  shrunk: that would SIGBUS every reader) and remapped;
* :mod:`~heksher_shm._shm.reading`: lock-free verified reads of a snapshot
  (refusing what a replaced leader published) and the bounded seqlock read
  of the status block, handing out the values of :mod:`~heksher_shm._shm.records`;
* :mod:`~heksher_shm._shm.writing`: the one writer, double-buffered, whose
  single aligned store of the generation word publishes a snapshot, and its
  terms (fencing tokens);
* :mod:`~heksher_shm._shm.folder`: the private folder the files live in.

Memory ordering: CPython emits no fences. On x86-64 (TSO) stores become visible
in program order, which is what the protocol relies on; on weaker machines the
crc check is the backstop (a reader may retry, but never accepts a mix). The
one store that must not wait behind later loads, a new term's, is followed by
the backing's barrier.
"""

from __future__ import annotations

from heksher_shm._shm.backing import Backing, FileBacking
from heksher_shm._shm.folder import ENV_SHM_DIR, resolve_shm_dir, shm_dir_path
from heksher_shm._shm.reading import READ_ATTEMPTS
from heksher_shm._shm.records import BlobCopy, HeaderStatus, HeadRead, SlotInfo
from heksher_shm._shm.writing import SegmentWriter

__all__ = [
    "ENV_SHM_DIR",
    "READ_ATTEMPTS",
    "Backing",
    "BlobCopy",
    "FileBacking",
    "HeadRead",
    "HeaderStatus",
    "Segment",
    "SlotInfo",
    "resolve_shm_dir",
    "shm_dir_path",
]


class Segment(SegmentWriter):
    """One memory-mapped segment file: a lock-free reader, and the writer when elected.

    Create instances with :meth:`open` (a real file), or :meth:`over` (any
    :class:`~heksher_shm._shm.backing.Backing`: a simulated mapping runs the
    same reading and writing code). Reading methods may be called from any
    number of threads and processes (also in a child after ``fork()``: the
    ``MAP_SHARED`` mapping is inherited). Writing methods must only be called
    by the elected leader; the election guarantees one writer per file.

    The layers: :class:`~heksher_shm._shm.mapped.MappedFile` (mapping,
    growing, closing, over a backing), :class:`~heksher_shm._shm.reading.SegmentReader` (the
    verified reads and the status seqlock) and
    :class:`~heksher_shm._shm.writing.SegmentWriter` (publishing and the status
    writes).
    """
