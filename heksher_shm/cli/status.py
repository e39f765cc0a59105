"""``heksher-shm status`` (one report per segment, usable as a health check) and ``heksher-shm watch``.

Verdicts are those of :func:`heksher_shm.status.segment_status` (``ok``,
``empty``, ``leaderless``, ``unresponsive``, ``stale``) plus three of the
command line's own: ``idle`` (empty or leaderless, and no live process uses
it: left over by processes that have exited), ``corrupted`` (the file is
there but its header or snapshot fails validation) and ``unreadable`` (the
file cannot be used safely at all: another user's, a symlink...).

A segment that no live process uses is not a failure unless it was asked
for: ``status NAME`` and ``status --strict`` count it (exit 1, or 4 when it is
corrupted, as a leftover of another version's format reads), ``status`` alone
does not, and ``watch`` without a name skips such segments when choosing the
one to follow.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heksher_shm._exposition import families, folder_family, read_segment, text_format
from heksher_shm._model.snapshot import decode_head
from heksher_shm._shm.identity import ProcessIdentity, is_alive
from heksher_shm._shm.segment import Segment, shm_dir_path
from heksher_shm.cli.common import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNHEALTHY,
    EXIT_UNREADABLE,
    EXIT_USAGE,
    CliError,
    age,
    clock,
    one_line,
    open_segment,
    segment_directory,
    select_segments,
    silence_stdout,
)
from heksher_shm.exceptions import SegmentError
from heksher_shm.status import (
    HEARTBEAT_STALE_AFTER,
    ProcessInfo,
    SegmentStatus,
    header_damage,
    segment_status,
)

__all__ = ["Checked", "check_segment", "run_status", "run_watch"]

_UNFORMATTED = "not formatted"  # the header_problem of a file no leader has published into yet


@dataclass(frozen=True)
class Checked:
    """One segment as ``status`` judges it."""

    path: Path
    name: str
    status: SegmentStatus | None
    """``None`` when the file could not be opened (``verdict`` is then ``"unreadable"``)."""
    verdict: str
    summary: str
    """One sentence saying why the verdict is what it is."""
    idle: bool
    """No live leader and no live process attached: left over by processes that have exited."""
    code: int
    """This segment's exit code."""

    @property
    def in_use(self) -> bool:
        """Whether live processes use it (a leader or an attached process); unknown for unreadable files."""
        return self.status is not None and not self.idle


def check_segment(path: Path, *, strict: bool = False) -> Checked:
    """Read a segment's status and judge it; never raises for a bad file.

    A segment no live process uses (verdict ``idle``, or ``corrupted``) exits 0 unless ``strict``.
    """
    name = path.name.removesuffix(".seg")
    try:
        st = segment_status(path)
    except (SegmentError, OSError) as e:
        return Checked(path, name, None, "unreadable", str(e), False, EXIT_UNREADABLE)
    verdict = st.verdict
    if verdict == "empty" and st.problem is not None and st.problem != _UNFORMATTED:
        verdict = "corrupted"
    if st.idle and verdict in ("empty", "leaderless"):
        verdict = "idle"
    if verdict == "ok" or (st.idle and not strict):
        code = EXIT_OK
    else:
        code = EXIT_UNREADABLE if verdict == "corrupted" else EXIT_UNHEALTHY
    return Checked(path, name, st, verdict, _summary(st, verdict), st.idle, code)


