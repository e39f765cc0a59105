"""Fenced leaders: terms (fencing tokens) in the segment (since format 4), refused by writers and by readers.

Two ``Segment`` objects on one file stand for two processes: each has its own
``MAP_SHARED`` mapping, so what one stores the other loads. The narrow window
(a leader stopped after its last check and before its store) is hit exactly
with the writer's crash-point hooks, where the test runs the new leader's
``begin_term``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import heksher_shm as heksher
from heksher_shm._shm import layout, writing
from heksher_shm._shm.segment import Segment
from heksher_shm.exceptions import SegmentCorruptedError, SnapshotFencedError
from heksher_shm.testing import HeksherService
from tests._support import FEATURES, peek, poke, unique


@pytest.fixture
def seg_path(tmp_path: Path) -> Path:
    return tmp_path / "segment"


@pytest.fixture
def old(seg_path: Path) -> Iterator[Segment]:
    """The leader of term 1, about to be replaced."""
    with Segment.open(seg_path) as segment:
        yield segment


@pytest.fixture
def new(seg_path: Path, old: Segment) -> Iterator[Segment]:
    """Its successor, in another 'process' (another mapping of the file)."""
    with Segment.open(seg_path) as segment:
        yield segment


def snapshot(segment: Segment) -> tuple[int, bytes, list[bytes], int]:
    """(generation, head, blobs, term) of the current snapshot, which must be readable."""
    read = segment.read_head()
    assert read is not None
    blobs = segment.read_blobs(read.generation, range(read.blob_count))
    assert blobs is not None
    return read.generation, read.head, blobs, read.term


def at_step(step: str, action: Callable[[], object]) -> Callable[[str], None]:
    """A crash-point hook that runs *action* once, when publishing passes *step*."""
    done: list[bool] = []

    def hook(name: str) -> None:
        if name == step and not done:
            done.append(True)
            action()

    return hook


# ---------------------------------------------------------------------- the layout


def test_format_5_layout() -> None:
    assert layout.FORMAT_VERSION == 5
    assert layout.DESCRIPTOR_SIZE == 64
    assert layout.DESCRIPTOR_CRC_SPAN == 56
    leader_words = [
        (layout.OFF_TERM, layout.WORD_TERM),
        (layout.OFF_ADOPTED, layout.WORD_ADOPTED),
        (layout.OFF_LEADER_CHANGES, layout.WORD_LEADER_CHANGES),
        (layout.OFF_UPDATES_OK, layout.WORD_UPDATES_OK),
        (layout.OFF_DECLARATIONS_OK, layout.WORD_DECLARATIONS_OK),
        (layout.OFF_DECLARATION_FAILURES, layout.WORD_DECLARATION_FAILURES),
        (layout.OFF_TERM_CHECK, layout.WORD_TERM_CHECK),
        (layout.OFF_DAMAGE_REPORTS, layout.WORD_DAMAGE_REPORTS),  # format 5: bumped by any process
    ]
    assert [offset for offset, _ in leader_words] == list(range(1280, 1344, 8))
    assert all(word * 8 == offset for offset, word in leader_words)
    assert layout.OFF_STATUS + layout.STATUS_SIZE == 1272  # the status block ends before them
    assert not hasattr(layout, "descriptor_offset")

    desc = layout.SlotDescriptor(7, 4096, 8192, 100, 3, 40, 5, 12.5, 0xDEADBEEF)
    raw = layout.pack_descriptor(desc)
    assert len(raw) == 64
    # generation, offset, capacity, length u64; blob_count, head_length u32; term u64; published_at f64;
    # crc u32; 4 reserved bytes
    assert struct.unpack("<QQQQIIQdI4x", raw) == tuple(desc)
    header = bytes(64) + raw + bytes(64)
    assert layout.unpack_descriptor(header, 0) == desc
    assert raw[40:48] == struct.pack("<Q", 5)  # the term sits inside the bytes the crc covers

    fresh = layout.format_header(99, term=6)
    assert len(fresh) == layout.HEADER_SIZE
    words = struct.unpack_from("<QQQQQQQQ", fresh, layout.OFF_TERM)
    assert words == (6, 0, 0, 0, 0, 0, layout.term_check(6), 0)
    assert layout.term_check(0) == 0  # a zeroed header agrees with itself
    assert layout.unpack_prefix(fresh).generation_floor == 99


def test_the_descriptor_records_the_term_and_its_crc_covers_it(old: Segment, seg_path: Path) -> None:
    generation = old.publish(b"head", [b"blob"], old.begin_term())
    status = old.status()
    assert status.current_slot is not None
    slot = status.slots[status.current_slot]
    assert (slot.generation, slot.term) == (generation, 1)
    start = layout.DESCRIPTOR_OFFSETS[status.current_slot]
    poke(seg_path, start + 40, struct.pack("<Q", 2))  # a scribbled term fails the checksum, not the fence
    with pytest.raises(SegmentCorruptedError, match="checksum mismatch"):
        old.read_head()


# ---------------------------------------------------------------------- terms


def test_begin_term_increments_and_returns_the_term(old: Segment, new: Segment) -> None:
    assert old.status().term == 0  # an unformatted file: no term began
    assert old.begin_term() == 1
    status = new.status()
    assert status.formatted  # begin_term formats a missing header first
    assert (status.term, status.leader_changes, status.adopted) == (1, 1, 0)
    assert new.begin_term() == 2
    assert old.begin_term() == 3
    assert (old.status().term, old.status().leader_changes) == (3, 3)


def test_publish_with_an_older_term_raises_and_keeps_the_previous_snapshot(
    old: Segment, new: Segment
) -> None:
    term = old.begin_term()
    first = old.publish(b"first", [b"a", b"b"], term)
    assert new.begin_term() == term + 1
    with pytest.raises(SnapshotFencedError, match=r"term 1 was replaced by term 2; not publishing") as info:
        old.publish(b"stale", [b"x"], term)
    assert str(old.path) in str(info.value)
    # Nothing was published: the previous snapshot (adopted by the new term) stays current and readable.
    assert new.generation() == first
    assert snapshot(new) == (first, b"first", [b"a", b"b"], term)
    second = new.publish(b"second", [b"c"], term + 1)
    assert second > first
    assert snapshot(old) == (second, b"second", [b"c"], term + 1)
    with pytest.raises(SnapshotFencedError):
        old.publish(b"stale again", [], term)  # and it never will again
    assert old.publish(b"a later term", [], term + 2) > second  # a newer term may publish at once


def test_a_leader_stopped_while_it_wrote_is_refused_before_it_claims(
    old: Segment, new: Segment, monkeypatch: pytest.MonkeyPatch
) -> None:
    term = old.begin_term()
    first = old.publish(b"first", [b"a"], term)
    # Replaced after the first check, while its payload was being written: the second check refuses.
    monkeypatch.setattr(writing, "_crash_point", at_step("descriptor", new.begin_term))
    with pytest.raises(SnapshotFencedError, match="term 1 was replaced by term 2"):
        old.publish(b"stale", [b"x" * 5000], term)
    monkeypatch.setattr(writing, "_crash_point", None)
    assert snapshot(new) == (first, b"first", [b"a"], term)


def test_readers_refuse_what_a_replaced_leader_published_after_its_last_check(
    old: Segment, new: Segment, seg_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer's check and its store are two steps: stopped between them (here: replaced right
    after its descriptor claimed the generation), the old leader still publishes. Readers refuse it."""
    term = old.begin_term()
    first = old.publish(b"first", [b"a"], term)
    monkeypatch.setattr(writing, "_crash_point", at_step("claimed", new.begin_term))
    stale = old.publish(b"stale", [b"x"], term)
    monkeypatch.setattr(writing, "_crash_point", None)
    assert new.generation() == stale > first
    for reader in (old, new):  # the stale leader's own process too
        with pytest.raises(SnapshotFencedError) as info:
            reader.read_head()
        message = str(info.value)
        assert f"generation {stale} was published by term 1, which term 2 replaced" in message
        assert str(seg_path) in message
    # A later term does not adopt it: it stays refused until the current leader publishes again.
    with Segment.open(seg_path) as third:
        assert third.begin_term() == 3
        assert third.status().adopted == 0
        with pytest.raises(SnapshotFencedError):
            third.read_head()
        repaired = third.publish(b"repaired", [b"r"], 3)
    assert snapshot(old) == (repaired, b"repaired", [b"r"], 3)


