"""Data faults, measured: damaged segment and helper files under running clients, and a full disk.

Readers are real client processes serving ``get()`` continuously (see
``tests/_fault_workers.py``). Whatever happens to the files, they must keep
serving the last good value or the correct new one: never garbage, never a
value older than one they served, never an exception, never a crash. The
leader repairs a damaged segment by republishing (its self-check runs every
``VERIFY_INTERVAL``); the tests time that repair.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heksher_shm._engine.policy import VERIFY_INTERVAL
from heksher_shm._model.snapshot import decode_blob, decode_head
from heksher_shm._shm import layout
from heksher_shm._shm.segment import Segment
from heksher_shm.testing import HeksherService
from tests._fault_workers import Counter, FaultWorker, drain_all, percentile, reaping, stress_seconds
from tests._support import peek, poke, unique

KINDS = ("thread", "async")
FAST_VERIFY = 0.5
"""The leader's self-check interval in the default-run tests, to keep them short (production: 2 s)."""


# ---------------------------------------------------------------------------------------------------------
# Helpers


def flip(path: Path, offset: int, mask: int) -> None:
    poke(path, offset, bytes([peek(path, offset, 1)[0] ^ mask]))


def current_slot(path: Path) -> tuple[int, layout.SlotDescriptor] | None:
    """(descriptor offset, descriptor) of the slot the generation word names, if any."""
    header = peek(path, 0, layout.OFF_STATUS)
    generation = struct.unpack_from("<Q", header, layout.OFF_GENERATION)[0]
    for index, at in enumerate(layout.DESCRIPTOR_OFFSETS):
        desc = layout.unpack_descriptor(header, index)
        if generation and desc.generation == generation:
            return at, desc
    return None


def snapshot_value(segment: Segment, name: str) -> object:
    """The value of alice's rule for ``name`` in the verified current snapshot (None if unreadable)."""
    try:
        read = segment.read_head()
        if read is None:
            return None
        head = decode_head(read.head)
        entry = next(e for e in head.settings if e.name == name)
        blobs = segment.read_blobs(read.generation, [entry.blob])
        if blobs is None:
            return None
        for rule in decode_blob(blobs[0]).rules:
            if rule.conditions == [("user", "alice")]:
                return msgspec.json.decode(rule.value)
    except Exception:
        return None
    return None


def wait_repaired(segment: Segment, name: str, value: int, timeout: float) -> float:
    """Seconds until a fresh, verified read of the segment gives ``value`` again (polled under a deadline)."""
    start = time.monotonic()
    while snapshot_value(segment, name) != value:
        assert time.monotonic() - start < timeout, f"the segment was not repaired within {timeout}s"
        time.sleep(0.005)
    return time.monotonic() - start


def counter_setting(service: HeksherService, prefix: str) -> tuple[str, int]:
    name = unique(prefix)
    service.declare(name, "int", -1, ["user"])
    return name, service.add_rule(name, {"user": "alice"}, 0)


def check_readers(workers: list[FaultWorker], final: int, killed: tuple[FaultWorker, ...] = ()) -> int:
    """Every reader served only values the service had, never backwards, without exceptions; returns reads."""
    reads = 0
    for w in workers:
        seen = w.seen
        reads += seen.reads
        garbage = sorted(v for v in seen.values if not 0 <= v <= final)
        assert garbage == [], f"{w} served values the service never had: {garbage}"
        assert seen.backwards == 0, f"{w} went backwards: {seen.problems[:3]}"
        assert seen.exceptions == 0, f"{w}: get() raised: {seen.problems[:3]}"
        if w not in killed:
            assert w.process.exitcode == 0, f"{w} ended with {w.process.exitcode} (-7 is SIGBUS)"
    return reads


