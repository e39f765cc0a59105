"""Run or replay simulated schedules: ``python -m tests.sim --help``.

Examples::

    python -m tests.sim --seed 1234                 # replay one schedule, print its trace
    python -m tests.sim --seeds 0:10000 --jobs 2    # run many; print each failure's replay command
    python -m tests.sim --seeds 0:2000 --no-fencing # the protocol as it was before fencing
"""

from __future__ import annotations

import argparse
import sys
import time

from tests.sim.pool import run_many
from tests.sim.run import PROFILES, run_schedule


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--seed", type=int, help="replay this one schedule and print its trace")
    which.add_argument("--seeds", help="run the schedules FIRST:END (END excluded)")
    parser.add_argument("--profile", choices=PROFILES, default="ci", help="schedule length (default: ci)")
    parser.add_argument("--no-fencing", action="store_true", help="run the protocol as it was before fencing")
    parser.add_argument(
        "--no-queried-rule",
        action="store_true",
        help="clients accept snapshots queried before the one they applied (to see what that rule protects)",
    )
    parser.add_argument("--jobs", type=int, default=0, help="processes for --seeds (default: every core)")
    parser.add_argument("--trace", type=int, default=60, help="events of the trace to keep (default: 60)")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="INVARIANT",
        help="count this invariant (a name prefix) instead of failing on it, to see what follows",
    )
    args = parser.parse_args(argv)
    fencing = not args.no_fencing
    skip = frozenset(args.skip)
    if args.seed is not None:
        result = run_schedule(
            args.seed,
            args.profile,
            fencing,
            trace=args.trace,
            skip=skip,
            keep_trace=True,
            queried_rule=not args.no_queried_rule,
        )
        if result.ok:
            print(f"seed {args.seed}: ok {result.stats}")
            print("\n".join(result.trace))
            return 0
        print(result.report())
        return 1
    first, _, end = args.seeds.partition(":")
    started = time.perf_counter()
    summary = run_many(
        range(int(first), int(end)),
        args.profile,
        fencing,
        jobs=args.jobs or None,
        skip=skip,
        queried_rule=not args.no_queried_rule,
    )
    elapsed = time.perf_counter() - started
    for failure in (summary.unknown or summary.failures)[:20]:
        print(failure.report(), end="\n\n")
    print(
        f"{summary.runs} schedules ({args.profile}, fencing {'on' if fencing else 'off'}) "
        f"in {elapsed:.1f} s: "
        f"{len(summary.failures)} failed; {summary.by_violation()}"
        + (f"; skipped (schedules): {dict(summary.skipped)}" if summary.skipped else "")
    )
    return 1 if summary.unknown else 0


if __name__ == "__main__":
    sys.exit(main())