def _summary(st: SegmentStatus, verdict: str) -> str:
    leader = st.leader
    if verdict == "ok":
        assert leader is not None
        failing = (
            "; the latest attempt failed"
            if st.last_error_time is not None and (st.last_update_ok or 0.0) <= st.last_error_time
            else ""
        )
        return (
            f"leader pid {leader.pid} serves generation {st.generation}, "
            f"last update {age(st.last_update_age)} ago{failing}"
        )
    if verdict == "idle":
        what = "nothing published" if st.verdict == "empty" else f"the rules of generation {st.generation}"
        return f"no live process uses it: left over by processes that have exited, with {what}"
    if verdict == "corrupted":
        if st.idle:  # perhaps a leftover of another version, which no leader of this one rewrites
            return f"the segment fails validation: {st.problem}; no live process uses it"
        return f"the segment fails validation: {st.problem}; its next leader rewrites it"
    if verdict == "empty":
        if leader is not None and leader.alive:
            return f"nothing published yet; leader pid {leader.pid} is starting"
        return "nothing published yet, and no live leader"
    if verdict == "leaderless":
        gone = f"the last leader (pid {leader.pid}) is gone" if leader is not None else "no leader recorded"
        return f"{gone}, and none of the {len(st.processes)} live processes has taken over"
    if verdict == "unresponsive":
        assert leader is not None
        return (
            f"leader pid {leader.pid} is alive but has made no progress for {age(st.heartbeat_age)}, "
            f"{age(st.overdue)} past its promise (limit {HEARTBEAT_STALE_AFTER:g} s); a follower replaces it"
        )
    if verdict == "stale":
        interval = f"every {age(st.update_interval)}" if st.update_interval else "at its interval"
        bound = f", stale after {age(st.stale_after)}" if st.stale_after is not None else ""
        why = f"; last error: {one_line(st.last_error, 200)}" if st.last_error else ""
        return f"no successful update for {age(st.last_update_age)} (it should update {interval}{bound}){why}"
    return verdict  # pragma: no cover - a verdict added to heksher_shm.status later


def _leader_kind(st: SegmentStatus) -> str | None:
    """The leader's client kind, which its own registration tells (the header records only its pid)."""
    leader = st.leader
    return None if leader is None else next((p.kind for p in st.processes if p.pid == leader.pid), None)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def _process_line(process: ProcessInfo, leader_pid: int | None) -> str:
    role = "leader" if process.pid == leader_pid else ""
    uptime = f"up {age(process.uptime)}" if process.uptime is not None else "up ?"
    return f"{process.pid:>8}  {process.kind or '?':<6}  {uptime:<16}  {role:<6}  {one_line(process.cmdline)}"


def _render(checked: Checked) -> list[str]:
    lines = [f"{checked.name}: {checked.verdict.upper()} - {checked.summary}"]
    lines.append(f"  file            {checked.path}")
    st = checked.status
    if st is None or checked.verdict == "corrupted":
        return lines  # a corrupted header's fields are noise
    leader = st.leader
    if leader is None:
        lines.append("  leader          none recorded")
    else:
        kind = _leader_kind(st)
        if leader.alive:
            lines.append(
                f"  leader          pid {leader.pid}{f' ({kind})' if kind else ''}, "
                f"up {age(leader.uptime)}: {one_line(leader.cmdline)}"
            )
        else:
            lines.append(f"  leader          pid {leader.pid}, gone")
    published = (
        f", published {clock(st.published)} ({age(st.read_at - st.published)} ago)" if st.published else ""
    )
    lines.append(f"  generation      {st.generation}{published}")
    heartbeat = f"{age(st.heartbeat_age)} ago" if st.heartbeat_age is not None else "never"
    if leader is None or not leader.alive:
        if st.heartbeat_age is not None:
            heartbeat += ", by a leader now gone"  # its promise of more means nothing
    elif st.overdue is not None and st.heartbeat_age is not None:
        heartbeat += (
            f", overdue by {age(st.overdue)}" if st.overdue > 0 else f", next within {age(-st.overdue)}"
        )
    lines.append(f"  progress        {heartbeat}")
    if st.last_update_ok is not None:
        interval = f", update interval {age(st.update_interval)}" if st.update_interval else ""
        lines.append(
            f"  last update ok  {clock(st.last_update_ok)} ({age(st.last_update_age)} ago){interval}"
        )
    else:
        lines.append("  last update ok  never")
    if st.last_error is not None:
        when = (
            f" at {clock(st.last_error_time)} ({age(st.read_at - st.last_error_time)} ago)"
            if st.last_error_time
            else ""
        )
        lines.append(f"  last error      {one_line(st.last_error, 200)}{when}; {st.error_count} in all")
    else:
        lines.append("  last error      none")
    lines.append(f"  settings        {_plural(st.settings, 'setting')}, {_plural(st.rules, 'rule')}")
    lines.append(f"  processes       {len(st.processes)} live")
    lines.extend(f"    {_process_line(p, leader.pid if leader else None)}" for p in st.processes)
    if st.problem is not None and checked.verdict != "corrupted" and st.problem != _UNFORMATTED:
        lines.append(f"  problem         {st.problem}")
    return lines