def next_reports(workers: list[FaultWorker], timeout: float = 5.0) -> None:
    """Wait until every worker sent at least one more report: they all read on since the last look."""
    counts = {id(w): len(w.seen.reports) for w in workers}
    deadline = time.monotonic() + timeout
    while any(len(w.seen.reports) <= counts[id(w)] for w in workers):
        assert time.monotonic() < deadline, "a worker stopped reporting"
        drain_all(workers, 0.02)


# ---------------------------------------------------------------------------------------------------------
# Damage to the segment


def _descriptor_fields(**fields: int) -> Callable[[Path, random.Random], None]:
    positions = {"offset": 8, "capacity": 16, "length": 24, "blob_count": 32, "head_length": 40}

    def damage(path: Path, rng: random.Random) -> None:
        found = current_slot(path)
        assert found is not None
        for name, value in fields.items():
            poke(path, found[0] + positions[name], struct.pack("<Q", value))

    return damage


def _flips_in(region: str, count: int) -> Callable[[Path, random.Random], None]:
    def damage(path: Path, rng: random.Random) -> None:
        for _ in range(count):
            start, end = _region(path, region)
            flip(path, rng.randrange(start, end), rng.randrange(1, 256))

    return damage


def _region(path: Path, region: str) -> tuple[int, int]:
    """[start, end) of a part of the file, as it is now."""
    size = os.path.getsize(path)
    if region == "header":
        return 0, layout.OFF_STATUS
    if region == "status":
        return layout.OFF_STATUS, layout.OFF_STATUS + layout.STATUS_SIZE
    found = current_slot(path)
    if region in ("slot", "blobs") and found is not None:
        desc = found[1]
        start = desc.offset
        if region == "blobs":
            start += desc.blob_count * layout.TABLE_ENTRY_SIZE + desc.head_length
        end = min(desc.offset + desc.length, size)
        if start < end:
            return start, end
    return 0, size


def _other_slot_garbage(path: Path, rng: random.Random) -> None:
    found = current_slot(path)
    assert found is not None
    at = found[1].offset + found[1].capacity  # past the current region: the writer's next target, or nothing
    poke(path, min(at, os.path.getsize(path)), rng.randbytes(64 * 1024))


def _grow(path: Path, rng: random.Random) -> None:
    # Growing a mapped file is harmless (shrinking is not, see test_truncated_under_running_clients).
    poke(path, os.path.getsize(path) + 4096, rng.randbytes(1 << 20))


def _promise_broken(path: Path, rng: random.Random) -> None:
    # A stray write that makes a healthy leader look stuck: a follower replaces it, values carry on.
    poke(path, layout.OFF_PROGRESS, struct.pack("<d", time.monotonic() - 100))
    poke(path, layout.OFF_PROMISE, struct.pack("<d", time.monotonic() - 100))


DAMAGES: dict[str, Callable[[Path, random.Random], None]] = {
    "header bytes flipped": _flips_in("header", 4),
    "zeroed header": lambda p, r: poke(p, 0, bytes(layout.HEADER_SIZE)),
    "wrong magic": lambda p, r: poke(p, 0, b"NOTHKSHM"),
    "wrong format version": lambda p, r: poke(p, 8, struct.pack("<I", 99)),
    "wrong header size": lambda p, r: poke(p, 12, struct.pack("<I", 512)),
    "generation matching no slot": lambda p, r: poke(p, layout.OFF_GENERATION, struct.pack("<Q", 777)),
    "generation beyond 2**63": lambda p, r: poke(p, layout.OFF_GENERATION, struct.pack("<Q", 2**63 + 5)),
    "slot length outside the file": _descriptor_fields(length=10**12, capacity=10**12),
    "slot offset outside the file": _descriptor_fields(offset=2**62),
    "slot offset inside the header": _descriptor_fields(offset=100),
    "blob count huge": _descriptor_fields(blob_count=2**40),
    "head length huge": _descriptor_fields(head_length=2**50),
    "slot bytes flipped": _flips_in("slot", 8),
    "blob bytes flipped": _flips_in("blobs", 4),
    "status block flipped": _flips_in("status", 8),
    "status seqlock left odd": lambda p, r: poke(p, layout.OFF_STATUS_SEQ, struct.pack("<Q", 12345)),
    "error length huge": lambda p, r: poke(p, 232, struct.pack("<I", 0xFFFFFFFF)),
    "promise broken": _promise_broken,
    "garbage in the other slot": _other_slot_garbage,
    "bytes flipped anywhere": _flips_in("anywhere", 16),
    "file grown with garbage": _grow,
}


