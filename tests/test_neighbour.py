"""A bad neighbour must not stop the app (issue 16): real processes, shared folders that cannot be used.

A local user (here ``nobody``) creates the default shared folder's name
first, world-writable. Refusing that folder is right; failing the app is
not: the client serves without sharing (one poller for this process, as
heksher 0.2.2), and says so once, at ERROR, with the fix. The same for a
folder or a file with loosened modes, a full file system at start, and a
read-only one (real tmpfs mounts, as root).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from heksher_shm._shm.identity import pid_namespace
from heksher_shm.testing import HeksherService
from tests._support import FEATURES

NOBODY = 65534

SCRIPT = """
import json, logging, sys
from heksher_shm._shm import folder
if sys.argv[1] != "-":
    folder._DEV_SHM = sys.argv[1]  # a /dev/shm of the test's own: the real one stays untouched
import heksher_shm as heksher

records = []

class Keep(logging.Handler):
    def emit(self, record):
        records.append((record.levelname, record.getMessage()))

logging.getLogger("heksher_shm").addHandler(Keep())
size = heksher.Setting("size", int, ["user"], 0)
named = {"segment_name": sys.argv[3]} if len(sys.argv) > 3 else {}
with heksher.ThreadHeksherClient(sys.argv[2], 60, ["user", "theme", "environment"], **named) as client:
    client.track_contexts(user="alice")
    client.reload()
    try:
        client.shared_status()
        status = None
    except Exception as error:
        status = str(error)
    print(json.dumps({
        "leading": client.leading,
        "segment": client.segment_path,
        "value": size.get(user="alice"),
        "status": status,
        "errors": [message for level, message in records if level == "ERROR"],
    }))
"""


ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (another user's folder, tmpfs mounts)")


def _run_app(dev_shm: Path | None, env: dict[str, str], *segment_name: str) -> dict[str, Any]:
    """Run SCRIPT against a fresh in-memory service that holds one rule; what it printed, and the
    number of queries the service saw."""
    with HeksherService(context_features=FEATURES) as service:
        service.declare("size", "int", 0, ["user"])
        service.add_rule("size", {"user": "alice"}, 5)
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(dev_shm or "-"), service.url, *segment_name],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if k not in ("HEKSHER_SHM_DIR", "XDG_RUNTIME_DIR")}
            | env,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        queries = service.count(path="/api/v1/query")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["leading"] is True  # alone: it polls the service itself
    assert result["segment"] is None
    assert result["value"] == 5
    assert queries >= 1
    return result


def _said_once(result: dict[str, Any], fix: str) -> None:
    (error,) = result["errors"]  # said once, with the fix
    assert "cannot share the host's rule cache" in error
    assert fix in error


@ROOT
def test_a_folder_another_user_made_first_does_not_stop_the_app(tmp_path: Path) -> None:
    dev_shm = tmp_path / "dev-shm"
    dev_shm.mkdir(mode=0o1777)
    dev_shm.chmod(0o1777)
    namespace = pid_namespace()
    squatted = dev_shm / (f"heksher_shm-0-{namespace}" if namespace else "heksher_shm-0")
    squatted.mkdir()
    squatted.chmod(0o777)
    os.chown(squatted, NOBODY, NOBODY)
    result = _run_app(dev_shm, {})
    assert f"{squatted}: is owned by uid {NOBODY}" in result["status"]
    _said_once(result, "HEKSHER_SHM_DIR")
    assert os.listdir(squatted) == []  # nothing written into another user's folder


def test_a_loosened_folder_does_not_stop_the_app(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o777)
    result = _run_app(None, {"HEKSHER_SHM_DIR": str(folder)})
    assert "has mode 0o777; it must not be writable by group or others" in result["status"]
    _said_once(result, "make that folder or file this user's own and private")
    assert os.listdir(folder) == []


def test_a_loosened_segment_file_does_not_stop_the_app(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o700)
    loosened = folder / "app.seg"
    loosened.write_bytes(b"")
    loosened.chmod(0o666)
    result = _run_app(None, {"HEKSHER_SHM_DIR": str(folder)}, "app")
    assert f"segment file {loosened}" in result["status"]
    assert "chmod 600" in result["status"]
    _said_once(result, "make that folder or file this user's own and private")
    assert loosened.stat().st_mode & 0o777 == 0o666  # never changed back behind the user's back
    assert loosened.read_bytes() == b""


@contextlib.contextmanager
def _tmpfs(where: Path, *options: str) -> Iterator[Path]:
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(("mode=700", *options)), "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@ROOT
def test_a_full_file_system_at_start_does_not_stop_the_app(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "full", "size=4k") as folder:
        (folder / "filler").write_bytes(b"x" * 4096)  # the one page it holds
        result = _run_app(None, {"HEKSHER_SHM_DIR": str(folder)})
    assert "No space left on device" in result["status"]
    _said_once(result, "free space on that file system (df)")


@ROOT
def test_a_read_only_file_system_does_not_stop_the_app(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "ro", "ro") as folder:
        result = _run_app(None, {"HEKSHER_SHM_DIR": str(folder)})
    assert "Read-only file system" in result["status"]
    _said_once(result, "at a private folder this user can write")
