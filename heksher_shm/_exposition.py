"""The host's figures as Prometheus metric families, and their text exposition format.

Both faces of the metrics are built here from the same
:class:`~heksher_shm.status.SegmentStatus` readings, so that they cannot
disagree: :class:`heksher_shm.metrics.HeksherCollector` turns
:func:`families` into ``prometheus_client`` families, and
``heksher-shm status --prometheus`` prints :func:`text_format` of them. This
module never imports ``prometheus_client`` (the core never imports an
extra): the text format (version 0.0.4, what node_exporter's textfile
collector reads) is written by hand.

Every figure comes from the segment and its registry folder, which any
process of the host can read: one scrape of any worker describes the whole
host. Nothing is counted per process and nothing is written on ``get()``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from heksher_shm._shm.folder import shm_dir_path
from heksher_shm.exceptions import SegmentError
from heksher_shm.status import SegmentStatus, list_segments, segment_status

__all__ = [
    "PREFIX",
    "VERDICTS",
    "Family",
    "Reading",
    "families",
    "folder_family",
    "read_folder",
    "text_format",
]

logger = logging.getLogger("heksher_shm.status")

PREFIX = "heksher_shm_"
"""Every metric's name starts with this."""

VERDICTS = ("ok", "empty", "leaderless", "unresponsive", "stale", "corrupted", "unreadable")
"""The states of ``heksher_shm_verdict``: :func:`~heksher_shm.status.segment_status`'s verdicts, and
``unreadable`` for a file that cannot be read safely (another user's, a symlink...)."""


@dataclass(frozen=True)
class Reading:
    """One segment as read for a scrape: its status, or why it could not be read."""

    name: str
    status: SegmentStatus | None
    problem: str | None = None


@dataclass(frozen=True)
class Family:
    """One metric family: its full name (a counter's ends in ``_total``), type, help and samples."""

    name: str
    type: Literal["gauge", "counter"]
    help: str
    samples: tuple[tuple[Mapping[str, str], float], ...]


def read_folder(shm_dir: str | os.PathLike[str] | None = None) -> list[Reading]:
    """Read every segment of the folder (``shm_dir``, else ``HEKSHER_SHM_DIR``, else the default).

    Never creates the folder: a missing one holds no segments.

    Raises:
        SegmentError: the folder cannot be used (another user's, a symlink...).
    """
    directory, _ = shm_dir_path(shm_dir)
    if not os.path.lexists(directory):
        return []
    return [read_segment(path) for path in list_segments(directory)]


def read_segment(path: Path) -> Reading:
    """One segment's :class:`Reading`; never raises for a bad or vanished file."""
    name = path.name.removesuffix(".seg")
    try:
        return Reading(name, segment_status(path))
    except (SegmentError, OSError) as e:
        return Reading(name, None, str(e))


def folder_family(folder: str | os.PathLike[str], problem: str | None) -> Family:
    """``heksher_shm_folder_usable{folder}``: 1 when the shared folder can be used, 0 when it is refused
    (another user's, loosened...): then this user's processes serve without sharing, each polling the
    service for itself, and the log and ``heksher-shm status`` say why."""
    return Family(
        PREFIX + "folder_usable",
        "gauge",
        "1 when the shared folder can be used; 0: it is refused and processes serve without sharing.",
        (({"folder": os.fspath(folder)}, 0.0 if problem is not None else 1.0),),
    )


def families(readings: Sequence[Reading]) -> list[Family]:
    """The metric families of these segments, each sample labelled with its ``segment``.

    A family without any sample (a counter no segment holds yet) is left out.
    """
    built = [_Builder(*spec) for spec in _SPECS]
    by_name = {b.name: b for b in built}
    for reading in readings:
        segment = {"segment": reading.name}
        st = reading.status
        verdict = "unreadable" if st is None else st.verdict
        for state in VERDICTS:
            by_name["verdict"].add({**segment, "verdict": state}, float(state == verdict))
        if st is None:
            continue
        for key, value in _figures(st):
            if value is None:
                continue
            if isinstance(value, Mapping):
                for label, count in value.items():
                    if count is not None:
                        by_name[key].add({**segment, "outcome": label}, float(count))
            else:
                by_name[key].add(segment, float(value))
    return [b.family() for b in built if b.samples]