def _damage_round(
    service: HeksherService, seconds: float, verify_interval: float | None, seed: int
) -> tuple[dict[str, list[float]], int]:
    """Apply every damage of DAMAGES (again and again for ``seconds``) under four reader processes.

    Returns the repair times per damage and the number of get() calls.
    """
    rng = random.Random(seed)
    interval = 0.3
    name, rule = counter_setting(service, "damaged")
    extra = {} if verify_interval is None else {"verify_interval": verify_interval}
    workers = [
        FaultWorker(service.url, KINDS[i % 2], [(name, "int", -1)], interval, **extra) for i in range(4)
    ]
    repairs: dict[str, list[float]] = {label: [] for label in DAMAGES}
    limit = (verify_interval or VERIFY_INTERVAL) + 3
    with reaping(workers):
        for w in workers:
            w.ready()
        counter = Counter(service, rule, period=3600)  # moved by hand
        path = Path(workers[0].ask("segment_path"))
        end = time.monotonic() + seconds
        with Segment.open(path, create=False) as watch:
            while True:
                for label, damage in DAMAGES.items():
                    value = counter.value
                    wait_repaired(watch, name, value, limit)
                    damage(path, rng)
                    # A damaged snapshot is never served: readers keep the last good one meanwhile.
                    repairs[label].append(wait_repaired(watch, name, value, limit))
                    value = counter.bump()
                    for w in workers:
                        assert w.ask("wait_value", value, interval + 3) is not None, f"{w} after {label}"
                    drain_all(workers, 0)
                if time.monotonic() > end:
                    break
        final = counter.value
    reads = check_readers(workers, final)
    return repairs, reads


def _report_repairs(repairs: dict[str, list[float]], reads: int, interval: float) -> None:
    everything = [t for times in repairs.values() for t in times]
    print(
        f"segment damage under 4 reader processes (self-check every {interval} s): "
        f"{len(everything)} damages, {reads} get() calls, 0 wrong / backwards / exceptions / crashes; "
        f"repair p50 {percentile(everything, 0.5) * 1000:.0f} ms, max {max(everything) * 1000:.0f} ms"
    )
    for label, times in repairs.items():
        print(f"  {label}: max {max(times) * 1000:.0f} ms")


def test_segment_damaged_under_running_clients(service: HeksherService) -> None:
    """Each kind of damage to the segment, one after the other, with four client processes reading."""
    repairs, reads = _damage_round(service, 0, FAST_VERIFY, seed=11)
    _report_repairs(repairs, reads, FAST_VERIFY)
    assert max(t for times in repairs.values() for t in times) < FAST_VERIFY + 1.5


def test_a_reader_that_finds_the_snapshot_damaged_has_it_repaired_long_before_an_update(
    service: HeksherService,
) -> None:
    """Segment format 5: the leader checks the segment when a process reported damage, not for rings
    that registrations explain. With an update interval of 60 s, a newcomer that reads a damaged blob
    counts it in the header and rings; the leader checks and publishes again within VERIFY_INTERVAL,
    without a query, and the newcomer starts with the right value."""
    name, _ = counter_setting(service, "reported")
    leader = FaultWorker(service.url, "thread", [(name, "int", -1)], 60)
    workers = [leader]
    with reaping(workers):
        leader.ready()
        path = Path(leader.ask("segment_path"))
        with Segment.open(path, create=False) as watch:
            assert snapshot_value(watch, name) == 0
            assert watch.status().damage_reports == 0
            queries = service.count(path="/api/v1/query")
            _flips_in("blobs", 3)(path, random.Random(5))
            assert snapshot_value(watch, name) is None  # the blob's checksum no longer matches
            newcomer = FaultWorker(service.url, "async", [(name, "int", -1)], 60)
            workers.append(newcomer)
            newcomer.ready()  # its set_as_main() read the damaged blob, reported it, and got a repair
            assert newcomer.ask("wait_value", 0, 1.0) is not None
            assert wait_repaired(watch, name, 0, VERIFY_INTERVAL + 1.5) < VERIFY_INTERVAL + 1.5
            assert watch.status().damage_reports >= 1
            assert service.count(path="/api/v1/query") == queries  # a check repaired it, not an update
    check_readers(workers, 0)


