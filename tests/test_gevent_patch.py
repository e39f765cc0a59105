"""A client's thread does not live through a gevent monkey-patch: it stops before, and starts after.

A gunicorn ``--preload`` gevent worker restarts the client's thread in the
fork hook, before it patches: that real OS thread then ran in a patched
process, where a worker that took over lost its thread at once and an
orphaned worker could hang at exit (issue 15; ``heksher_shm/_process/monkey.py``
says how). ``tests/apps/gevent_patch_app.py`` plays that worker without
gunicorn: fork from a leading client, patch the child, make it take over,
let it exit normally. The prefork test of the real thing is
``tests/prefork/test_gevent.py::test_gunicorn_gevent_preload``.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from heksher_shm.testing import HeksherService
from tests._support import unique

pytest.importorskip("gevent", reason="gevent is not installed (pip install -e '.[test]')")

APP = Path(__file__).parent / "apps" / "gevent_patch_app.py"
DEADLINE = 60.0


def test_a_forked_child_that_patches_runs_its_client_as_a_greenlet(service: HeksherService) -> None:
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
