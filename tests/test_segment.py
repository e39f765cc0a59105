"""The shared-memory segment: format, publish, verified reads, growth, status words, hostile files.

Multi-process behaviour runs in real processes synchronised with barriers,
events and pipes under named deadlines; children are always reaped.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import socket
import stat
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from heksher_shm._shm import folder, identity, layout
from heksher_shm._shm.segment import HeadRead, Segment, resolve_shm_dir
from heksher_shm.exceptions import SegmentCorruptedError, SegmentError, SnapshotFencedError
from tests import _segment_workers as workers
from tests._support import peek, poke

IS_ROOT = os.geteuid() == 0
NOBODY = 65534
SPAWN = multiprocessing.get_context("spawn")
CHILD_DEADLINE = 30.0  # seconds any child may take before the test calls it hung


# ---------------------------------------------------------------------- helpers


@pytest.fixture
def seg_path(tmp_path: Path) -> Path:
    """Where the test's segment file lives."""
    return tmp_path / "segment"


@pytest.fixture
def writer(seg_path: Path) -> Iterator[Segment]:
    """An open segment, used as the (single) writer."""
    with Segment.open(seg_path) as segment:
        yield segment


def read_everything(segment: Segment) -> tuple[int, bytes, list[bytes]] | None:
    """The current snapshot as (generation, head, blobs), or None."""
    head = segment.read_head()
    if head is None:
        return None
    blobs = segment.read_blobs(head.generation, range(head.blob_count))
    assert blobs is not None
    return head.generation, head.head, blobs


def assert_repaired(path: Path, above: int = 0) -> None:
    """A new writer can publish over whatever is in the file, and a fresh reader gets exactly that."""
    with Segment.open(path) as new_writer:
        generation = new_writer.publish(b"repaired head", [b"r1", b"", b"r3" * 500])
        assert generation > above
    with Segment.open(path) as reader:
        assert read_everything(reader) == (generation, b"repaired head", [b"r1", b"", b"r3" * 500])
        assert reader.status().formatted


def reap(processes: list[Any]) -> None:
    """Kill and join children that are still around (always called from a finally)."""
    for process in processes:
        if process.pid is None:
            continue  # never started
        if process.is_alive():
            process.kill()
        process.join(CHILD_DEADLINE)


def receive(conn: Connection, what: str) -> Any:
    """One message from a child, or a failure naming what did not arrive in time."""
    if not conn.poll(CHILD_DEADLINE):
        pytest.fail(f"no {what} within {CHILD_DEADLINE} s")
    try:
        return conn.recv()
    except EOFError:
        pytest.fail(f"no {what}: the child exited without sending it")


# ---------------------------------------------------------------------- basics


def test_round_trip(writer: Segment, seg_path: Path) -> None:
    assert writer.generation() == 0
    assert writer.read_head() is None
    generation = writer.publish(b"the head", [b"one", b"", b"three" * 1000])
    assert generation == writer.generation() == 1
    with Segment.open(seg_path) as reader:
        assert reader.generation() == 1
        assert reader.read_head() == HeadRead(1, b"the head", 3)
        assert reader.read_blobs(1, [2, 0, 1]) == [b"three" * 1000, b"one", b""]
        assert reader.read_blobs(1, []) == []
    assert stat.S_IMODE(os.stat(seg_path).st_mode) == 0o600


def test_copy_blobs_checks_when_used(writer: Segment, seg_path: Path) -> None:
    """copy_blobs: the same bytes as read_blobs, each checked by verified(), not before."""
    blobs = [bytes([i]) * (100 + i) for i in range(10)]
    generation = writer.publish(b"head", blobs)
    with Segment.open(seg_path) as reader:
        copies = reader.copy_blobs(generation, [7, 2, 3])
        assert copies is not None
        assert [bytes(c.verified()) for c in copies] == [blobs[7], blobs[2], blobs[3]]
        # one copy for blobs close together: they share its buffer
        assert copies[0].data.obj is copies[1].data.obj
        assert reader.copy_blobs(generation, []) == []
        assert reader.copy_blobs(generation + 1, [0]) is None  # not the published generation
        with pytest.raises(SegmentCorruptedError, match="out of range"):
            reader.copy_blobs(generation, [10])
        damaged = copies[0]._replace(crc=copies[0].crc ^ 1)
        with pytest.raises(SegmentCorruptedError, match="checksum mismatch in blob 7"):
            damaged.verified()


def test_copy_blobs_far_apart_are_copied_apart(writer: Segment, seg_path: Path) -> None:
    """Two small blobs with a megabyte between them: two small copies, not one that spans it."""
    blobs = [b"first", b"x" * (1 << 20), b"last"]
    generation = writer.publish(b"", blobs)
    with Segment.open(seg_path) as reader:
        copies = reader.copy_blobs(generation, [0, 2])
        assert copies is not None
        assert [bytes(c.verified()) for c in copies] == [b"first", b"last"]
        assert all(len(c.data.obj) < 100 for c in copies)  # type: ignore[arg-type]