@pytest.mark.stress
@pytest.mark.timeout(stress_seconds(45) + 180)
def test_segment_damaged_under_running_clients_long(service: HeksherService) -> None:
    """The same, round after round for HEKSHER_STRESS_SECONDS, with the real VERIFY_INTERVAL."""
    repairs, reads = _damage_round(service, stress_seconds(45), None, seed=int(time.time()))
    _report_repairs(repairs, reads, VERIFY_INTERVAL)
    assert max(t for times in repairs.values() for t in times) < VERIFY_INTERVAL + 1.5


def test_random_damage_under_running_clients(service: HeksherService) -> None:
    """Hypothesis picks byte flips in the header, the status block, the current slot or anywhere, while
    the value on the service moves on; four client processes read throughout."""
    interval = 0.2
    name, rule = counter_setting(service, "fuzzed")
    workers = [
        FaultWorker(service.url, KINDS[i % 2], [(name, "int", -1)], interval, verify_interval=FAST_VERIFY)
        for i in range(4)
    ]
    with reaping(workers):
        for w in workers:
            w.ready()
        counter = Counter(service, rule, period=3600)
        path = Path(workers[0].ask("segment_path"))

        @settings(
            max_examples=40,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(
            flips=st.lists(
                st.tuples(
                    st.sampled_from(["header", "status", "slot", "blobs", "anywhere"]),
                    st.integers(0, 2**32),
                    st.integers(1, 255),
                ),
                min_size=1,
                max_size=4,
            ),
            bump=st.booleans(),
        )
        def damage_and_read(flips: list[tuple[str, int, int]], bump: bool) -> None:
            for region, number, mask in flips:
                start, end = _region(path, region)
                flip(path, start + number % (end - start), mask)
            if bump:
                counter.bump()
            next_reports(workers)  # every reader read on with the damage in place

        damage_and_read()
        with Segment.open(path, create=False) as watch:
            wait_repaired(watch, name, counter.value, FAST_VERIFY + 3)
        final = counter.bump()
        for w in workers:
            assert w.ask("wait_value", final, interval + 3) is not None
    reads = check_readers(workers, final)
    print(f"random damage: 40 examples under 4 reader processes, {reads} get() calls, all values good")


# ---------------------------------------------------------------------------------------------------------
# Helper files


def test_helper_files_damaged_under_running_clients(service: HeksherService) -> None:
    """The lock file scribbled over, emptied, grown and opened up (newcomers refuse it, and serve
    without sharing, until it is private again); registry entries of live processes
    replaced by garbage; junk in the registry folder: one leader throughout, everyone keeps serving, the
    junk is reported once, and the damaged registrations come back when their owners write again."""
    interval = 0.3
    name, rule = counter_setting(service, "helpers")
    workers = [FaultWorker(service.url, KINDS[i % 2], [(name, "int", -1)], interval) for i in range(3)]
    with reaping(workers):
        for w in workers:
            w.ready()
        counter = Counter(service, rule, period=3600)
        leader = next(w for w in workers if w.ask("leading"))
        follower = next(w for w in workers if w is not leader)
        segment = Path(leader.ask("segment_path"))
        lock = segment.with_suffix(".lock")
        registry = Path(f"{segment}.d")

        def still_serving() -> None:
            value = counter.bump()
            for w in workers:
                assert w.ask("wait_value", value, interval + 3) is not None, w
            assert [w.ask("leading") for w in workers].count(True) == 1

        poke(lock, 0, os.urandom(4096))
        still_serving()
        os.truncate(lock, 0)
        still_serving()
        os.truncate(lock, 1 << 20)
        lock.chmod(0o666)
        still_serving()  # the running processes hold it open already
        # A newcomer does not open a lock file others may write: it starts all the same (issue 16, a bad
        # neighbour must not stop the app) but serves without sharing, and says why and what to do ...
        refused = FaultWorker(service.url, "thread", [(name, "int", -1)], interval)
        try:
            refused.ready()
            assert refused.ask("segment_path") is None
            (message,) = refused.ask("logs", "cannot share the host's rule cache")
            assert f"leader lock file {lock}: has mode 0o666" in message, message
        finally:
            refused.stop()
        lock.chmod(0o600)  # ... until the operator fixes it, as the message says

        entry = Path(follower.ask("registration"))
        entry.write_bytes(b"\x00garbage{")
        (registry / "not-a-registration.txt").write_bytes(b"junk")
        (registry / "123-456.reg").write_bytes(b"{}")  # a dead process's name: pruned
        still_serving()
        assert follower.ask("reload") is None  # its next write restores its registration
        assert msgspec.json.decode(entry.read_bytes())["pid"] == follower.pid
        still_serving()
        newcomer = FaultWorker(service.url, "thread", [(name, "int", -1)], interval)
        workers.append(newcomer)
        newcomer.ready()  # joins (the lock works, its registration is read) despite everything above
        assert not newcomer.ask("leading")
        still_serving()
        assert not (registry / "123-456.reg").exists()
        junk = leader.ask("logs", "not-a-registration.txt")
        assert len(junk) == 1, junk  # reported once, however many scans saw it
        assert stat_mode(registry) == 0o700
        final = counter.value
    check_readers(workers, final)


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# ---------------------------------------------------------------------------------------------------------
# Full disk


@contextlib.contextmanager
def small_tmpfs(size: str) -> Iterator[Path]:
    """A fresh tmpfs of ``size``, mounted for the test (skips when mounting is refused)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where = Path(tempfile.mkdtemp(prefix="heksher-full-"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
        shutil.rmtree(where, ignore_errors=True)


def fill(directory: Path, leave: int) -> Path:
    """Fill the filesystem of ``directory`` until about ``leave`` bytes are free; returns the filler."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        chunk = b"\xff" * (1 << 16)
        with pytest.raises(OSError) as full:  # noqa: PT012 - writing until the disk is full
            while True:
                f.write(chunk)
                f.flush()
    assert full.value.errno == errno.ENOSPC
    os.truncate(filler, max(0, os.path.getsize(filler) - leave))
    return filler


def _disk_full(
    service: HeksherService,
    leader_kind: str,
    shm_dir: str,
    fill_up: Callable[[FaultWorker], Callable[[], None]],
) -> None:
    """Leader and followers serve; the disk fills up; the next snapshot is bigger: the publish fails
    clearly, everyone keeps the previous snapshot, nobody gets SIGBUS; space returns: it goes through."""
    interval = 0.3
    counter_name, rule = counter_setting(service, "full")
    big_name = unique("big")
    service.declare(big_name, "str", "", ["user"])
    big_rule = service.add_rule(big_name, {"user": "alice"}, "small")
    settings_ = [(counter_name, "int", -1), (big_name, "str", "")]
    other = KINDS[1 - KINDS.index(leader_kind)]
    workers: list[FaultWorker] = []
    with reaping(workers):
        workers.append(FaultWorker(service.url, leader_kind, settings_, interval, shm_dir=shm_dir).ready())
        assert workers[0].ask("leading")
        for kind in (other, leader_kind):
            workers.append(FaultWorker(service.url, kind, settings_, interval, shm_dir=shm_dir).ready())
        leader = workers[0]
        for w in workers:
            assert w.ask("get", big_name) == "small"
        restore = fill_up(leader)
        try:
            service.set_rule_value(big_rule, "x" * 600_000)  # the next snapshot needs far more room
            service.set_rule_value(rule, 1)
            deadline = time.monotonic() + 10
            while not all(w.seen.errors for w in workers):
                assert time.monotonic() < deadline, [w.seen.errors for w in workers]
                drain_all(workers, 0.05)
            status = leader.ask("status")
            assert "No space left on device" in (status["last_error"] or ""), status
            assert any("publishing snapshots fails" in m for m in leader.ask("logs", "publishing"))
            for w in workers:
                assert "No space left on device" in w.seen.errors[0] or "publish" in w.seen.errors[0]
                assert w.ask("get", big_name) == "small"  # the previous snapshot, whole
                assert w.ask("get", counter_name) == 0
        finally:
            restore()
        # Space is back. The next change on the service goes through everywhere (that the change made
        # while the disk was full goes through by itself is test_failed_publish_is_retried).
        t0 = time.monotonic()
        service.set_rule_value(rule, 2)
        for w in workers:
            assert w.ask("wait_value", 2, interval + 3) is not None, w
        recovered = time.monotonic() - t0
        # Settings of one process follow a new snapshot one by one (as with heksher 0.2.2): the big
        # one may come a moment after the counter, never an older one after a newer.
        deadline = time.monotonic() + 5
        for w in workers:
            while w.ask("get", big_name) != "x" * 600_000:
                assert time.monotonic() < deadline, w
        assert leader.ask("status")["verdict"] == "ok"
    check_readers(workers, 2)
    print(
        f"disk full ({leader_kind} leader): the next change reached every process in "
        f"{recovered * 1000:.0f} ms"
    )
    assert recovered < interval + 1.0


@pytest.mark.parametrize("leader_kind", KINDS)
def test_disk_full_on_a_small_tmpfs(service: HeksherService, leader_kind: str) -> None:
    with small_tmpfs("4m") as mount:
        shm_dir = mount / "shm"

        def fill_up(leader: FaultWorker) -> Callable[[], None]:
            filler = fill(mount, leave=64 * 1024)
            return filler.unlink

        _disk_full(service, leader_kind, str(shm_dir), fill_up)


@pytest.mark.parametrize("leader_kind", KINDS)
def test_disk_full_simulated(service: HeksherService, leader_kind: str) -> None:
    """The same where no tmpfs can be mounted: ``posix_fallocate`` fails with ENOSPC in the leader."""

    def fill_up(leader: FaultWorker) -> Callable[[], None]:
        assert leader.ask("disk_full", True)
        return lambda: leader.ask("disk_full", False)

    _disk_full(service, leader_kind, os.environ["HEKSHER_SHM_DIR"], fill_up)


# ---------------------------------------------------------------------------------------------------------
# Bugs these tests found (fixed; each test guards its fix)


def test_truncated_under_running_clients(service: HeksherService) -> None:
    # This process must not map the segment: it would get the SIGBUS too.
    interval = 0.3
    name, _ = counter_setting(service, "truncated")
    workers = [FaultWorker(service.url, KINDS[i % 2], [(name, "int", -1)], interval) for i in range(2)]
    with reaping(workers):
        for w in workers:
            w.ready()
        leader = next(w for w in workers if w.ask("leading"))
        path = Path(leader.ask("segment_path"))
        os.truncate(path, layout.HEADER_SIZE)  # the header stays, the slots are cut off
        # The service does not change, so only the leader's self-check can notice and repair.
        deadline = time.monotonic() + VERIFY_INTERVAL + 8  # a bound: the leader checks at its next wake
        while True:
            leader.process.join(0.05)
            assert leader.alive, f"the leader died with {leader.process.exitcode} (-7 is SIGBUS)"
            if leader.ask("logs", "damaged or overwritten"):
                break
            assert time.monotonic() < deadline, "the leader did not repair the truncated segment"
        for w in workers:
            assert w.ask("get", name) == 0
            assert w.alive, f"{w} died with {w.process.exitcode} (-7 is SIGBUS)"


def test_failed_publish_is_retried(service: HeksherService) -> None:
    # One process: with followers, a pending acknowledgement for one of them can make the leader publish
    # again by chance (which is what the disk-full tests above see); alone, nothing does.
    interval = 0.3
    name, _ = counter_setting(service, "retried")
    big_name = unique("big")
    service.declare(big_name, "str", "", ["user"])
    big_rule = service.add_rule(big_name, {"user": "alice"}, "small")
    workers: list[FaultWorker] = []
    with reaping(workers):
        leader = FaultWorker(service.url, "thread", [(name, "int", -1), (big_name, "str", "")], interval)
        workers.append(leader.ready())
        assert leader.ask("disk_full", True)
        service.set_rule_value(big_rule, "x" * 600_000)  # needs more room: the publish fails
        deadline = time.monotonic() + 10
        while not leader.seen.errors:
            assert time.monotonic() < deadline, "the publish did not fail"
            drain_all(workers, 0.05)
        assert leader.ask("disk_full", False)
        # No further change on the service: the rules fetched while the disk was full must go through.
        deadline = time.monotonic() + VERIFY_INTERVAL + interval + 2
        while leader.ask("get", big_name) != "x" * 600_000:
            assert time.monotonic() < deadline, "the rules fetched while the disk was full never went through"
            leader.process.join(0.05)


def test_removed_lock_file_never_makes_two_leaders(service: HeksherService) -> None:
    interval = 0.3
    name, _ = counter_setting(service, "lockless")
    workers: list[FaultWorker] = []
    with reaping(workers):
        workers.append(FaultWorker(service.url, "thread", [(name, "int", -1)], interval).ready())
        assert workers[0].ask("leading")
        Path(workers[0].ask("segment_path")).with_suffix(".lock").unlink()  # a cleaner passed by
        workers.append(FaultWorker(service.url, "async", [(name, "int", -1)], interval).ready())
        deadline = time.monotonic() + VERIFY_INTERVAL + 1
        while [w.ask("leading") for w in workers].count(True) != 1:
            assert time.monotonic() < deadline, "two leaders"
            workers[1].process.join(0.05)


def test_removed_segment_file_is_recreated(service: HeksherService) -> None:
    interval = 0.3
    name, rule = counter_setting(service, "unlinked")
    workers: list[FaultWorker] = []
    with reaping(workers):
        workers.append(FaultWorker(service.url, "thread", [(name, "int", -1)], interval).ready())
        Path(workers[0].ask("segment_path")).unlink()  # a cleaner passed by
        late = FaultWorker(service.url, "async", [(name, "int", -1)], interval, client={"startup_timeout": 3})
        workers.append(late)
        late.ready()
        service.set_rule_value(rule, 1)
        assert late.ask("wait_value", 1, interval + 3) is not None


def test_damaged_registration_is_restored(service: HeksherService) -> None:
    interval = 0.3
    shared_name, _ = counter_setting(service, "shared")
    own_name, own_rule = counter_setting(service, "own")
    workers: list[FaultWorker] = []
    with reaping(workers):
        workers.append(FaultWorker(service.url, "thread", [(shared_name, "int", -1)], interval).ready())
        follower = FaultWorker(
            service.url, "async", [(shared_name, "int", -1), (own_name, "int", -1)], interval
        ).ready()
        workers.append(follower)
        Path(follower.ask("registration")).write_bytes(b"\x00garbage")
        service.set_rule_value(own_rule, 1)
        deadline = time.monotonic() + 4
        while follower.ask("get", own_name) != 1:
            assert time.monotonic() < deadline, "the follower's own setting is no longer updated"
            follower.process.join(0.05)
