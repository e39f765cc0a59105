"""A client's thread does not live through a gevent monkey-patch: it stops before, and starts after.

A gunicorn ``--preload`` gevent worker restarts the client's thread in the
fork hook, before it patches: that real OS thread then ran in a patched
process, where a worker that took over lost its thread at once and an
orphaned worker could hang at exit (issue 15; ``heksher_shm/_process/monkey.py``
says how). ``tests/apps/gevent_patch_app.py`` plays that worker without
gunicorn: fork from a leading client, patch the child, make it take over,
let it exit normally. The prefork test of the real thing is
``tests/prefork/test_gevent.py::test_gunicorn_gevent_preload``.

The stop and the restart themselves are tested in this process too, without
patching it: a thread that waits stops at once and its client leads again
from a new one; a thread busy past the deadline is left as it is.
"""

from __future__ import annotations

import json
import logging
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import heksher_shm as heksher
from heksher_shm.clients import thread_client
from heksher_shm.testing import HeksherService
from tests._support import FEATURES, unique

APP = Path(__file__).parent / "apps" / "gevent_patch_app.py"
DEADLINE = 60.0


def test_a_forked_child_that_patches_runs_its_client_as_a_greenlet(service: HeksherService) -> None:
    pytest.importorskip("gevent", reason="gevent is not installed (pip install -e '.[test]')")
    name = unique("gevent_patch")
    service.declare(name, "int", 0, ["user"])
    rule = service.add_rule(name, {"user": "alice"}, 1)
    app = subprocess.Popen(
        [sys.executable, str(APP), service.url, name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert app.stdin is not None
    assert app.stdout is not None
    assert app.stderr is not None
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in app.stdout], daemon=True)
    reader.start()

    def report() -> dict[str, Any]:
        try:
            line = lines.get(timeout=DEADLINE)
        except queue.Empty:
            raise AssertionError(f"the app said nothing within {DEADLINE}s") from None
        return dict(json.loads(line))

    try:
        assert report() == {"role": "parent", "pid": app.pid, "leading": True, "value": 1}
        child = report()
        assert child["role"] == "child"
        assert child["threading_patched"] is True
        # Stopped before the patch, started after it: a greenlet of the main OS thread, as every thread
        # of a patched process (before, a real OS thread that went on running in the patched process).
        assert child["thread_alive"] is True
        assert child["on_main_os_thread"] is True

        service.set_rule_value(rule, 2)
        app.stdin.write("close\n")
        app.stdin.flush()
        # The child takes over from the closed parent and leads from its greenlet (a real thread
        # crossing the patch lost itself here: "cannot notify on un-acquired lock").
        assert report() == {"role": "child", "leading": True, "value": 2}
        # ... and exits the normal way (one crossing the patch could wait forever in logging.shutdown())
        assert report() == {"role": "parent", "child_exit": 0}
        app.wait(DEADLINE)
        stderr = app.stderr.read()
        assert app.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
    except AssertionError:
        if app.poll() is None:
            app.kill()
        app.wait(10)
        print(f"---- the app's stderr ----\n{app.stderr.read()[-3000:]}")
        raise
    finally:
        if app.poll() is None:
            app.kill()
            app.wait(10)
        reader.join(10)
        for stream in (app.stdin, app.stdout, app.stderr):
            stream.close()


class _Client(heksher.ThreadHeksherClient):
    """Its background thread can be held inside ``on_update_ok`` (busy, and not at a wait)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hold = False
        self.held = threading.Event()
        self.release = threading.Event()

    def on_update_ok(self) -> None:
        if self.hold:
            self.hold = False
            self.held.set()
            assert self.release.wait(DEADLINE)


def _client_and_setting(service: HeksherService) -> tuple[_Client, Any, int]:
    name = unique("handover")
    service.declare(name, "int", 0, ["user"])
    rule = service.add_rule(name, {"user": "alice"}, 1)
    setting = heksher.Setting(name, int, ["user"], 0)
    client = _Client(service.url, 60, FEATURES)
    client.track_contexts(user=heksher.TRACK_ALL)
    client.set_as_main()
    assert client.leading
    assert setting.get(user="alice") == 1
    return client, setting, rule


def test_a_waiting_thread_stops_at_once_and_starts_again(memory_service: HeksherService) -> None:
    client, setting, rule = _client_and_setting(memory_service)
    try:
        before = client._thread
        assert before is not None
        assert client._pause_for_monkey_patch() is True
        assert not before.is_alive()
        assert client._thread is None
        assert not client.leading  # its engine let go of the lock, as when it closes
        client._resume_after_monkey_patch()
        after = client._thread
        assert after is not None
        assert after is not before
        assert after.is_alive()
        memory_service.set_rule_value(rule, 2)
        client.reload()  # the new thread leads again, and answers
        assert client.leading
        assert setting.get(user="alice") == 2
    finally:
        client.close()


def test_a_thread_busy_past_the_deadline_is_left_as_it_is(
    memory_service: HeksherService, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    client, setting, rule = _client_and_setting(memory_service)
    monkeypatch.setattr(thread_client, "HANDOVER_TIMEOUT", 0.2)
    memory_service.set_rule_value(rule, 2)
    client.hold = True
    reloading = threading.Thread(target=client.reload)
    try:
        reloading.start()
        assert client.held.wait(DEADLINE), "the update's callback never ran"
        thread = client._thread  # held in on_update_ok until released: busy, not at a wait
        with caplog.at_level(logging.WARNING, logger="heksher_shm.client"):
            assert client._pause_for_monkey_patch() is False
        assert "did not reach a wait within 0.2 s of gevent's patching" in caplog.text
        client.release.set()
        reloading.join(DEADLINE)
        assert not reloading.is_alive()
        assert client._thread is thread
        assert thread is not None
        assert thread.is_alive()  # it went on past its next wait: the request was withdrawn
        assert setting.get(user="alice") == 2
        memory_service.set_rule_value(rule, 3)
        client.reload()
        assert setting.get(user="alice") == 3
    finally:
        client.release.set()
        reloading.join(DEADLINE)
        client.close()
