"""Figures for docs/deployment: query rate against worker count, propagation delay, takeover time.

A stress test (off by default), printing one line per configuration:

    .venv/bin/pytest -m stress -s -p no:randomly tests/prefork/test_measure.py

gunicorn sync workers, update interval 0.5 s, on this machine; the figures
depend on the machine and its load, the bounds asserted do not.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest

from heksher_shm.testing import HeksherService
from tests.apps.prefork import harness as h

pytest.importorskip("gunicorn", reason="gunicorn is not installed (pip install -e '.[prefork]')")

INTERVAL = 0.5
WINDOW = 10  # intervals
CHANGES = 5
KILLS = 3


@pytest.mark.stress
@pytest.mark.parametrize("workers", [1, 2, 4, 8])
def test_measure_gunicorn(service: HeksherService, tmp_path: Path, workers: int) -> None:
    rule = service.add_rule(h.SETTING, {"user": "alice"}, 0)
    port = h.free_port()
    argv = [*h.gunicorn_base(port), "--workers", str(workers)]
    argv += ["--chdir", str(h.HERE), "wsgi_app:app"]
    server = h.Server(argv, h.server_env(service.url, INTERVAL), h.HERE, port, tmp_path / "gunicorn.log")
    try:
        with h.shown_on_failure(server):
            h.wait_workers(server, workers)
            traffic = h.one_poller(service, INTERVAL, intervals=WINDOW)
            per_interval = traffic.queries / (traffic.seconds / INTERVAL)
            assert per_interval <= 1.2, traffic
            delays = []
            for value in range(1, CHANGES + 1):
                propagation = h.propagates(server, service, rule, value, INTERVAL, min_pids=min(workers, 2))
                delays.append(propagation.slowest)
            takeovers = []
            for _ in range(KILLS if workers > 1 else 0):
                takeovers.append(h.kill_leader().seconds)
                h.wait_workers(server, workers)
            after = h.propagates(server, service, rule, CHANGES + 1, INTERVAL, min_pids=min(workers, 2))
            spread = after.slowest - after.earliest
            took = server.stop()
    finally:
        server.close()
    takeover = "no takeover (one worker)"
    if takeovers:
        median, slowest = statistics.median(takeovers) * 1000, max(takeovers) * 1000
        takeover = f"takeover median {median:.0f} ms max {slowest:.0f} ms"
    print(
        f"\n[measure] gunicorn sync -w {workers}, interval {INTERVAL}s: "
        f"{per_interval:.2f} queries per interval ({traffic.queries} in {traffic.seconds:.1f}s), "
        f"propagation (slowest worker) median {statistics.median(delays):.2f}s max {max(delays):.2f}s, "
        f"spread between workers {spread * 1000:.0f} ms, " + takeover + f", shutdown {took:.2f}s",
        flush=True,
    )


@pytest.mark.stress
@pytest.mark.parametrize("preload", [False, True], ids=["lazy", "preload"])
def test_measure_recycling(service: HeksherService, tmp_path: Path, preload: bool) -> None:
    """Propagation while workers are recycled (--max-requests 100 under steady traffic), 4 workers."""
    rule = service.add_rule(h.SETTING, {"user": "alice"}, 0)
    port = h.free_port()
    argv = [*h.gunicorn_base(port), "--workers", "4"]
    argv += ["--max-requests", "100", "--max-requests-jitter", "0", "--chdir", str(h.HERE)]
    argv += [*(["--preload"] if preload else []), "wsgi_app:app"]
    server = h.Server(argv, h.server_env(service.url, INTERVAL), h.HERE, port, tmp_path / "gunicorn.log")
    try:
        with h.shown_on_failure(server):
            h.wait_workers(server, 4)
            background = h.Background(port, threads=2)
            try:
                t0 = time.monotonic()
                boots0 = server.log().count("Booting worker")
                queries0 = service.count(path=h.QUERY)
                delays, leaders = [], set()
                for value in range(1, 2 * CHANGES + 1):
                    propagation = h.propagates(
                        server, service, rule, value, INTERVAL, 10.0, set(), 4, settle=16
                    )
                    delays.append(max(propagation.first_new.values()))
                    leaders.add(h.leader_pid())
                seconds = time.monotonic() - t0
                queries = service.count(path=h.QUERY) - queries0
                boots = server.log().count("Booting worker") - boots0
            finally:
                background.stop()
            server.stop()
    finally:
        server.close()
    print(
        f"\n[measure] gunicorn sync -w 4 --max-requests 100{' --preload' if preload else ''}, interval "
        f"{INTERVAL}s, {boots} workers booted in {seconds:.1f}s: propagation median "
        f"{statistics.median(delays):.2f}s max {max(delays):.2f}s, "
        f"{queries / (seconds / INTERVAL):.2f} queries per interval, {len(leaders)} leaders seen",
        flush=True,
    )
