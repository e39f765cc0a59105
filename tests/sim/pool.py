"""Many schedules at once, over every core: what CI and the stress step run."""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tests.sim.run import Result, run_schedule

__all__ = ["Summary", "run_many"]

_CHUNK = 50
"""Schedules one worker runs per task (a task costs a pickled list; a schedule a few milliseconds)."""


@dataclass
class Summary:
    """What many schedules came to."""

    runs: int = 0
    failures: list[Result] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    """For each skipped invariant, in how many schedules it did not hold."""
    """Every schedule that broke an invariant, known issues included."""

    @property
    def unknown(self) -> list[Result]:
        """The failures that are not instances of a known open issue."""
        return [r for r in self.failures if not r.known]

    def by_violation(self) -> dict[str, int]:
        return dict(Counter(f"{r.violation} [{r.known}]" if r.known else r.violation for r in self.failures))


def _run_chunk(
    job: tuple[Sequence[int], str, bool, frozenset[str], bool],
) -> tuple[int, list[Result], Counter[str]]:
    seeds, profile, fencing, skip, queried_rule = job
    failures = []
    skipped: Counter[str] = Counter()
    for seed in seeds:
        result = run_schedule(seed, profile, fencing, skip=skip, queried_rule=queried_rule)
        if not result.ok:
            failures.append(result)
        for name in result.stats:
            if name.startswith("skipped "):
                skipped[name[len("skipped ") :]] += 1  # schedules in which it happened
    return len(seeds), failures, skipped


def run_many(
    seeds: Iterable[int],
    profile: str = "ci",
    fencing: bool = True,
    jobs: int | None = None,
    skip: frozenset[str] = frozenset(),
    queried_rule: bool = True,
) -> Summary:
    """Run every schedule of *seeds* on *jobs* processes (default: every core); the failures, by seed."""
    seeds = list(seeds)
    chunks = [
        (seeds[i : i + _CHUNK], profile, fencing, skip, queried_rule) for i in range(0, len(seeds), _CHUNK)
    ]
    jobs = jobs or os.cpu_count() or 1
    summary = Summary()
    if jobs == 1 or len(chunks) == 1:
        for runs, failures, skipped in map(_run_chunk, chunks):
            summary.runs += runs
            summary.failures += failures
            summary.skipped += skipped
    else:
        # fork: the workers start at once, with the simulation already imported.
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            for runs, failures, skipped in pool.imap_unordered(_run_chunk, chunks):
                summary.runs += runs
                summary.failures += failures
                summary.skipped += skipped
            pool.close()
            pool.join()
    summary.failures.sort(key=lambda r: r.seed)
    return summary
