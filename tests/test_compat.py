"""The same application gives the same values on heksher 0.2.2 and on heksher_shm."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from heksher_shm.testing import HeksherService

pytest.importorskip("heksher", reason="the peer, heksher 0.2.2, is a test dependency")

APP = Path(__file__).parent / "apps" / "compat_app.py"

RULES = [
    ("compat_size", {"user": "alice"}, 20),
    ("compat_size", {"user": "bob"}, 500),  # rejected by the validator
    ("compat_size", {"theme": "dark"}, 30),
    ("compat_ratio", {"user": "alice"}, 2),
    ("compat_title", {"user": "alice", "theme": "dark"}, "dark alice"),
    ("compat_title", {"user": "carol"}, "carol"),  # untracked theme elsewhere is irrelevant here
    ("compat_flag", {"theme": "dark"}, True),
    ("compat_color", {"user": "bob"}, "blue"),
    ("compat_perm", {"user": "alice"}, ["READ", "WRITE"]),
    ("compat_seq", {"user": "alice"}, [1, 2, 3]),
    ("compat_map", {"theme": "dark"}, {"x": 5}),
    ("compat_late", {"user": "alice"}, "late-alice"),
]


def run(module: str, url: str, kind: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, str(APP), module, url, kind], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_same_values_as_heksher_0_2_2(kind: str) -> None:
    with HeksherService(context_features=["user", "theme", "environment"]) as service:
        peer_first = run("heksher", service.url, kind)  # declares everything
        for setting, conditions, value in RULES:
            service.add_rule(setting, conditions, value)
        peer = run("heksher", service.url, kind)
        ours = run("heksher_shm", service.url, kind)
    assert peer != peer_first  # the rules did change something
    assert ours == peer
