"""The deterministic simulation (``tests/sim``): many schedules of a simulated host, each checked against
the invariants of design.md, and the seeds that found bugs.

``HEKSHER_SIM_SCHEDULES`` sets how many schedules the CI test runs (10,000 by default), and
``HEKSHER_SIM_STRESS`` how many the stress test does (1,000,000); ``HEKSHER_SIM_FIRST_SEED`` moves the
stress test's seeds (so that each run of it can try new ones). A failure prints the command that
replays it; see docs/testing.rst.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.sim import run_schedule
from tests.sim.invariants import INVARIANTS, KNOWN
from tests.sim.pool import Summary, run_many

ROOT = Path(__file__).resolve().parent.parent


def _report(summary: Summary, what: str, seconds: float) -> str:
    lines = [
        f"{what}: {summary.runs} schedules in {seconds:.1f} s, {len(summary.unknown)} failed "
        f"({len(summary.failures) - len(summary.unknown)} instances of known issues; "
        f"all failures: {summary.by_violation()})"
    ]
    lines += [failure.report() for failure in summary.unknown[:5]]
    return "\n\n".join(lines)


def _count(variable: str, default: int) -> int:
    value = os.environ.get(variable, "")
    return int(value) if value else default


CI_SCHEDULES = _count("HEKSHER_SIM_SCHEDULES", 10_000)
STRESS_SCHEDULES = _count("HEKSHER_SIM_STRESS", 1_000_000)
LONG_SCHEDULES = _count("HEKSHER_SIM_LONG", 10_000)


@pytest.mark.timeout(120 + CI_SCHEDULES // 20)  # no timed assert: generous even on a loaded machine
def test_schedules() -> None:
    """The CI run: every invariant holds in every schedule (instances of known issues are counted)."""
    count = CI_SCHEDULES
    started = time.perf_counter()
    summary = run_many(range(count))
    seconds = time.perf_counter() - started
    report = _report(summary, "ci", seconds)
    print(report)
    assert summary.runs == count
    assert not summary.unknown, report


@pytest.mark.stress
@pytest.mark.timeout(600 + STRESS_SCHEDULES // 20)
def test_stress() -> None:
    """A million schedules (by default), from ``HEKSHER_SIM_FIRST_SEED`` on."""
    count = STRESS_SCHEDULES
    first = _count("HEKSHER_SIM_FIRST_SEED", 1_000_000)
    started = time.perf_counter()
    summary = run_many(range(first, first + count))
    seconds = time.perf_counter() - started
    report = _report(summary, "stress", seconds)
    print(report)
    assert not summary.unknown, report


@pytest.mark.stress
@pytest.mark.timeout(600 + LONG_SCHEDULES // 5)
def test_long_schedules() -> None:
    """Longer schedules (more processes, longer faults); ``HEKSHER_SIM_LONG`` of them (10,000)."""
    count = LONG_SCHEDULES
    started = time.perf_counter()
    summary = run_many(range(count), "long")
    seconds = time.perf_counter() - started
    report = _report(summary, "long", seconds)
    print(report)
    assert not summary.unknown, report


# -- the seeds that found bugs, kept as regression tests -----------------------------------------------------

REGRESSIONS = {
    # The outcome of a declaration that failed for good was never published when the query spec did not
    # change (a new setting whose declaration is refused): the acknowledgement named a snapshot without
    # it, and set_as_main() returned without its error.
    0: "set-as-main-covers (7)",
    31: "set-as-main-covers (7)",
    23: "set-as-main-covers (7)",
    # A leader whose segment checks had drifted away from its updates woke for each of them, twice per
    # update interval, while nothing happened.
    88: "quiet-when-idle (11)",
    49: "quiet-when-idle (11)",
    201: "quiet-when-idle (11)",
    # A process's declaration of a new setting at version 1.1 or 1.2 was refused (a 400: a new setting
    # must be 1.0), another process's 1.0 then created it, and that process died before a query with
    # the setting succeeded: the leader never queried it, and the first process never got its rules.
    1010557: "convergence (5, 7)",
    1019067: "convergence (5, 7)",
    1034456: "convergence (5, 7)",
    # After the service lost its data, a new leader held a setting from the snapshot that it could not
    # declare again (its processes' versions were refused: a new setting must be 1.0); it asked for it in
    # every query, and each update was a 404, a declaration of nothing and a second 404: two queries per
    # backoff step (and a query that asks for it fails for every setting).
    1045201: "quiet-when-idle (11)",
    # The same, seen as a setting that never caught up: every query was a 404 (found apart, fixed by the
    # same change).
    1015139: "convergence (5, 7)",
    1023991: "convergence (5, 7)",
    1031079: "convergence (5, 7)",
    1038797: "convergence (5, 7)",
    # The simulation's fault, not the engine's: a leader stalled 5 s in the Beat before its wait, the
    # last fault, then slept out the wait drawn before the stall; it was replaced for its overrun just
    # before the quiet stretch began, and the new term's declarations (each once, as a new term must)
    # fell in it. The quiet stretch now begins once such a takeover has come and its term has settled.
    1080729: "quiet-when-idle (11)",
    # A leader was replaced while its process's set_as_main() waited; the new leader answered it with its
    # first snapshot, where the declaration had failed (a 503). The process was stopped, and applied a
    # later snapshot first: its declaration had succeeded there, but the query that followed had failed,
    # so the snapshot had no rules for the setting, and set_as_main() returned without an error.
    1059092: "set-as-main-covers (7)",
    1293630: "set-as-main-covers (7)",  # the same, found apart
    # One flipped bit lowered the header's term word: the next leader took the same term as the one it
    # replaced, whose late publish every process then read (fixed by keeping the term twice).
    1188394: "replaced-leader-accepted (13)",
    # The only process that wanted a setting left during an outage: the leader's next update had nothing
    # to ask, counted as a success ("recovered", the backoff reset), and when a new process came, its
    # query followed the previous failure by the first step (0.5 s) instead of the second.
    1712689: "outage-backoff (1, 11)",
    # The first fix of that one kept the backoff's short steps for the updates with nothing to ask: the
    # leader woke every 0.4 s while nobody wanted anything.
    1066967: "quiet-when-idle (11)",
    # The simulation's fault, not the engine's: a flip raised the header's term word 0.7 s before the
    # faults ended; no reader came upon it (no snapshot of theirs was damaged), so the leader found it at
    # its next check, 2.4 s after the faults (fenced off by the higher term, it stepped down), and the
    # new term's declarations fell in the quiet stretch. The quiet stretch now begins once the leader
    # can have checked the segment after the last flip.
    1114431: "quiet-when-idle (11)",
    # A leader stopped between its registry scan and its declarations was replaced; the new term's
    # declarations of a new setting were refused (a version other than 1.0). Resumed, the old leader
    # declared what it had read before the stop, a 1.0 of that setting for a process gone since, and
    # created it; the new term never learned it existed, and its processes never got its rules. A
    # leader now checks that it still leads right before it declares.
    1277433: "convergence (5, 7)",
    1292264: "convergence (5, 7)",
    # The same, by a leader stopped between that check and its requests (in CI's stress range): the
    # leader now also looks for the settings refused as new at each scheduled update.
    1007892: "convergence (5, 7)",
}


@pytest.mark.parametrize("seed", sorted(REGRESSIONS))
def test_regression(seed: int) -> None:
    """A schedule that once broke an invariant (see :data:`REGRESSIONS`) holds them all."""
    result = run_schedule(seed)
    assert result.ok, result.report()


LONG_REGRESSIONS = {
    # A bit flipped in a setting's blob after the snapshot answering a reload() was published: the
    # process applied it (the blob's checksum was checked only at the setting's next get(), which kept
    # the previous rules) and reload() returned without an error with rules older than the service's.
    # A snapshot whose copied blobs fail their checksum is now not applied: the request waits for the
    # leader's repair.
    1632: "reload-is-fresh (7)",
}
"""Long-profile schedules (``python -m tests.sim --profile long``) that once broke an invariant."""


@pytest.mark.parametrize("seed", sorted(LONG_REGRESSIONS))
def test_long_regression(seed: int) -> None:
    """A long schedule that once broke an invariant (see :data:`LONG_REGRESSIONS`) holds them all."""
    result = run_schedule(seed, profile="long")
    assert result.ok, result.report()


# -- fencing ------------------------------------------------------------------------------------------------

HOLE = 2
"""A CI schedule in which, without fencing, a leader stopped between its lock check and its publish is
replaced, resumes, publishes, and its own process accepts that snapshot (issue 15's hole):
``python -m tests.sim --seed 2 --no-fencing``. (Any change to the engine's effects changes every
schedule: search again with ``tests.sim.run_schedule(seed, fencing=False)`` when it no longer holds.)"""

BACKWARDS = 11
"""A CI schedule in which, without fencing *and* without the clients' refusal of a snapshot queried
before the one they applied, a follower reads a setting's rules older than those it had:
``python -m tests.sim --seed 11 --no-fencing --no-queried-rule --skip one-term --skip replaced``."""


def test_without_fencing_the_simulation_finds_the_hole() -> None:
    """The protocol as it was before fencing (every term the same token): a replaced leader that resumes
    publishes, and processes accept it, its own included. With fencing, the same schedule holds."""
    hole = run_schedule(HOLE, fencing=False)
    assert hole.violation == "replaced-leader-accepted (13)", hole.report()
    found = re.match(r"pid (\d+) accepted generation \d+, published by pid (\d+) ", hole.detail)
    assert found is not None, hole.detail
    assert found[1] == found[2]  # its own process
    assert run_schedule(HOLE).ok


def test_what_keeps_reads_monotonic() -> None:
    """Without fencing, what a replaced leader publishes late is older than what the new leader published,
    and the clients' rule (refuse rules queried before those applied) is all that keeps processes from
    going back; without both, they do. Fencing alone keeps them from it too."""
    both_off = run_schedule(
        BACKWARDS, fencing=False, queried_rule=False, skip=frozenset({"replaced", "one-term"})
    )
    assert both_off.violation == "monotonic-reads (13)", both_off.report()
    assert run_schedule(BACKWARDS, queried_rule=False).ok
    assert run_schedule(BACKWARDS, fencing=False, skip=frozenset({"replaced", "one-term"})).violation != (
        "monotonic-reads (13)"
    )


def test_with_fencing_no_replaced_leader_is_ever_accepted() -> None:
    """Of the first 500 schedules, without fencing a good part let a replaced leader's snapshot through;
    with fencing none does (the CI run checks ten thousand)."""
    without = run_many(range(500), fencing=False, skip=frozenset({"replaced-leader"}))
    assert without.skipped["replaced-leader-accepted (13)"] > 100
    with_fencing = run_many(range(500))
    fenced = ("replaced", "one-term", "monotonic")
    assert not any(r.violation and r.violation.startswith(fenced) for r in with_fencing.failures)


# -- replaying --------------------------------------------------------------------------------------------


def test_a_seed_replays_exactly() -> None:
    """The same seed gives the same run, in another process and with other string hashes too."""
    here = run_schedule(HOLE, fencing=False, trace=100_000, keep_trace=True)
    code = (
        "from tests.sim import run_schedule; "
        f"r = run_schedule({HOLE}, fencing=False, trace=100_000, keep_trace=True); "
        "print(repr((r.violation, r.trace)))"
    )
    there = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert there.stdout.strip() == repr((here.violation, here.trace))


def test_a_failure_prints_the_command_that_replays_it() -> None:
    """The report names the violation, the replay command and the events before it; the command works."""
    report = run_schedule(HOLE, fencing=False).report()
    assert f"replay: python -m tests.sim --seed {HOLE} --profile ci --no-fencing" in report
    replayed = subprocess.run(
        [sys.executable, "-m", "tests.sim", "--seed", str(HOLE), "--no-fencing"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert replayed.returncode == 1
    assert replayed.stdout.strip() == report


def test_every_known_issue_and_invariant_is_named_once() -> None:
    assert len(set(INVARIANTS)) == len(INVARIANTS)
    assert all(name.replace("-", "").isalpha() for name in KNOWN)