def test_empty_head_and_no_blobs(writer: Segment) -> None:
    generation = writer.publish(b"", [])
    assert writer.read_head() == HeadRead(generation, b"", 0)
    assert writer.read_blobs(generation, []) == []


def test_existing_empty_file_has_no_snapshot(seg_path: Path) -> None:
    os.close(os.open(seg_path, os.O_CREAT | os.O_WRONLY, 0o600))
    with Segment.open(seg_path) as segment:
        assert segment.generation() == 0
        assert segment.read_head() is None
        assert segment.read_blobs(1, [0]) is None
        status = segment.status()
        assert not status.formatted
        assert status.header_problem == "not formatted"
        assert status.generation == 0
        assert status.leader_pid is None
        # Opening reserves the header so every mapping covers the generation word.
        assert os.path.getsize(seg_path) == layout.HEADER_SIZE


def test_created_file_is_0600_despite_umask(seg_path: Path) -> None:
    old = os.umask(0o077 | 0o200)  # would leave the owner without write permission
    try:
        Segment.open(seg_path).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(seg_path).st_mode) == 0o600


def test_many_generations(writer: Segment, seg_path: Path) -> None:
    with Segment.open(seg_path) as reader:
        previous = 0
        for generation in range(1, 301):
            head, blobs = workers.payload_for(generation)
            assert writer.publish(head, blobs) == generation
            assert reader.generation() == generation
            assert read_everything(reader) == (generation, head, blobs)
            if previous:
                # The caller holding an older generation is told to re-read the head.
                assert reader.read_blobs(previous, [0]) is None
            previous = generation


def test_blob_selection_out_of_100k(writer: Segment, seg_path: Path) -> None:
    blobs = [b"%d" % i * (i % 7) for i in range(100_000)]
    generation = writer.publish(b"many", blobs)
    with Segment.open(seg_path) as reader:
        assert reader.read_head() == HeadRead(generation, b"many", 100_000)
        picks = [0, 1, 7, 50_000, 99_998, 99_999]
        assert reader.read_blobs(generation, picks) == [blobs[i] for i in picks]
        with pytest.raises(SegmentCorruptedError, match="blob index 100000 out of range"):
            reader.read_blobs(generation, [100_000])
        with pytest.raises(SegmentCorruptedError, match="blob index -1 out of range"):
            reader.read_blobs(generation, [-1])


def test_close_is_idempotent_and_final(seg_path: Path) -> None:
    segment = Segment.open(seg_path)
    segment.publish(b"h", [])
    segment.close()
    segment.close()
    with pytest.raises(SegmentError, match="closed"):
        segment.read_head()
    with pytest.raises(SegmentError, match="closed"):
        segment.publish(b"h", [])
    with pytest.raises(ValueError):
        segment.generation()
    assert "closed" in repr(segment)


def test_open_without_create(seg_path: Path) -> None:
    with pytest.raises(SegmentError, match=rf"{seg_path}: does not exist"):
        Segment.open(seg_path, create=False)
    assert not seg_path.exists()
    Segment.open(seg_path).close()
    Segment.open(seg_path, create=False).close()


def test_is_replaced(writer: Segment, seg_path: Path) -> None:
    assert not writer.is_replaced()
    seg_path.unlink()
    assert writer.is_replaced()
    with Segment.open(seg_path) as newcomer:
        assert not newcomer.is_replaced()
        assert writer.is_replaced()


def test_concurrent_creation(seg_path: Path) -> None:
    threads = 8
    barrier = threading.Barrier(threads)
    opened: list[Segment] = []
    failures: list[BaseException] = []

    def open_it() -> None:
        barrier.wait(timeout=CHILD_DEADLINE)
        try:
            opened.append(Segment.open(seg_path))
        except BaseException as exc:
            failures.append(exc)

    workers_ = [threading.Thread(target=open_it) for _ in range(threads)]
    for thread in workers_:
        thread.start()
    for thread in workers_:
        thread.join(CHILD_DEADLINE)
    try:
        assert not failures
        assert len(opened) == threads
        generation = opened[0].publish(b"x", [b"y"])
        assert all(s.read_head() == HeadRead(generation, b"x", 1) for s in opened)
    finally:
        for segment in opened:
            segment.close()


# ---------------------------------------------------------------------- growth


