"""A WSGI app whose worker processes share one Heksher poller (gunicorn, uwsgi).

    HEKSHER_URL=http://localhost:8888 gunicorn -w 4 wsgi_app:app

The client is made main when this module is imported, with no server hook:
gunicorn without ``--preload`` and uwsgi with ``--lazy-apps`` import it once
per worker; gunicorn ``--preload`` and uwsgi without ``--lazy-apps`` import it
once in the master, which then forks the workers (the clients resume in each
worker by themselves).

``GET /?user=alice`` answers ``{"pid": ..., "cache_size": ..., "leading": ...}``:
the setting's value for that user, and which worker process answered.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import heksher_shm as heksher

if os.environ.get("HEKSHER_PREFORK_GREENLET_DUMP"):
    # Only under the tests' harness: every greenlet's stack in the log on request (see stacks.py beside
    # this file, loaded by path: the servers put different folders on sys.path).
    _spec = importlib.util.spec_from_file_location("prefork_stacks", Path(__file__).with_name("stacks.py"))
    assert _spec is not None
    assert _spec.loader is not None
    _stacks = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_stacks)
    _stacks.install_greenlet_dump()

cache_size = heksher.Setting("cache_size", int, ["user"], default_value=10)

client = heksher.ThreadHeksherClient(
    os.environ["HEKSHER_URL"],
    float(os.environ.get("HEKSHER_UPDATE_INTERVAL", "60")),
    ["user", "theme", "environment"],
)
client.track_contexts(user=heksher.TRACK_ALL)
client.set_as_main()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Answer the setting's value for ``?user=``, and this worker's pid."""
    user = parse_qs(environ.get("QUERY_STRING", "")).get("user", ["anonymous"])[0]
    body = {"pid": os.getpid(), "cache_size": cache_size.get(user=user), "leading": client.leading}
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]
