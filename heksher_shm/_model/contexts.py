"""Tracked contexts: the ``TRACK_ALL`` marker, and the ``context_filters`` a query asks with.

Pure: used by the settings' lookups, by the clients to judge whether a
snapshot covers what a process tracks, and by the engine to build a query.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

__all__ = ["TRACK_ALL", "context_filters", "covers"]

TRACK_ALL: Final = "*"
"""Track every value of a context feature (see ``track_contexts``)."""


def context_filters(tracked: Mapping[str, str | Iterable[str]]) -> str:
    """The ``context_filters`` query parameter for tracked context values.

    Features come sorted, values sorted inside parentheses, ``*`` for
    :data:`TRACK_ALL`; nothing tracked gives the empty string, which the
    service answers with no rules (as heksher 0.2.2 sends it).
    """
    parts = []
    for feature in sorted(tracked):
        values = tracked[feature]
        if values == TRACK_ALL:
            parts.append(f"{feature}:*")
        else:
            parts.append(f"{feature}:(" + ",".join(sorted(values)) + ")")
    return ",".join(parts)


_FILTER_PART = re.compile(r"([^:,]+):(\*|\([^)]*\))")


def covers(filters: str, tracked: Mapping[str, str | Iterable[str]]) -> bool:
    """Whether a query with these ``context_filters`` returned every rule *tracked* admits."""
    if filters == TRACK_ALL:
        return True
    admitted: dict[str, str | set[str]] = {}
    for feature, values in _FILTER_PART.findall(filters):
        admitted[feature] = TRACK_ALL if values == TRACK_ALL else set(values[1:-1].split(","))
    for feature, values in tracked.items():
        have = admitted.get(feature)
        if have is None:
            return False
        if have != TRACK_ALL and (values == TRACK_ALL or not set(values) <= set(have)):
            return False
    return True
