"""Importable child-process bodies for tests/test_segment.py (spawn needs module-level functions).

Every payload is derived from its generation alone, so a reader can check each
byte it got against what the writer must have published for that generation:
any mix of two snapshots is caught.
"""

from __future__ import annotations

import os
import random
import time
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier, Event
from typing import Any

from heksher_shm._shm.segment import Segment

# Every GROWTH_EVERY-th generation is large, and larger each time round, so the file
# has to grow several times while readers are reading.
GROWTH_EVERY = 23


def blob_count_for(generation: int) -> int:
    """How many blobs the snapshot of ``generation`` holds."""
    if generation % GROWTH_EVERY == 0:
        return 200 + 100 * ((generation // GROWTH_EVERY) % 12)
    return 3 + generation % 17


def blob_for(generation: int, index: int) -> bytes:
    """Blob ``index`` of generation ``generation``: cheap to rebuild, distinct per generation."""
    unit = f"<{generation}:{index}>".encode()
    length = (generation * 7919 + index * 104729) % (3000 if generation % GROWTH_EVERY == 0 else 400)
    return (unit * (length // len(unit) + 1))[:length]


def head_for(generation: int) -> bytes:
    """The head of generation ``generation``."""
    return f"head gen={generation} blobs={blob_count_for(generation)} ".encode() * (1 + generation % 5)


def payload_for(generation: int) -> tuple[bytes, list[bytes]]:
    """Head and blobs the writer publishes as ``generation``."""
    return head_for(generation), [blob_for(generation, i) for i in range(blob_count_for(generation))]


def publish_next(segment: Segment) -> int:
    """Publish the payload of the next generation; the generation is predicted, then checked."""
    expected = segment.generation() + 1
    generation = segment.publish(*payload_for(expected))
    if generation != expected:
        raise AssertionError(f"published generation {generation}, expected {expected}")
    return generation


def check_snapshot(segment: Segment, indices_rng: random.Random) -> str:
    """Read one snapshot and verify it byte for byte: 'ok', 'none', 'moved' or 'torn: ...'."""
    head = segment.read_head()
    if head is None:
        return "none"
    generation = head.generation
    if head.head != head_for(generation) or head.blob_count != blob_count_for(generation):
        return f"torn: head of generation {generation}"
    count = head.blob_count
    indices = sorted({0, count - 1, indices_rng.randrange(count), indices_rng.randrange(count)})
    blobs = segment.read_blobs(generation, indices)
    if blobs is None:
        return "moved"
    for index, blob in zip(indices, blobs, strict=True):
        if blob != blob_for(generation, index):
            return f"torn: blob {index} of generation {generation}"
    return "ok"


def writer_loop(path: str, barrier: Barrier, stop: Event, results: Connection) -> None:
    """Publish continuously until ``stop``; report how many generations were published."""
    published = 0
    try:
        with Segment.open(path) as segment:
            publish_next(segment)  # readers always find something once the barrier opens
            barrier.wait(timeout=30)
            while not stop.is_set():
                publish_next(segment)
                published += 1
            results.send({"published": published, "error": None})
    except BaseException:
        results.send({"published": published, "error": traceback.format_exc()})


def reader_loop(path: str, barrier: Barrier, duration: float, results: Connection) -> None:
    """Read and verify snapshots in a tight loop for ``duration`` seconds; report the counts."""
    counts: dict[str, Any] = {"ok": 0, "none": 0, "moved": 0, "torn": 0, "errors": 0, "first_problem": None}
    rng = random.Random(os.getpid())
    try:
        with Segment.open(path) as segment:
            barrier.wait(timeout=30)
            deadline = time.monotonic() + duration
            while time.monotonic() < deadline:
                try:
                    outcome = check_snapshot(segment, rng)
                except Exception:
                    counts["errors"] += 1
                    counts["first_problem"] = counts["first_problem"] or traceback.format_exc()
                    continue
                if outcome.startswith("torn"):
                    counts["torn"] += 1
                    counts["first_problem"] = counts["first_problem"] or outcome
                else:
                    counts[outcome] += 1
            counts["mapped_size"] = len(segment._mm)
    except BaseException:
        counts["errors"] += 1
        counts["first_problem"] = counts["first_problem"] or traceback.format_exc()
    results.send(counts)


def doomed_writer(path: str, progress: Connection, sizes: Sequence[int]) -> None:
    """Publish large generation-derived payloads forever; gets SIGKILLed.

    After each publish it reports (generation, seconds the whole cycle took), so
    the parent can aim its kill at a random point of a cycle.
    """
    with Segment.open(path) as segment:
        round_ = 0
        started = time.perf_counter()
        while True:
            expected = segment.generation() + 1
            size = sizes[round_ % len(sizes)]
            segment.publish(doomed_head(expected, size), big_blobs_for(expected, size))
            now = time.perf_counter()
            progress.send((expected, now - started))
            started = now
            round_ += 1


def doomed_head(generation: int, size: int) -> bytes:
    """The head ``doomed_writer`` publishes: most of the payload, and it names the size.

    A big head makes the window the kill should hit wide: the writer copies the
    head into the slot and checksums it after un-claiming the slot, while blob
    checksums are computed before.
    """
    label = f"doomed gen={generation} size={size};".encode()
    return (label * (size * 3 // 4 // len(label) + 1))[: size * 3 // 4]


def size_of_doomed_head(head: bytes) -> int:
    """The size a ``doomed_head`` names."""
    return int(head.split(b";", 1)[0].rsplit(b"=", 1)[1])


def big_blobs_for(generation: int, size: int) -> list[bytes]:
    """Four blobs totalling about a quarter of ``size`` bytes, derived from ``generation``."""
    unit = f"[{generation}]".encode()
    piece = unit * (size // 16 // len(unit) + 1)
    return [piece[: size // 16 - i] for i in range(4)]


def error_message(count: int) -> str:
    """The error text recorded as error number ``count`` (its length varies with ``count``)."""
    return f"error #{count} " * (1 + count % 60)


def error_writer_loop(path: str, ready: Event, stop: Event) -> None:
    """Record errors as fast as possible so readers race the status seqlock."""
    with Segment.open(path) as segment:
        count = 0
        segment.record_error(error_message(count + 1), float(count + 1))
        count += 1
        ready.set()
        while not stop.is_set():
            count += 1
            segment.record_error(error_message(count), float(count))
