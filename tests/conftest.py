"""Fixtures for the whole suite.

Behaviour tests run against the in-memory service by default, and against a
real Heksher when ``HEKSHER_TEST_URL`` is set; tests that need fault
injection or request counters ask for ``memory_service`` and skip there.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
from collections.abc import AsyncIterator, Callable, Iterator
from multiprocessing.process import BaseProcess
from typing import Any

import pytest

from heksher_shm._process import main as _main
from heksher_shm.testing import HeksherService
from tests import _semaphores
from tests._procs import service, workers  # fixtures for multi-process tests
from tests._support import FEATURES, REAL_URL, Admin, Driver

__all__ = ["service", "workers"]

_SPAWN = multiprocessing.get_context("spawn")

# Every multiprocessing semaphore of this session, and of the pool drivers it starts, is named after it
# (see tests/_semaphores.py), so that _no_semaphores_left_behind can tell its leftovers from other programs'.
_SEM_PREFIX = f"mp-heksher-test-{os.getpid()}"
_semaphores.tag_this_process(_SEM_PREFIX)
os.environ[_semaphores.PREFIX_ENV] = _SEM_PREFIX
_untagged_semaphores: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def _no_semaphores_left_behind() -> Iterator[None]:
    """Fail the session if semaphore files it made stay in /dev/shm; report other new ones.

    A test that kills processes with multiprocessing objects (a pool, a
    barrier) must remove their semaphores, as PoolDriver.close() does. New
    ``sem.mp-*`` files without the session's name may be another program's
    (another test run on the host), so they are reported in the summary,
    not failed on.
    """
    before = _semaphores.semaphores()
    yield
    gc.collect()  # the session's own multiprocessing objects unlink theirs when collected
    left = _semaphores.semaphores() - before
    ours = sorted(n for n in left if n.startswith(_SEM_PREFIX))
    _untagged_semaphores[:] = sorted(left - set(ours))
    if ours:
        _semaphores.remove(_SEM_PREFIX)
        pytest.fail(
            f"the tests left {len(ours)} multiprocessing semaphores in {_semaphores.SEM_DIR} (removed now): "
            f"{', '.join('sem.' + n for n in ours[:10])}{' ...' if len(ours) > 10 else ''}; a test killed "
            "processes that used them without removing them (see tests/_semaphores.py)"
        )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _untagged_semaphores:
        terminalreporter.write_line(
            f"note: {len(_untagged_semaphores)} sem.mp-* files appeared in {_semaphores.SEM_DIR} during the "
            "run without this session's name: another program's, or left by a process the tests started "
            "(tests/_semaphores.py)"
        )


@pytest.fixture(autouse=True)
def _private_shm_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test shares segments only with its own processes."""
    directory = tmp_path_factory.mktemp("shm")
    directory.chmod(0o700)
    monkeypatch.setenv("HEKSHER_SHM_DIR", str(directory))


@pytest.fixture(autouse=True)
def _private_umask() -> Iterator[None]:
    """Files a test writes by hand (hostile registrations, say) are private, as heksher_shm's own are:
    what a test means to be wrong with them is their content, not their mode."""
    previous = os.umask(0o077)
    yield
    os.umask(previous)


@pytest.fixture(autouse=True)
def _fresh_main_client() -> Iterator[None]:
    """Each test starts with no main client (the main client is process-wide state)."""
    _main.reset()
    yield
    _main.reset()


@pytest.fixture
def spawn() -> Iterator[Callable[..., BaseProcess]]:
    """Start spawned processes; kill and reap whatever is left at the end."""
    started: list[BaseProcess] = []

    def start(target: Callable[..., object], *args: object) -> BaseProcess:
        process = _SPAWN.Process(target=target, args=args, daemon=True)
        process.start()
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            if process.is_alive():
                process.kill()
            process.join(5.0)


@pytest.fixture
def memory_service() -> Iterator[HeksherService]:
    """The in-memory service; tests using it skip against a real Heksher."""
    if REAL_URL:
        pytest.skip("needs the in-memory service (fault injection / request counters)")
    with HeksherService(context_features=FEATURES) as service:
        yield service


@pytest.fixture
def service_url() -> Iterator[str]:
    """A Heksher to test against: HEKSHER_TEST_URL, or a fresh in-memory one."""
    if REAL_URL:
        yield REAL_URL
        return
    with HeksherService(context_features=FEATURES) as service:
        yield service.url


@pytest.fixture
def admin(service_url: str) -> Iterator[Admin]:
    """Rule administration over HTTP against ``service_url``."""
    a = Admin(service_url)
    yield a
    a.close()


@pytest.fixture(params=["async", "thread", "async-unshared", "thread-unshared"])
def kind(request: pytest.FixtureRequest) -> str:
    """Each client behaviour test runs once per client kind, shared (the default) and not."""
    return str(request.param)


@pytest.fixture
async def make_driver(kind: str) -> AsyncIterator[Any]:
    """A factory of clients of the current kind, closed at teardown."""
    drivers: list[Driver] = []

    def make(url: str, update_interval: float = 60, **kwargs: Any) -> Driver:
        driver = Driver(kind, url, update_interval, **kwargs)
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        await driver.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that talk to ``HEKSHER_TEST_URL`` when it is set, so CI can run just those against
    a real Heksher (``-m real_server``); the rest always use the in-memory service."""
    for item in items:
        if "service_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_server)
