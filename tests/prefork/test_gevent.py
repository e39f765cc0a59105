"""gunicorn ``-k gevent``, for real: a ThreadHeksherClient whose thread is a greenlet.

gunicorn's gevent worker calls ``gevent.monkey.patch_all()`` in each worker
before it imports the app (without ``--preload``), so ``threading`` is
gevent's there: the client's background "thread" is a greenlet, its events
and conditions are gevent's, and anything in it that blocks the OS thread (a
lock wait, a blocking read, a sleep outside gevent) stops every request of
that worker. The five checks of ``tests/apps/prefork/harness.py`` show that it
does not: every worker answers, the service sees one poller, a rule change
reaches every worker within an update interval plus a margin, the leader
worker SIGKILLed is replaced by another worker within a second and updates go
on, and a graceful stop is followed by a working start on the same folder.

With ``--preload`` the arbiter imports the app before anything is patched,
so its client leads from a real OS thread; each worker patches after the fork,
when its copy of the client already resumed as a follower.

A failure names the check (``check 3 propagates failed: ...``), the master's
and workers' pids, and the segment's status (leader, verdict, heartbeat and
update ages, last error).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from heksher_shm.testing import HeksherService
from tests.apps.prefork import harness as h

pytest.importorskip("gunicorn", reason="gunicorn is not installed (pip install -e '.[prefork]')")
pytest.importorskip(
    "gevent", reason="gevent is not importable, so gunicorn has no gevent worker (pip install -e '.[test]')"
)

INTERVAL = 0.3
WORKERS = 3


def starter(service: HeksherService, tmp_path: Path, *options: str) -> h.Start:
    def start(tag: str) -> h.Server:
        port = h.free_port()
        # A gevent worker takes up to --worker-connections (1000) connections at once, so under load the
        # first one awake may accept every request of the sweep and another never get one. Two at a time
        # leaves the rest to the other workers, as a sync worker does.
        argv = h.gunicorn(port, "gevent", WORKERS, "--worker-connections", "2", *options)
        log = tmp_path / f"gunicorn-gevent{tag}.log"
        return h.Server(argv, h.server_env(service.url, INTERVAL), h.HERE, port, log)

    return start


def gevent_workers_ran(tmp_path: Path) -> None:
    """gunicorn said it used the gevent worker (which patches with ``gevent.monkey.patch_all()``)."""
    logs = h.read_logs(tmp_path, "gunicorn-gevent")
    assert logs.count("Using worker: gevent") == 2, "gunicorn did not run its gevent worker twice"


def test_gunicorn_gevent(service: HeksherService, tmp_path: Path) -> None:
    """Each worker patches, imports the app and makes its client main; one of them leads."""
    h.full_run(starter(service, tmp_path), service, WORKERS, INTERVAL)
    gevent_workers_ran(tmp_path)


def test_gunicorn_gevent_preload(service: HeksherService, tmp_path: Path) -> None:
    """--preload: the unpatched arbiter imports the app and leads; the patched workers follow."""
    takeover = h.master_leads_run(starter(service, tmp_path, "--preload"), service, WORKERS, INTERVAL)
    gevent_workers_ran(tmp_path)
    # the orphaned gevent workers exit within a second (their notify loop sees the new parent), while
    # followers are woken by the leader's exit (a pidfd): one of them took over before
    assert takeover is not None