# (short name, type, help). The full name is PREFIX + short name (+ "_total" for a counter).
_SPECS: tuple[tuple[str, Literal["gauge", "counter"], str], ...] = (
    ("verdict", "gauge", "1 for the segment's verdict (as heksher-shm status judges it), 0 for the others."),
    ("in_use", "gauge", "1 when a live leader or a live attached process uses the segment, else 0."),
    ("leader_pid", "gauge", "The pid of the segment's live leader; 0 when no live leader is recorded."),
    (
        "staleness_seconds",
        "gauge",
        "Seconds since the last successful update of the rules; +Inf when there was none.",
    ),
    (
        "stale_after_seconds",
        "gauge",
        "The staleness bound: seconds without a successful update after which the rules are stale.",
    ),
    ("stale", "gauge", "1 when the rules are older than the staleness bound, else 0."),
    (
        "last_update_timestamp_seconds",
        "gauge",
        "When the last successful update was made (Unix time).",
    ),
    ("update_interval_seconds", "gauge", "The leader's update interval."),
    ("heartbeat_age_seconds", "gauge", "Seconds since the leader last showed progress."),
    ("updates", "counter", "Updates of the rules by the segment's leaders, by outcome (ok, failed)."),
    ("leader_changes", "counter", "Times a new leader took the segment over (takeovers)."),
    ("declarations", "counter", "Declarations sent by the segment's leaders, by outcome (ok, failed)."),
    (
        "damage_reports",
        "counter",
        "Times a process found the published snapshot damaged and asked the leader to check the segment.",
    ),
    ("generation", "gauge", "The generation of the published snapshot (0: nothing published)."),
    ("settings", "gauge", "Settings in the published snapshot."),
    ("rules", "gauge", "Rules in the published snapshot."),
    ("snapshot_bytes", "gauge", "Bytes of the published snapshot in the segment."),
    ("processes", "gauge", "Live processes attached to the segment (the leader's included)."),
)


def _figures(st: SegmentStatus) -> Iterable[tuple[str, float | Mapping[str, float | None] | None]]:
    """(short name, value) of each figure of one segment; None: not known, no sample."""
    leader = st.leader
    header = st.header
    live_leader = leader is not None and leader.alive
    yield "in_use", float(not st.idle)
    yield "leader_pid", leader.pid if leader is not None and live_leader else 0
    yield "staleness_seconds", math.inf if st.last_update_age is None else st.last_update_age
    yield "stale_after_seconds", st.stale_after
    if st.stale_after is not None:
        age = st.last_update_age
        yield "stale", float(age is None or age > st.stale_after)
    yield "last_update_timestamp_seconds", st.last_update_ok
    yield "update_interval_seconds", st.update_interval
    yield "heartbeat_age_seconds", st.heartbeat_age if live_leader else None
    # The header's counters: only ever incremented (by leaders; damage reports by any process), read as
    # whole words.
    if header is not None and header.formatted:
        yield "updates", {"ok": header.updates_ok, "failed": st.error_count}
        yield "leader_changes", header.leader_changes
        yield "declarations", {"ok": header.declarations_ok, "failed": header.declaration_failures}
        yield "damage_reports", header.damage_reports
    else:
        yield "updates", {"ok": None, "failed": st.error_count}
    yield "generation", st.generation
    yield "settings", st.settings
    yield "rules", st.rules
    yield "snapshot_bytes", st.snapshot_bytes
    yield "processes", len(st.processes)


class _Builder:
    def __init__(self, short: str, kind: Literal["gauge", "counter"], help_text: str) -> None:
        self.name = short
        self.kind = kind
        self.help = help_text
        self.samples: list[tuple[Mapping[str, str], float]] = []

    def add(self, labels: Mapping[str, str], value: float) -> None:
        self.samples.append((labels, value))

    def family(self) -> Family:
        suffix = "_total" if self.kind == "counter" else ""
        return Family(PREFIX + self.name + suffix, self.kind, self.help, tuple(self.samples))


def text_format(found: Iterable[Family]) -> str:
    """The families in Prometheus's text exposition format (version 0.0.4), one sample per line."""
    lines: list[str] = []
    for family in found:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for labels, value in family.samples:
            pairs = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sorted(labels.items()))
            where = f"{{{pairs}}}" if pairs else ""
            lines.append(f"{family.name}{where} {_number(value)}")
    return "".join(line + "\n" for line in lines)


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)
