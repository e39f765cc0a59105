"""Security, end to end: private files, refused impostors, other users locked out, hostile registrations.

The unit tests of each file kind are in test_segment.py, test_election.py and
test_registry.py; these check what a *client* does with the same hostile
files, and what another user can do to a running host.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import heksher_shm as heksher
from heksher_shm._engine.shared import default_segment_name
from heksher_shm._shm.election import LeaderLock
from heksher_shm._shm.identity import ProcessIdentity, current_identity, identity_of, token
from heksher_shm._shm.registry import MAX_REGISTRATION_BYTES, registry_directory
from heksher_shm._shm.segment import Segment
from heksher_shm.exceptions import SegmentError
from heksher_shm.testing import HeksherService
from tests._fault_workers import FaultWorker, reaping
from tests._support import FEATURES, unique

IS_ROOT = os.geteuid() == 0
NOBODY = 65534
needs_root = pytest.mark.skipif(
    not IS_ROOT, reason="needs root: files of another uid, running as another uid"
)


def _paths(url: str, shm_dir: Path) -> dict[str, Path]:
    base = shm_dir / default_segment_name(url, FEATURES)
    segment = base.with_suffix(".seg")
    return {"segment": segment, "lock": base.with_suffix(".lock"), "registry": registry_directory(segment)}


def _plant(path: Path, what: str, elsewhere: Path) -> Callable[[], None]:
    """Put an impostor at ``path``; returns a check that it was left as it was."""
    if what == "symlink":
        elsewhere.mkdir(exist_ok=True)
        target = elsewhere / "precious"
        target.write_bytes(b"precious")
        path.symlink_to(target)
        return lambda: _assert(path.is_symlink() and target.read_bytes() == b"precious")
    if what == "symlink to a folder":
        elsewhere.mkdir(exist_ok=True)
        path.symlink_to(elsewhere, target_is_directory=True)
        return lambda: _assert(path.is_symlink() and list(elsewhere.iterdir()) == [])
    if what == "fifo":
        os.mkfifo(path, 0o600)
        return lambda: _assert(stat.S_ISFIFO(path.lstat().st_mode))
    if what == "directory":
        path.mkdir(mode=0o700)
        return lambda: _assert(path.is_dir() and list(path.iterdir()) == [])
    if what == "file":
        path.write_bytes(b"")
        path.chmod(0o600)
        return lambda: _assert(path.is_file())
    if what == "foreign":
        path.write_bytes(b"")
        path.chmod(0o600)
        os.chown(path, NOBODY, NOBODY)
        return lambda: _assert(path.lstat().st_uid == NOBODY)
    if what == "foreign folder":
        path.mkdir(mode=0o700)
        os.chown(path, NOBODY, NOBODY)
        return lambda: _assert(path.lstat().st_uid == NOBODY)
    raise ValueError(what)


def _assert(condition: bool) -> None:
    assert condition, "the planted file was changed"


async def _join(kind: str, url: str) -> tuple[BaseException | None, float]:
    """Create a client of ``kind`` and make it main; returns (why it could not share, seconds it took).

    A file or folder that must not be used never stops the application (issue 16, "a bad neighbour"):
    ``set_as_main()`` succeeds, the client serves without sharing, and ``shared_status()`` raises the
    refusal, naming the path.
    """
    cls: type[Any] = heksher.AsyncHeksherClient if kind == "async" else heksher.ThreadHeksherClient
    # A refusal must come at once; the short timeout only bounds the wait when it does not.
    client = cls(url, 60, FEATURES, startup_timeout=1.5)
    start = time.monotonic()
    raised: BaseException | None = None
    try:
        if kind == "async":
            await client.set_as_main()
        else:
            await asyncio.to_thread(client.set_as_main)
    except Exception as e:
        raised = e
    elapsed = time.monotonic() - start
    if raised is None and client.segment_path is None:
        assert client.leading  # alone: it polls for itself
        try:
            client.shared_status()
        except SegmentError as refusal:
            raised = refusal
    if kind == "async":
        await client.aclose()
    else:
        await asyncio.to_thread(client.close)
    return raised, elapsed


def _planted(path_kind: str, what: str) -> Any:
    marks = [needs_root] if what.startswith("foreign") else []
    return pytest.param(path_kind, what, marks=marks, id=f"{path_kind}-{what.replace(' ', '-')}")


# ---------------------------------------------------------------------------------------------------------
# Private files


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_files_are_private_whatever_the_umask(service: HeksherService, tmp_path: Path, kind: str) -> None:
    """A process with umask 000 creates the folder 0700 and every file 0600."""
    shm_dir = tmp_path / "fresh" / "shm"  # does not exist yet: the client creates it
    name = unique("private")
    workers: list[FaultWorker] = []
    with reaping(workers):
        workers.append(FaultWorker(service.url, kind, [(name, "int", 0)], 60, shm_dir=str(shm_dir), umask=0))
        workers[0].ready()
        paths = _paths(service.url, shm_dir)
        assert stat.S_IMODE(shm_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(paths["registry"].stat().st_mode) == 0o700
        for path in [paths["segment"], paths["lock"], *paths["registry"].iterdir()]:
            st = path.lstat()
            # regular files, and the doorbells: Unix sockets
            assert stat.S_ISREG(st.st_mode) or (path.suffix == ".bell" and stat.S_ISSOCK(st.st_mode)), path
            assert stat.S_IMODE(st.st_mode) == 0o600, (path, oct(st.st_mode))
            assert st.st_uid == os.geteuid()


# ---------------------------------------------------------------------------------------------------------
# Impostors in place of our files


@pytest.mark.parametrize("kind", ["thread", "async"])
@pytest.mark.parametrize(
    ("path_kind", "what"),
    [
        _planted("segment", "symlink"),
        _planted("segment", "fifo"),
        _planted("segment", "directory"),
        _planted("segment", "foreign"),
        _planted("registry", "symlink to a folder"),
        _planted("registry", "fifo"),
        _planted("registry", "file"),
        _planted("registry", "foreign folder"),
    ],
)
async def test_impostor_is_refused_by_the_client(
    service: HeksherService, tmp_path: Path, kind: str, path_kind: str, what: str
) -> None:
    """The client refuses the impostor at once, naming the path, serves without sharing, and leaves the
    impostor alone."""
    shm_dir = Path(os.environ["HEKSHER_SHM_DIR"])
    path = _paths(service.url, shm_dir)[path_kind]
    untouched = _plant(path, what, tmp_path / "elsewhere")
    raised, elapsed = await _join(kind, service.url)
    assert isinstance(raised, SegmentError), repr(raised)
    assert str(path) in str(raised)
    assert elapsed < 2.0
    untouched()


@pytest.mark.parametrize("what", ["symlink", "fifo", "directory", pytest.param("foreign", marks=needs_root)])
def test_impostor_lock_file_is_refused_by_the_lock(tmp_path: Path, what: str) -> None:
    """The client-level counterpart is test_impostor_lock_file_is_refused_by_the_client."""
    directory = tmp_path / "private"
    directory.mkdir(mode=0o700)
    path = directory / "x.lock"
    untouched = _plant(path, what, tmp_path / "elsewhere")
    with pytest.raises(SegmentError, match=re.escape(str(path))):
        LeaderLock(path).try_acquire()
    untouched()


@pytest.mark.parametrize("kind", ["thread", "async"])
async def test_impostor_lock_file_is_refused_by_the_client(
    service: HeksherService, tmp_path: Path, kind: str
) -> None:
    path = _paths(service.url, Path(os.environ["HEKSHER_SHM_DIR"]))["lock"]
    untouched = _plant(path, "symlink", tmp_path / "elsewhere")
    raised, elapsed = await _join(kind, service.url)
    untouched()
    assert isinstance(raised, SegmentError), repr(raised)
    assert str(path) in str(raised)
    assert elapsed < 2.0


@pytest.mark.parametrize("what", ["symlink", "fifo"])
async def test_impostor_at_our_registration_is_replaced_not_followed(
    service: HeksherService, tmp_path: Path, what: str
) -> None:
    """Registrations are written to a temporary file and renamed over the name: whatever sat there is
    replaced by our regular 0600 file, and a symlink's target is never written."""
    shm_dir = Path(os.environ["HEKSHER_SHM_DIR"])
    registry = _paths(service.url, shm_dir)["registry"]
    registry.mkdir(mode=0o700)
    entry = registry / f"{token(current_identity())}.reg"
    elsewhere = tmp_path / "elsewhere"
    _plant(entry, what, elsewhere)
    _setting = heksher.Setting(unique("mine"), int, ["user"], 0)
    raised, _ = await _join("thread", service.url)
    assert raised is None
    if what == "symlink":
        assert (elsewhere / "precious").read_bytes() == b"precious"


