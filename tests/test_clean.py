"""``heksher-shm clean``: only what no live process uses goes, with real processes, through the command."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from heksher_shm._shm.identity import ProcessIdentity, current_identity, pid_namespace, token
from heksher_shm._shm.registration import Registration, encode_registration
from heksher_shm.cli.common import EXIT_NOT_FOUND, EXIT_OK, EXIT_UNHEALTHY, EXIT_UNREADABLE, EXIT_USAGE
from tests._procs import Worker, leaders_of


@pytest.fixture
def folder() -> Path:
    return Path(os.environ["HEKSHER_SHM_DIR"])


def _clean(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "heksher_shm", "clean", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _segment(folder: Path) -> str:
    (path,) = folder.glob("*.seg")
    return path.name.removesuffix(".seg")


@pytest.fixture
def leftover(service: object, workers: list[Worker], folder: Path) -> str:
    """A segment whose only process was SIGKILLed: its registration, doorbell and lock file stay."""
    worker = Worker(service.url, "thread", ["cache_size"], 60).ready()  # type: ignore[attr-defined]
    workers.append(worker)
    worker.kill()
    name = _segment(folder)
    assert {f"{name}.seg", f"{name}.lock", f"{name}.seg.d"} <= _files(folder)
    assert os.listdir(folder / f"{name}.seg.d")  # the dead process's registration and doorbell
    return name


def test_a_segment_in_use_is_kept(service: object, workers: list[Worker], folder: Path) -> None:
    for kind in ("thread", "async"):
        workers.append(Worker(service.url, kind, ["cache_size"], 60).ready())  # type: ignore[attr-defined]
    before = _files(folder)
    name = _segment(folder)
    for args in ((), ("--dry-run",)):
        done = _clean(*args)
        assert done.returncode == EXIT_OK, done.stderr
        assert f"kept {name}: in use ({name}.lock is locked" in done.stdout
        assert _files(folder) == before
    # The leader dies: whether the other has taken over yet or not, it uses the segment.
    (leader,) = leaders_of(workers)
    leader.kill()
    done = _clean()
    assert done.returncode == EXIT_OK
    assert f"kept {name}: in use" in done.stdout
    assert f"{name}.seg" in _files(folder)


def test_a_leftover_is_listed_then_removed(leftover: str, folder: Path) -> None:
    stray = folder / f".{leftover}.lock.4242.0badcafe"  # a takeover's new lock file, left by a killed process
    stray.touch(mode=0o600)
    before = _files(folder)
    done = _clean("--dry-run")
    assert done.returncode == EXIT_OK, done.stderr
    assert f"would remove {leftover}: " in done.stdout
    assert "would remove 1 unused segment, kept 0 in use" in done.stdout
    assert _files(folder) == before
    done = _clean()
    assert done.returncode == EXIT_OK, done.stderr
    assert f"removed {leftover}: " in done.stdout
    assert _files(folder) == set()
    done = _clean()
    assert done.returncode == EXIT_OK
    assert "removed 0 unused segments" in done.stdout


def test_a_live_registration_keeps_it(leftover: str, folder: Path) -> None:
    """A registered live process (here: this one) is attached, whoever holds the lock."""
    me = current_identity()
    entry = folder / f"{leftover}.seg.d" / f"{token(me)}.reg"
    entry.write_bytes(
        encode_registration(Registration(pid=me.pid, create_time=me.create_time, kind="thread"))
    )
    done = _clean()
    assert done.returncode == EXIT_OK
    assert f"kept {leftover}: in use (1 live process attached: pid {os.getpid()})" in done.stdout
    assert entry.exists()


def test_a_process_of_another_pid_namespace_keeps_it(leftover: str, folder: Path) -> None:
    """Its liveness cannot be judged from here: never removed."""
    foreign = ProcessIdentity(4242, 12.5, (pid_namespace() or 1) + 1)
    entry = folder / f"{leftover}.seg.d" / f"{token(foreign)}.reg"
    entry.touch(mode=0o600)
    done = _clean()
    assert done.returncode == EXIT_OK
    assert f"kept {leftover}: in use (1 live process attached: pid 4242)" in done.stdout


def test_a_held_takeover_lock_keeps_it(leftover: str, folder: Path) -> None:
    path = folder / f"{leftover}.takeover"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = _clean()
        assert done.returncode == EXIT_OK
        assert f"kept {leftover}: in use ({leftover}.takeover is locked" in done.stdout
        assert path.exists()
    finally:
        os.close(fd)
    assert _clean().returncode == EXIT_OK
    assert _files(folder) == set()


def test_files_the_policy_refuses_are_left_alone(leftover: str, folder: Path) -> None:
    segment = folder / f"{leftover}.seg"
    segment.chmod(0o644)
    done = _clean()
    assert done.returncode == EXIT_UNREADABLE
    assert f"skipped {leftover}: {segment} has mode 0o644" in done.stdout
    assert segment.exists()
    segment.chmod(0o600)
    odd = folder / f"{leftover}.seg.d" / "notes.txt"
    odd.touch()
    done = _clean()
    assert done.returncode == EXIT_UNREADABLE
    assert "which heksher_shm does not make" in done.stdout
    assert odd.exists()
    odd.unlink()
    assert _clean().returncode == EXIT_OK


def test_a_file_that_cannot_be_removed(leftover: str, folder: Path) -> None:
    registry = folder / f"{leftover}.seg.d"
    (registry / "sub").mkdir()  # a folder where registrations are: not one of ours, left alone
    done = _clean()
    assert done.returncode == EXIT_UNREADABLE
    (registry / "sub").rmdir()
    if os.geteuid() == 0:
        return  # root removes files from a read-only folder
    registry.chmod(0o500)
    try:
        done = _clean()
        assert done.returncode == EXIT_UNHEALTHY
        assert f"failed {leftover}: cannot remove" in done.stdout
    finally:
        registry.chmod(0o700)


def test_name_and_folder_arguments(leftover: str, folder: Path, tmp_path: Path) -> None:
    assert _clean("no such").returncode == EXIT_USAGE
    done = _clean("other")
    assert done.returncode == EXIT_NOT_FOUND
    assert "no files of a segment named 'other'" in done.stderr
    done = _clean("--dir", str(tmp_path / "missing"))
    assert done.returncode == EXIT_NOT_FOUND
    assert "does not exist" in done.stderr
    done = _clean(leftover, "--dry-run")
    assert done.returncode == EXIT_OK
    assert f"would remove {leftover}" in done.stdout


def test_the_default_folder_missing_is_nothing_to_clean(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from heksher_shm.cli import clean, main

    monkeypatch.setattr(clean, "shm_dir_path", lambda given: (tmp_path / "heksher_shm-0", False))
    assert main(["clean"]) == EXIT_OK
