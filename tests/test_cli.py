"""The ``heksher-shm`` command line, run as a real subprocess against real client processes.

The suite's conftest gives each test its own ``HEKSHER_SHM_DIR``; the CLI
subprocesses and the worker processes inherit it.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from heksher_shm import __version__
from heksher_shm._model.snapshot import FORMAT
from heksher_shm._shm.identity import ProcessIdentity, current_identity, pid_namespace
from heksher_shm._shm.layout import FORMAT_VERSION, OFF_GENERATION
from heksher_shm._shm.registration import Registration
from heksher_shm._shm.registry import Registry, registry_directory
from heksher_shm.testing import HeksherService
from tests._procs import Worker, leaders_of
from tests._support import FEATURES, poke, unique

FOREIGN_UID = 65534  # "nobody"


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``heksher-shm ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "heksher_shm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout


def status_json(*args: str) -> tuple[int, list[dict[str, Any]]]:
    result = cli("status", "--json", *args)
    no_traceback(result)
    return result.returncode, json.loads(result.stdout)["segments"]


class LineReader:
    """A subprocess's stdout, line by line, with deadlines (a thread does the blocking reads)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        assert process.stdout is not None
        stdout = process.stdout

        def pump() -> None:
            for line in stdout:
                self.lines.put(line.rstrip("\n"))
            self.lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def next(self, timeout: float = 15) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout} s") from None
        assert line is not None, "the process ended"
        return line


@pytest.fixture
def shm_dir() -> Path:
    return Path(os.environ["HEKSHER_SHM_DIR"])