def test_growth_remaps_readers_and_never_shrinks(writer: Segment, seg_path: Path) -> None:
    writer.publish(b"small", [b"a" * 100])
    with Segment.open(seg_path) as reader:
        mapped_before = len(reader._mm)
        big = [bytes([i]) * 50_000 for i in range(40)]  # 2 MB, far beyond the first slot
        generation = writer.publish(b"big", big)
        assert reader.read_head() == HeadRead(generation, b"big", 40)
        assert reader.read_blobs(generation, [39, 0]) == [big[39], big[0]]
        assert len(reader._mm) > mapped_before  # the reader remapped on its own

        for _ in range(10):
            generation = writer.publish(b"big", big)
        size = os.path.getsize(seg_path)
        # Steady-state republishing reuses both slots: the file stops growing.
        for _ in range(10):
            generation = writer.publish(b"big again", big)
        assert os.path.getsize(seg_path) == size
        payload = 2_000_000 + 40 * layout.TABLE_ENTRY_SIZE + len(b"big again")
        assert size <= 2.5 * payload

        # A small payload after a big one: the file never shrinks (readers would SIGBUS).
        generation = writer.publish(b"small again", [b"z"])
        assert os.path.getsize(seg_path) == size
        assert read_everything(reader) == (generation, b"small again", [b"z"])


def test_gradual_growth_keeps_the_file_bounded(writer: Segment, seg_path: Path) -> None:
    size = 10_000
    for _ in range(40):
        size = size * 11 // 10
        writer.publish(b"", [b"g" * size])
    # Two slots with slack plus at most one abandoned region: a few times the payload, not a
    # sum over every size ever published.
    assert os.path.getsize(seg_path) <= 4 * size + 4 * layout.PAGE
    assert read_everything(writer) == (40, b"", [b"g" * size])


