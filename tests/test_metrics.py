"""Host-wide metrics: the collector a worker registers and ``heksher-shm status --prometheus`` agree.

Both are parsed with prometheus_client's own parser. A spawned worker leads, another follows and
registers :class:`heksher_shm.metrics.HeksherCollector` in ``prometheus_client.REGISTRY``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from heksher_shm._exposition import Family, text_format
from heksher_shm.metrics import HeksherCollector
from heksher_shm.status import ENV_STALE_AFTER
from heksher_shm.testing import Fault, HeksherService
from tests.test_openfeature import SPECS, Proc

# Seconds since something: read a moment apart, so they differ a little.
_MOVING = {"heksher_shm_staleness_seconds", "heksher_shm_heartbeat_age_seconds"}


def _parse(text: str) -> dict[str, tuple[str, dict[tuple[tuple[str, str], ...], float]]]:
    """name -> (type, labels -> value), for the heksher_shm_ families."""
    found = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("heksher_shm_"):
            samples = {tuple(sorted(s.labels.items())): s.value for s in family.samples}
            found[family.name] = (family.type, samples)
    return found


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "heksher_shm", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def _value(parsed: dict[str, Any], name: str, **labels: str) -> float:
    for key, value in parsed[name][1].items():
        if dict(key).items() >= labels.items():
            return float(value)
    raise AssertionError(f"no sample of {name} with {labels}: {parsed[name]}")


def test_the_collector_and_the_command_line_agree(service: HeksherService, workers: list[Proc]) -> None:
    leader = Proc(service.url, "thread", SPECS)
    workers.append(leader)
    follower = Proc(service.url, "async", SPECS[:1])
    workers.append(follower)
    service.add_rule("cache_size", {"user": "alice"}, 20)
    leader.ask("reload")

    scraped = _parse(follower.ask("metrics"))
    printed = _cli("status", "--prometheus")
    assert printed.returncode == 0, printed.stderr
    cli = _parse(printed.stdout)
    _agree(scraped, cli)

    (path,) = Path(os.environ["HEKSHER_SHM_DIR"]).glob("*.seg")
    segment = path.name.removesuffix(".seg")
    assert _value(cli, "heksher_shm_leader_pid", segment=segment) == leader.pid
    assert _value(cli, "heksher_shm_processes") == 2
    assert _value(cli, "heksher_shm_verdict", verdict="ok") == 1
    assert _value(cli, "heksher_shm_verdict", verdict="stale") == 0
    assert _value(cli, "heksher_shm_in_use") == 1
    assert _value(cli, "heksher_shm_settings") == len(SPECS)
    assert _value(cli, "heksher_shm_rules") == 1
    assert _value(cli, "heksher_shm_generation") > 0
    assert _value(cli, "heksher_shm_snapshot_bytes") > 0
    assert _value(cli, "heksher_shm_stale") == 0
    assert _value(cli, "heksher_shm_stale_after_seconds") == 2 * 60 + 5
    assert _value(cli, "heksher_shm_update_interval_seconds") == 60
    assert 0 <= _value(cli, "heksher_shm_staleness_seconds") < 60
    assert _value(cli, "heksher_shm_updates", outcome="failed") == 0
    assert cli["heksher_shm_updates"][0] == "counter"

    service.inject_fault(Fault(status=500), path="/api/v1/query")
    leader.ask("reload")  # fails; the leader retries on its own after a backoff step (counted too)
    cli = _parse(_cli("status", "--prometheus", env={ENV_STALE_AFTER: "0.000001"}).stdout)
    failed = _value(cli, "heksher_shm_updates", outcome="failed")
    assert failed >= 1
    assert _value(cli, "heksher_shm_stale") == 1
    assert _value(cli, "heksher_shm_stale_after_seconds") == 0.000001
    scraped = _parse(follower.ask("metrics"))
    assert _value(scraped, "heksher_shm_updates", outcome="failed") >= failed


def _agree(scraped: dict[str, Any], cli: dict[str, Any]) -> None:
    """The same families, types, labels and values (those that count seconds since something: nearly)."""
    assert scraped.keys() == cli.keys()
    for name, (kind, samples) in scraped.items():
        assert cli[name][0] == kind, name
        assert cli[name][1].keys() == samples.keys(), name
        for labels, value in samples.items():
            if name in _MOVING and math.isfinite(value):
                assert abs(cli[name][1][labels] - value) < 30, (name, labels)
            else:
                assert cli[name][1][labels] == value, (name, labels)


def test_a_leftover_and_an_unreadable_segment(service: HeksherService, workers: list[Proc]) -> None:
    leader = Proc(service.url, "thread", SPECS[:1])
    workers.append(leader)
    leader.stop()  # the segment stays, used by no one
    folder = Path(os.environ["HEKSHER_SHM_DIR"])
    bad = folder / "bad.seg"
    bad.write_bytes(b"x" * 4096)
    bad.chmod(0o644)  # refused by the file policy: unreadable

    registry = CollectorRegistry()
    registry.register(HeksherCollector())
    scraped = _parse(generate_latest(registry).decode())
    printed = _cli("status", "--prometheus")
    assert printed.returncode == 0, printed.stderr  # the health is in the figures
    cli = _parse(printed.stdout)
    _agree(scraped, cli)
    assert _value(cli, "heksher_shm_verdict", segment="bad", verdict="unreadable") == 1
    assert _value(cli, "heksher_shm_verdict", segment="bad", verdict="ok") == 0
    name = Path(_leftover(folder)).name.removesuffix(".seg")
    assert _value(cli, "heksher_shm_in_use", segment=name) == 0
    assert _value(cli, "heksher_shm_leader_pid", segment=name) == 0
    assert _value(cli, "heksher_shm_verdict", segment=name, verdict="leaderless") == 1
    assert "segment" in dict(next(iter(cli["heksher_shm_verdict"][1])))

    ignoring = _parse(_cli("status", "--prometheus", "--ignore-idle").stdout)
    assert {dict(k)["segment"] for k in ignoring["heksher_shm_verdict"][1]} == {"bad"}


def _leftover(folder: Path) -> str:
    (path,) = [p for p in folder.glob("*.seg") if p.name != "bad.seg"]
    return str(path)


def _usable(folder: Path, value: float) -> dict[str, Any]:
    return {"heksher_shm_folder_usable": ("gauge", {(("folder", str(folder)),): value})}


def test_a_folder_without_segments(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    registry.register(HeksherCollector(tmp_path / "missing"))
    assert _parse(generate_latest(registry).decode()) == _usable(tmp_path / "missing", 1.0)
    registry = CollectorRegistry()
    registry.register(HeksherCollector(tmp_path))
    assert _parse(generate_latest(registry).decode()) == _usable(tmp_path, 1.0)
    printed = _cli("status", "--prometheus", "--dir", str(tmp_path / "missing"))
    assert printed.returncode == 3
    assert printed.stdout == ""


def test_a_folder_that_cannot_be_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A scrape never fails for the folder: it logs, and says it is refused (its processes serve
    without sharing); so does status --prometheus."""
    folder = tmp_path / "open"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    registry = CollectorRegistry()
    registry.register(HeksherCollector(folder))
    assert _parse(generate_latest(registry).decode()) == _usable(folder, 0.0)
    assert "writable by group or others" in caplog.text
    printed = _cli("status", "--prometheus", "--dir", str(folder))
    assert printed.returncode == 0
    assert _parse(printed.stdout) == _usable(folder, 0.0)


