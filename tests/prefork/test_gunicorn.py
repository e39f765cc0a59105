"""gunicorn, for real: sync and gthread workers, with and without --preload, recycling, HUP, kills, TERM.

Every test starts gunicorn on 127.0.0.1 with ``tests/apps/prefork/wsgi_app.py``
and checks, against the in-memory service's request counters: every worker
answers the rule's value; the service sees one poller; a rule change reaches
every worker within an update interval plus a margin; killing the leader does
not stop updates; shutdown does not hang and the next start on the same
folder works. See ``docs/deployment/gunicorn.rst`` for what each step shows.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from heksher_shm.testing import HeksherService
from tests.apps.prefork import harness as h

pytest.importorskip("gunicorn", reason="gunicorn is not installed (pip install -e '.[prefork]')")

INTERVAL = 0.3
WORKERS = 4


def starter(service: HeksherService, tmp_path: Path, worker_class: str, *options: str) -> h.Start:
    def start(tag: str) -> h.Server:
        port = h.free_port()
        argv = h.gunicorn(port, worker_class, WORKERS, *options)
        log = tmp_path / f"gunicorn{tag}.log"
        return h.Server(argv, h.server_env(service.url, INTERVAL), h.HERE, port, log)

    return start


@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_gunicorn(service: HeksherService, tmp_path: Path, worker_class: str) -> None:
    """Each worker imports the app and makes its client main; one of them leads."""
    h.full_run(starter(service, tmp_path, worker_class), service, WORKERS, INTERVAL)


@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_gunicorn_preload(service: HeksherService, tmp_path: Path, worker_class: str) -> None:
    """preload_app (from gunicorn_preload.conf.py): the arbiter imports the app, so its client leads.

    The workers' copies of the client, forked from the arbiter, resume as followers.
    """
    # --max-requests 0: the checks count on a stable set of workers (the file recycles them after ~1000)
    start = starter(
        service, tmp_path, worker_class, "--config", "gunicorn_preload.conf.py", "--max-requests", "0"
    )
    takeover = h.master_leads_run(start, service, WORKERS, INTERVAL)
    # gunicorn's orphaned workers live on until their next request: one of them took over meanwhile
    assert takeover is not None


def boots(server: h.Server) -> int:
    """How many workers gunicorn has booted so far (from its log)."""
    return server.log().count("Booting worker with pid")


RECYCLING_LAG = 10.0
"""Bound on a rule change's delay while the leading worker itself keeps being recycled (no --preload)."""


@pytest.mark.parametrize("preload", [False, True], ids=["lazy", "preload"])
def test_gunicorn_max_requests(service: HeksherService, tmp_path: Path, preload: bool) -> None:
    """Workers recycled while serving (--max-requests 200 under steady traffic).

    Every answer is the rule's value (a fresh worker never answers before it
    has the rules), the poller stays one (plus a new leader's first query and
    declaration when the leader is recycled), and changes propagate during the
    churn. With --preload the arbiter leads and is never recycled: changes
    arrive within an interval. Without it the leader is a worker and is
    recycled too; each handover costs the new leader's first requests, so
    changes arrive later (see docs/deployment/gunicorn.rst for the figures).
    """
    rule = service.add_rule(h.SETTING, {"user": "alice"}, 1)
    # About two seconds a worker: every leader term lives long enough to query even on a starved
    # machine (at 100 a worker lived one second, and a starved leader could exit before its first query).
    options = ["--max-requests", "200", "--max-requests-jitter", "0", *(["--preload"] if preload else [])]
    server = starter(service, tmp_path, "sync", *options)("")
    try:
        with h.shown_on_failure(server):
            h.until(lambda: len(server.children()) == WORKERS, 60, "the workers are up")
            h.sweep(server.port, lambda s: True, 60, "a worker answers", tolerate_errors=True)
            booted = boots(server)
            background = h.Background(server.port, threads=2)
            try:
                h.until(lambda: boots(server) - booted >= WORKERS, 60, "workers are recycled")
                before = boots(server)
                h.one_poller(service, INTERVAL, extra=lambda: boots(server) - before)
                margin = h.MARGIN if preload else RECYCLING_LAG
                h.propagates(server, service, rule, 2, INTERVAL, margin, set(), WORKERS, settle=4 * WORKERS)
            finally:
                churned = background.stop()
            assert {a.value for a in churned.answers} <= {1, 2}, (
                "an answer was neither the old nor the new rule"
            )
            assert not churned.errors, churned.errors[:5]
            assert len(churned.pids()) > WORKERS
            assert server.stop() < 15
    finally:
        server.close()


@pytest.mark.parametrize("preload", [False, True], ids=["lazy", "preload"])
def test_gunicorn_hup(service: HeksherService, tmp_path: Path, preload: bool) -> None:
    """kill -HUP: gunicorn starts new workers and retires the old ones; values and updates carry on.

    Without --preload the new workers import the app again and one of them
    leads; with it the app is not imported again and the arbiter keeps leading.
    """
    rule = service.add_rule(h.SETTING, {"user": "alice"}, 1)
    server = starter(service, tmp_path, "sync", *(["--preload"] if preload else []))("")
    try:
        with h.shown_on_failure(server):
            old = h.wait_workers(server, WORKERS)
            server.send_signal(signal.SIGHUP)
            h.until(
                lambda: len(server.children()) == WORKERS and not server.children() & old,
                30,
                "the old workers are replaced",
            )
            new = h.wait_workers(server, WORKERS)
            # the old leader goes with the old workers, and one of the new ones takes over
            h.leader_settled({server.pid} if preload else new)
            h.every_worker_answers(server, 1)
            h.one_poller(service, INTERVAL)
            h.propagates(server, service, rule, 2, INTERVAL)
            assert server.stop() < 15
    finally:
        server.close()
