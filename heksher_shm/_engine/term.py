"""A leader's term: what it declared, queried and published, and what follows from it.

Pure bookkeeping (no I/O, no effects): which settings and contexts to query
(:func:`query_spec`) and which requests to acknowledge
(:func:`acknowledgements`), both derived from the term and the live
processes' wishes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from heksher_shm._engine.effects import Effect, KeepsLead
from heksher_shm._engine.host import Wish
from heksher_shm._model.contexts import TRACK_ALL, context_filters
from heksher_shm._model.snapshot import Ack, Outcome, SettingEntry

__all__ = [
    "LeaderLost",
    "Spec",
    "Term",
    "acknowledgements",
    "keep_lead",
    "query_spec",
    "refused_as_new",
    "transient",
]

logger = logging.getLogger("heksher_shm.engine")

Spec = tuple[tuple[str, ...], str]
"""What one query asks for: the setting names, and the context filters."""


class LeaderLost(Exception):
    """The term ended: the lock was lost, or a newer term fenced this one off."""


def keep_lead() -> Generator[Effect, Any, None]:
    """Step down (raise :class:`LeaderLost`) if the lock file was removed or replaced: someone else may
    lock the new one, or already did, having judged this leader stuck."""
    if not (yield KeepsLead()):
        logger.warning("the election lock file was removed or replaced; stepping down")
        raise LeaderLost


@dataclass
class Term:
    """A leader's state for one term: what it declared, queried and published."""

    number: int
    """The fencing token the term began with: every snapshot it publishes carries it."""
    declared: dict[str, Outcome] = field(default_factory=dict)
    declare_failures: int = 0
    declare_retry_at: float = 0.0
    context_features: list[str] | None = None
    etag: str = ""
    spec: Spec | None = None
    next_update: float = 0.0
    """Monotonic time of the next query (regular, or a retry after a failure)."""
    failures: int = 0
    """Failed updates in a row (the backoff step)."""
    updated_once: bool = False
    """Whether an update of this term succeeded yet."""
    desync_left: int = 0
    """How many more waits after a success are drawn (see :data:`heksher_shm._engine.health.DESYNC_WAVES`)."""
    error: tuple[str, str] | None = None
    """The standing error (text, id) while updates fail: what a reload() gets during the backoff."""
    lost: set[str] = field(default_factory=set)
    """Settings a query's 404 named: the service does not have them, whatever the snapshot holds."""
    found: set[str] = field(default_factory=set)
    """Settings whose declarations were refused as new ones (a version other than 1.0) that the
    service has since: someone else created them (see :func:`refused_as_new`)."""
    next_prune: float = 0.0
    queried_for: dict[str, int] = field(default_factory=dict)
    """Per process, the latest ``query_seq`` a query (or a standing error) has answered."""
    served: dict[str, Ack] = field(default_factory=dict)
    """The acknowledgements written this term, by process key."""
    entries: list[SettingEntry] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)
    published: bool = False
    published_outcomes: dict[str, Outcome] = field(default_factory=dict)
    """The declaration outcomes the last snapshot of this term carries (what processes read them from)."""
    queried: float = 0.0
    as_of: float = 0.0
    """When the service answered the query behind the rules (epoch seconds; 0.0: unknown)."""
    restored: str | None = None
    """Where the rules came from when not from the service (the last-known-good file), or None."""
    generation: int = 0
    head: bytes = b""
    fresh: bool = False
    """It published at this wake (nothing to verify yet)."""
    verified: float = 0.0
    """When it last checked the segment (or published: monotonic seconds)."""
    verify_wanted: bool = False
    """A check is due at the next wake at least VERIFY_INTERVAL after the last one."""
    damage_seen: int | None = None
    """The segment's damage report counter when it last looked (None: not yet, in this term)."""


