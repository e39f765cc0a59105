"""Fork a child from a process whose client is already main, and report what each side sees.

Usage: python fork_app.py URL SETTING KIND EXIT   (KIND: thread|async, EXIT: os_exit|normal)
Prints one JSON line from the parent.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import heksher_shm as heksher

URL, NAME, KIND, EXIT = sys.argv[1:5]
FEATURES = ["user", "theme", "environment"]
setting = heksher.Setting(NAME, int, ["user"], 0)


def child_report(client: Any) -> dict[str, Any]:
    if KIND == "async":

        async def in_loop() -> dict[str, Any]:
            # the inherited async client resumes in the child's new loop
            await client.reload()
            return {"value": setting.get(user="alice"), "leading": client.leading, "pid": os.getpid()}

        return asyncio.run(in_loop())
    client.reload()
    return {"value": setting.get(user="alice"), "leading": client.leading, "pid": os.getpid()}


def fork(client: Any) -> tuple[int, int]:
    """Fork; the child reports through a pipe and exits as asked. Returns (pid, read end)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            report = child_report(client)
        except BaseException as e:  # reported to the parent
            report = {"error": repr(e)}
        os.write(write_fd, json.dumps(report).encode())
        os.close(write_fd)
        if EXIT == "os_exit":
            os._exit(0)
        sys.exit(0)  # normal interpreter shutdown: atexit, finalizers, garbage collection
    os.close(write_fd)
    return pid, read_fd


def collect(pid: int, read_fd: int) -> tuple[dict[str, Any], int]:
    with os.fdopen(read_fd, "rb") as r:
        child = json.loads(r.read() or b"{}")
    _, status = os.waitpid(pid, 0)
    return child, status


def report(client: Any, leading_before: bool, child: dict[str, Any], status: int) -> dict[str, Any]:
    return {
        "leading_before": leading_before,
        "child": child,
        "child_status": status,
        "leading_after": client.leading,
        "lock_held": client._parts.lock.held if client._parts else None,
    }


if KIND == "thread":
    c = heksher.ThreadHeksherClient(URL, 60, FEATURES)
    c.track_contexts(user=heksher.TRACK_ALL)
    c.set_as_main()
    before = c.leading
    result = report(c, before, *collect(*fork(c)))
    c.reload()
    result["parent_value_after"] = setting.get(user="alice")
    c.close()
elif EXIT == "os_exit":
    # Fork from inside the running loop, as multiprocessing does; such a
    # child must leave with os._exit, or it would unwind the parent's loop.

    async def main() -> dict[str, Any]:
        c = heksher.AsyncHeksherClient(URL, 60, FEATURES)
        c.track_contexts(user=heksher.TRACK_ALL)
        await c.set_as_main()
        before = c.leading
        pid, read_fd = fork(c)
        # wait in a thread: this loop must keep running, it may be the host's leader
        child, status = await asyncio.get_running_loop().run_in_executor(None, collect, pid, read_fd)
        out = report(c, before, child, status)
        await c.reload()
        out["parent_value_after"] = setting.get(user="alice")
        await c.aclose()
        return out

    result = asyncio.run(main())
else:
    # Fork with no loop running (gunicorn --preload style): the client was made
    # main in a loop that has ended, so this process no longer leads.
    c = heksher.AsyncHeksherClient(URL, 60, FEATURES)
    c.track_contexts(user=heksher.TRACK_ALL)
    asyncio.run(c.set_as_main())
    before = c.leading
    result = report(c, before, *collect(*fork(c)))

    async def after() -> None:
        await c.reload()
        result["parent_value_after"] = setting.get(user="alice")
        await c.aclose()

    asyncio.run(after())
print(json.dumps(result))
