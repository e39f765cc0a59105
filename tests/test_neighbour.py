"""A bad neighbour must not stop the app (issue 16): real processes, a shared folder another user made.

A local user (here ``nobody``) creates the default shared folder's name
first, world-writable. Refusing that folder is right; failing the app is
not: the client serves without sharing (one poller for this process, as
heksher 0.2.2), and says so once, at ERROR, with the fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from heksher_shm._shm.identity import pid_namespace
from heksher_shm.testing import HeksherService
from tests._support import FEATURES

NOBODY = 65534

SCRIPT = """
import json, logging, sys
from heksher_shm._shm import folder
folder._DEV_SHM = sys.argv[1]  # a /dev/shm of the test's own: the real one stays untouched
import heksher_shm as heksher

records = []

class Keep(logging.Handler):
    def emit(self, record):
        records.append((record.levelname, record.getMessage()))

logging.getLogger("heksher_shm").addHandler(Keep())
size = heksher.Setting("size", int, ["user"], 0)
with heksher.ThreadHeksherClient(sys.argv[2], 60, ["user", "theme", "environment"]) as client:
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


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a folder another user owns")
def test_a_folder_another_user_made_first_does_not_stop_the_app(tmp_path: Path) -> None:
    dev_shm = tmp_path / "dev-shm"
    dev_shm.mkdir(mode=0o1777)
    dev_shm.chmod(0o1777)
    namespace = pid_namespace()
    squatted = dev_shm / (f"heksher_shm-0-{namespace}" if namespace else "heksher_shm-0")
    squatted.mkdir()
    squatted.chmod(0o777)
    os.chown(squatted, NOBODY, NOBODY)
    env = {k: v for k, v in os.environ.items() if k not in ("HEKSHER_SHM_DIR", "XDG_RUNTIME_DIR")}
    with HeksherService(context_features=FEATURES) as service:
        service.declare("size", "int", 0, ["user"])
        service.add_rule("size", {"user": "alice"}, 5)
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(dev_shm), service.url],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        queries = service.count(path="/api/v1/query")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["leading"] is True  # alone: it polls the service itself
    assert result["segment"] is None
    assert result["value"] == 5
    assert queries >= 1
    assert f"{squatted}: is owned by uid {NOBODY}" in result["status"]
    (error,) = result["errors"]  # said once, with the fix
    assert "cannot share the host's rule cache" in error
    assert "HEKSHER_SHM_DIR" in error
    assert os.listdir(squatted) == []  # nothing written into another user's folder
