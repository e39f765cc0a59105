"""The files a host's processes share, and nothing above them (no engine, no clients).

Modules, each one job, imports pointing down the list::

    segment.py      Segment: one memory-mapped file, its lock-free readers and its one writer
    writing.py        publishing (double-buffered), terms (fencing tokens), the status writes
    reading.py        verified snapshot reads (fenced) and the status seqlock
    records.py          what readers hand out: verified heads, blob copies, header views
    mapped.py         mapping, growing and closing the file, over a backing
    backing.py        every host operation a segment needs (the real file, or a simulation's)
    layout.py       the segment's byte layout (pure)
    registry.py     the registry folder: one registration per process, scanned by the leader
    registration.py   the registration record and its checks
    election.py     the leader lock (flock), fork-safe, and its takeover
    bell.py         doorbells: Unix datagram sockets a sleeping process wakes on
    identity.py     who a process is (pid, start time, PID namespace) and whether it lives
    folder.py       where the files live: the private per-user folder
    files.py        one policy for every file and folder: what is refused, what is repaired
"""