def test_full_disk_fails_the_publish_not_the_readers(
    writer: Segment, seg_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generation = writer.publish(b"kept", [b"k" * 100])
    real_fallocate = os.posix_fallocate

    def full_disk(fd: int, offset: int, length: int) -> None:
        if offset + length > os.fstat(fd).st_size:
            raise OSError(28, "No space left on device")
        real_fallocate(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", full_disk)
    with pytest.raises(SegmentError, match=r"segment file .*: cannot reserve .*No space left"):
        writer.publish(b"too big", [b"x" * 1_000_000])
    with Segment.open(seg_path) as reader:
        assert read_everything(reader) == (generation, b"kept", [b"k" * 100])
    monkeypatch.setattr(os, "posix_fallocate", real_fallocate)
    assert writer.publish(b"fits now", [b"x" * 1_000_000]) == generation + 1


# ---------------------------------------------------------------------- status words


def test_status_fields(writer: Segment, seg_path: Path) -> None:
    writer.set_leader(4242, 1234.5, 7)
    writer.beat(1000.25, 1060.5)
    writer.record_update_ok(999.5)
    generation = writer.publish(b"h", [b"b"])
    with Segment.open(seg_path) as reader:
        status = reader.status()
        assert status.path == seg_path
        assert status.formatted
        assert status.header_problem is None
        assert status.format_version == layout.FORMAT_VERSION
        assert status.generation == generation
        assert status.current_slot == 0
        assert status.slots[0].generation == generation
        assert status.slots[0].blob_count == 1
        assert status.slots[0].published_at is not None
        assert status.file_size == os.path.getsize(seg_path)
        assert status.leader_pid == 4242
        assert status.leader_create_time == 1234.5
        assert (status.progress, status.promise) == reader.liveness() == (1000.25, 1060.5)
        assert reader.leader() == (4242, 1234.5, 0, 7)
        assert status.last_update_ok == 999.5
        assert status.status_available
        assert status.error_count == reader.error_count() == 0
        assert status.last_error is None
        assert status.last_error_time is None

        writer.record_error("first", 5.0)
        writer.record_error("second failure", 6.0)
        writer.beat(time.monotonic(), time.monotonic() + 60)
        status = reader.status()
        assert status.error_count == reader.error_count() == 2
        assert status.last_error == "second failure"
        assert status.last_error_time == 6.0
        assert status.progress is not None
        assert abs(status.progress - time.monotonic()) < 60
        assert reader.update_marks() == (999.5, 2, "second failure")
        assert status.leader_pid == 4242  # other fields survive the update

        writer.publish(b"h2", [])
        status = reader.status()
        assert status.current_slot == 1
        assert status.slots[1].generation == generation + 1


def test_writer_status_calls_format_an_unformatted_file(writer: Segment) -> None:
    writer.set_leader(7, 8.0)
    status = writer.status()
    assert status.formatted
    assert status.leader_pid == 7
    assert status.generation == 0
    # Publishing afterwards keeps the leader fields: the header is not formatted twice.
    writer.publish(b"h", [])
    assert writer.status().leader_pid == 7


def test_error_text_is_cut_on_a_character_boundary(writer: Segment) -> None:
    writer.record_error("a" + "é" * 1000, 1.0)
    text = writer.status().last_error
    assert text is not None
    assert text == "a" + "é" * 511  # 1 + 511 * 2 = 1023 bytes: the 512th "é" would split
    assert len(text.encode()) <= layout.ERROR_TEXT_MAX
    writer.record_error("lone surrogate \udcff", 2.0)
    assert writer.status().last_error == "lone surrogate \\udcff"


def test_status_seqlock_left_odd_by_a_killed_writer(writer: Segment, seg_path: Path) -> None:
    writer.set_leader(11, 12.0)
    writer.record_error("before", 1.0)
    writer.publish(b"h", [])
    seq = struct.unpack("<Q", peek(seg_path, layout.OFF_STATUS_SEQ, 8))[0]
    assert seq % 2 == 0
    poke(seg_path, layout.OFF_STATUS_SEQ, struct.pack("<Q", seq + 1))  # died mid-update
    with Segment.open(seg_path) as reader:
        started = time.monotonic()
        status = reader.status()
        assert time.monotonic() - started < 2.0  # bounded: gives up instead of spinning
        assert not status.status_available
        assert status.leader_pid is None
        assert status.last_error is None
        assert status.generation == 1  # the rest of the header stays readable
        assert reader.read_head() == HeadRead(1, b"h", 0)

        with Segment.open(seg_path) as next_writer:
            next_writer.record_error("after", 2.0)
        status = reader.status()
        assert status.status_available
        assert status.error_count == 2
        assert status.last_error == "after"
        assert status.leader_pid == 11


def test_status_seqlock_under_a_writing_process(seg_path: Path) -> None:
    Segment.open(seg_path).close()
    ready, stop = SPAWN.Event(), SPAWN.Event()
    process = SPAWN.Process(target=workers.error_writer_loop, args=(str(seg_path), ready, stop))
    process.start()
    try:
        assert ready.wait(CHILD_DEADLINE), "error writer did not start"
        seen = consistent = 0
        with Segment.open(seg_path) as reader:
            deadline = time.monotonic() + 0.7
            while time.monotonic() < deadline:
                status = reader.status()
                if not status.status_available:
                    continue
                seen += 1
                count = status.error_count
                if count:
                    assert status.last_error == workers.error_message(count)
                    assert status.last_error_time == float(count)
                    consistent += 1
        assert consistent > 0, seen
    finally:
        stop.set()
        process.join(CHILD_DEADLINE)
        reap([process])
    assert process.exitcode == 0


# ---------------------------------------------------------------------- processes


def _forked_reader(segment: Segment, conn: Connection) -> None:
    try:
        first = segment.read_head()
        conn.send(first)
        conn.recv()  # the parent published again
        conn.send(read_everything(segment))
        # A parent thread held the writer lock at fork time; the child's copy is fresh.
        conn.send(segment.publish(b"from child", [b"c"]))
    except BaseException as exc:
        conn.send(repr(exc))


def test_inherited_segment_works_in_forked_child(writer: Segment) -> None:
    generation = writer.publish(b"parent", [b"p"])
    fork = multiprocessing.get_context("fork")
    parent_conn, child_conn = fork.Pipe()
    with writer._write_lock:  # as if a parent thread were publishing at fork time
        process = fork.Process(target=_forked_reader, args=(writer, child_conn))
        process.start()
    try:
        assert receive(parent_conn, "first read") == HeadRead(generation, b"parent", 1)
        second = writer.publish(b"parent 2", [b"q"])
        parent_conn.send("go")
        assert receive(parent_conn, "second read") == (second, b"parent 2", [b"q"])
        assert receive(parent_conn, "child publish") == second + 1
        assert read_everything(writer) == (second + 1, b"from child", [b"c"])
    finally:
        reap([process])


def test_no_torn_reads_under_continuous_publishing(seg_path: Path) -> None:
    readers = 3
    duration = 2.0
    barrier = SPAWN.Barrier(readers + 1)
    stop = SPAWN.Event()
    processes: list[Any] = []
    try:
        writer_in, writer_out = SPAWN.Pipe(duplex=False)
        processes.append(
            SPAWN.Process(target=workers.writer_loop, args=(str(seg_path), barrier, stop, writer_out))
        )
        reader_pipes = []
        for _ in range(readers):
            reader_in, reader_out = SPAWN.Pipe(duplex=False)
            reader_pipes.append(reader_in)
            processes.append(
                SPAWN.Process(target=workers.reader_loop, args=(str(seg_path), barrier, duration, reader_out))
            )
        for process in processes:
            process.start()
        results = [receive(pipe, "reader result") for pipe in reader_pipes]
        stop.set()
        written = receive(writer_in, "writer result")
    finally:
        stop.set()
        reap(processes)

    assert written["error"] is None, written["error"]
    problems = [r["first_problem"] for r in results if r["first_problem"]]
    assert sum(r["torn"] for r in results) == 0, problems
    assert sum(r["errors"] for r in results) == 0, problems
    assert all(r["ok"] > 50 for r in results), results
    assert written["published"] > 100, written
    # Growth happened during the run and every reader followed it by remapping.
    assert os.path.getsize(seg_path) > 16 * layout.PAGE
    assert all(r["mapped_size"] > 4 * layout.PAGE for r in results), results


def test_writer_killed_mid_publish(seg_path: Path) -> None:
    server = multiprocessing.get_context("forkserver")
    # Children fork from a server that already imported the package: ~ms per child.
    server.set_forkserver_preload(["tests._segment_workers"])
    rng = random.Random(20240601)
    sizes = [300_000, 1_500_000, 3_000_000, 800_000]  # alternating sizes make kills land in growth too
    last_reported = rounds = killed_inside = 0
    # At least 20 kills, and go on (boundedly) until one provably hit the inside of a publish.
    while rounds < 20 or (killed_inside == 0 and rounds < 60):
        rounds += 1
        rng.shuffle(sizes)
        progress_in, progress_out = server.Pipe(duplex=False)
        process = server.Process(
            target=workers.doomed_writer, args=(str(seg_path), progress_out, list(sizes))
        )
        process.start()
        progress_out.close()
        try:
            longest_cycle = 0.0
            for _ in range(rng.randint(2, 4)):
                last_reported, cycle = receive(progress_in, "publish report")
                longest_cycle = max(longest_cycle, cycle)
            # The sleep synchronises nothing: it only picks a random point of a publish cycle
            # for the kill, and every outcome is checked below whatever the point was.
            time.sleep(rng.uniform(0, longest_cycle))
            process.kill()  # SIGKILL
        finally:
            reap([process])
        assert process.exitcode == -signal.SIGKILL
        # The child may have run ahead of what we read: collect the rest of its reports.
        while True:
            try:
                last_reported, _ = progress_in.recv()
            except EOFError:
                break
        progress_in.close()
        with Segment.open(seg_path) as reader:
            head = reader.read_head()
            assert head is not None
            # The published snapshot is the last reported one or the one after it, complete.
            assert head.generation in (last_reported, last_reported + 1)
            size = workers.size_of_doomed_head(head.head)
            assert head.head == workers.doomed_head(head.generation, size)
            assert reader.read_blobs(head.generation, range(4)) == workers.big_blobs_for(
                head.generation, size
            )
            status = reader.status()
            assert status.current_slot is not None
            other = status.slots[1 - status.current_slot]
            # Un-claimed target slot, or claimed but not yet published: the kill hit a publish.
            killed_inside += other.generation == 0 or other.generation > head.generation
            last_reported = head.generation
    assert killed_inside > 0, f"no kill out of {rounds} landed inside a publish"
    assert_repaired(seg_path, above=last_reported)


# ---------------------------------------------------------------------- hostile files


def _symlink(path: Path) -> None:
    target = path.with_name("target")
    os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o600))
    path.symlink_to(target)


