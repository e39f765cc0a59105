"""A gunicorn ``--preload`` gevent worker in miniature: fork from a leading client, then patch the child.

Usage: python gevent_patch_app.py URL SETTING

The parent imports gevent without patching (as gunicorn's arbiter does when
it loads its gevent worker class), makes a client main (it leads, from a real
thread) and forks. The child's client resumes (a real thread again, restarted
by the fork hook), then the child calls ``gevent.monkey.patch_all()`` (as
the worker does) and says what its client's thread is now. The test then
changes a rule and writes ``close`` to the parent, which closes its client:
the child takes over, reloads, says the value it reads, and exits the normal
way (``atexit``, ``logging.shutdown()``). The parent reports how the child
exited, or that it did not within its deadline (it is then killed).

Each report is one JSON line on stdout.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from typing import Any

import gevent.monkey

import heksher_shm as heksher

URL, NAME = sys.argv[1:3]
FEATURES = ["user", "theme", "environment"]
DEADLINE = 20.0

setting = heksher.Setting(NAME, int, ["user"], 0)


def say(**report: Any) -> None:
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()


def child(client: heksher.ThreadHeksherClient) -> None:
    gevent.monkey.patch_all()
    thread = client._thread
    say(
        role="child",
        pid=os.getpid(),
        thread_alive=thread is not None and thread.is_alive(),
        # a greenlet of the main thread, as every thread of the patched process
        on_main_os_thread=thread is not None and thread.native_id == os.getpid(),
        threading_patched=gevent.monkey.is_module_patched("threading"),
    )
    deadline = time.monotonic() + DEADLINE
    while not client.leading and time.monotonic() < deadline:
        gevent.sleep(0.01)  # a poll period under the deadline; the parent closes its client when told
    if client.leading:
        client.reload()
    say(role="child", leading=client.leading, value=setting.get(user="alice"))
    # exits the normal way: the hang this guards against was in logging.shutdown() at exit


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    client = heksher.ThreadHeksherClient(URL, 0.2, FEATURES)
    client.track_contexts(user=heksher.TRACK_ALL)
    client.set_as_main()
    say(role="parent", pid=os.getpid(), leading=client.leading, value=setting.get(user="alice"))
    pid = os.fork()
    if pid == 0:
        child(client)
        return
    assert sys.stdin.readline().strip() == "close"
    client.close()
    deadline = time.monotonic() + DEADLINE
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            say(role="parent", child_exit=os.waitstatus_to_exitcode(status))
            return
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            say(role="parent", child_exit=None)
            return
        time.sleep(0.01)  # a poll period under the deadline


if __name__ == "__main__":
    main()
