"""A follower in this process (both client kinds), led by a worker process."""

from __future__ import annotations

import array
import asyncio
import os
import stat
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import msgspec
import pytest

import heksher_shm as heksher
from heksher_shm._engine.context import ErrorBook
from heksher_shm._model.snapshot import FORMAT, Ack, Head, Outcome, SettingEntry, encode_head
from heksher_shm._shm.layout import WORD_GENERATION
from heksher_shm.clients._answers import RequestAnswers
from heksher_shm.clients._contexts import Contexts
from heksher_shm.clients._feed import SettingsFeed
from heksher_shm.exceptions import LeaderUpdateError, SegmentCorruptedError, SegmentError
from heksher_shm.testing import Fault, HeksherService
from tests._procs import Worker
from tests._support import FEATURES, unique, until


@pytest.fixture(params=["async", "thread"])
def kind(request: pytest.FixtureRequest) -> str:
    """Followers exist only with sharing on: both client kinds, shared."""
    return str(request.param)


@pytest.fixture
def leader(service: HeksherService, workers: list[Worker]) -> Worker:
    w = Worker(service.url, "thread", [], 60)
    workers.append(w)
    w.ready()
    assert w.ask("leading")
    return w


async def test_follower_values_callbacks_and_errors(
    make_driver: Any, service: HeksherService, leader: Worker
) -> None:
    name = unique("follows")
    setting = heksher.Setting(name, int, ["user"], 0)
    driver = make_driver(service.url)
    driver.client.track_contexts(user="alice")
    await driver.set_as_main()
    assert not driver.client.leading
    assert name in service.settings  # the leader declared what this process registered
    rule = service.add_rule(name, {"user": "alice"}, 1)
    await driver.reload()
    assert setting.get(user="alice") == 1

    # on_update_ok fires in followers when the leader's update succeeds
    driver.updates_ok.clear()
    service.set_rule_value(rule, 2)
    await driver.reload()
    await until(driver.updates_ok.is_set, what="on_update_ok in the follower")
    assert setting.get(user="alice") == 2

    # a failed update: reload raises (async) or logs (thread); on_update_error fires here too
    service.inject_fault(Fault(status=503), count=1, path="/api/v1/query")
    if driver.kind == "async":
        with pytest.raises(httpx.HTTPError, match="503"):
            await driver.reload()
    else:
        await driver.reload()
    await until(lambda: len(driver.errors) >= 1, what="on_update_error in the follower")
    assert "503" in str(driver.errors[0])
    assert setting.get(user="alice") == 2  # last good values kept

    status = driver.client.shared_status()
    assert status.leader.pid == leader.pid
    assert os.getpid() in {p.pid for p in status.processes}
    assert leader.pid in {p.pid for p in status.processes}
    assert status.settings >= 1
    assert status.verdict == "ok"


async def test_modification_lock_holds_back_a_follower(
    make_driver: Any, service: HeksherService, leader: Worker
) -> None:
    name = unique("held")
    setting = heksher.Setting(name, int, ["user"], 0)
    driver = make_driver(service.url)
    driver.client.track_contexts(user="alice")
    await driver.set_as_main()
    rule = service.add_rule(name, {"user": "alice"}, 1)
    await driver.reload()
    lock = driver.client.modification_lock
    if driver.kind == "async":
        await lock.acquire()
    else:
        lock.acquire()
    try:
        service.set_rule_value(rule, 2)
        leader.ask("reload")  # the leader published the new value...
        status = driver.client.shared_status()
        applied = driver.client._feed.applied
        assert applied is not None
        assert status.generation > applied
        for _ in range(50):
            assert setting.get(user="alice") == 1  # ...but this process does not apply it while locked
            await asyncio.sleep(0)
    finally:
        lock.release()
    await until(lambda: setting.get(user="alice") == 2, what="applied after release")


