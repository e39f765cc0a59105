"""The last-known-good file: kept by the leader, served by a host that lost its segment and the service.

The end-to-end test is the one the issue asks for: real processes, the
shared folder deleted (a reboot, a new container), the service down. The
others pin the file's refusals: whatever is not exactly a file of ours,
written for this service and these context features, is never served.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from heksher_shm._model.snapshot import FORMAT
from heksher_shm._shm.lastgood import MAGIC, KeptFile, KeptFileError
from heksher_shm.status import list_segments, segment_status
from heksher_shm.testing import HeksherService
from tests._procs import Worker
from tests._support import FEATURES, unique

URL = "http://127.0.0.1:1/"


def kept_file(tmp_path: Path, url: str = URL, features: tuple[str, ...] = tuple(FEATURES)) -> KeptFile:
    return KeptFile(tmp_path / "rules.snapshot", url, features)


def test_a_snapshot_is_kept_and_read_back(tmp_path: Path) -> None:
    kept = kept_file(tmp_path)
    assert kept.read() is None  # no file yet: nothing to serve, nothing wrong
    kept.write(b"the head", [b"one", b"two"], 1700000000.0)
    back = kept.read()
    assert back is not None
    assert (back.head, back.blobs, back.written) == (b"the head", [b"one", b"two"], 1700000000.0)
    assert (back.service_url, back.snapshot_format) == (URL.rstrip("/"), FORMAT)
    assert stat.S_IMODE(os.stat(kept.path).st_mode) == 0o600
    assert os.listdir(tmp_path) == ["rules.snapshot"]  # no temporary file left behind


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("foreign", "not a heksher_shm snapshot file"),
        ("version", "file version 99"),
        ("checksum", "checksum mismatch"),
        ("truncated", "checksum mismatch"),
        ("url", "written for service http://127.0.0.1:1, not http://other:2"),
        ("features", "written for context features"),
        ("loosened", "group/other permission bits must be clear"),
        ("symlink", "symbolic link"),
    ],
)
def test_a_file_that_is_not_exactly_ours_is_refused(tmp_path: Path, damage: str, message: str) -> None:
    kept = kept_file(tmp_path)
    kept.write(b"head", [b"blob"], 1.0)
    data = kept.path.read_bytes()
    reader = kept
    if damage == "foreign":
        kept.path.write_bytes(b"#!/bin/sh\necho not ours\n" * 4)
    elif damage == "version":
        kept.path.write_bytes(MAGIC + (99).to_bytes(4, "little") + data[12:])
    elif damage == "checksum":
        kept.path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "truncated":
        kept.path.write_bytes(data[:-3])
    elif damage == "url":
        reader = kept_file(tmp_path, url="http://other:2")
    elif damage == "features":
        reader = kept_file(tmp_path, features=("user",))
    elif damage == "loosened":
        os.chmod(kept.path, 0o666)
    else:
        target = tmp_path / "elsewhere"
        kept.path.rename(target)
        kept.path.symlink_to(target)
    with pytest.raises(KeptFileError, match=message):
        reader.read()


def _worker(url: str, kind: str, name: str, snapshot: Path, **client: object) -> Worker:
    return Worker(url, kind, [name], 60, client={"snapshot_file": str(snapshot), **client})


def test_a_host_without_its_segment_and_the_service_serves_the_kept_rules(
    tmp_path: Path, workers: list[Worker]
) -> None:
    """The issue's test: the shared folder deleted and the service down; new processes serve the kept
    rules, say so, and report them stale. A file written for another service is never served."""
    name = unique("kept")
    snapshot = tmp_path / "rules.snapshot"
    with HeksherService(context_features=FEATURES) as svc:
        url = svc.url
        first = _worker(url, "thread", name, snapshot)
        workers.append(first)
        first.ready()
        svc.add_rule(name, {"user": "alice"}, 7)
        first.ask("reload")
        assert first.ask("get", name, {"user": "alice"}) == 7
        first.stop()
        workers.remove(first)
        # the service goes away with this block
    assert snapshot.exists()
    shm_dir = Path(os.environ["HEKSHER_SHM_DIR"])
    shutil.rmtree(shm_dir)  # a reboot, a new container: no segment survives

    for kind in ("thread", "async"):
        late = _worker(url, kind, name, snapshot, startup_timeout=10)
        workers.append(late)
        late.ready()  # set_as_main returns: the kept rules cover the process (a warning, not an error)
        assert late.ask("get", name, {"user": "alice"}) == 7
    (path,) = list_segments()
    status = segment_status(path)
    assert status.verdict == "stale"  # nothing was updated: the rules are as old as the file
    assert status.last_update_ok is None

    # a file written for another service is refused and never served
    for w in workers:
        w.stop()
    workers.clear()
    shutil.rmtree(shm_dir)
    foreign = tmp_path / "foreign.snapshot"
    shutil.copy(snapshot, foreign)
    os.chmod(foreign, 0o600)
    other_url = url.replace("127.0.0.1", "localhost")
    stranger = _worker(other_url, "thread", name, foreign, startup_timeout=5)
    workers.append(stranger)
    stranger.ready()  # the thread client logs and returns
    assert stranger.ask("get", name, {"user": "alice"}) == 0  # the setting's own default


def test_serving_the_kept_rules_is_said_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import heksher_shm as heksher

    name = unique("said")
    setting = heksher.Setting(name, int, ["user"], 0)
    snapshot = tmp_path / "rules.snapshot"
    with HeksherService(context_features=FEATURES) as svc:
        url = svc.url
        with heksher.ThreadHeksherClient(url, 60, FEATURES, snapshot_file=snapshot) as client:
            client.track_contexts(user="alice")
            svc.add_rule(name, {"user": "alice"}, 3)
            client.reload()
            assert setting.get(user="alice") == 3
    shutil.rmtree(os.environ["HEKSHER_SHM_DIR"])
    heksher_main_reset()
    setting = heksher.Setting(name, int, ["user"], 0)
    caplog.set_level("INFO", logger="heksher_shm")
    with heksher.ThreadHeksherClient(url, 60, FEATURES, snapshot_file=snapshot, startup_timeout=5) as client:
        client.track_contexts(user="alice")
        assert setting.get(user="alice") == 3
        client.reload()  # fails again: the service is still down
        assert setting.get(user="alice") == 3
    said = [r for r in caplog.records if "last-known-good" in r.getMessage() and r.levelname == "WARNING"]
    assert len(said) == 1, [r.getMessage() for r in said]
    assert "stale until the service answers" in said[0].getMessage()


def heksher_main_reset() -> None:
    from heksher_shm._process import main as _main

    _main.reset()
