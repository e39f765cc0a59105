"""uvicorn --workers 4, for real, with AsyncHeksherClient started in the ASGI lifespan.

The same five checks as the gunicorn tests (see ``tests/apps/prefork/harness.py``):
values everywhere, one poller, propagation within an interval, takeover after
the leading worker is SIGKILLed (uvicorn replaces it), clean TERM and restart.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from heksher_shm.testing import HeksherService
from tests.apps.prefork import harness as h

pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install -e '.[prefork]')")

INTERVAL = 0.3
WORKERS = 4


def test_uvicorn_workers(service: HeksherService, tmp_path: Path) -> None:
    def start(tag: str) -> h.Server:
        port = h.free_port()
        argv = [sys.executable, "-m", "uvicorn", "asgi_app:app", "--app-dir", str(h.HERE)]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(WORKERS), "--lifespan", "on"]
        return h.Server(
            argv, h.server_env(service.url, INTERVAL), h.HERE, port, tmp_path / f"uvicorn{tag}.log"
        )

    h.full_run(start, service, WORKERS, INTERVAL)