def _dangling_symlink(path: Path) -> None:
    path.symlink_to(path.with_name("does-not-exist"))


def _fifo(path: Path) -> None:
    os.mkfifo(path, 0o600)


def _directory(path: Path) -> None:
    path.mkdir(mode=0o700)


def _socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()


def _mode(mode: int) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.fchmod(fd, mode)
        os.close(fd)

    return make


def _foreign(path: Path) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    os.chown(path, NOBODY, NOBODY)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        pytest.param(_symlink, "symbolic link", id="symlink"),
        pytest.param(_dangling_symlink, "symbolic link", id="dangling-symlink"),
        pytest.param(_fifo, "FIFO", id="fifo"),
        pytest.param(_directory, "directory", id="directory"),
        pytest.param(_socket, "not a regular file", id="socket"),
        pytest.param(_mode(0o644), "mode 0o644; group/other", id="world-readable"),
        pytest.param(_mode(0o620), "mode 0o620; group/other", id="group-writable"),
        pytest.param(
            _foreign,
            f"owned by uid {NOBODY}",
            id="foreign-owner",
            marks=pytest.mark.skipif(not IS_ROOT, reason="chown to another uid needs root"),
        ),
    ],
)
def test_refuses_unsafe_files(seg_path: Path, make: Callable[[Path], None], reason: str) -> None:
    make(seg_path)
    before = os.lstat(seg_path)
    with pytest.raises(SegmentError) as info:
        Segment.open(seg_path)
    assert str(seg_path) in str(info.value)
    assert reason in str(info.value)
    after = os.lstat(seg_path)
    assert (after.st_mode, after.st_size, after.st_uid) == (before.st_mode, before.st_size, before.st_uid)


