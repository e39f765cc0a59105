"""uwsgi --master --processes 4, for real: with --lazy-apps, with the docs' ini file, and with the
default command line (no --lazy-apps, no --py-call-uwsgi-fork-hooks).

Skipped when uwsgi is not installed (``pip install uwsgi`` compiles it; CI
installs it). The same five checks as the gunicorn tests.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from heksher_shm.testing import HeksherService
from tests.apps.prefork import harness as h

UWSGI = shutil.which("uwsgi", path=str(Path(sys.executable).parent)) or shutil.which("uwsgi")
pytestmark = pytest.mark.skipif(UWSGI is None, reason="uwsgi is not installed (pip install uwsgi)")

INTERVAL = 0.3
WORKERS = 4
TEST_OPTIONS = ["--disable-logging", "--home", sys.prefix]  # quiet, and this virtualenv's packages
REFUSAL = "already runs in a uwsgi master"


def uwsgi(port: int, *options: str) -> list[str]:
    """A command line with every option given on it (no ini file)."""
    assert UWSGI is not None
    argv = [UWSGI, "--master", "--processes", str(WORKERS), "--http-socket", f"127.0.0.1:{port}"]
    argv += ["--chdir", str(h.HERE), "--wsgi-file", "wsgi_app.py", "--callable", "app"]
    return [*argv, "--need-app", "--die-on-term", *TEST_OPTIONS, *options]


def with_ini(port: int, *options: str) -> list[str]:
    """``uwsgi --ini uwsgi.ini`` (the file the docs show) on a test port."""
    assert UWSGI is not None
    return [UWSGI, "--ini", "uwsgi.ini", "--http-socket", f"127.0.0.1:{port}", *TEST_OPTIONS, *options]


def starter(service: HeksherService, tmp_path: Path, *options: str, ini: bool = True) -> h.Start:
    def start(tag: str) -> h.Server:
        port = h.free_port()
        log = tmp_path / f"uwsgi{tag}.log"
        argv = with_ini(port, *options) if ini else uwsgi(port, *options)
        return h.Server(argv, h.server_env(service.url, INTERVAL), h.HERE, port, log)

    return start


def test_uwsgi_lazy_apps(service: HeksherService, tmp_path: Path) -> None:
    """--lazy-apps: each worker imports the app and makes its client main; one of them leads."""
    h.full_run(starter(service, tmp_path, "--lazy-apps"), service, WORKERS, INTERVAL)
    assert REFUSAL not in h.read_logs(tmp_path, "uwsgi")


def test_uwsgi_master_loads_app(service: HeksherService, tmp_path: Path) -> None:
    """uwsgi.ini as is: the master imports the app and makes its first update itself, without a
    background thread, then lets go; the forked workers resume and elect a leader among them."""
    h.full_run(starter(service, tmp_path), service, WORKERS, INTERVAL)
    assert REFUSAL not in h.read_logs(tmp_path, "uwsgi")


@pytest.mark.parametrize("threads", [[], ["--enable-threads"]], ids=["default", "enable-threads"])
def test_uwsgi_default_command_line(service: HeksherService, tmp_path: Path, threads: list[str]) -> None:
    """No --lazy-apps and no --py-call-uwsgi-fork-hooks, with and without --enable-threads: the app
    loads in the master, and the workers resume through uwsgi's own post-fork hook."""
    h.full_run(starter(service, tmp_path, *threads, ini=False), service, WORKERS, INTERVAL)
    logs = h.read_logs(tmp_path, "uwsgi")
    assert REFUSAL not in logs
    assert "Traceback" not in logs
