"""The followers' registry: round trips, pruning by liveness, hostile files, change detection."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path

import msgspec
import pytest

from heksher_shm._shm import registry as registry_module
from heksher_shm._shm.identity import ProcessIdentity, current_identity, parse_token, pid_namespace, token
from heksher_shm._shm.registration import Registration, encode_declaration, validate_registration
from heksher_shm._shm.registry import MAX_REGISTRATION_BYTES, Registry, registry_directory
from heksher_shm.exceptions import SegmentError
from tests import _election_workers as workers

SPAWN = multiprocessing.get_context("spawn")
STARTUP_DEADLINE = 20.0
STEP_DEADLINE = 5.0


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(registry_directory(tmp_path / "segment"))


def registration_for(who: ProcessIdentity, **fields: object) -> Registration:
    values: dict[str, object] = {"kind": "thread"}
    values.update(fields)
    return Registration(pid=who.pid, create_time=who.create_time, pidns=who.pidns, **values)  # type: ignore[arg-type]


def entry_name(who: ProcessIdentity) -> str:
    return f"{token(who)}.reg"


def wait_until(condition: Callable[[], bool], what: str, deadline: float = STEP_DEADLINE) -> None:
    """Poll ``condition`` until it holds; fail after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, f"timed out waiting until {what}"
        time.sleep(0.005)


def settle(registry: Registry) -> None:
    """Scan until changed() says nothing changed (the leader's loop, in short)."""

    def settled() -> bool:
        if not registry.changed():
            return True
        registry.scan()
        return False

    wait_until(settled, "the registry settles")


def test_write_scan_round_trip(registry: Registry) -> None:
    me = current_identity()
    sent = registration_for(
        me,
        kind="async",
        declarations=[
            encode_declaration({"name": "cache_ttl", "version": "1.0", "type": "int", "default_value": 5}),
            encode_declaration({"name": "a.b_c", "version": "12.34", "metadata": {"x": [1, 2]}}),
        ],
        tracked={"user": ["alice", "bob"], "theme": "*"},
        reload_seq=3,
    )
    before = time.time()
    registry.write(sent)
    path = registry.path_for(me)
    assert path.name == entry_name(me)
    assert path.stat().st_mode & 0o777 == 0o600
    assert registry.directory.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in registry.directory.iterdir()] == [path.name]  # no temp file left

    result = registry.scan()
    assert result.rejected == ()
    assert result.dead == ()
    (received,) = result.registrations
    assert received.updated >= before
    assert msgspec.structs.replace(received, updated=0.0) == sent
    assert received.identity == me
    assert [msgspec.json.decode(raw) for raw in received.declarations][1]["metadata"] == {"x": [1, 2]}

    registry.remove()
    assert not path.exists()
    registry.remove()  # idempotent
    assert registry.scan().registrations == ()


def test_write_rejects_invalid_registrations(registry: Registry) -> None:
    me = current_identity()
    bad = [
        registration_for(me, declarations=[encode_declaration({"name": "bad name!", "version": "1.0"})]),
        registration_for(me, declarations=[encode_declaration({"name": "ok", "version": "1"})]),
        registration_for(me, declarations=[msgspec.Raw(b"[1, 2]")]),
        registration_for(me, tracked={"user": "alice"}),
        registration_for(me, format=2),
        registration_for(me, reload_seq=-1),
    ]
    for registration in bad:
        assert validate_registration(registration) is not None
        with pytest.raises(ValueError, match="invalid registration"):
            registry.write(registration)
    huge = registration_for(
        me,
        declarations=[
            encode_declaration({"name": "x", "version": "1.0", "pad": "y" * MAX_REGISTRATION_BYTES})
        ],
    )
    with pytest.raises(ValueError, match="over the limit"):
        registry.write(huge)
    assert list(registry.directory.iterdir()) == []


