"""One policy for every file and folder (heksher_shm._shm.files), checked the same way for each user.

The same impostors are planted where each kind of file should be (the segment, the leader lock, a
registration) and each user of the policy must refuse them with the same reason; the same loose folders
are given to each user of the folder policy.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from heksher_shm._shm.election import LeaderLock
from heksher_shm._shm.identity import current_identity
from heksher_shm._shm.registration import Registration
from heksher_shm._shm.registry import Registry
from heksher_shm._shm.segment import Segment, resolve_shm_dir
from heksher_shm.exceptions import SegmentError


def _symlink(path: Path) -> None:
    target = path.parent.parent / "elsewhere"  # outside the registry folder, whatever the file
    target.write_bytes(b"precious")
    target.chmod(0o600)
    path.symlink_to(target)


def _fifo(path: Path) -> None:
    os.mkfifo(path, 0o600)


def _directory(path: Path) -> None:
    path.mkdir(mode=0o700)


def _socket(path: Path) -> None:
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(f"/proc/self/fd/{folder}/{path.name}")  # a deep tmp path is too long for sun_path
    finally:
        os.close(folder)
    path.chmod(0o600)


def _mode(mode: int) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        path.write_bytes(_registration_bytes() if path.suffix == ".reg" else b"")
        path.chmod(mode)

    return make


def _registration_bytes() -> bytes:
    me = current_identity()
    registration = Registration(pid=me.pid, create_time=me.create_time, pidns=me.pidns, kind="thread")
    return msgspec.json.encode(registration)


IMPOSTORS: dict[str, tuple[Callable[[Path], None], str]] = {
    "symlink": (_symlink, "symbolic link"),
    "fifo": (_fifo, "is a FIFO, not a regular file"),
    "directory": (_directory, "is a directory, not a file"),
    "socket": (_socket, "is a socket, not a regular file"),
    "world-readable": (_mode(0o644), "has mode 0o644; group/other permission bits must be clear"),
    "group-writable": (_mode(0o620), "has mode 0o620; group/other permission bits must be clear"),
}


def _use_segment(folder: Path) -> tuple[Path, Callable[[], str]]:
    path = folder / "x.seg"

    def use() -> str:
        with pytest.raises(SegmentError) as raised:
            Segment.open(path)
        return str(raised.value)

    return path, use


def _use_lock(folder: Path) -> tuple[Path, Callable[[], str]]:
    path = folder / "x.lock"

    def use() -> str:
        with pytest.raises(SegmentError) as raised:
            LeaderLock(path).try_acquire()
        return str(raised.value)

    return path, use


def _use_registration(folder: Path) -> tuple[Path, Callable[[], str]]:
    registry = Registry(folder / "x.seg.d")
    path = registry.path_for(current_identity())

    def use() -> str:
        (rejection,) = registry.scan().rejected  # a scan never raises: it skips, with the reason
        return f"{registry.directory / rejection.name}: {rejection.reason}"

    return path, use


USERS = {"segment": _use_segment, "leader lock": _use_lock, "registration": _use_registration}


@pytest.mark.parametrize("impostor", list(IMPOSTORS))
@pytest.mark.parametrize("user", list(USERS))
def test_every_file_is_refused_alike(tmp_path: Path, user: str, impostor: str) -> None:
    folder = tmp_path / "shm" / "folder"
    folder.mkdir(mode=0o700, parents=True)
    path, use = USERS[user](folder)
    make, reason = IMPOSTORS[impostor]
    make(path)
    before = path.lstat()
    message = use()
    assert str(path) in message
    assert reason in message
    after = path.lstat()
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)  # refused, never changed


def _registry_folder(folder: Path) -> Callable[[], None]:
    return lambda: Registry(folder).directory.stat() and None


def _shm_folder(folder: Path) -> Callable[[], None]:
    return lambda: resolve_shm_dir(folder) and None


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
@pytest.mark.parametrize("user", ["registry folder", "explicit segment folder"])
def test_a_folder_others_may_write_to_is_refused(tmp_path: Path, user: str, mode: int) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(mode)
    use = _registry_folder(folder) if user == "registry folder" else _shm_folder(folder)
    with pytest.raises(SegmentError, match="must not be writable by group or others"):
        use()
    assert folder.stat().st_mode & 0o777 == mode


def test_our_own_folder_readable_by_others_is_tightened_a_named_one_is_not(tmp_path: Path) -> None:
    ours = tmp_path / "x.seg.d"
    ours.mkdir()
    ours.chmod(0o755)
    Registry(ours)
    assert ours.stat().st_mode & 0o777 == 0o700
    named = tmp_path / "named"
    named.mkdir()
    named.chmod(0o750)
    resolve_shm_dir(named)
    assert named.stat().st_mode & 0o777 == 0o750  # who may look in a folder the user chose is theirs to say


def test_files_are_created_private_whatever_the_umask(tmp_path: Path) -> None:
    folder = tmp_path / "shm"
    folder.mkdir(mode=0o700)
    previous = os.umask(0)
    try:
        Segment.open(folder / "a.seg").close()
        lock = LeaderLock(folder / "a.lock")
        assert lock.try_acquire()
        lock.release()
        registry = Registry(folder / "a.seg.d")
    finally:
        os.umask(previous)
    for path in (folder / "a.seg", folder / "a.lock"):
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert registry.directory.stat().st_mode & 0o777 == 0o700