def _as_json(checked: Checked) -> dict[str, Any]:
    base: dict[str, Any] = {"name": checked.name, "path": str(checked.path)}
    if checked.status is not None:
        base.update(dataclasses.asdict(checked.status))
        del base["header"]  # the raw header view (for the metrics); its fields are shown above
        if base["leader"] is not None:
            base["leader"]["kind"] = _leader_kind(checked.status)
    else:
        base["error"] = checked.summary
    base.update(
        verdict=checked.verdict,
        healthy=checked.verdict == "ok",
        idle=checked.idle,
        summary=checked.summary,
    )
    return base


def run_status(
    dir_arg: str | None,
    name: str | None,
    as_json: bool,
    ignore_idle: bool,
    strict: bool = False,
    prometheus: bool = False,
) -> int:
    """``heksher-shm status``: print every segment's state; the exit code is the worst segment's.

    An idle segment fails (exit 1) only when named or with ``strict``. With
    ``prometheus``, print the metrics in the text exposition format instead and
    exit 0 once they are printed: the segments' health is in the figures.
    """
    if prometheus:
        try:
            directory = segment_directory(dir_arg)
        except CliError as refused:
            if refused.code != EXIT_UNREADABLE:
                raise
            # The folder is refused: the figure that says so is the one to print.
            sys.stdout.write(text_format([folder_family(shm_dir_path(dir_arg)[0], str(refused))]))
            return EXIT_OK
        readings = [read_segment(path) for path in select_segments(directory, name)]
        if ignore_idle:
            readings = [r for r in readings if r.status is None or not r.status.idle]
        sys.stdout.write(text_format([folder_family(directory, None), *families(readings)]))
        return EXIT_OK
    directory = segment_directory(dir_arg)
    strict = strict or name is not None
    checked = [check_segment(path, strict=strict) for path in select_segments(directory, name)]
    if ignore_idle:
        checked = [c for c in checked if not c.idle]
        if not checked:
            raise CliError(
                f"no segments in use in {directory}: every segment there is left over by exited processes",
                EXIT_NOT_FOUND,
            )
    code = max((c.code for c in checked), default=EXIT_OK)
    try:
        if as_json:
            print(
                json.dumps(
                    {"directory": str(directory), "segments": [_as_json(c) for c in checked]}, indent=2
                )
            )
        else:
            print("\n\n".join("\n".join(_render(c)) for c in checked))
            if len(checked) > 1:
                tally = Counter(c.verdict for c in checked)
                parts = ", ".join(f"{count} {verdict}" for verdict, count in sorted(tally.items()))
                print(f"\n{len(checked)} segments: {parts}")
        sys.stdout.flush()
    except BrokenPipeError:
        # `status | head -1`: the reader went away, but the verdict stands (a health check that pipes
        # its output must still fail on an unhealthy segment).
        silence_stdout()
    return code


# -- watch ---------------------------------------------------------------------------------------------