def test_dead_process_entry_is_pruned(registry: Registry, spawn: Callable[..., BaseProcess]) -> None:
    ours, theirs = SPAWN.Pipe()
    child = spawn(workers.register_and_wait, str(registry.directory), theirs)
    theirs.close()
    assert ours.poll(STARTUP_DEADLINE)
    pid, create_time, pidns = ours.recv()
    name = entry_name(ProcessIdentity(pid, create_time, pidns))
    assert [reg.pid for reg in registry.scan().registrations] == [pid]

    os.kill(pid, signal.SIGKILL)
    child.join(STEP_DEADLINE)
    assert child.exitcode == -signal.SIGKILL

    assert registry.scan(prune=False).dead == (name,)
    assert (registry.directory / name).exists()
    result = registry.scan()
    assert result.registrations == ()
    assert result.dead == (name,)
    assert not (registry.directory / name).exists()


def test_pid_reuse_counts_as_dead(registry: Registry) -> None:
    me = current_identity()
    # right pid, wrong start (a later one: an earlier one may be negative right after boot)
    impostor = ProcessIdentity(me.pid, me.create_time + 100.0, me.pidns)
    registry.write(registration_for(impostor))
    registry.write(registration_for(me))
    result = registry.scan()
    assert [reg.identity for reg in result.registrations] == [me]
    assert result.dead == (entry_name(impostor),)
    assert not registry.path_for(impostor).exists()


def test_stale_temp_file_of_a_dead_writer_is_removed(registry: Registry) -> None:
    me = current_identity()
    dead_writer = ProcessIdentity(me.pid, me.create_time + 50.0)
    stale = f".{entry_name(dead_writer)[:-4]}.0123abcd.tmp"
    live = f".{entry_name(me)[:-4]}.89abcdef.tmp"
    for name in (stale, live):
        (registry.directory / name).write_bytes(b'{"half": ')
    result = registry.scan()
    assert result.dead == (stale,)
    assert result.rejected == ()  # a live writer's temp file is a write in progress
    assert not (registry.directory / stale).exists()
    assert (registry.directory / live).exists()


def _oversized(path: Path) -> None:
    with open(path, "wb") as file:
        file.truncate(MAX_REGISTRATION_BYTES + 1)


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xffnot json at all")


def _symlink(path: Path) -> None:
    # Points at a perfectly valid registration: still refused.
    target = path.parent.parent / "elsewhere.reg"
    target.write_bytes(msgspec.json.encode(registration_for(current_identity())))
    path.symlink_to(target)


def _fifo(path: Path) -> None:
    os.mkfifo(path, 0o600)


def _directory(path: Path) -> None:
    path.mkdir()


# A PID no process can have (above Linux's PID_MAX_LIMIT): dead wherever it is judged.
NEVER_A_PID = 4_194_305


@pytest.mark.skipif(pid_namespace() == 0, reason="needs a readable /proc/self/ns/pid")
def test_registration_of_another_pid_namespace_is_kept_not_pruned(registry: Registry) -> None:
    """Two containers sharing the folder: a PID of theirs means nothing here, so a scan never prunes it."""
    me = current_identity()
    assert me.pidns == pid_namespace()
    theirs = ProcessIdentity(NEVER_A_PID, me.create_time, me.pidns + 1)
    ours_dead = ProcessIdentity(NEVER_A_PID, me.create_time, me.pidns)
    registry.write(registration_for(theirs))
    registry.write(registration_for(ours_dead))
    their_temp = f".{token(theirs)}.0123abcd.tmp"  # their write in progress: not ours to judge either
    (registry.directory / their_temp).write_bytes(b'{"half": ')
    assert entry_name(theirs) != entry_name(ours_dead)  # same pid and start, another namespace

    result = registry.scan()
    assert [reg.identity for reg in result.registrations] == [theirs]
    assert result.dead == (entry_name(ours_dead),)
    assert registry.path_for(theirs).exists()
    assert (registry.directory / their_temp).exists()
    # Not judged at all: even a liveness test that calls everyone dead keeps it.
    nobody_lives = Registry(registry.directory, alive=lambda identity: False)
    assert [reg.identity for reg in nobody_lives.scan().registrations] == [theirs]
    assert registry.path_for(theirs).exists()


