"""The segment's code over a simulated mapping: every host operation is the backing's.

``Segment.over`` runs the real layout, publish, verified reads and fencing
over ``tests/_memory_backing.py`` (no file, no ``mmap``, no clock of the
host), as a deterministic simulation of many processes needs.
"""

from __future__ import annotations

import ast
import zlib
from pathlib import Path

import pytest

from heksher_shm._shm import layout
from heksher_shm._shm.segment import HeadRead, Segment
from heksher_shm.exceptions import SegmentCorruptedError, SegmentError, SnapshotFencedError
from tests._memory_backing import MemoryBacking, MemoryFile

PACKAGE = Path(__file__).resolve().parent.parent / "heksher_shm"


class Clock:
    """A wall clock the test moves."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def open_over(file: MemoryFile, clock: Clock | None = None, pauses: list[int] | None = None) -> Segment:
    """One simulated process's segment over *file*."""

    def pause() -> None:
        if pauses is not None:
            pauses.append(1)

    backing = MemoryBacking(file, clock or Clock(), pause)
    return Segment.over(backing, "sim/segment")


def test_publish_and_read_back_across_simulated_processes() -> None:
    file = MemoryFile()
    clock = Clock()
    writer, reader = open_over(file, clock), open_over(file)
    assert file.size == layout.HEADER_SIZE  # opening reserved the header
    assert reader.read_head() is None
    generation = writer.publish(b"the head", [b"one", b"", b"three" * 1000])
    assert reader.generation() == generation == 1
    assert reader.read_head() == HeadRead(1, b"the head", 3)
    assert reader.read_blobs(1, [2, 0]) == [b"three" * 1000, b"one"]
    copies = reader.copy_blobs(1, [1])
    assert copies is not None
    assert [bytes(c.verified()) for c in copies] == [b""]
    status = reader.status()
    assert status.file_size == file.size > layout.HEADER_SIZE  # the writer reserved its slot
    assert status.current_slot is not None
    assert status.slots[status.current_slot].published_at == clock.now  # the backing's clock
    clock.now += 10
    writer.publish(b"again", [b"x" * 100_000])  # grows the file, reusing nothing of the current slot
    assert reader.read_head() == HeadRead(2, b"again", 1)
    assert reader.read_blobs(2, [0]) == [b"x" * 100_000]
    writer.close()
    reader.close()
    assert writer._backing.closed  # type: ignore[attr-defined]


def test_a_flipped_byte_is_detected() -> None:
    file = MemoryFile()
    pauses: list[int] = []
    writer, reader = open_over(file), open_over(file, pauses=pauses)
    generation = writer.publish(b"head", [b"blob"])
    status = reader.status()
    assert status.current_slot is not None
    slot = status.slots[status.current_slot]
    at = slot.offset + slot.blob_count * layout.TABLE_ENTRY_SIZE  # the head's first byte
    file[at : at + 1] = bytes([file[at] ^ 0x20])
    with pytest.raises(SegmentCorruptedError, match=f"checksum mismatch in slot .*generation {generation}"):
        reader.read_head()
    assert pauses  # the retries yielded through the backing
    assert writer.publish(b"repaired", [b"r"]) == generation + 1
    assert reader.read_head() == HeadRead(generation + 1, b"repaired", 1)


def test_fencing_over_a_simulated_mapping() -> None:
    file = MemoryFile()
    old, new = open_over(file), open_over(file)
    assert old.begin_term() == 1
    first = old.publish(b"first", [b"a"], 1)
    assert old._backing.barriers == 1  # type: ignore[attr-defined]  # begin_term ends with the barrier
    assert new.begin_term() == 2
    # The stale writer (term 1) is refused; the previous snapshot stays, adopted by term 2.
    with pytest.raises(SnapshotFencedError, match="term 1 was replaced by term 2; not publishing"):
        old.publish(b"stale", [b"x"], 1)
    assert new.read_head() == HeadRead(first, b"first", 1, 1)
    # A snapshot that a replaced leader published anyway is refused by every reader: here the same
    # bytes, claimed (with a valid checksum) as a newer generation of term 1.
    header = file[: layout.OFF_STATUS]
    index = next(i for i in range(2) if layout.unpack_descriptor(header, i).generation == first)
    desc = layout.unpack_descriptor(header, index)._replace(generation=first + 1)
    covered = file[desc.offset : desc.offset + desc.blob_count * layout.TABLE_ENTRY_SIZE + desc.head_length]
    crc = zlib.crc32(covered, zlib.crc32(layout.pack_descriptor(desc)[: layout.DESCRIPTOR_CRC_SPAN]))
    at = layout.DESCRIPTOR_OFFSETS[index]
    file[at : at + layout.DESCRIPTOR_SIZE] = layout.pack_descriptor(desc._replace(crc=crc))
    file[layout.OFF_GENERATION : layout.OFF_GENERATION + 8] = (first + 1).to_bytes(8, "little")
    check = open_over(file)
    with pytest.raises(SnapshotFencedError, match=f"generation {first + 1} was published by term 1"):
        check.read_head()
    assert new.publish(b"second", [], 2) == first + 2
    assert check.read_head() == HeadRead(first + 2, b"second", 0, 2)


def test_a_full_simulated_disk_fails_the_publish_not_the_readers() -> None:
    file = MemoryFile(capacity=64 * 1024)
    writer = open_over(file)
    generation = writer.publish(b"kept", [b"k" * 100])
    with pytest.raises(SegmentError, match=r"cannot reserve .*No space left"):
        writer.publish(b"too big", [b"x" * 100_000])
    assert open_over(file).read_head() == HeadRead(generation, b"kept", 1)


@pytest.mark.parametrize("module", ["reading", "writing"])
def test_the_segment_logic_does_no_io_of_its_own(module: str) -> None:
    """Every host operation goes through the backing: reading and writing import none of these."""
    tree = ast.parse((PACKAGE / "_shm" / f"{module}.py").read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & {"os", "mmap", "time", "select", "socket", "fcntl"}, imported