def test_text_format_escapes_and_numbers() -> None:
    family = Family(
        "heksher_shm_x",
        "gauge",
        "help with \\ and\nnewline",
        (({"segment": 'a"b\\c\nd'}, 1.5), ({"segment": "e"}, math.inf), ({"segment": "f"}, 3.0)),
    )
    text = text_format([family])
    assert 'heksher_shm_x{segment="e"} +Inf\n' in text
    assert 'heksher_shm_x{segment="f"} 3\n' in text
    (parsed,) = text_string_to_metric_families(text)
    assert parsed.documentation == "help with \\ and\nnewline"
    assert [(s.labels["segment"], s.value) for s in parsed.samples] == [
        ('a"b\\c\nd', 1.5),
        ("e", math.inf),
        ("f", 3.0),
    ]


def test_the_core_never_imports_the_extras(tmp_path: Path) -> None:
    """heksher_shm, its clients and its command line (status --prometheus included) import neither
    openfeature nor prometheus_client."""
    code = (
        "import sys, contextlib, io\n"
        "import heksher_shm, heksher_shm.clients, heksher_shm.cli, heksher_shm.status, heksher_shm.testing\n"
        "import heksher_shm.cli.clean, heksher_shm.cli.status, heksher_shm._exposition\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    heksher_shm.cli.main(['status', '--prometheus', '--dir', {str(tmp_path)!r}])\n"
        f"    heksher_shm.cli.main(['clean', '--dry-run', '--dir', {str(tmp_path)!r}])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('openfeature', 'prometheus_client'))\n"
        "print(bad)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