def test_a_new_term_adopts_the_readable_snapshot(old: Segment, new: Segment) -> None:
    """The snapshot current when a term begins stays readable (the new leader inherits it), also
    across terms that publish nothing; the new term's first publish replaces it."""
    first = old.publish(b"first", [b"a"], old.begin_term())
    assert new.begin_term() == 2
    assert new.status().adopted == first
    assert snapshot(new) == (first, b"first", [b"a"], 1)
    assert old.begin_term() == 3  # a term that publishes nothing before the next one begins
    assert snapshot(new) == (first, b"first", [b"a"], 1)
    assert new.begin_term() == 4
    second = new.publish(b"second", [], 4)
    assert snapshot(old) == (second, b"second", [], 4)


def test_readers_refuse_a_stale_descriptor_written_by_hand(old: Segment, seg_path: Path) -> None:
    """A descriptor of term 1 claiming a new generation after term 2 began (made with the layout's
    helpers): refused; the same descriptor with term 2 is read."""
    old.publish(b"one", [b"1"], old.begin_term())
    current = old.publish(b"two", [b"2"], 1)
    assert old.begin_term() == 2

    def forge(term: int) -> int:
        header = peek(seg_path, 0, layout.OFF_STATUS)
        index = next(i for i in range(2) if layout.unpack_descriptor(header, i).generation != current)
        desc = layout.unpack_descriptor(header, index)
        generation = current + (3 if term == 1 else 4)
        desc = desc._replace(generation=generation, term=term, crc=0)
        covered = peek(seg_path, desc.offset, desc.blob_count * layout.TABLE_ENTRY_SIZE + desc.head_length)
        crc = zlib.crc32(covered, zlib.crc32(layout.pack_descriptor(desc)[: layout.DESCRIPTOR_CRC_SPAN]))
        poke(seg_path, layout.DESCRIPTOR_OFFSETS[index], layout.pack_descriptor(desc._replace(crc=crc)))
        poke(seg_path, layout.OFF_GENERATION, struct.pack("<Q", generation))
        return generation

    stale = forge(term=1)
    with pytest.raises(SnapshotFencedError, match=f"generation {stale} was published by term 1"):
        old.read_head()
    fresh = forge(term=2)
    read = old.read_head()
    assert read is not None
    assert (read.generation, read.head, read.term) == (fresh, b"one", 2)


