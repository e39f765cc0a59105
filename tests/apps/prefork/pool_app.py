"""A process pool driven by the prefork tests, one JSON line per command.

Usage: python pool_app.py POOL METHOD MODE WORKERS
    POOL:    pool (multiprocessing.Pool) or executor (concurrent.futures.ProcessPoolExecutor)
    METHOD:  fork, spawn or forkserver
    MODE:    parent (the parent makes its client main before the pool starts)
             or initializer (each worker makes its own, in the pool's initializer)

Commands on stdin, each answered by one line ``@@ {json}`` on stdout:
    {"op": "probe"}                         every worker's pid, value and leading
    {"op": "await", "value": V}             when each worker first answered V
    {"op": "hold", "value": V}              the same, answered once every worker is inside its task
    {"op": "collect", "expect": N}          the held tasks' answers, once N are in (or 30 s passed)
    {"op": "exit"}                          shut the pool down gracefully (terminate it if a
                                            held task was lost with its worker), then exit
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

TIMEOUT = 30.0


def answer(payload: dict[str, Any]) -> None:
    print("@@ " + json.dumps(payload), flush=True)


def commands() -> Iterator[dict[str, Any]]:
    """Command lines from stdin, read with os.read.

    Not ``for line in sys.stdin``: a Pool forks replacement workers from a
    thread of its own, and a child forked while this thread waits inside
    ``sys.stdin``'s buffer inherits that buffer's lock held; multiprocessing
    then closes ``sys.stdin`` in the child and hangs on the lock for good.
    """
    pending = b""
    while True:
        chunk = os.read(0, 65536)
        if not chunk:
            return
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield dict(json.loads(line))


def tag_semaphores() -> None:
    """Name this process's multiprocessing semaphores ``<HEKSHER_TEST_SEMPREFIX>-<pid>-...``.

    The tests SIGKILL this process's whole session, resource tracker included,
    which leaves the pool's semaphores in /dev/shm; PoolDriver.close() removes
    them by this name (see tests/_semaphores.py; ``semprefix`` is private to
    multiprocessing).
    """
    prefix = os.environ.get("HEKSHER_TEST_SEMPREFIX")
    if prefix:
        multiprocessing.current_process()._config["semprefix"] = f"/{prefix}-{os.getpid()}"  # type: ignore[attr-defined]


def main() -> None:
    import pool_tasks

    tag_semaphores()
    kind, method, mode, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    ctx = multiprocessing.get_context(method)
    barrier = ctx.Barrier(workers)
    inside = ctx.Value("i", 0)
    if mode == "parent":
        pool_tasks.start_client()  # before the pool starts
    initargs = (barrier, inside, mode == "initializer")
    pool: Any
    if kind == "pool":
        pool = ctx.Pool(workers, initializer=pool_tasks.test_initializer, initargs=initargs)

        def each(fn: Any, *args: Any) -> list[Any]:
            return list(pool.starmap_async(fn, [args] * workers, chunksize=1).get(TIMEOUT * 2))

        def start_each(fn: Any, *args: Any) -> list[Callable[[], Any]]:
            results = [pool.apply_async(fn, args) for _ in range(workers)]
            return [lambda r=r: r.get(0) if r.ready() else None for r in results]

    else:
        pool = ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=pool_tasks.test_initializer, initargs=initargs
        )

        def each(fn: Any, *args: Any) -> list[Any]:
            futures = [pool.submit(fn, *args) for _ in range(workers)]
            return [f.result(TIMEOUT * 2) for f in futures]

        def start_each(fn: Any, *args: Any) -> list[Callable[[], Any]]:
            futures = [pool.submit(fn, *args) for _ in range(workers)]
            return [lambda f=f: f.result(0) if f.done() else None for f in futures]

    parent_leading = pool_tasks.client.leading if pool_tasks.client is not None else None
    answer({"ready": each(pool_tasks.probe, TIMEOUT), "parent": os.getpid(), "leading": parent_leading})
    held: list[Callable[[], Any]] = []
    lost = 0
    for command in commands():
        try:
            if command["op"] == "probe":
                answer({"answers": each(pool_tasks.probe, TIMEOUT)})
            elif command["op"] == "await":
                answer({"answers": each(pool_tasks.await_value, command["value"], TIMEOUT)})
            elif command["op"] == "hold":
                with inside.get_lock():
                    inside.value = 0
                held = start_each(pool_tasks.await_value, command["value"], TIMEOUT)
                deadline = time.monotonic() + TIMEOUT
                while inside.value < workers and time.monotonic() < deadline:
                    time.sleep(0.001)  # polling the shared counter under the deadline
                answer({"held": inside.value})
            elif command["op"] == "collect":
                deadline = time.monotonic() + TIMEOUT
                while True:
                    done = [get() for get in held]
                    finished = [d for d in done if d is not None]
                    if len(finished) >= command["expect"] or time.monotonic() > deadline:
                        break
                    time.sleep(0.001)
                lost = len(held) - len(finished)
                answer({"answers": finished, "lost": lost})
            elif command["op"] == "exit":
                t0 = time.monotonic()
                if kind == "pool" and lost:
                    pool.terminate()  # Pool.join() would wait for the lost task forever
                elif kind == "pool":
                    pool.close()
                    pool.join()
                else:
                    pool.shutdown(wait=True)
                if pool_tasks.client is not None:
                    pool_tasks.client.close()
                answer({"bye": time.monotonic() - t0})
                return
        except Exception as e:  # reported to the test, which decides
            answer({"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    main()