@pytest.fixture
def popen() -> Iterator[list[subprocess.Popen[str]]]:
    """Subprocesses started by a test, killed and reaped at teardown."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def attach_this_process(segment: Path) -> None:
    """Register the test process as attached to ``segment``: a live process uses it, and nothing else
    does (no client of its own, so it never leads)."""
    me = current_identity()
    Registry(registry_directory(segment)).write(
        Registration(pid=me.pid, create_time=me.create_time, pidns=me.pidns, kind="thread")
    )


def unformatted_segment(path: Path) -> Path:
    """A segment file no leader has published into (what a client that died at once leaves)."""
    path.write_bytes(b"")
    path.chmod(0o600)
    return path


def start_pair(service: HeksherService, workers: list[Worker], name: str, interval: float = 60) -> Worker:
    """A thread worker and an async worker sharing a segment; returns the leader."""
    workers.extend(Worker(service.url, kind, [name], interval) for kind in ("thread", "async"))
    for w in workers:
        w.ready()
    (leader,) = leaders_of(workers)
    return leader


# -- status and dump with live processes ----------------------------------------------------------------


def test_status_and_dump_of_a_healthy_segment(service: HeksherService, workers: list[Worker]) -> None:
    name = unique("cli")
    leader = start_pair(service, workers, name)
    service.add_rule(name, {"user": "alice"}, 5)
    asked = time.monotonic()
    assert workers[1].ask("reload") is True  # published and visible once this returns

    code, segments = status_json()
    since = time.monotonic() - asked
    assert code == 0
    (seg,) = segments
    assert seg["verdict"] == "ok"
    assert seg["healthy"] is True
    assert seg["leader"]["pid"] == leader.pid
    assert seg["leader"]["alive"] is True
    assert seg["leader"]["kind"] == leader.kind
    assert {p["pid"] for p in seg["processes"]} == {w.pid for w in workers}
    assert {p["kind"] for p in seg["processes"]} == {"thread", "async"}
    assert (seg["settings"], seg["rules"]) == (1, 1)
    assert seg["generation"] >= 1
    assert seg["last_error"] is None
    assert seg["heartbeat_age"] <= since  # it showed progress when it answered the reload

    text = cli("status", seg["name"])
    no_traceback(text)
    assert text.returncode == 0
    first = text.stdout.splitlines()[0]
    assert first.startswith(f"{seg['name']}: OK")
    assert f"pid {leader.pid} ({leader.kind}), up " in text.stdout
    assert "1 setting, 1 rule" in text.stdout
    assert "2 live" in text.stdout

    dump = cli("dump")
    no_traceback(dump)
    assert dump.returncode == 0
    assert f"{name}: default 0, 1 rule" in dump.stdout
    assert re.search(r"rule \d+\s+user=alice\s+5$", dump.stdout, re.MULTILINE), dump.stdout
    assert f"{name}  created" in dump.stdout  # the declaration's outcome this term

    as_json = cli("dump", seg["name"], "--setting", name, "--json")
    no_traceback(as_json)
    assert as_json.returncode == 0
    (dumped,) = json.loads(as_json.stdout)["segments"]
    (setting,) = dumped["settings"]
    assert setting["name"] == name
    assert setting["default"] == 0
    assert [(r["conditions"], r["value"]) for r in setting["rules"]] == [({"user": "alice"}, 5)]
    assert dumped["context_features"] == FEATURES

    unknown = cli("dump", "--setting", "no_such_setting")
    no_traceback(unknown)
    assert unknown.returncode == 3
    assert "no setting named 'no_such_setting'" in unknown.stderr
    assert name in unknown.stderr  # says what the segment does hold


def test_a_leftover_segment_is_idle_not_a_failure(service: HeksherService, workers: list[Worker]) -> None:
    start_pair(service, workers, unique("gone"))
    segment = Path(workers[0].ask("status").path)
    name = segment.name.removesuffix(".seg")
    for w in workers:
        w.kill()

    code, (seg,) = status_json()
    assert code == 0  # what is left over by exited processes does not fail the check
    assert seg["verdict"] == "idle"
    assert (seg["idle"], seg["healthy"]) == (True, False)
    assert seg["leader"]["alive"] is False
    assert seg["processes"] == []

    text = cli("status")
    no_traceback(text)
    assert text.returncode == 0
    assert text.stdout.startswith(
        f"{name}: IDLE - no live process uses it: left over by processes that have exited, "
        f"with the rules of generation {seg['generation']}"
    )
    assert "by a leader now gone" in text.stdout  # not the dead leader's promise of more
    assert "next within" not in text.stdout

    # Asked for by name, or with --strict, the segment must be served.
    named = cli("status", name)
    assert (named.returncode, named.stdout.startswith(f"{name}: IDLE")) == (1, True)
    assert status_json("--strict")[0] == 1

    ignoring = cli("status", "--ignore-idle")
    no_traceback(ignoring)
    assert ignoring.returncode == 3
    assert "left over" in ignoring.stderr

    # the snapshot outlives its processes: dump and watch still show it
    assert cli("dump").returncode == 0
    watched = cli("watch", "--count", "1")
    assert watched.returncode == 0
    assert " (gone)  ok" in watched.stdout

    # A live process attached to it, and no live leader: that is a failure.
    attach_this_process(segment)
    code, (seg,) = status_json()
    assert code == 1
    assert (seg["verdict"], seg["idle"]) == ("leaderless", False)
    assert seg["summary"].endswith("and none of the 1 live processes has taken over")
    assert [p["pid"] for p in seg["processes"]] == [os.getpid()]


@pytest.mark.skipif(pid_namespace() == 0, reason="needs a readable /proc/self/ns/pid")
def test_status_with_a_process_of_another_pid_namespace(
    service: HeksherService, workers: list[Worker]
) -> None:
    """Two containers sharing a folder: the leader keeps the other side's registration (it cannot judge
    a PID of another namespace), and status lists that process without details."""
    start_pair(service, workers, unique("pidns"))
    segment = Path(workers[0].ask("status").path)
    me = current_identity()
    # Same PID and start as a process here that does not exist, in another namespace.
    theirs = ProcessIdentity(4_194_305, me.create_time, me.pidns + 1)
    registry = Registry(registry_directory(segment))
    registry.write(
        Registration(pid=theirs.pid, create_time=theirs.create_time, pidns=theirs.pidns, kind="async")
    )
    assert workers[1].ask("reload") is True  # the leader scanned the registry since the write
    assert registry.path_for(theirs).exists()

    code, (seg,) = status_json()
    assert code == 0
    assert seg["verdict"] == "ok"
    foreign = [p for p in seg["processes"] if p["pid"] == theirs.pid]
    assert foreign == [
        {
            "pid": theirs.pid,
            "create_time": theirs.create_time,
            "alive": True,
            "cmdline": None,
            "uptime": None,
            "kind": "async",
        }
    ]
    text = cli("status")
    no_traceback(text)
    assert text.returncode == 0
    assert "3 live" in text.stdout
    assert str(theirs.pid) in text.stdout


def test_status_is_stale_while_the_service_is_down(workers: list[Worker]) -> None:
    name = unique("stale")
    with HeksherService(context_features=FEATURES) as svc:
        workers.append(Worker(svc.url, "thread", [name], 0.2))
        workers[0].ready()
        code, (seg,) = status_json()
        assert (code, seg["verdict"]) == (0, "ok")
    # The service is gone; the leader keeps beating and failing. Stale after two intervals
    # plus the heartbeat allowance (5 s) without a successful update.
    deadline = time.monotonic() + 30
    while True:
        code, (seg,) = status_json()
        if seg["verdict"] == "stale":
            break
        assert seg["verdict"] == "ok", seg
        assert time.monotonic() < deadline, f"not stale within 30 s: {seg}"
    assert code == 1
    assert "ConnectError" in seg["last_error"]
    assert seg["error_count"] >= 1
    assert seg["leader"]["alive"] is True
    text = cli("status")
    assert text.returncode == 1
    assert "STALE - no successful update for" in text.stdout
    assert "ConnectError" in text.stdout


# -- watch -----------------------------------------------------------------------------------------------

LINE = re.compile(
    r"\d\d:\d\d:\d\d\.\d{3}  generation (\d+)  settings (\d+)  rules (\d+)  "
    r"leader (\d+|none)( \(gone\))?  (.*)"
)


def test_watch_follows_generations_and_the_takeover(
    service: HeksherService, workers: list[Worker], popen: list[subprocess.Popen[str]]
) -> None:
    name = unique("watched")
    leader = start_pair(service, workers, name)
    process = subprocess.Popen(
        [sys.executable, "-m", "heksher_shm", "watch", "--count", "3", "--interval", "0.02"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    popen.append(process)
    lines = LineReader(process)

    first = LINE.fullmatch(lines.next())
    assert first is not None
    assert first[4] == str(leader.pid)
    assert first[6] == "ok"
    assert first[3] == "0"

    service.add_rule(name, {"user": "alice"}, 1)
    (follower,) = [w for w in workers if w is not leader]
    follower.ask("reload")
    second = LINE.fullmatch(lines.next())
    assert second is not None
    assert int(second[1]) > int(first[1])
    assert (second[2], second[3]) == ("1", "1")

    leader.kill()
    third = LINE.fullmatch(lines.next())
    assert third is not None
    # Either the dead leader is seen before the takeover, or the new one straight away.
    assert third[5] == " (gone)" or third[4] == str(follower.pid), third[0]

    assert process.wait(15) == 0
    assert process.stderr is not None
    assert "watching" in process.stderr.read()


# -- expected errors -------------------------------------------------------------------------------------


def test_missing_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nothing-here"
    for args in (
        ["status", "--dir", str(missing)],
        ["dump", "--dir", str(missing)],
        ["watch", "--dir", str(missing)],
    ):
        result = cli(*args)
        no_traceback(result)
        assert result.returncode == 3, result
        assert f"segment directory {missing} (--dir) does not exist" in result.stderr
    monkeypatch.setenv("HEKSHER_SHM_DIR", str(missing))
    result = cli("status")
    assert result.returncode == 3
    assert "(HEKSHER_SHM_DIR) does not exist" in result.stderr
    assert not missing.exists()  # inspecting never creates the directory


def test_empty_directory_and_unknown_or_invalid_names(shm_dir: Path) -> None:
    empty = cli("status")
    no_traceback(empty)
    assert empty.returncode == 3
    assert "no segments in" in empty.stderr

    (shm_dir / "present.seg").write_bytes(b"")
    (shm_dir / "present.seg").chmod(0o600)
    unknown = cli("status", "absent")
    no_traceback(unknown)
    assert unknown.returncode == 3
    assert "no segment named 'absent'" in unknown.stderr
    assert "segments there: present" in unknown.stderr

    invalid = cli("dump", "../etc/passwd")
    no_traceback(invalid)
    assert invalid.returncode == 2
    assert "is not a segment name" in invalid.stderr

    # A file no leader has published into, that no live process uses, is idle: a failure only when named.
    code, (seg,) = status_json("present")
    assert (code, seg["verdict"]) == (1, "idle")
    assert seg["summary"].endswith("with nothing published")
    assert status_json()[0] == 0
    nothing = cli("dump", "present")
    assert nothing.returncode == 0
    assert "nothing published yet" in nothing.stdout


def test_garbage_segment(shm_dir: Path) -> None:
    path = shm_dir / "garbage.seg"
    path.write_bytes(bytes(range(256)) * 32)
    path.chmod(0o600)
    code, (seg,) = status_json()
    assert code == 0  # no live process uses it: as a leftover of another format version would be
    assert (seg["verdict"], seg["idle"]) == ("corrupted", True)
    assert "the header is corrupted: bad magic" in seg["summary"]
    assert seg["summary"].endswith("; no live process uses it")
    assert seg["generation"] is None  # the generation word of a garbage header is not a generation
    assert "generation" not in seg["summary"]
    assert status_json("--strict")[0] == 4

    text = cli("status", "garbage")
    no_traceback(text)
    assert text.returncode == 4
    assert text.stdout.startswith("garbage: CORRUPTED")

    dump = cli("dump", "garbage")
    no_traceback(dump)
    assert dump.returncode == 4
    assert "bad magic" in dump.stderr

    watch = cli("watch", "garbage", "--count", "1")
    no_traceback(watch)
    assert watch.returncode == 0
    assert "corrupted header: bad magic" in watch.stdout
    assert "generation" not in watch.stdout

    # A process uses it: now it fails unnamed too, and the next leader is to rewrite it.
    attach_this_process(path)
    code, (seg,) = status_json()
    assert code == 4
    assert (seg["verdict"], seg["idle"]) == ("corrupted", False)
    assert seg["summary"].endswith("; its next leader rewrites it")


def test_a_generation_word_no_slot_carries_is_a_corrupted_header(
    service: HeksherService, workers: list[Worker]
) -> None:
    start_pair(service, workers, unique("garbled"))
    segment = Path(workers[0].ask("status").path)
    name = segment.name.removesuffix(".seg")
    for w in workers:
        w.kill()
    garbage = 0x1234_5678_9ABC_DEF0
    poke(segment, OFF_GENERATION, garbage.to_bytes(8, "little"))

    code, (seg,) = status_json(name)
    assert code == 4
    assert seg["verdict"] == "corrupted"
    assert seg["generation"] is None
    assert "the header is corrupted: no slot descriptor carries the generation" in seg["summary"]
    assert str(garbage) not in cli("status", name).stdout

    watch = cli("watch", name, "--count", "1")
    no_traceback(watch)
    assert "corrupted header: no slot descriptor carries" in watch.stdout
    assert str(garbage) not in watch.stdout


def into_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``heksher-shm ARGS`` with stdout a pipe whose reader has gone (as ``| head`` leaves it)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE: no race with a reader that reads and leaves
    try:
        return subprocess.run(
            [sys.executable, "-m", "heksher_shm", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)


def test_output_into_a_closed_pipe_exits_quietly_with_what_was_found(shm_dir: Path) -> None:
    unformatted_segment(shm_dir / "unused.seg")  # idle: counts only when named or with --strict
    for args, code in [
        (("dump",), 0),
        (("dump", "--json"), 0),
        (("status",), 0),
        (("status", "--json"), 0),
        (("status", "--strict"), 1),  # the verdict stands, whoever reads the output
        (("watch", "--count", "1"), 0),
    ]:
        result = into_closed_pipe(*args)
        assert result.returncode == code, args
        # no BrokenPipeError, no traceback, no "Exception ignored" from Python's flush at exit
        assert "Error" not in result.stderr, args
        assert "Exception" not in result.stderr, args

    path = shm_dir / "garbage.seg"
    path.write_bytes(bytes(range(256)) * 32)
    path.chmod(0o600)
    dump = into_closed_pipe("dump")
    assert dump.returncode == 4  # the corrupted segment is still reported
    assert "Exception" not in dump.stderr
    assert "garbage.seg: bad magic" in dump.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_foreign_owned_segment_and_directory(shm_dir: Path) -> None:
    path = shm_dir / "foreign.seg"
    path.write_bytes(b"")
    path.chmod(0o600)
    os.chown(path, FOREIGN_UID, -1)
    code, (seg,) = status_json()
    assert code == 4
    assert seg["verdict"] == "unreadable"
    assert f"owned by uid {FOREIGN_UID}" in seg["error"]
    for command in ("status", "dump"):
        result = cli(command, "foreign")
        no_traceback(result)
        assert result.returncode == 4
        assert f"owned by uid {FOREIGN_UID}, not by this user" in result.stdout + result.stderr
    assert path.stat().st_size == 0  # a refused file is not touched

    os.chown(shm_dir, FOREIGN_UID, -1)
    result = cli("status")
    no_traceback(result)
    assert result.returncode == 4
    assert f"segment directory {shm_dir}: is owned by uid {FOREIGN_UID}" in result.stderr


def test_watch_picks_the_segment_in_use(
    service: HeksherService, workers: list[Worker], shm_dir: Path
) -> None:
    unformatted_segment(shm_dir / "old.seg")  # left over: nobody uses it
    workers.append(Worker(service.url, "thread", [unique("shop")], 60, client={"segment_name": "shop"}))
    (leader,) = (w.ready() for w in workers)

    picked = cli("watch", "--count", "1")
    no_traceback(picked)
    assert picked.returncode == 0, picked.stderr
    assert f"watching shop in {shm_dir}, the only one in use (1 other idle or unreadable)" in picked.stderr
    line = LINE.fullmatch(picked.stdout.rstrip("\n"))
    assert line is not None, picked.stdout
    assert (line[4], line[6]) == (str(leader.pid), "ok")

    text = cli("status")
    assert text.returncode == 0  # the idle one does not count
    assert text.stdout.rstrip().endswith("2 segments: 1 idle, 1 ok")

    # Two segments in use: watch cannot choose, and says which.
    attach_this_process(unformatted_segment(shm_dir / "busy.seg"))
    ambiguous = cli("watch")
    no_traceback(ambiguous)
    assert ambiguous.returncode == 2
    assert (
        f"2 segments in use in {shm_dir}; name the one to watch: busy, shop (and not in use: old)"
        in ambiguous.stderr
    )
    code, segments = status_json()
    assert code == 1  # busy: a live process and nothing published, no leader
    assert [(s["name"], s["verdict"]) for s in segments] == [
        ("busy", "empty"),
        ("old", "idle"),
        ("shop", "ok"),
    ]


def test_watch_needs_a_segment_in_use(shm_dir: Path) -> None:
    for name in ("one", "two"):
        unformatted_segment(shm_dir / f"{name}.seg")
    result = cli("watch")
    no_traceback(result)
    assert result.returncode == 2
    assert f"2 segments in {shm_dir} and none in use" in result.stderr
    assert "name the one to watch: one, two" in result.stderr
    assert cli("watch", "two", "--count", "1").returncode == 0


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout == (
        f"heksher-shm {__version__} (segment format {FORMAT_VERSION}, snapshot format {FORMAT})\n"
    )


def exit_codes(help_text: str) -> set[int]:
    """The codes listed under ``exit codes`` in a --help text."""
    section = help_text.split("\nexit codes", 1)[1].split("\n\n", 1)[0]
    return {int(code) for code in re.findall(r"^  (\d+) ", section, re.MULTILINE)}


def test_help_lists_commands_and_exit_codes() -> None:
    result = cli("--help")
    assert result.returncode == 0
    for word in ("status", "dump", "watch", "demo", "serve", "--version", "exit codes"):
        assert word in result.stdout
    assert exit_codes(result.stdout) == {0, 1, 2, 3, 4, 130}


@pytest.mark.parametrize(
    ("command", "codes"),
    [
        ("status", {0, 1, 2, 3, 4, 130}),
        ("dump", {0, 2, 3, 4, 130}),
        ("watch", {0, 2, 3, 4}),
        ("demo", {0, 1, 2, 4, 130}),
    ],
)
def test_each_command_lists_its_own_exit_codes(command: str, codes: set[int]) -> None:
    result = cli(command, "--help")
    assert result.returncode == 0
    assert exit_codes(result.stdout) == codes
    others = {"status", "dump", "watch", "demo", "serve"} - {command}
    section = result.stdout.split("\nexit codes", 1)[1]
    assert not [word for word in others if f"{word}:" in section]  # no other command's codes


# -- the demo --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["private", "given"])
def test_demo(where: str, shm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if where == "private":
        monkeypatch.delenv("HEKSHER_SHM_DIR")
    result = cli("demo", "--workers", "2", "--duration", "4", timeout=120)
    no_traceback(result)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "2 worker processes (thread, async) share one poller" in out
    assert re.search(r"worker \d \((thread|async), pid \d+\) leads", out), out
    assert "all 2 live workers serve 200" in out
    assert "all 2 live workers serve 300" in out
    assert re.search(r"SIGKILL to the leader, worker \d", out), out
    assert re.search(r"took over \d+ ms after the SIGKILL; meanwhile the workers kept serving 300", out), out
    assert "the only live worker serves 400" in out
    assert "SIGKILLed while leading" in out
    assert out.rstrip().endswith(
        "demo OK: every worker converged after each change, and the leader's death cost one takeover"
    )
    segment = Path(re.search(r"segment  (\S+\.seg)", out)[1])  # type: ignore[index]
    if where == "private":
        assert segment.parent != shm_dir
        assert not segment.parent.exists()  # the private directory is gone
    else:
        assert segment.parent == shm_dir
        assert list(shm_dir.iterdir()) == []  # the demo's files are gone


def test_demo_needs_two_workers() -> None:
    result = cli("demo", "--workers", "1")
    no_traceback(result)
    assert result.returncode == 2
    assert "at least 2" in result.stderr


def test_a_killed_demo_leaves_no_workers(popen: list[subprocess.Popen[str]]) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "heksher_shm", "demo", "--workers", "2", "--duration", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    popen.append(process)
    lines = LineReader(process)
    pids: list[int] = []
    while len(pids) < 2:
        found = re.search(r"worker \d \(\w+, pid (\d+)\) ready", lines.next(timeout=60))
        if found:
            pids.append(int(found[1]))
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 128 + signal.SIGTERM
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped by the demo, not merely dead


# -- serve -----------------------------------------------------------------------------------------------

# The installed console script when there is one (so its entry point is tested too), else the module.
_SCRIPT = Path(sys.executable).with_name("heksher-shm")
HEKSHER_SHM = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "heksher_shm"]
# From the signal to the exit: measured 30-70 ms (median), 170 ms at worst with a load average of 9 on
# two cores; the stop used to take about 2 s.
SERVE_STOP_DEADLINE = 0.5


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_promptly_on_a_signal(signum: signal.Signals, popen: list[subprocess.Popen[str]]) -> None:
    process = subprocess.Popen(
        [*HEKSHER_SHM, "serve", "--port", "0", "--context-features", "user,theme"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    popen.append(process)
    lines = LineReader(process)
    first = lines.next(timeout=60)
    listening = re.fullmatch(
        r"heksher-shm: in-memory Heksher service listening on (http://127\.0\.0\.1:\d+) "
        r"\(context features: user, theme\)",
        first,
    )
    assert listening, first
    # A keep-alive connection stays open across the signal, as a client's would.
    with httpx.Client(base_url=listening[1], timeout=10) as http:
        declared = http.post(
            "/api/v1/settings/declare",
            json={"name": "color", "configurable_features": ["user"], "type": "str", "default_value": "red"},
        )
        assert declared.json() == {"outcome": "created"}
        rule = {"setting": "color", "feature_values": {"user": "alice"}, "value": "blue"}
        assert http.post("/api/v1/rules", json=rule).status_code == 201
        sent = time.monotonic()
        process.send_signal(signum)
        assert process.wait(timeout=10) == 0
        took = time.monotonic() - sent
    assert took < SERVE_STOP_DEADLINE, f"{took:.3f} s from {signum.name} to the exit"
    assert lines.next() == f"heksher-shm: stopped on {signum.name} (1 setting and 1 rule discarded)"
    assert process.stderr is not None
    assert process.stderr.read() == ""
