"""Fork hygiene: one hook resets every module's locks and flags in the child, in a fixed order.

Each test forks for real while another thread of this process is inside a
critical section, and the child reports over a pipe. The parent waits for
the report under a deadline (a deadlocked child is killed, and fails the
test), and always reaps the child.
"""

from __future__ import annotations

import gc
import importlib
import os
import pathlib
import select
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

import heksher_shm
from heksher_shm._process import fork as _fork
from heksher_shm._process import gc as _gc
from heksher_shm._process import main as _main
from heksher_shm._process.gc import paused_gc
from heksher_shm.testing import HeksherService

CHILD_DEADLINE = 10.0
STEP_DEADLINE = 5.0


def _fork_child(body: Callable[[], str]) -> tuple[str | None, int]:
    """Fork; run *body* in the child and return (what it reported, exit code).

    The report is None when the child said nothing before ``CHILD_DEADLINE``
    (it is then killed): a deadlock, for these tests.
    """
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():  # Python 3.12 warns about forking a threaded process
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            os.close(read_end)
            os.write(write_end, body().encode())
        except BaseException as error:
            os.write(write_end, f"raised {error!r}".encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    report: str | None = None
    try:
        ready, _, _ = select.select([read_end], [], [], CHILD_DEADLINE)
        if ready:
            chunks = []
            while chunk := os.read(read_end, 4096):
                chunks.append(chunk)
            report = b"".join(chunks).decode()
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    return report, os.waitstatus_to_exitcode(status)


@contextmanager
def _thread_inside(enter: Callable[[], object], leave: Callable[[], object]) -> Iterator[None]:
    """Run a thread that calls *enter*, stays until the block ends, then calls *leave*."""
    inside, release = threading.Event(), threading.Event()

    def body() -> None:
        enter()
        inside.set()
        release.wait(STEP_DEADLINE * 4)
        leave()

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    try:
        assert inside.wait(STEP_DEADLINE), "the thread never got inside"
        yield
    finally:
        release.set()
        thread.join(STEP_DEADLINE)


def test_child_forked_during_a_gc_pause_has_the_collector_on() -> None:
    assert gc.isenabled()
    pause = paused_gc()

    def child() -> str:
        before = gc.isenabled()
        with paused_gc():
            during = gc.isenabled()
        return f"{before} {during} {gc.isenabled()}"

    with _thread_inside(pause.__enter__, lambda: pause.__exit__(None, None, None)):
        assert not gc.isenabled()
        report, code = _fork_child(child)
    assert (report, code) == ("True False True", 0)
    assert gc.isenabled()  # the parent's pause ended normally


def test_child_forked_inside_a_gc_pause_ends_it_harmlessly() -> None:
    """The forking thread itself is inside a pause: leaving it in the child must not go below zero."""

    def child() -> str:
        enabled = gc.isenabled()
        return f"{enabled} {_gc._depth}"

    with paused_gc():
        report, code = _fork_child(lambda: _child_leaving_pause(child))
    assert (report, code) == ("True 0 | True False True", 0)


def _child_leaving_pause(inner: Callable[[], str]) -> str:
    # Runs in the child, inside the parent's pause: report, leave a nested pause, report again.
    first = inner()
    with paused_gc():
        during = gc.isenabled()
    return f"{first} | {gc.isenabled()} {during} {gc.isenabled()}"


def test_child_forked_while_locks_are_held_does_not_deadlock() -> None:
    def hold() -> None:
        _main._lock.acquire()
        _gc._lock.acquire()

    def let_go() -> None:
        _gc._lock.release()
        _main._lock.release()

    def child() -> str:
        setting = heksher_shm.Setting("forked_child_setting", int, ["user"], 3)
        with paused_gc():
            alive = setting in _main.live_settings()
        return f"{alive} {setting.get(user='a')} {gc.isenabled()}"

    with _thread_inside(hold, let_go):
        report, code = _fork_child(child)
    assert report is not None, "the child deadlocked"
    assert (report, code) == ("True 3 True", 0)


def test_after_fork_in_child_is_idempotent_and_inert_in_the_original_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(_main, "_reset_after_fork", lambda: calls.append(os.getpid()))
    _fork.after_fork_in_child()  # not a child: nothing is reset under this process's threads
    assert calls == []

    def child() -> str:
        # The at-fork hook ran once already; a server's post-fork hook may call it again, and again.
        _fork.after_fork_in_child()
        _fork.after_fork_in_child()
        return f"{len(calls)} {calls == [os.getpid()]}"

    assert _fork_child(child) == ("1 True", 0)


def test_every_reset_module_has_its_hook_and_nothing_else_registers_fork_hooks() -> None:
    for name in _fork.CHILD_RESETS:
        assert callable(importlib.import_module(name)._reset_after_fork), name
    for name in _fork.PARENT_GUARDS:
        module = importlib.import_module(name)
        assert callable(module._before_fork), name
        assert callable(module._after_fork_in_parent), name
        assert name in _fork.CHILD_RESETS, f"{name} holds something across fork but never resets it"
    package = pathlib.Path(heksher_shm.__file__).parent
    registering = sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if "os.register_at_fork(" in path.read_text()
    )
    assert registering == ["_process/fork.py"]