def test_identity_tokens_name_the_namespace_and_read_back() -> None:
    me = current_identity()
    assert token(me) == f"{me.pid}-{round(me.create_time * 1_000_000)}-{me.pidns}"
    assert parse_token(token(me)) == me
    unknown = ProcessIdentity(me.pid, me.create_time)  # namespace unknown: the older spelling
    assert token(unknown) == f"{me.pid}-{round(me.create_time * 1_000_000)}"
    assert parse_token(token(unknown)) == unknown
    for bad in ("", "0-1", "1-2-0", "1-2-", "1-2-3-4", "x-1", f"{me.pid}-1.reg"):
        assert parse_token(bad) is None, bad


def test_a_registration_naming_another_namespace_than_its_file_is_rejected(registry: Registry) -> None:
    me = current_identity()
    lying = ProcessIdentity(me.pid, me.create_time, me.pidns + 1)
    (registry.directory / entry_name(me)).write_bytes(msgspec.json.encode(registration_for(lying)))
    result = registry.scan()
    assert result.registrations == ()
    assert [r.name for r in result.rejected] == [entry_name(me)]
    assert "not the file's owner" in result.rejected[0].reason


def _foreign(path: Path) -> None:
    path.write_bytes(msgspec.json.encode(registration_for(current_identity())))
    os.chown(path, 65534, 65534)


def _other_identity(path: Path) -> None:
    me = current_identity()
    path.write_bytes(msgspec.json.encode(registration_for(ProcessIdentity(me.pid + 1, me.create_time))))


def _bad_declaration(path: Path) -> None:
    me = current_identity()
    body = msgspec.json.encode(registration_for(me)).replace(
        b'"declarations":[]', b'"declarations":[{"name":"x y","version":"1.0"}]'
    )
    path.write_bytes(body)


def _future_format(path: Path) -> None:
    path.write_bytes(msgspec.json.encode(registration_for(current_identity(), format=9)))