class _Watcher:
    """Polls one segment and describes it in one line; the line's key changes when something happened."""

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self._counted: tuple[int, int, int] | None = None  # (generation, settings, rules)
        self._leader: tuple[int, float, bool] | None = None
        self._leader_checked = 0.0

    def observe(self) -> tuple[tuple[object, ...], str]:
        segment = self.segment
        generation = segment.generation()
        header = segment.status()
        damage = header_damage(header)
        if damage is not None:
            # The header's fields are noise, its generation word included: say so instead of showing them.
            line = f"{clock(time.time(), precise=True)}  corrupted header: {one_line(damage, 200)}"
            return (header.generation, None, False, "corrupted", 0), line
        problem: str | None = None
        settings = rules = 0
        if generation:
            if self._counted is None or self._counted[0] != generation:
                try:
                    read = segment.read_head()
                    if read is not None:
                        head = decode_head(read.head)
                        count = sum(e.rule_count for e in head.settings)
                        self._counted = (read.generation, len(head.settings), count)
                        generation = read.generation
                except (SegmentError, ValueError) as e:
                    problem = str(e)
            if self._counted is not None and problem is None:
                generation, settings, rules = self._counted
        pid, created = header.leader_pid, header.leader_create_time
        alive = False
        if pid is not None and created is not None:
            alive = self._alive(pid, created)
        if problem is not None:
            state, kind = f"corrupted: {one_line(problem, 200)}", "corrupted"
        elif header.error_count and (
            header.last_update_ok is None or (header.last_error_time or 0.0) >= header.last_update_ok
        ):
            state, kind = f"error: {one_line(header.last_error, 200)}", "error"
        elif not generation:
            state, kind = "empty", "empty"
        else:
            state, kind = "ok", "ok"
        leader = "none" if pid is None else f"{pid}{'' if alive else ' (gone)'}"
        line = (
            f"{clock(time.time(), precise=True)}  generation {generation}  settings {settings}  "
            f"rules {rules}  leader {leader}  {state}"
        )
        return (generation, pid, alive, kind, header.error_count), line

    def _alive(self, pid: int, created: float) -> bool:
        # One /proc read; a dead leader stays dead, so only a new identity needs a new check.
        if self._leader is not None and self._leader[:2] == (pid, created) and not self._leader[2]:
            return False
        alive = is_alive(ProcessIdentity(pid, created))
        self._leader = (pid, created, alive)
        return alive


def _choose(directory: Path, paths: list[Path]) -> tuple[Path, str]:
    """The one segment to watch when none is named, and why it was chosen (for the first line).

    The only segment there, else the only one live processes use.

    Raises:
        CliError: none or several are in use (exit 2); the message names them.
    """
    if len(paths) == 1:
        return paths[0], ""
    checked = [check_segment(path) for path in paths]
    in_use = [c for c in checked if c.in_use]
    if len(in_use) == 1:
        rest = len(paths) - 1
        return in_use[0].path, f", the only one in use ({_plural(rest, 'other')} idle or unreadable)"

    def names(group: list[Checked]) -> str:
        return ", ".join(c.name for c in group)

    if not in_use:
        raise CliError(
            f"{len(paths)} segments in {directory} and none in use: no live process is attached to any "
            f"(left over by processes that have exited, or unreadable); name the one to watch: "
            f"{names(checked)}",
            EXIT_USAGE,
        )
    idle = [c for c in checked if not c.in_use]
    others = f" (and not in use: {names(idle)})" if idle else ""
    raise CliError(
        f"{len(in_use)} segments in use in {directory}; name the one to watch: {names(in_use)}{others}",
        EXIT_USAGE,
    )


def run_watch(dir_arg: str | None, name: str | None, interval: float, count: int | None) -> int:
    """``heksher-shm watch``: one line per change of generation, leader or update outcome.

    Without ``name``: the only segment in the directory, else the only one in use.
    """
    directory = segment_directory(dir_arg)
    paths = select_segments(directory, name)
    path, why = _choose(directory, paths) if name is None else (paths[0], "")
    segment = open_segment(path)
    watcher = _Watcher(segment)
    print(
        f"watching {path.name.removesuffix('.seg')} in {directory}{why} (Ctrl-C to stop)",
        file=sys.stderr,
        flush=True,
    )
    printed = 0
    last: tuple[object, ...] | None = None
    try:
        while count is None or printed < count:
            key, line = watcher.observe()
            if key != last:
                print(line, flush=True)
                printed += 1
                last = key
                if count is not None and printed >= count:
                    break
            time.sleep(interval)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how watch normally ends
    finally:
        segment.close()
    return EXIT_OK