def _publish_valid(path: Path) -> int:
    with Segment.open(path) as segment:
        segment.publish(b"valid head 1", [b"b1", b"b2" * 100])
        return segment.publish(b"valid head 2", [b"c1" * 300, b"c2"])


def _current_descriptor_offset(path: Path) -> int:
    generation = struct.unpack("<Q", peek(path, layout.OFF_GENERATION, 8))[0]
    for offset in layout.DESCRIPTOR_OFFSETS:
        if struct.unpack("<Q", peek(path, offset, 8))[0] == generation:
            return offset
    raise AssertionError("no current descriptor")


_DESCRIPTOR_FIELDS = {
    "offset": (8, "<Q"),
    "capacity": (16, "<Q"),
    "length": (24, "<Q"),
    "blob_count": (32, "<I"),
}


def _descriptor(**fields: int) -> Callable[[Path], None]:
    """Damage: overwrite fields of the current slot descriptor."""

    def damage(path: Path) -> None:
        start = _current_descriptor_offset(path)
        for name, value in fields.items():
            at, kind = _DESCRIPTOR_FIELDS[name]
            poke(path, start + at, struct.pack(kind, value))

    return damage


def _reseal_current_slot(path: Path) -> None:
    """Recompute the slot crc after editing the table, as a deliberate forger would."""
    offset = _current_descriptor_offset(path)
    desc = layout.unpack_descriptor(peek(path, 0, layout.OFF_STATUS), layout.DESCRIPTOR_OFFSETS.index(offset))
    covered = desc.blob_count * layout.TABLE_ENTRY_SIZE + desc.head_length
    crc = zlib.crc32(peek(path, desc.offset, covered), zlib.crc32(peek(path, offset, 56)))
    poke(path, offset + 56, struct.pack("<I", crc))


def _corrupt_blob_end(path: Path) -> None:
    offset = _current_descriptor_offset(path)
    desc = layout.unpack_descriptor(peek(path, 0, layout.OFF_STATUS), layout.DESCRIPTOR_OFFSETS.index(offset))
    poke(path, desc.offset + 8, struct.pack("<Q", 10**9))  # end of blob 1
    _reseal_current_slot(path)


def _flip_blob_byte(path: Path) -> None:
    offset = _current_descriptor_offset(path)
    desc = layout.unpack_descriptor(peek(path, 0, layout.OFF_STATUS), layout.DESCRIPTOR_OFFSETS.index(offset))
    at = desc.offset + desc.blob_count * layout.TABLE_ENTRY_SIZE + desc.head_length + 5
    poke(path, at, bytes([peek(path, at, 1)[0] ^ 0x40]))


def _flip_head_byte(path: Path) -> None:
    offset = _current_descriptor_offset(path)
    desc = layout.unpack_descriptor(peek(path, 0, layout.OFF_STATUS), layout.DESCRIPTOR_OFFSETS.index(offset))
    at = desc.offset + desc.blob_count * layout.TABLE_ENTRY_SIZE + 1
    poke(path, at, bytes([peek(path, at, 1)[0] ^ 0x01]))


def _garbage(path: Path) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, random.Random(7).randbytes(64 * 1024))
    os.close(fd)


# (how to damage a published file, what read_head says: None or a substring of the error,
#  whether read_head succeeds but read_blobs must fail)
DAMAGES: list[Any] = [
    pytest.param(lambda p: os.truncate(p, 100), "no slot descriptor", id="truncated-into-header"),
    pytest.param(
        lambda p: os.truncate(p, layout.HEADER_SIZE + 10), "beyond the end of the file", id="truncated-slot"
    ),
    pytest.param(_garbage, "bad magic", id="garbage"),
    pytest.param(lambda p: poke(p, 0, bytes(layout.HEADER_SIZE)), None, id="zeroed-header"),
    pytest.param(lambda p: poke(p, 0, b"NOTHKSHM"), "bad magic", id="wrong-magic"),
    pytest.param(lambda p: poke(p, 8, struct.pack("<I", 99)), "unsupported format version 99", id="version"),
    pytest.param(lambda p: poke(p, 12, struct.pack("<I", 512)), "bad header size", id="header-size"),
    pytest.param(lambda p: poke(p, 16, struct.pack("<Q", 777)), "no slot descriptor", id="generation"),
    pytest.param(
        _descriptor(capacity=10**12, length=10**12), "beyond the end of the file", id="length-outside-file"
    ),
    pytest.param(
        _descriptor(capacity=2**64 - 1, offset=2**64 - 4096),
        "beyond the end of the file",
        id="offset-outside-file",
    ),
    pytest.param(_descriptor(offset=100), "inside the header", id="offset-in-header"),
    pytest.param(_descriptor(length=2**62), "exceeds its capacity", id="length>capacity"),
    pytest.param(_descriptor(blob_count=2**31), "blob table and head", id="blob-count"),
    pytest.param(_flip_head_byte, "checksum mismatch in slot", id="head-byte"),
    pytest.param(_corrupt_blob_end, "blob area", id="blob-end-resealed"),
    pytest.param(_flip_blob_byte, "checksum mismatch in blob", id="blob-byte"),
]