async def test_folder_at_our_registration_is_a_clear_error(service: HeksherService, tmp_path: Path) -> None:
    registry = _paths(service.url, Path(os.environ["HEKSHER_SHM_DIR"]))["registry"]
    registry.mkdir(mode=0o700)
    entry = registry / f"{token(current_identity())}.reg"
    entry.mkdir(mode=0o700)
    raised, _ = await _join("async", service.url)
    assert isinstance(raised, SegmentError), repr(raised)
    assert str(entry) in str(raised)


# ---------------------------------------------------------------------------------------------------------
# Another user


def _python_for_nobody() -> str | None:
    """An interpreter the nobody user may run (ours may live under /root, closed to others)."""
    for candidate in (sys.executable, shutil.which("python3"), "/usr/bin/python3", "/usr/local/bin/python3"):
        if not candidate:
            continue
        try:
            done = subprocess.run(
                [candidate, "-c", "pass"], user=NOBODY, group=NOBODY, extra_groups=[], cwd="/",
                capture_output=True, timeout=30, check=False,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return candidate
    return None


_PROBE = """
import json, os, sys
out = {}
for label, path, how in json.loads(sys.argv[1]):
    try:
        if how == "list":
            os.listdir(path)
        elif how == "create":
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        else:
            os.close(os.open(path, os.O_RDONLY if how == "read" else os.O_WRONLY))
        out[label] = "allowed"
    except OSError as e:
        out[label] = e.errno
print(json.dumps(out))
"""


@pytest.fixture
def open_parent() -> Iterator[Path]:
    """A folder every user may traverse, so that only our own modes stand between them and our files."""
    parent = Path(tempfile.mkdtemp(prefix="heksher-shared-"))
    parent.chmod(0o755)
    try:
        yield parent
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@needs_root
def test_another_user_can_neither_read_nor_write(service: HeksherService, open_parent: Path) -> None:
    """As uid 65534: listing the folder, reading or writing the segment, the lock, a registration, and
    planting a registration all fail with EACCES, also when the folder itself is opened for traversal."""
    python = _python_for_nobody()
    if python is None:
        pytest.skip("no Python interpreter the nobody user may run")
    shm_dir = open_parent / "shm"
    name = unique("secret")
    workers: list[FaultWorker] = []
    with reaping(workers):
        workers.append(FaultWorker(service.url, "thread", [(name, "int", 0)], 60, shm_dir=str(shm_dir)))
        workers[0].ready()
        paths = _paths(service.url, shm_dir)
        registration = Path(workers[0].ask("registration"))
        probes: list[tuple[str, str, str]] = [("list the folder", str(shm_dir), "list")]
        for label, path in [
            ("segment", paths["segment"]),
            ("lock", paths["lock"]),
            ("registration", registration),
        ]:
            probes += [(f"read the {label}", str(path), "read"), (f"write the {label}", str(path), "write")]
        probes += [
            ("list the registry", str(paths["registry"]), "list"),
            ("plant a registration", str(paths["registry"] / "1-1.reg"), "create"),
            ("plant a file", str(shm_dir / "planted"), "create"),
        ]

        def probe() -> dict[str, Any]:
            done = subprocess.run(
                [python, "-c", _PROBE, json.dumps(probes)],
                user=NOBODY, group=NOBODY, extra_groups=[], cwd="/",
                capture_output=True, text=True, timeout=30, check=True,
            )  # fmt: skip
            result: dict[str, Any] = json.loads(done.stdout)
            return result

        assert probe() == {label: errno.EACCES for label, _, _ in probes}
        # Even with the folder opened for traversal (0711), every file's own 0600 mode holds.
        shm_dir.chmod(0o711)
        try:
            traversable = probe()
        finally:
            shm_dir.chmod(0o700)
        assert traversable == {label: errno.EACCES for label, _, _ in probes}
        assert workers[0].ask("get", name) == 0


# ---------------------------------------------------------------------------------------------------------
# Hostile registrations from "other processes"


@pytest.fixture
def live_identities() -> Iterator[Callable[[], ProcessIdentity]]:
    """Identities of live processes (idle children), so the leader does not prune their entries as dead."""
    children: list[subprocess.Popen[bytes]] = []

    def make() -> ProcessIdentity:
        child = subprocess.Popen(["sleep", "600"])
        children.append(child)
        deadline = time.monotonic() + 10
        while (identity := identity_of(child.pid)) is None:
            assert time.monotonic() < deadline
        return identity

    try:
        yield make
    finally:
        for child in children:
            child.kill()
            child.wait(10)


def _registration(identity: ProcessIdentity, **fields: Any) -> bytes:
    body = {
        "format": 1,
        "pid": identity.pid,
        "create_time": identity.create_time,
        "pidns": identity.pidns,
        "kind": "thread",
        **fields,
    }
    return msgspec.json.encode(body)


def _declaration(name: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "configurable_features": ["user"],
        "type": "int",
        "default_value": 0,
        "metadata": {},
        "version": "1.0",
        **fields,
    }


HOSTILE_NAMES = ["../../etc/passwd", "a b", "", "x;rm -rf /", "\u202eevil", "名前"]


def test_hostile_registrations(
    service: HeksherService, tmp_path: Path, live_identities: Callable[[], ProcessIdentity]
) -> None:
    """Registry entries in the names of live processes that are too big, not JSON, of the wrong types, with
    hostile declaration names, naming another process, or not regular files: the leader skips each,
    logs it once, declares none of it, and keeps serving the others."""
    interval = 0.3
    name = unique("honest")
    service.declare(name, "int", -1, ["user"])
    rule = service.add_rule(name, {"user": "alice"}, 0)
    workers: list[FaultWorker] = []
    with reaping(workers):
        workers.append(FaultWorker(service.url, "thread", [(name, "int", -1)], interval).ready())
        workers.append(FaultWorker(service.url, "async", [(name, "int", -1)], interval).ready())
        leader, follower = workers
        assert leader.ask("leading")
        registry = Path(leader.ask("registration")).parent

        def entry(identity: ProcessIdentity) -> Path:
            return registry / f"{token(identity)}.reg"

        bad: dict[str, Path] = {}
        someone = live_identities()
        bad["oversized"] = entry(someone)
        bad["oversized"].write_bytes(b'{"format":1,' + b" " * (MAX_REGISTRATION_BYTES + 1) + b"}")
        bad["garbage"] = entry(live_identities())
        bad["garbage"].write_bytes(os.urandom(300))
        someone = live_identities()
        bad["wrong types"] = entry(someone)
        bad["wrong types"].write_bytes(_registration(someone, pid=str(someone.pid), declarations="all"))
        for hostile in HOSTILE_NAMES:
            someone = live_identities()
            bad[f"name {hostile!r}"] = entry(someone)
            bad[f"name {hostile!r}"].write_bytes(_registration(someone, declarations=[_declaration(hostile)]))
        someone = live_identities()
        bad["bad version"] = entry(someone)
        unversioned = unique("unversioned")
        bad["bad version"].write_bytes(
            _registration(someone, declarations=[_declaration(unversioned, version="x")])
        )
        someone = live_identities()
        bad["bad tracking"] = entry(someone)
        bad["bad tracking"].write_bytes(_registration(someone, tracked={"user": "alice"}))
        someone, other = live_identities(), live_identities()
        bad["another process's"] = entry(someone)
        bad["another process's"].write_bytes(_registration(other))
        for what in ("symlink", "fifo", "directory") + (("foreign",) if IS_ROOT else ()):
            bad[what] = entry(live_identities())
            _plant(bad[what], what, tmp_path / f"elsewhere-{what}")
        # Valid as a registration, but its declaration is not one: only that declaration is skipped.
        someone = live_identities()
        odd = entry(someone)
        odd_name = unique("odd")
        odd.write_bytes(_registration(someone, declarations=[_declaration(odd_name, type=5)]))

        deadline = time.monotonic() + 10
        while True:
            logged = leader.ask("logs", "skipping registry entry")
            missing = [label for label, path in bad.items() if not any(str(path) in m for m in logged)]
            if not missing:
                break
            assert time.monotonic() < deadline, f"not reported: {missing}"
            leader.process.join(0.05)
        # More scans (each reload is acknowledged after one): still reported once each.
        for _ in range(3):
            assert follower.ask("reload") is None
        logged = leader.ask("logs", "skipping registry entry")
        for label, path in bad.items():
            assert sum(str(path) in m for m in logged) == 1, (label, [m for m in logged if str(path) in m])
        # Reported (more than once while the file is new: see test_malformed_declaration_is_logged_once).
        assert leader.ask("logs", "skipping a malformed declaration")
        # Nothing of it reached the service, and the honest processes are served.
        assert set(service.settings) == {name}, set(service.settings)  # none of the planted ones
        service.set_rule_value(rule, 1)
        for w in workers:
            assert w.ask("wait_value", 1, interval + 3) is not None
        assert all(path.exists() or path.is_symlink() for path in bad.values())  # reported, not deleted


def test_malformed_declaration_is_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from heksher_shm._engine.shared import RegistrySource
    from heksher_shm._shm import registry as registry_module
    from heksher_shm._shm.registry import Registry

    # Every stamp counts as too fresh to trust, so every scan reads the file again: what happens during
    # the first 100 ms of any new file, made permanent so the test does not depend on timing.
    monkeypatch.setattr(registry_module, "_RACY_WINDOW_NS", 10**18)
    monkeypatch.setattr(registry_module, "_RACY_WINDOW_COARSE_NS", 10**18)
    directory = tmp_path / "registry"
    directory.mkdir(mode=0o700)
    me = current_identity()
    entry = directory / f"{token(me)}.reg"
    entry.write_bytes(_registration(me, declarations=[_declaration("odd", type=5)]))
    source = RegistrySource(Registry(directory), Segment.open(tmp_path / "segment"))
    with caplog.at_level("WARNING", logger="heksher_shm"):
        for _ in range(3):
            source.wishes(prune=True)
    assert [r.getMessage() for r in caplog.records].count(
        "skipping a malformed declaration in a registration"
    ) == 1


def test_one_declaration_of_many_processes_is_decoded_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, live_identities: Callable[[], ProcessIdentity]
) -> None:
    """Workers of one application declare the same settings: the leader decodes each distinct
    declaration once, not once per process, and a scan after one registration changed decodes only
    what is new in it; every process's wish still holds every declaration."""
    from heksher_shm._engine import shared
    from heksher_shm._shm.registry import Registry

    decoded: list[bytes] = []
    real = shared._declaration_decoder

    class Counting:
        def decode(self, raw: Any) -> Any:
            decoded.append(bytes(raw))
            return real.decode(raw)

    monkeypatch.setattr(shared, "_declaration_decoder", Counting())
    directory = tmp_path / "registry"
    directory.mkdir(mode=0o700)
    segment = Segment.open(tmp_path / "segment")
    common = [_declaration(f"s{i}") for i in range(50)]
    identities = [live_identities() for _ in range(4)]
    for identity in identities:
        (directory / f"{token(identity)}.reg").write_bytes(_registration(identity, declarations=common))
    source = shared.RegistrySource(Registry(directory), segment)
    wishes = source.wishes(prune=True)
    assert [len(w.declarations) for w in wishes] == [50] * 4
    assert len(decoded) == 50
    decoded.clear()
    changed = identities[0]
    extra = [*common, _declaration("new")]
    entry = directory / f"{token(changed)}.reg"
    entry.write_bytes(_registration(changed, declarations=extra, reload_seq=2))
    wishes = source.wishes(prune=True)  # (the segment is not formatted: no counter to bump)
    assert sorted(len(w.declarations) for w in wishes) == [50, 50, 50, 51]
    assert [msgspec.json.decode(raw)["name"] for raw in decoded] == ["new"]
    segment.close()
