"""A child that starts a client with some settings and holds it: a leader, a follower, a peer process.

Run by the runner as ``python -m benchmarks._holder child '<params>'``. After
``set_as_main()`` it reports ``ready`` (with its role and how long
building the client and ``set_as_main()`` took), then answers commands until ``exit``:

* ``reload``: ``client.reload()``;
* ``role``: leader, follower or alone (the peer); ``info``: the same, the pid and the segment file;
* ``memory``: ``get()`` every setting once, collect garbage, report USS/PSS/RSS.

With ``no_client`` it makes the settings and no client (a memory baseline).

With ``watch`` in its parameters, a thread calls ``get()`` on one setting every
``period`` seconds and reports each new value with the ``time.monotonic()`` at
which it was first seen (the propagation case).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from typing import Any

from benchmarks._common import child_main, commands, emit
from benchmarks._scenario import specs_from
from benchmarks._sides import library, make_client, make_settings, memory, role


def _watch(setting: Any, context: dict[str, str], period: float, stop: threading.Event) -> None:
    last = setting.get(**context)
    while not stop.wait(period):
        value = setting.get(**context)
        if value != last:
            seen = time.monotonic()
            last = value
            emit("seen", value=value, t=seen)


def _memory_after_gets(settings: dict[str, Any], context: dict[str, str]) -> dict[str, float]:
    for setting in settings.values():
        setting.get(**context)
    gc.collect()
    return memory()


def _baseline(settings: dict[str, Any]) -> None:
    """No client: the interpreter, the library and the settings, for memory baselines."""
    logging.getLogger("heksher").setLevel(logging.WARNING)  # 0.2.2 logs each get() without rules
    emit("ready", role="none")
    for command in commands():
        if command["cmd"] != "memory":
            raise ValueError(f"unknown command {command!r}")
        emit("done", role="none", **_memory_after_gets(settings, command.get("context", {})))


def body(params: dict[str, Any]) -> None:
    side = params["side"]
    lib = library(side)
    settings = make_settings(lib, specs_from(params["settings"]))
    if params.get("no_client"):
        _baseline(settings)
        return
    start = time.perf_counter()
    client = make_client(lib, params["url"], params["interval"], params["track"], params.get("defaults"))
    constructed = time.perf_counter()
    client.set_as_main()
    done = time.perf_counter()
    emit("ready", role=role(side, client), construct_s=constructed - start, set_as_main_s=done - constructed)
    stop = threading.Event()
    watch = params.get("watch")
    if watch is not None:
        threading.Thread(
            target=_watch,
            args=(settings[watch["setting"]], watch["context"], watch["period"], stop),
            daemon=True,
        ).start()
    for command in commands():
        name = command["cmd"]
        if name == "reload":
            client.reload()
            emit("done")
        elif name == "role":
            emit("done", role=role(side, client))
        elif name == "info":
            emit(
                "done",
                role=role(side, client),
                pid=os.getpid(),
                segment=getattr(client, "segment_path", None),
            )
        elif name == "memory":
            emit("done", role=role(side, client), **_memory_after_gets(settings, command.get("context", {})))
        else:
            raise ValueError(f"unknown command {command!r}")
    stop.set()
    client.close()


if __name__ == "__main__":
    child_main(body)