@pytest.mark.parametrize(("damage", "problem"), DAMAGES)
def test_damaged_files_are_reported_then_repaired(
    seg_path: Path, damage: Callable[[Path], object], problem: str | None
) -> None:
    published = 0 if damage is _garbage else _publish_valid(seg_path)
    damage(seg_path)  # with no mapping open: truncating a mapped file would SIGBUS its readers
    with Segment.open(seg_path) as reader:
        reader.generation()
        status = reader.status()  # reports, never raises
        assert status.file_size >= layout.HEADER_SIZE
        head: HeadRead | None = None
        blobs: list[bytes] | None = None
        error: SegmentCorruptedError | None = None
        try:
            head = reader.read_head()
            blobs = None if head is None else reader.read_blobs(head.generation, range(head.blob_count))
        except SegmentCorruptedError as exc:
            error = exc
    if problem is None:
        assert error is None, f"expected no snapshot, got {error}"
        assert head is None
    else:
        assert error is not None, f"expected an error about {problem!r}, got {head!r} / {blobs!r}"
        assert str(seg_path) in str(error)
        assert problem in str(error)
    assert_repaired(seg_path, above=published)


def test_a_reader_open_during_repair_follows_it(seg_path: Path) -> None:
    _publish_valid(seg_path)
    poke(seg_path, 0, b"NOTHKSHM")
    with Segment.open(seg_path) as reader:
        with pytest.raises(SegmentCorruptedError):
            reader.read_head()
        seen = reader.generation()
        with Segment.open(seg_path) as new_writer:
            generation = new_writer.publish(b"new", [b"n"])
        # Reformatting never reuses a generation a reader may hold.
        assert generation > seen
        assert reader.generation() == generation
        assert read_everything(reader) == (generation, b"new", [b"n"])


