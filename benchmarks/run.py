"""Run the benchmarks of heksher_shm against heksher 0.2.2.

Usage (from the repository root, with the ``bench`` extra installed)::

    .venv/bin/python -m benchmarks.run                 # full suite, JSON on stdout
    .venv/bin/python -m benchmarks.run --write-docs    # ... and regenerate the docs' table and plots
    .venv/bin/python -m benchmarks.run --quick         # CI: fewer repeats, smaller N and sizes
    .venv/bin/python -m benchmarks.run --only get_repeated pollers
    .venv/bin/python -m benchmarks.run --only get_repeated --cpu-time   # on a busy machine

Every case runs its sides in fresh processes against one service: the in-memory
Heksher service started here, or a real Heksher at ``--service URL`` (or
``HEKSHER_TEST_URL``, when set).
Progress goes to stderr, the results (JSON) to stdout and, with ``--json``, to a file.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks._common import REPO, ChildError, Run, log, machine_info
from benchmarks._service import open_service

CASES = [
    "get_repeated",
    "get_new_context",
    "get_default",
    "openfeature",
    "pollers",
    "propagation",
    "outage",
    "takeover",
    "set_as_main",
    "publish",
    "first_get",
    "memory",
    "stall",
    "idle",
    "start",
    "service",
    "capacity",
    "lockstep",
]
"""In running order (publish, first_get, memory and stall share the big rule set, seeded as it grows)."""

PUBLISHED = REPO / "benchmarks" / "published.json"
"""The full results of the run behind the published docs (written by ``--write-docs``)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI mode: fewer repeats, smaller N and sizes")
    parser.add_argument("--only", nargs="+", choices=CASES, metavar="CASE", help=f"run these cases: {CASES}")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="regenerate docs/_generated/benchmarks_table.rst and docs/_static/benchmarks/*.png",
    )
    parser.add_argument(
        "--docs-dir", type=Path, default=REPO / "docs", help="where --write-docs writes (default: docs/)"
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="RESULTS",
        help="run nothing: write the docs (--write-docs) from the JSON of an earlier run",
    )
    parser.add_argument(
        "--replace-in",
        type=Path,
        metavar="RESULTS",
        help="put the cases run (with --only) in place of the same cases in the JSON of an earlier run, "
        "noting the run apart in it; --write-docs then writes the docs from the whole",
    )
    parser.add_argument(
        "--service",
        metavar="URL",
        help="run against the real Heksher at URL (as HEKSHER_TEST_URL does; default: in-memory)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (children's logs)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time the get() cases in the measuring thread's CPU time, which other processes on a busy "
        "machine do not inflate (not with --write-docs: the published numbers are wall-clock)",
    )
    return parser


def _run_cases(run: Run, cases: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Run each case (its children are reaped after it); a failed case is recorded and the next one runs."""
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    for case in cases:
        module = importlib.import_module(f"benchmarks.bench_{case}")
        log(f"case {case} ...")
        case_started = time.monotonic()
        try:
            result = module.run(run)
        except (ChildError, RuntimeError, OSError, ValueError) as e:
            traceback.print_exc()
            failures.append(f"{case}: {e}")
            result = {"case": case, "title": module.TITLE, "error": str(e), "rows": []}
        finally:
            run.reap()
        result["seconds"] = round(time.monotonic() - case_started, 1)
        log(f"case {case} took {result['seconds']} s")
        results.append(result)
    return results, failures


def _replaced(base: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """*base* (a whole run) with *part*'s cases in place of its own, and *part* noted as a run apart."""
    new = {case["case"]: case for case in part["cases"]}
    cases = [new.pop(case["case"], case) for case in base["cases"]]
    cases += new.values()  # cases the base run did not have
    rerun = {
        "cases": [case["case"] for case in part["cases"]],
        "command": part["command"],
        "date": part["machine"]["date"],
        "source": part["machine"].get("source", "unknown"),
        "loadavg_at_start": part["machine"]["loadavg_at_start"],
    }
    return {**base, "cases": cases, "reruns": [*base.get("reruns", []), rerun]}


def _command(argv: list[str]) -> str:
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(REPO)
    return " ".join([str(python), "-m", "benchmarks.run", *argv])


def _docs_from(args: argparse.Namespace) -> int:
    """Rebuild the table and plots from a saved run (its command, machine and date are kept)."""
    if not args.write_docs:
        log("--from-json only makes sense with --write-docs")
        return 2
    from benchmarks._report import write_docs

    report = json.loads(args.from_json.read_text())
    for path in write_docs(report, args.docs_dir):
        log(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.from_json is not None:
        return _docs_from(args)
    if args.cpu_time and args.write_docs:
        log("--cpu-time numbers are not published: leave out --write-docs")
        return 2
    cases = [c for c in CASES if args.only is None or c in args.only]
    workdir = Path(tempfile.mkdtemp(prefix="heksher-bench-"))
    service = open_service(args.service)
    run = Run(quick=args.quick, service=service, workdir=workdir, cpu_time=args.cpu_time)
    log(f"service: {service.kind} at {service.url}; work folder {workdir}")
    started = time.monotonic()
    load_at_start = os.getloadavg()
    try:
        results, failures = _run_cases(run, cases)
    finally:
        run.reap()
        service.close()
    report = {
        "command": _command(sys.argv[1:] if argv is None else argv),
        "mode": "quick" if args.quick else "full",
        "service": service.kind,
        "machine": {**machine_info(), "loadavg_at_start": load_at_start, "loadavg_at_end": os.getloadavg()},
        "seconds": round(time.monotonic() - started, 1),
        "cases": results,
    }
    if args.replace_in is not None:
        report = _replaced(json.loads(args.replace_in.read_text()), report)
        args.replace_in.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.replace_in}")
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    if args.write_docs:
        from benchmarks._report import write_docs

        for path in write_docs(report, args.docs_dir):
            log(f"wrote {path}")
        # Every sample of the published run, next to the code that produced it.
        PUBLISHED.write_text(text + "\n")
        log(f"wrote {PUBLISHED}")
    if args.keep or failures:
        log(f"children's logs kept in {workdir / 'logs'}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    log(f"done in {report['seconds']} s")
    for failure in failures:
        log(f"FAILED {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
