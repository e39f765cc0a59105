"""An ASGI app whose worker processes share one Heksher poller (uvicorn --workers).

    HEKSHER_URL=http://localhost:8888 uvicorn asgi_app:app --workers 4

Each worker makes its client main in the lifespan startup, inside the event
loop that serves requests, and closes it at lifespan shutdown. Plain ASGI, so
it runs without a framework; with Starlette or FastAPI, put the same two
calls in the app's lifespan.

``GET /?user=alice`` answers ``{"pid": ..., "cache_size": ..., "leading": ...}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import heksher_shm as heksher

cache_size = heksher.Setting("cache_size", int, ["user"], default_value=10)

client = heksher.AsyncHeksherClient(
    os.environ["HEKSHER_URL"],
    float(os.environ.get("HEKSHER_UPDATE_INTERVAL", "60")),
    ["user", "theme", "environment"],
)
client.track_contexts(user=heksher.TRACK_ALL)

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """Start and stop the client with the lifespan; answer the setting's value over HTTP."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await client.set_as_main()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    user = parse_qs(scope.get("query_string", b"").decode()).get("user", ["anonymous"])[0]
    body = {"pid": os.getpid(), "cache_size": cache_size.get(user=user), "leading": client.leading}
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})
