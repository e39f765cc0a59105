"""heksher_shm._servers: what a client says at start-up under uwsgi, checked with stand-in ``uwsgi`` modules.

The real servers run in test_prefork_uwsgi.py; uwsgi 2.0.27 and later always
run Python threads, so the no-threads case is checked here (and was observed
with uwsgi 2.0.26, see docs/deployment/uwsgi.rst).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import types
from typing import Any

import pytest

import heksher_shm as heksher
from heksher_shm import _servers
from heksher_shm._servers import check_background_threads, uwsgi_problems


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


def test_master_without_fork_hooks_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, fake_uwsgi(worker_id=0, master=True, processes=b"4"))
    with pytest.raises(RuntimeError, match="--py-call-uwsgi-fork-hooks") as raised:
        check_background_threads()
    assert "--lazy-apps" in str(raised.value)


def test_master_with_fork_hooks_is_fine() -> None:
    module = fake_uwsgi(worker_id=0, master=True, processes=b"4", py_call_uwsgi_fork_hooks=True)
    assert uwsgi_problems(module) == {}


def test_fork_hooks_need_threads() -> None:
    """uwsgi skips the fork hooks when Python threads are off, even when asked to call them."""
    module = fake_uwsgi(worker_id=0, has_threads=0, master=True, py_call_uwsgi_fork_hooks=True)
    assert set(uwsgi_problems(module)) == {"threads", "fork-hooks"}


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


def test_set_as_main_refuses_in_a_forking_master(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check runs when a client becomes main, before it joins anything."""
    install(monkeypatch, fake_uwsgi(worker_id=0, master=True, processes=b"4"))
    client = heksher.ThreadHeksherClient("http://127.0.0.1:9", 60, ["user"])
    try:
        with pytest.raises(RuntimeError, match="--py-call-uwsgi-fork-hooks"):
            client.set_as_main()
        assert client.segment_path is None
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