async def test_get_applies_its_own_setting_first(service: HeksherService, leader: Worker) -> None:
    """The get() that finds a new snapshot applies it to its own setting only (its state is then current
    for the new generation); the others follow with their own get() or the next full apply, after
    which every state is current for the generation the process applied.

    An async client, so that its background task cannot start applying anything while this test
    does not await: every step below runs between two awaits, once the task is idle (its applies run
    in a worker thread under modification_lock, and one may still be finishing when reload() returns).
    """
    names = [unique("first"), unique("other")]
    first, other = (heksher.Setting(name, int, ["user"], 0) for name in names)
    client = heksher.AsyncHeksherClient(service.url, 60, FEATURES)
    client.track_contexts(user="alice")
    await client.set_as_main()
    try:
        rules = [service.add_rule(name, {"user": "alice"}, 1) for name in names]
        await client.reload()
        await until(lambda: not client.modification_lock.locked(), what="the background task idle")
        assert (first.get(user="alice"), other.get(user="alice")) == (1, 1)
        applied = client._feed.applied
        assert applied is not None
        assert first._state.generation == other._state.generation == applied

        for rule in rules:
            service.set_rule_value(rule, 2)
        leader.ask("reload")  # published; this loop is not awaited, so nothing applies it yet
        published = client._link.transport.generation()
        assert published > applied
        assert first.get(user="alice") == 2
        assert first._state.generation == published  # current for the new snapshot, on its own
        assert client._feed.applied == applied  # the process as a whole: not yet
        assert other._state.digest is not None
        assert other._state.generation == applied  # stale: its next get() applies it
        assert other.get(user="alice") == 2
        assert other._state.generation == published

        await client.reload()  # a full apply: every state current for what the process applied
        latest = client._feed.applied
        assert latest is not None
        assert latest >= published
        assert first._state.generation == other._state.generation == latest
        assert (first.get(user="alice"), other.get(user="alice")) == (2, 2)
    finally:
        await client.aclose()


async def test_waiting_rules_keep_one_fallback(service: HeksherService, leader: Worker) -> None:
    """A setting nobody reads gets new rules with every snapshot; each waits for its first get().
    What it would fall back to stays the rules last in use, not a chain of earlier waiting ones
    (which would keep every earlier snapshot's copy alive)."""
    name = unique("unread")
    setting = heksher.Setting(name, int, ["user"], 0)
    client = heksher.AsyncHeksherClient(service.url, 60, FEATURES)
    client.track_contexts(user="alice")
    await client.set_as_main()
    try:
        rule = service.add_rule(name, {"user": "alice"}, 0)
        await client.reload()
        assert setting.get(user="alice") == 0
        in_use = setting._state
        for value in range(1, 6):
            service.set_rule_value(rule, value)
            await client.reload()
            pending = setting._state.pending
            assert pending is not None, "the rules were decoded before anyone asked"
            assert pending.restore is in_use  # type: ignore[attr-defined]
        assert setting.get(user="alice") == 5
        assert setting._state.pending is None
    finally:
        await client.aclose()


