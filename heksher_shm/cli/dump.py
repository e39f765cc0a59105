"""``heksher-shm dump``: the defaults and rules a segment holds, with their raw JSON values decoded."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from heksher_shm._model.snapshot import SettingBlob
from heksher_shm.cli.common import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    CliError,
    Snapshot,
    age,
    clock,
    decode_json,
    one_line,
    open_segment,
    read_snapshot,
    segment_directory,
    select_segments,
    show_json,
    silence_stdout,
)

__all__ = ["run_dump"]


def _read(path: Path) -> Snapshot | None:
    segment = open_segment(path)
    try:
        return read_snapshot(segment)
    finally:
        segment.close()


def _setting_json(name: str, blob: SettingBlob) -> dict[str, Any]:
    return {
        "name": name,
        "default": decode_json(blob.default),
        "rules": [
            {"rule_id": r.rule_id, "conditions": dict(r.conditions), "value": decode_json(r.value)}
            for r in blob.rules
        ],
    }


def _segment_json(path: Path, snapshot: Snapshot | None, names: list[str]) -> dict[str, Any]:
    base: dict[str, Any] = {"name": path.name.removesuffix(".seg"), "path": str(path)}
    if snapshot is None:
        base.update(generation=0, published=None, settings=[], declarations=[])
        return base
    head = snapshot.head
    base.update(
        generation=snapshot.generation,
        published=head.published,
        update_ok=head.ok,
        update_error=head.error,
        update_interval=head.update_interval or None,
        context_features=head.context_features,
        settings=[_setting_json(n, snapshot.blobs[n]) for n in names],
        declarations=[
            {"name": o.name, "outcome": o.outcome, "status": o.status, "error": o.error}
            for o in sorted(head.outcomes.values(), key=lambda o: o.name)
            if o.name in names
        ],
    )
    return base


def _conditions(conditions: list[tuple[str, str]]) -> str:
    return ", ".join(f"{feature}={value}" for feature, value in conditions) or "(any context)"


def _render(path: Path, snapshot: Snapshot | None, names: list[str], filtered: bool) -> list[str]:
    name = path.name.removesuffix(".seg")
    if snapshot is None:
        return [f"segment {name}: nothing published yet"]
    head = snapshot.head
    outcome = "ok" if head.ok else f"failed: {one_line(head.error, 200)}"
    lines = [
        f"segment {name}: generation {snapshot.generation}, published {clock(head.published)} "
        f"({age(time.time() - head.published)} ago), that update {outcome}",
        f"context features: {', '.join(head.context_features) or '(none)'}",
    ]
    if not names:
        lines += ["", "(no settings)"]
    for setting in names:
        blob = snapshot.blobs[setting]
        count = len(blob.rules)
        lines += [
            "",
            f"{setting}: default {show_json(decode_json(blob.default))}, {count} rule{'s' * (count != 1)}",
        ]
        shown = [
            (f"rule {r.rule_id}", _conditions(r.conditions), show_json(decode_json(r.value)))
            for r in blob.rules
        ]
        id_width = max((len(i) for i, _, _ in shown), default=0)
        cond_width = max((len(c) for _, c, _ in shown), default=0)
        lines += [f"  {i:<{id_width}}  {c:<{cond_width}}  {v}" for i, c, v in shown]
    outcomes = sorted((o for o in head.outcomes.values() if o.name in names), key=lambda o: o.name)
    if outcomes and not filtered:
        lines += ["", "declarations in the current leader's term:"]
        width = max(len(o.name) for o in outcomes)
        for o in outcomes:
            result = o.outcome or "no answer"
            if o.error is not None:
                result = f"failed: {one_line(o.error, 200)}"
            lines.append(f"  {o.name:<{width}}  {result}")
    return lines


def run_dump(dir_arg: str | None, name: str | None, setting: str | None, as_json: bool) -> int:
    """``heksher-shm dump``: print the segment's (or every segment's) settings, defaults and rules."""
    directory = segment_directory(dir_arg)
    paths = select_segments(directory, name)
    found: list[tuple[Path, Snapshot | None, list[str]]] = []
    failures: list[CliError] = []
    for path in paths:
        try:
            snapshot = _read(path)
        except CliError as e:
            if len(paths) == 1:
                raise
            failures.append(e)  # dump the others, report this one, exit non-zero
            continue
        names = [] if snapshot is None else list(snapshot.blobs)
        if setting is not None:
            names = [n for n in names if n == setting]
            if not names:
                if len(paths) == 1:
                    held = ", ".join(snapshot.blobs) if snapshot is not None and snapshot.blobs else "none"
                    raise CliError(
                        f"segment {path.name.removesuffix('.seg')} holds no setting named {setting!r} "
                        f"(it holds: {held})",
                        EXIT_NOT_FOUND,
                    )
                continue
        found.append((path, snapshot, names))
    if setting is not None and not found and not failures:
        raise CliError(f"no segment in {directory} holds a setting named {setting!r}", EXIT_NOT_FOUND)
    try:
        if as_json:
            segments = [_segment_json(p, s, n) for p, s, n in found]
            print(
                json.dumps({"directory": str(directory), "segments": segments}, indent=2, ensure_ascii=False)
            )
        else:
            print("\n\n".join("\n".join(_render(p, s, n, setting is not None)) for p, s, n in found))
        sys.stdout.flush()
    except BrokenPipeError:
        # `dump | head`: the reader had what it wanted. Quietly, with what the dump found: the segments
        # that could not be read are still reported below, and still decide the exit code.
        silence_stdout()
    for failure in failures:
        print(f"heksher-shm dump: {failure}", file=sys.stderr)
    return max((f.code for f in failures), default=EXIT_OK)