# ---------------------------------------------------------------------- counters


def test_counters(old: Segment, new: Segment) -> None:
    old.begin_term()
    old.record_update_ok(100.0)
    old.record_update_ok(101.0)
    old.count_declarations(3, 1)
    old.count_declarations(2, 0)
    old.publish(b"h", [], 1)
    new.begin_term()
    status = new.status()
    assert (status.updates_ok, status.declarations_ok, status.declaration_failures) == (2, 5, 1)
    assert (status.term, status.leader_changes, status.last_update_ok) == (2, 2, 101.0)


def test_a_reformat_keeps_the_term(old: Segment, seg_path: Path) -> None:
    """A damaged header is formatted anew under the publisher's own term; a status write keeps the term
    word; a new term after a lost header exceeds any count of earlier ones."""
    old.publish(b"h", [], old.begin_term())
    poke(seg_path, 0, b"NOTHKSHM")
    old.set_leader(1, 2.0)  # formats: the term word stays
    assert old.status().term == 1
    poke(seg_path, 0, b"NOTHKSHM")
    old.publish(b"h", [], 5)  # a damaged header's term is not trusted: its publisher formats it
    assert (old.status().term, snapshot(old)[3]) == (5, 5)
    poke(seg_path, 0, bytes(layout.HEADER_SIZE))  # the header is lost, terms and all
    assert old.begin_term() > 10**15