_payloads = st.tuples(st.binary(max_size=200), st.lists(st.binary(max_size=120), max_size=12))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    first=_payloads,
    second=st.none() | _payloads,
    flips=st.lists(
        st.tuples(
            st.sampled_from(["header", "slot", "anywhere"]), st.integers(0, 2**20), st.integers(1, 255)
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_random_byte_flips_never_give_wrong_data(
    first: tuple[bytes, list[bytes]],
    second: tuple[bytes, list[bytes]] | None,
    flips: list[tuple[str, int, int]],
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "segment"
        published: dict[int, tuple[bytes, list[bytes]]] = {}
        with Segment.open(path) as segment:
            for payload in (first, second):
                if payload is not None:
                    published[segment.publish(*payload)] = payload
            status = segment.status()
        current = status.slots[status.current_slot or 0]
        for where, number, mask in flips:
            if where == "header":
                at = number % layout.OFF_STATUS  # fields that matter to readers
            elif where == "slot":
                at = current.offset + number % max(current.length, 1)
            else:
                at = number % status.file_size
            poke(path, at, bytes([peek(path, at, 1)[0] ^ mask]))

        with Segment.open(path) as segment:
            try:
                head = segment.read_head()
            except SegmentCorruptedError:
                head = None
                event("head: corruption reported")
            except SnapshotFencedError:  # a flip raised the header's term word above the snapshot's
                head = None
                event("head: fenced")
            else:
                event("head: no snapshot" if head is None else "head: verified copy")
            if head is not None:
                # Anything returned is exactly what was published under that generation.
                assert head.generation in published
                want_head, want_blobs = published[head.generation]
                assert (head.head, head.blob_count) == (want_head, len(want_blobs))
                for index in range(head.blob_count):
                    try:
                        blob = segment.read_blobs(head.generation, [index])
                    except SegmentCorruptedError:
                        event("blob: corruption reported")
                        continue
                    assert blob is None or blob == [want_blobs[index]]
            segment.status()
            # The next leader repairs whatever the flips did (it begins a term first, as every leader
            # does: a flipped term word would refuse a publisher of an older one).
            generation = segment.publish(b"repaired", [b"r"], segment.begin_term())
            assert read_everything(segment) == (generation, b"repaired", [b"r"])
            if len(flips) == 1:
                assert generation > max(published)


# ---------------------------------------------------------------------- directory policy


def default_dir_name() -> str:
    """The default folder's name: per user, and per PID namespace where it can be read."""
    namespace = identity.pid_namespace()
    return f"heksher_shm-{os.geteuid()}" + (f"-{namespace}" if namespace else "")


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolve without the user's HEKSHER_SHM_DIR."""
    monkeypatch.delenv(folder.ENV_SHM_DIR, raising=False)


@pytest.mark.usefixtures("no_env")
def test_shm_dir_explicit_argument_beats_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(folder.ENV_SHM_DIR, str(tmp_path / "from-env"))
    assert resolve_shm_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert stat.S_IMODE(os.stat(tmp_path / "explicit").st_mode) == 0o700
    assert resolve_shm_dir() == tmp_path / "from-env"
    assert (tmp_path / "from-env").is_dir()


@pytest.mark.usefixtures("no_env")
def test_shm_dir_default_under_dev_shm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dev_shm = tmp_path / "dev-shm"
    fake_dev_shm.mkdir()
    monkeypatch.setattr(folder, "_DEV_SHM", str(fake_dev_shm))
    old = os.umask(0o022)
    try:
        path = resolve_shm_dir()
    finally:
        os.umask(old)
    assert path == fake_dev_shm / default_dir_name()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert resolve_shm_dir() == path  # idempotent
    # Our own default directory with loose bits is tightened rather than refused.
    path.chmod(0o755)
    assert resolve_shm_dir() == path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700


@pytest.mark.usefixtures("no_env")
def test_shm_dir_default_falls_back_to_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(folder, "_DEV_SHM", str(tmp_path / "no-such-dir"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert resolve_shm_dir() == tmp_path / "tmp" / default_dir_name()


@pytest.mark.skipif(identity.pid_namespace() == 0, reason="needs a readable /proc/self/ns/pid")
@pytest.mark.usefixtures("no_env")
def test_shm_dir_default_is_per_pid_namespace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Containers sharing /dev/shm but not their PIDs get a folder each by default; an explicit folder
    (HEKSHER_SHM_DIR, shm_dir) is used exactly as given."""
    monkeypatch.setattr(folder, "_DEV_SHM", str(tmp_path))
    namespace = os.stat("/proc/self/ns/pid").st_ino
    assert resolve_shm_dir() == tmp_path / f"heksher_shm-{os.geteuid()}-{namespace}"
    monkeypatch.setenv(folder.ENV_SHM_DIR, str(tmp_path / "given"))
    assert resolve_shm_dir() == tmp_path / "given"
    assert resolve_shm_dir(tmp_path / "explicit") == tmp_path / "explicit"


@pytest.mark.usefixtures("no_env")
def test_shm_dir_default_without_a_readable_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(folder, "_DEV_SHM", str(tmp_path))
    monkeypatch.setattr(identity, "_NS_PATH", str(tmp_path / "no-such-ns"))
    monkeypatch.setattr(identity, "_pidns", None)
    assert resolve_shm_dir() == tmp_path / f"heksher_shm-{os.geteuid()}"


@pytest.mark.usefixtures("no_env")
def test_shm_dir_concurrent_creation(tmp_path: Path) -> None:
    barrier = threading.Barrier(6)
    results: list[Path | BaseException] = []

    def resolve() -> None:
        barrier.wait(timeout=CHILD_DEADLINE)
        try:
            results.append(resolve_shm_dir(tmp_path / "racy"))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=resolve) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CHILD_DEADLINE)
    assert results == [tmp_path / "racy"] * 6


def test_shm_dir_refuses_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(SegmentError, match=rf"{link}: is a symbolic link"):
        resolve_shm_dir(link)


def test_shm_dir_refuses_a_file(tmp_path: Path) -> None:
    not_dir = tmp_path / "file"
    not_dir.write_bytes(b"")
    with pytest.raises(SegmentError, match=rf"{not_dir}: is not a directory"):
        resolve_shm_dir(not_dir)


def test_shm_dir_explicit_writable_by_others_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(SegmentError, match=rf"{shared}: has mode 0o777"):
        resolve_shm_dir(shared)
    shared.chmod(0o750)  # readable by the group is the user's call for an explicit directory
    assert resolve_shm_dir(shared) == shared


@pytest.mark.skipif(not IS_ROOT, reason="chown to another uid needs root")
@pytest.mark.usefixtures("no_env")
def test_shm_dir_refuses_foreign_owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, NOBODY, NOBODY)
    with pytest.raises(SegmentError, match=rf"{foreign}: is owned by uid {NOBODY}"):
        resolve_shm_dir(foreign)
    # The same for a default directory squatted by another user.
    monkeypatch.setattr(folder, "_DEV_SHM", str(tmp_path))
    squatted = tmp_path / default_dir_name()
    squatted.mkdir(mode=0o777)
    os.chown(squatted, NOBODY, NOBODY)
    with pytest.raises(SegmentError, match=f"owned by uid {NOBODY}"):
        resolve_shm_dir()