def test_parent_hook_releases_only_what_the_before_hook_took(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that runs the after-fork-in-parent hook alone (some uwsgi versions) must not release a
    gate nobody took."""
    election = importlib.import_module("heksher_shm._shm.election")
    released: list[str] = []
    real_release = election._after_fork_in_parent

    def release() -> None:
        released.append("gate")
        real_release()

    monkeypatch.setattr(election, "_after_fork_in_parent", release)
    _fork._after_fork_in_parent()
    assert released == []
    _fork._before_fork()
    _fork._after_fork_in_parent()
    assert released == ["gate"]
    _fork._after_fork_in_parent()
    assert released == ["gate"]
    # Free again: another thread can take the gate.
    taken = threading.Event()

    def take() -> None:
        if election._GATE.acquire(timeout=STEP_DEADLINE):
            taken.set()
            election._GATE.release()

    thread = threading.Thread(target=take)
    thread.start()
    thread.join(STEP_DEADLINE * 2)
    assert taken.is_set()


def test_the_reset_order_is_the_documented_one() -> None:
    import heksher_shm.clients  # noqa: F401  (registers its reset, as importing heksher_shm does)

    assert _fork.CHILD_RESETS == (
        "heksher_shm._process.gc",
        "heksher_shm._process.main",
        "heksher_shm._shm.election",
        "heksher_shm._shm.writing",
        "heksher_shm._shm.identity",
        "heksher_shm._shm.bell",
    )
    registered = _fork.child_resets()[len(_fork.CHILD_RESETS) :]
    assert registered[0] == "heksher_shm.clients._base"  # imported by the package itself
    # and the OpenFeature provider's, after it, once that is imported
    assert registered[1:] in ([], ["heksher_shm.openfeature.events"])


def test_upper_layers_register_their_reset_and_it_runs_after_the_lower_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The layers above _process register their reset (fork.py never names them): it runs in the
    child after every reset of CHILD_RESETS, in the order registered; registering again replaces."""
    calls: list[str] = []
    monkeypatch.setattr(_fork, "_registered", list(_fork._registered))
    monkeypatch.setattr(_main, "_reset_after_fork", lambda: calls.append("main"))
    _fork.register_child_reset("tests.upper", lambda: calls.append("upper, replaced"))
    _fork.register_child_reset("tests.upper", lambda: calls.append("upper"))
    _fork.register_child_reset("tests.upmost", lambda: calls.append("upmost"))
    assert _fork.child_resets()[-2:] == ["tests.upper", "tests.upmost"]

    def child() -> str:
        return " ".join(call for call in calls if call in {"main", "upper", "upper, replaced", "upmost"})

    assert _fork_child(child) == ("main upper upmost", 0)


def test_a_closed_client_still_referenced_closes_none_of_a_forked_childs_descriptors() -> None:
    """A closed client that something still holds (an OpenFeature provider, a module global) resumes in a
    forked child like any live one; closing its wake pipe there again closed whatever had reused the
    pipe's numbers since, two of the child's own descriptors (found by the OpenFeature fork test: its
    pipe to the test read "Bad file descriptor")."""
    with HeksherService() as service:
        client = heksher_shm.ThreadHeksherClient(service.url, 60, ["user"], shared=False)
        client.close()
        probe = os.pipe()  # the lowest free numbers: those the closed client's wake pipe had
        inodes = [os.fstat(fd).st_ino for fd in probe]
        try:

            def child() -> str:
                # Still the same pipe? (A number closed and taken again by a new pipe is open, too.)
                alive = []
                for fd, inode in zip(probe, inodes, strict=True):
                    try:
                        alive.append("same" if os.fstat(fd).st_ino == inode else "another")
                    except OSError as error:
                        alive.append(error.strerror or "?")
                return " ".join(alive)

            report, code = _fork_child(child)
        finally:
            for fd in probe:
                os.close(fd)
        del client  # held to the fork (a closed client that something keeps)
    assert (report, code) == ("same same", 0)