@pytest.mark.parametrize(
    ("word", "damage"),
    [
        (layout.OFF_TERM, 0),  # the term word reads lower
        (layout.OFF_TERM_CHECK, layout.term_check(1)),  # its copy reads lower
        (layout.OFF_TERM_CHECK, layout.term_check(2) ^ 0x04),  # its copy, a bit flipped: garbage
        (layout.OFF_TERM, 2 | 1 << 60),  # the term word, a bit flipped: garbage
    ],
)
def test_a_damaged_term_word_never_lowers_the_fence(
    old: Segment, new: Segment, seg_path: Path, word: int, damage: int
) -> None:
    """The term is kept twice (the word and an encoded copy). One copy damaged (as the simulation found:
    a flipped bit lowered the term word, and a replaced leader's publish passed; seed 1188394), the
    other still fences: the replaced leader's publish is refused, its successor's is not, and puts the
    copies back; a new term over damaged copies is taken above any count of earlier terms."""
    stale = old.begin_term()
    assert new.begin_term() == stale + 1 == 2
    poke(seg_path, word, struct.pack("<Q", damage))
    assert new.status().term == stale + 1  # the higher plausible copy counts
    with pytest.raises(SnapshotFencedError, match=r"term 1 was replaced by term 2"):
        old.publish(b"stale", [b"x"], stale)
    generation = new.publish(b"new", [b"y"], stale + 1)  # its own term: the copies are put back
    assert peek(seg_path, layout.OFF_TERM, 8) == struct.pack("<Q", stale + 1)
    assert peek(seg_path, layout.OFF_TERM_CHECK, 8) == struct.pack("<Q", layout.term_check(stale + 1))
    assert snapshot(old) == (generation, b"new", [b"y"], stale + 1)
    poke(seg_path, word, struct.pack("<Q", damage))  # damaged again, and a new term begins over it
    assert old.begin_term() > 10**15  # above any count: the damaged copy may have been the higher one
    with pytest.raises(SnapshotFencedError):
        new.publish(b"replaced", [], stale + 1)


def test_a_term_begun_half_way_fences_the_old_term(old: Segment, new: Segment, seg_path: Path) -> None:
    """A process killed between storing the new term and its copy: the higher copy (the new term)
    already fences the old one, and the next term is taken above any count."""
    stale = old.begin_term()
    poke(seg_path, layout.OFF_TERM, struct.pack("<Q", stale + 1))  # the term stored, not yet its copy
    with pytest.raises(SnapshotFencedError):
        old.publish(b"stale", [], stale)
    assert new.begin_term() > 10**15


# ---------------------------------------------------------------------- the engine


def test_a_fenced_leader_steps_down_and_leads_again_with_a_new_term(memory_service: HeksherService) -> None:
    """The engine takes a term when it leads; a publish refused for an older term makes it step down
    (here it wins the lock again at once: nobody else competes) and lead under a new term."""
    name = unique("fenced")
    setting = heksher.Setting(name, int, ["user"], 0)
    client = heksher.ThreadHeksherClient(memory_service.url, 60, FEATURES)
    client.track_contexts(user="alice")
    client.set_as_main()
    try:
        assert client.leading
        with Segment.open(client.segment_path or "", create=False) as watch:
            before = watch.status()
            assert before.term >= 1
            assert before.current_slot is not None
            assert before.slots[before.current_slot].term == before.term
            assert before.updates_ok >= 1
            replaced_by = watch.begin_term()  # as a process that seized the lock would
            memory_service.add_rule(name, {"user": "alice"}, 5)
            client.reload()  # its publish is refused; it steps down and leads again, under a new term
            assert setting.get(user="alice") == 5
            after = watch.status()
            assert after.term == replaced_by + 1
            assert after.leader_changes == before.leader_changes + 2
            read = watch.read_head()
            assert read is not None
            assert read.term == after.term
        assert client.leading
    finally:
        client.close()