def test_registration_writers_leave_the_latest_wish(
    service: HeksherService, leader: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """set_as_main/reload write the registration from the caller's thread while the background loop
    may re-register a missing one. A re-registration computed before a request and written after it
    would leave a stale request number (and a set_as_main waiting for an acknowledgement nobody was
    asked for): the writes are serialised, so the request's comes last."""
    client = heksher.ThreadHeksherClient(service.url, 60, FEATURES)
    client.set_as_main()
    try:
        assert client._parts is not None
        registry = client._parts.registry
        write = registry.write
        computed, requested = threading.Event(), threading.Event()
        housekeeper_ident: list[int] = []

        def slow_housekeeper_write(registration: Any) -> bytes:
            if threading.get_ident() in housekeeper_ident:
                computed.set()  # its wish is computed, its write not done
                requested.wait(1.0)  # the request, if it can get in first (it cannot: it waits)
            return write(registration)

        monkeypatch.setattr(registry, "write", slow_housekeeper_write)

        def housekeeping() -> None:  # what the housekeeping does when it finds no registration
            housekeeper_ident.append(threading.get_ident())
            client._registration.changed()

        def request() -> None:
            client._registration.request()
            requested.set()

        housekeeper = threading.Thread(target=housekeeping)
        housekeeper.start()
        assert computed.wait(10), "the housekeeping did not re-register"
        requester = threading.Thread(target=request)
        requester.start()
        for t in (housekeeper, requester):
            t.join(10)
        (ours,) = [r for r in registry.scan(prune=False).registrations if r.pid == os.getpid()]
        assert ours.reload_seq == client._registration.reload_seq
    finally:
        client.close()


async def test_files_are_private(make_driver: Any, service: HeksherService) -> None:
    _keep = heksher.Setting(unique("private"), int, ["user"], 0)
    driver = make_driver(service.url)
    await driver.set_as_main()
    segment = Path(driver.client.segment_path)
    assert stat.S_IMODE(segment.parent.stat().st_mode) == 0o700
    for path in [segment, segment.with_suffix(".lock"), *Path(f"{segment}.d").iterdir()]:
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600, path
    assert stat.S_IMODE(Path(f"{segment}.d").stat().st_mode) == 0o700


def _segment_for(client: Any) -> Path:
    from heksher_shm._engine.shared import default_segment_name
    from heksher_shm._shm.segment import resolve_shm_dir

    name = default_segment_name(client._service_url, client._context_features)
    return resolve_shm_dir(None) / f"{name}.seg"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown a file to another user")
async def test_foreign_segment_refused(make_driver: Any, service: HeksherService) -> None:
    driver = make_driver(service.url)
    path = _segment_for(driver.client)
    path.write_bytes(b"")
    path.chmod(0o600)
    os.chown(path, 65534, 65534)
    await driver.set_as_main()  # the application starts: it serves without sharing
    assert driver.client.segment_path is None
    with pytest.raises(SegmentError, match=str(path)):
        driver.client.shared_status()


async def test_symlink_segment_refused(make_driver: Any, service: HeksherService, tmp_path: Path) -> None:
    driver = make_driver(service.url)
    path = _segment_for(driver.client)
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious")
    path.symlink_to(target)
    await driver.set_as_main()
    with pytest.raises(SegmentError, match=r"symbolic link|symlink"):
        driver.client.shared_status()
    assert target.read_bytes() == b"precious"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "zeroed"])
async def test_damaged_segment_is_repaired(make_driver: Any, service: HeksherService, damage: str) -> None:
    name = unique("repaired")
    setting = heksher.Setting(name, int, ["user"], 0)
    service.declare(name, "int", 5, ["user"])
    first = heksher.ThreadHeksherClient(service.url, 60, ["user", "theme", "environment"])
    await asyncio.to_thread(first.set_as_main)
    path = Path(first.segment_path or "")
    first.close()
    size = path.stat().st_size
    with path.open("r+b") as f:
        if damage == "garbage":
            f.write(os.urandom(size))
        elif damage == "zeroed":
            f.write(bytes(4096))
        else:
            f.truncate(100)
    driver = make_driver(service.url)
    await driver.set_as_main()  # leads, and republishes over the damage
    assert setting.get(user="x") == 5
    assert driver.client.shared_status().verdict == "ok"


async def test_registration_restored(make_driver: Any, service: HeksherService, leader: Worker) -> None:
    _keep = heksher.Setting(unique("restored"), int, ["user"], 0)
    driver = make_driver(service.url)
    await driver.set_as_main()
    from heksher_shm._shm.identity import current_identity

    path = driver.client._parts.registry.path_for(current_identity())
    path.unlink()
    # Nothing polls: the next time the process wakes (here: the leader's ring after an update,
    # which reaches every live doorbell, registered or not), it writes its registration again.
    leader.ask("reload")
    await until(path.exists, timeout=5, what="registration written again")