HOSTILE: dict[str, tuple[Callable[[Path], None], str]] = {
    "oversized": (_oversized, "too large"),
    "garbage": (_garbage, "not a valid registration"),
    "symlink": (_symlink, "symbolic link"),
    "fifo": (_fifo, "not a regular file"),
    "directory": (_directory, "is a directory"),
    "foreign": (_foreign, "owned by uid 65534"),
    "other identity": (_other_identity, "not the file's owner"),
    "bad declaration": (_bad_declaration, "invalid name 'x y'"),
    "future format": (_future_format, "unsupported format 9"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_entries_are_rejected_with_a_reason(
    registry: Registry, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    if case == "foreign" and os.geteuid() != 0:
        pytest.skip("needs root to chown")
    make, reason = HOSTILE[case]
    name = entry_name(current_identity())  # named after a live process: not pruned
    make(registry.directory / name)
    caplog.set_level(logging.WARNING, logger="heksher_shm.registry")

    started = time.monotonic()
    first = registry.scan()
    second = registry.scan()
    assert time.monotonic() - started < STEP_DEADLINE  # nothing blocks (FIFO!)

    for result in (first, second):
        assert result.registrations == ()
        assert len(result.rejected) == 1
        assert result.rejected[0].name == name
        assert reason in result.rejected[0].reason
    (record,) = caplog.records  # logged once, not on every scan
    assert record.heksher_shm_reason == first.rejected[0].reason  # type: ignore[attr-defined]
    assert record.heksher_shm_path == str(registry.directory / name)  # type: ignore[attr-defined]
    assert (registry.directory / name).exists() or (registry.directory / name).is_symlink()


def test_hostile_entries_of_dead_processes_are_removed(registry: Registry) -> None:
    me = current_identity()
    dead = ProcessIdentity(me.pid, me.create_time + 10.0)
    os.mkfifo(registry.directory / entry_name(dead))
    result = registry.scan()
    assert result.dead == (entry_name(dead),)
    assert list(registry.directory.iterdir()) == []


def test_unexpected_names_are_reported_not_removed(registry: Registry) -> None:
    (registry.directory / "notes.txt").write_text("hi")
    result = registry.scan()
    assert [(r.name, r.reason) for r in result.rejected] == [("notes.txt", "unexpected file name")]
    assert (registry.directory / "notes.txt").exists()


def test_unsafe_registry_directories_are_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.d"
    real.mkdir(mode=0o700)
    link = tmp_path / "link.d"
    link.symlink_to(real)
    with pytest.raises(SegmentError, match=r"link\.d.*symbolic link"):
        Registry(link)
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign.d"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
        with pytest.raises(SegmentError, match=r"foreign\.d.*owned by uid 65534"):
            Registry(foreign)
    loose = tmp_path / "loose.d"
    loose.mkdir()
    loose.chmod(0o755)
    Registry(loose)
    assert loose.stat().st_mode & 0o777 == 0o700


def test_changed_reports_writes_and_removals(registry: Registry) -> None:
    me = current_identity()
    assert registry.changed()  # never scanned
    registry.scan()
    settle(registry)
    assert not registry.changed()

    registry.write(registration_for(me))
    assert registry.changed()
    assert registry.changed()  # stays True until a scan
    registry.scan()
    # Right after a change the stamp is "racy" (coarse timestamps), so
    # changed() may stay True for a moment, but it settles once scanned.
    settle(registry)

    registry.write(registration_for(me, reload_seq=1))
    assert registry.changed()
    assert registry.scan().registrations[0].reload_seq == 1
    settle(registry)

    registry.remove()
    assert registry.changed()


def test_unchanged_files_are_not_read_again(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    me = current_identity()
    registry.write(registration_for(me))
    path = registry.path_for(me)
    mtime_ns = path.stat().st_mtime_ns
    wait_until(
        lambda: not registry_module._is_racy(mtime_ns, time.time_ns()), "the file's timestamp has aged", 10.0
    )

    reads: list[str] = []
    original = Registry._load

    def counting(self: Registry, *args: object, **kwargs: object) -> object:
        reads.append("read")
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Registry, "_load", counting)
    assert len(registry.scan().registrations) == 1
    assert len(registry.scan().registrations) == 1
    assert reads == ["read"]

    registry.write(registration_for(me, reload_seq=7))  # same size, new content
    assert registry.scan().registrations[0].reload_seq == 7
    assert reads == ["read", "read"]


def test_a_fresh_stamp_is_never_trusted(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two writes within one timestamp tick, the second reusing the freed
    # inode and having the same size, leave (inode, mtime, size) unchanged.
    # Simulated here by rewriting in place and restoring the mtime; the
    # window is widened so the file stays "fresh" however slow this machine is.
    monkeypatch.setattr(registry_module, "_RACY_WINDOW_NS", 60 * 10**9)
    monkeypatch.setattr(registry_module, "_RACY_WINDOW_COARSE_NS", 60 * 10**9)
    me = current_identity()
    registry.write(registration_for(me, reload_seq=1))
    path = registry.path_for(me)
    before = path.stat()
    assert registry.scan().registrations[0].reload_seq == 1
    assert registry.changed()  # the directory's stamp is fresh too

    with open(path, "r+b") as file:
        file.write(path.read_bytes().replace(b'"reload_seq":1', b'"reload_seq":2'))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )
    assert registry.scan().registrations[0].reload_seq == 2


def test_readers_never_see_a_partial_file(registry: Registry, spawn: Callable[..., BaseProcess]) -> None:
    ours, theirs = SPAWN.Pipe()
    writer = spawn(workers.rewrite_loop, str(registry.directory), 400, theirs)
    theirs.close()
    assert ours.poll(STARTUP_DEADLINE)
    assert ours.recv() == "started"
    assert writer.pid is not None
    scans = raw_reads = 0
    deadline = time.monotonic() + STARTUP_DEADLINE
    while not ours.poll(0):
        assert time.monotonic() < deadline, "writer did not finish"
        result = registry.scan()
        assert result.rejected == ()
        assert [reg.pid for reg in result.registrations] == [writer.pid]
        scans += 1
        for path in registry.directory.glob("*.reg"):
            try:
                data = path.read_bytes()
            except FileNotFoundError:  # pragma: no cover - replaced between glob and open
                continue
            assert validate_registration(msgspec.json.decode(data, type=Registration)) is None
            raw_reads += 1
    assert ours.recv() == "done"
    writer.join(STEP_DEADLINE)
    assert writer.exitcode == 0
    assert scans > 5
    assert raw_reads > 5
    assert [p.name for p in registry.directory.iterdir() if p.name.endswith(".tmp")] == []