def query_spec(term: Term, wishes: Sequence[Wish]) -> Spec:
    """What to query: settings whose declaration got an answer, and the union of tracked contexts.

    A setting whose declaration failed is still queried if the service is
    known to have it: the snapshot already had it, or another declaration of
    it succeeded this term (another process's, perhaps gone since). Its own
    declaration got no answer while the service was down, or was refused,
    say for a version conflict with another process's, or because it
    declared a new setting at a version other than 1.0 before another
    process's 1.0 created it. A process keeps getting the rules of every
    setting it holds that the service has, as heksher 0.2.2 does; not those a
    404 named (``term.lost``) unless a declaration of it succeeded since:
    asking for one again fails the whole query.
    """
    names: set[str] = set()
    known = _known_to_service(term)
    for wish in wishes:
        for digest, body in wish.declarations.items():
            outcome = term.declared.get(digest)
            if outcome is None:
                continue
            if outcome.error is None or body.name in known:
                names.add(body.name)
    union: dict[str, str | set[str]] = {}
    for wish in wishes:
        for feature, values in wish.tracked.items():
            if values == TRACK_ALL or union.get(feature) == TRACK_ALL:
                union[feature] = TRACK_ALL
            else:
                current = union.setdefault(feature, set())
                assert isinstance(current, set)
                current.update(values)
    if not all(_FILTERABLE.fullmatch(feature) for feature in union):
        # Heksher 0.5.7 parses filter feature names as [a-z]+: a feature
        # like trust_level cannot appear in a filter at all, and would
        # break the query for every process. Ask for every rule instead;
        # each process keeps only its own tracked values anyway.
        return tuple(sorted(names)), TRACK_ALL
    return tuple(sorted(names)), context_filters(union)


def acknowledgements(term: Term, wishes: Sequence[Wish]) -> dict[str, Ack]:
    """The acknowledgements the live processes should have now (changed or not).

    A process's request is acknowledged once each of its declarations got
    an answer in this term and, if it asked for a query, a query (or the
    standing error) answered it. A successful acknowledgement names the
    snapshot (term, generation) that serves the request; one made while
    updates fail carries the standing error.
    """
    error, error_id = term.error if term.error is not None else (None, "")
    acks: dict[str, Ack] = {}
    for wish in wishes:
        served = term.served.get(wish.key)
        if served is not None and served.seq >= wish.reload_seq and (not served.error or error):
            acks[wish.key] = served  # nothing new to say (the common case: no work per process)
            continue
        if (
            wish.query_seq > term.queried_for.get(wish.key, 0)
            or not all(digest in term.declared for digest in wish.declarations)
            or (error is None and not term.published)
        ):
            # A query is still to come for it, or its declarations are (set_as_main waits for
            # them, not just for any update), or a snapshot of this term that can serve it.
            if served is not None:
                acks[wish.key] = served
            continue
        acks[wish.key] = Ack(wish.reload_seq, error, error_id, term.number, term.generation)
    return acks


def _known_to_service(term: Term) -> set[str]:
    """The settings the term knows the service has: the snapshot's (unless a 404 named them), those it
    found since they were refused as new, and those a declaration of succeeded this term."""
    known = ({entry.name for entry in term.entries} | term.found) - term.lost
    known.update(outcome.name for outcome in term.declared.values() if outcome.error is None)
    return known


def refused_as_new(term: Term, wishes: Sequence[Wish]) -> list[str]:
    """Settings live processes want whose declarations the service refused as new settings (a 400 to
    a version other than 1.0: Heksher creates a setting only at 1.0) and that the term does not know
    to exist since.

    Someone else may create such a setting later: a process of another host,
    or a leader replaced while its declarations were on their way. Its
    processes then get its rules only if the term learns of it: the leader
    asks the service for these settings at each scheduled update (one request
    each, only while such a declaration is wanted), as heksher 0.2.2's
    processes get a setting's rules once it exists.
    """
    known = _known_to_service(term)
    names: set[str] = set()
    for wish in wishes:
        for digest, body in wish.declarations.items():
            outcome = term.declared.get(digest)
            if (
                outcome is not None
                and outcome.error is not None
                and outcome.status == 400
                and body.version != "1.0"
                and body.name not in known
            ):
                names.add(body.name)
    return sorted(names)


_FILTERABLE = re.compile(r"[a-z]+")


def transient(outcome: Outcome) -> bool:
    """Worth declaring again: no answer at all, or a server error."""
    return not outcome.settled
