"""heksher_shm._process.servers: what a client does at start-up under uwsgi, with stand-in ``uwsgi`` modules.

The real servers run in test_uwsgi.py; uwsgi 2.0.27 and later always
run Python threads, so the no-threads case is checked here (and was observed
with uwsgi 2.0.26, see docs/deployment/uwsgi.rst).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import types
from typing import Any

import pytest

import heksher_shm as heksher
from heksher_shm._process import fork as _fork
from heksher_shm._process import servers as _servers
from heksher_shm._process.servers import check_background_threads, forking_uwsgi_master, uwsgi_problems


def fake_uwsgi(
    *,
    worker_id: int = 1,
    has_threads: int | None = 1,
    version: tuple[int, ...] = (2, 0, 31, 0, b""),
    **opt: Any,
) -> types.ModuleType:
    """A stand-in for the module uwsgi gives the Python it embeds (option values as uwsgi gives them)."""
    module = types.ModuleType("uwsgi")
    module.opt = {name.replace("_", "-"): value for name, value in opt.items()}  # type: ignore[attr-defined]
    module.version_info = version  # type: ignore[attr-defined]
    module.worker_id = lambda: worker_id  # type: ignore[attr-defined]
    if has_threads is not None:
        module.has_threads = has_threads  # type: ignore[attr-defined]
    return module


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_servers, "_warned", set())
    monkeypatch.setattr(_servers, "_hooked", [])


def install(monkeypatch: pytest.MonkeyPatch, module: types.ModuleType) -> None:
    monkeypatch.setitem(sys.modules, "uwsgi", module)


def test_nothing_outside_uwsgi(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delitem(sys.modules, "uwsgi", raising=False)
    check_background_threads()
    assert not caplog.records


def test_lazy_worker_with_threads_is_fine() -> None:
    assert uwsgi_problems(fake_uwsgi(master=True, processes=b"4", lazy_apps=True)) == {}


def test_threads_off_warns_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    install(monkeypatch, fake_uwsgi(has_threads=0, master=True, lazy_apps=True))
    with caplog.at_level(logging.WARNING, logger="heksher_shm.servers"):
        check_background_threads()
        check_background_threads()
    assert len(caplog.records) == 1
    assert "--enable-threads" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("version", "opt", "threads"),
    [
        ((2, 0, 26), {}, False),
        ((2, 0, 26), {"enable_threads": True}, True),
        ((2, 0, 26), {"enable_threads": b"false"}, False),
        ((2, 0, 26), {"threads": b"2"}, True),
        ((2, 0, 27), {}, True),
    ],
)
def test_threads_inferred_without_has_threads(
    version: tuple[int, ...], opt: dict[str, Any], threads: bool
) -> None:
    """Without ``uwsgi.has_threads``, the version and the options tell."""
    problems = uwsgi_problems(fake_uwsgi(has_threads=None, version=version, lazy_apps=True, **opt))
    assert ("threads" not in problems) is threads


def test_forking_master_chains_the_post_fork_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a master that forks from here, the reset is chained to uwsgi.post_fork_hook, once, before
    whatever hook was there (uwsgidecorators.postfork's, say), which still runs."""
    module = fake_uwsgi(worker_id=0, master=True, processes=b"4")
    calls: list[str] = []
    module.post_fork_hook = lambda: calls.append("theirs")  # type: ignore[attr-defined]
    install(monkeypatch, module)
    monkeypatch.setattr(_fork, "after_fork_in_child", lambda: calls.append("ours"))
    assert forking_uwsgi_master()
    assert forking_uwsgi_master()  # a second client: not chained twice
    module.post_fork_hook()  # type: ignore[attr-defined]
    assert calls == ["ours", "theirs"]
    check_background_threads()  # no refusal any more


def test_master_with_fork_hooks_is_fine() -> None:
    module = fake_uwsgi(worker_id=0, master=True, processes=b"4", py_call_uwsgi_fork_hooks=True)
    assert uwsgi_problems(module) == {}


def test_no_threads_is_the_only_problem_left() -> None:
    """uwsgi skips Python's fork hooks when threads are off; uwsgi.post_fork_hook does not need them."""
    module = fake_uwsgi(worker_id=0, has_threads=0, master=True, py_call_uwsgi_fork_hooks=True)
    assert set(uwsgi_problems(module)) == {"threads"}


@pytest.mark.parametrize(
    "opt",
    [
        {"master": True, "lazy_apps": True},  # the master's own client, but the app loads in workers
        {"master": True, "lazy": True},
        {"processes": b"1"},  # no master and one process: nothing is forked
    ],
)
def test_no_fork_from_here(opt: dict[str, Any]) -> None:
    assert uwsgi_problems(fake_uwsgi(worker_id=0, **opt)) == {}


def test_a_strange_uwsgi_module_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("uwsgi")
    module.worker_id = "not callable"  # type: ignore[attr-defined]
    module.opt = {"master": True}  # type: ignore[attr-defined]
    install(monkeypatch, module)
    check_background_threads()  # no exception


_OURS = [["heksher", "shm"], ["heksher", "shm", "beat"], ["heksher", "shm", "declare"]]


def test_set_as_main_in_a_forking_master(monkeypatch: pytest.MonkeyPatch, memory_service: Any) -> None:
    """In a uwsgi master that forks from here: the first update is made in the calling thread, no
    background thread starts, and the master keeps nothing shared (lock, registration, doorbell)."""
    install(monkeypatch, fake_uwsgi(worker_id=0, master=True, processes=b"4"))
    name = f"master_{id(monkeypatch):x}"
    setting = heksher.Setting(name, int, ["user"], 0)
    memory_service.declare(name, "int", 0, ["user"])
    memory_service.add_rule(name, {"user": "alice"}, 3)
    client = heksher.ThreadHeksherClient(memory_service.url, 60, ["user", "theme", "environment"])
    client.track_contexts(user=heksher.TRACK_ALL)
    try:
        client.set_as_main()
        assert client._thread is None
        assert setting.get(user="alice") == 3
        assert not client.leading
        assert client._parts is not None
        assert not client._parts.lock.held
        assert sorted(os.listdir(client._parts.registry.directory)) == []
        ours = [t.name for t in threading.enumerate() if t.name.split("_")[0].split("-")[:3] in _OURS]
        assert ours == []  # (the in-memory service's threads are heksher-shm-testing-*)
    finally:
        client.close()


def test_a_running_thread_in_a_forking_master_is_refused(
    monkeypatch: pytest.MonkeyPatch, memory_service: Any
) -> None:
    """What truly cannot work: a client whose background thread already runs when uwsgi will fork."""
    client = heksher.ThreadHeksherClient(memory_service.url, 60, ["user", "theme", "environment"])
    try:
        client.set_as_main()
        install(monkeypatch, fake_uwsgi(worker_id=0, master=True, processes=b"4"))
        with pytest.raises(RuntimeError, match="--lazy-apps"):
            client.set_as_main()
    finally:
        client.close()


CHILD_HOOK_ONLY = """
import ctypes, os
import heksher_shm

libc = ctypes.CDLL(None, use_errno=True)
pid = libc.fork()
if pid == 0:
    ctypes.pythonapi.PyOS_AfterFork_Child()
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_child_hook_alone_is_quiet() -> None:
    """A fork that runs only Python's child hook, as some uwsgi versions and options do, prints nothing."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD_HOOK_ONLY], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "Exception ignored" not in out.stderr, out.stderr