async def test_leader_repairs_a_damaged_segment(service: HeksherService, workers: list[Worker]) -> None:
    from heksher_shm._engine.policy import VERIFY_INTERVAL

    name = unique("scribbled")
    setting = heksher.Setting(name, int, ["user"], 0)
    client = heksher.ThreadHeksherClient(service.url, 60, ["user", "theme", "environment"])
    client.track_contexts(user="alice")
    await asyncio.to_thread(client.set_as_main)
    try:
        assert client.leading
        service.add_rule(name, {"user": "alice"}, 9)
        await asyncio.to_thread(client.reload)
        follower = Worker(service.url, "async", [name], 60)
        workers.append(follower)
        follower.ready()
        assert follower.ask("get", name, {"user": "alice"}) == 9
        path = Path(client.segment_path or "")
        before = client.shared_status().generation
        with path.open("r+b") as f:  # scribble over everything after the header
            f.seek(4096)
            f.write(os.urandom(path.stat().st_size - 4096))
        # Nothing polls the segment: the next process that reads it finds the damage and rings the
        # leader, which checks the segment and publishes again (at most VERIFY_INTERVAL after its
        # last check), while that process waits for its rules.
        newcomer = Worker(service.url, "thread", [name], 60)
        workers.append(newcomer)
        newcomer.ready()
        await until(lambda: client.shared_status().generation > before, timeout=VERIFY_INTERVAL + 3)
        assert client.shared_status().verdict == "ok"
        assert newcomer.ask("get", name, {"user": "alice"}) == 9
        assert follower.ask("get", name, {"user": "alice"}) == 9  # never a wrong value, never an error
        assert setting.get(user="alice") == 9
    finally:
        client.close()


def test_a_later_snapshot_without_the_rules_of_a_declared_setting_is_no_answer() -> None:
    """The new leader answered set_as_main with its first snapshot, where the declaration had failed; the
    process, stopped meanwhile, applied a later one first, where the declaration had succeeded but the
    query that followed had failed (no rules for the setting). That is the query's error, not a success
    (simulation seed 1059092)."""
    digest = b"d" * 16
    head = Head(
        format=FORMAT,
        term=2,
        published=0.0,
        context_features=["user"],
        settings=[],
        outcomes={digest: Outcome("size", "uptodate", 200, type="int", features=("user",))},
        ok=False,
        error="ReadError: connection reset by peer",
    )
    feed = SimpleNamespace(
        head=head,
        accepted=3,
        settings=[SimpleNamespace(name="size", _digest=digest)],
        take_released_failures=dict,
    )
    link = SimpleNamespace(joined=True, host=SimpleNamespace(read_ack=lambda: Ack(1, term=2, generation=1)))
    answers = RequestAnswers(cast(Any, feed), cast(Any, None), cast(Any, link), ErrorBook(1), 30.0)
    answers.take()
    assert answers.acked(1)
    error = answers.error(1, starting=True)
    assert isinstance(error, LeaderUpdateError)
    assert "connection reset by peer" in str(error)
    # Once a query with it succeeded, the same answer counts.
    served = [SettingEntry("size", 0, b"x", 0)]
    feed.head = msgspec.structs.replace(head, settings=served, ok=True, error=None)
    assert answers.error(1, starting=True) is None


def test_a_snapshot_with_a_damaged_blob_is_not_applied() -> None:
    """A byte flipped in a setting's blob after the leader published it: the apply keeps the previous
    rules and does not count the snapshot as applied, so a reload() it answers waits for the leader's
    repair instead of returning with the previous rules (simulation seed 1632, long profile)."""

    class DamagedBlob:
        def verified(self) -> bytes:
            raise SegmentCorruptedError("checksum mismatch in blob 0")

    name = unique("size")
    head = Head(
        format=FORMAT,
        term=11,
        published=0.0,
        context_features=["user"],
        settings=[SettingEntry(name, 0, b"d" * 16, 1)],
        outcomes={},
        ok=True,
    )
    words = [0] * (WORD_GENERATION + 1)
    words[WORD_GENERATION] = 13
    transport = SimpleNamespace(
        words=array.array("Q", words),
        generation=lambda: 13,
        read_head=lambda: SimpleNamespace(generation=13, head=encode_head(head)),
        copy_blobs=lambda generation, indices: [DamagedBlob() for _ in indices],
    )
    damaged: list[bool] = []
    feed = SettingsFeed(
        Contexts(),
        cast(Any, transport),
        cast(Any, None),
        is_main=lambda: False,
        damaged=lambda: damaged.append(True),
        update_failed=lambda error: None,
        applied=lambda: None,
    )
    feed.adopt([heksher.Setting(name, int, ["user"], 0)])
    feed.apply_latest(notify=False)
    assert damaged
    assert feed.accepted is None  # settled on, not applied
    assert feed.head is None
    assert feed.applied == 13  # not read again at every get()
