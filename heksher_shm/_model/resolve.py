"""Rule resolution, compiled once per update so that a lookup is a few dict probes.

The service's semantics: a rule holds exact-match conditions on a subset of a
setting's configurable features, taken in the service's context-feature order.
Among the rules whose every condition matches a context, the winner is the one
whose last (deepest) condition comes latest in that order; a tie is broken in
favour of the rule with an exact match at the earliest feature where the tied
rules differ.

Rules that condition on the same *set* of features (a "pattern") can never both
match one context with different values, so a pattern is one dict from the
tuple of its features' values to the rule's value. The ordering above is a
total order over patterns: compare the index of their deepest feature, then
the features they condition on, earliest first, "present" beating "absent".
Resolving is therefore: walk the patterns from best to worst and return the
first hit. There are at most 2**k patterns for k features, and in practice a
handful.

This module does no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any, Final

__all__ = ["NO_MATCH", "CompiledRules", "compile_rules"]

logger = logging.getLogger("heksher_shm.resolve")


class _NoMatch:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_MATCH"


NO_MATCH: Final = _NoMatch()
"""Returned by :meth:`CompiledRules.resolve` when no rule matches."""

Conditions = Sequence[tuple[str, str]]


class CompiledRules:
    """Rules of one setting, compiled for resolution over an ordered feature list."""

    __slots__ = ("catch_all", "features", "patterns", "rule_count")

    def __init__(
        self,
        features: tuple[str, ...],
        patterns: list[tuple[tuple[int, ...], dict[Any, Any]]],
        catch_all: Any,
        rule_count: int,
    ) -> None:
        self.features = features
        self.patterns = patterns
        """Best first: the indices (into :attr:`features`, ascending) a pattern conditions on, and its
        table from their values (the bare value for one feature, else a tuple) to the rule's value."""
        self.catch_all = catch_all
        self.rule_count = rule_count

    def resolve(self, namespace: Mapping[str, str]) -> Any:
        """The winning rule's value for *namespace*, or :data:`NO_MATCH`.

        *namespace* must hold a value for every feature in :attr:`features`.
        ``Setting.get()`` does not call this: its lookup is generated from the
        same patterns (:mod:`heksher_shm._model.lookup`).
        """
        features = self.features
        for indices, table in self.patterns:
            key_of: Callable[[Mapping[str, str]], Any] = itemgetter(*(features[i] for i in indices))
            value = table.get(key_of(namespace), NO_MATCH)
            if value is not NO_MATCH:
                return value
        return self.catch_all

    def match(self, namespace: Mapping[str, str]) -> tuple[tuple[str, str], ...] | None:
        """The conditions of the rule :meth:`resolve` answers from, as (feature, value) pairs in
        :attr:`features` order (``()`` for a rule without conditions); None when no rule matches.

        Not for the hot path: the OpenFeature provider uses it to name the rule behind a value.
        """
        features = self.features
        for indices, table in self.patterns:
            names = [features[i] for i in indices]
            key = namespace[names[0]] if len(names) == 1 else tuple(namespace[f] for f in names)
            if key in table:
                return tuple((f, namespace[f]) for f in names)
        return () if self.catch_all is not NO_MATCH else None

    def condition_values(self) -> list[frozenset[Any]]:
        """For each feature (as in :attr:`features`), the values rules condition it on.

        A value outside these can only miss wherever the feature is probed:
        resolution cannot tell it from another such value. Built on demand
        (memory in proportion to the rules), not kept.
        """
        values: list[set[Any]] = [set() for _ in self.features]
        for indices, table in self.patterns:
            if len(indices) == 1:
                values[indices[0]].update(table)
            else:
                for key in table:
                    for i, value in zip(indices, key, strict=True):
                        values[i].add(value)
        return [frozenset(v) for v in values]


def _pattern_rank(indices: tuple[int, ...], width: int) -> tuple[int, tuple[bool, ...]]:
    present = set(indices)
    return (max(indices, default=-1), tuple(i in present for i in range(width)))


def compile_rules(features: Sequence[str], rules: Iterable[tuple[Conditions, Any]]) -> CompiledRules:
    """Compile *rules* (conditions, value) over *features*, given in the service's order.

    Conditions may come in any order; a condition on a feature outside
    *features* is the caller's to filter out beforehand (it raises
    :class:`ValueError` here). Two rules with the same conditions: the later
    one wins and a conflict is logged, as the service cannot send such a pair.
    """
    order = {feature: i for i, feature in enumerate(features)}
    tables: dict[tuple[int, ...], dict[Any, Any]] = {}
    catch_all: Any = NO_MATCH
    count = 0
    for conditions, value in rules:
        count += 1
        try:
            pairs = sorted(((order[f], v) for f, v in conditions), key=itemgetter(0))
        except KeyError as e:
            raise ValueError(
                f"rule condition on {e.args[0]!r}, not one of the features {list(features)}"
            ) from None
        if not pairs:
            if catch_all is not NO_MATCH:
                logger.error("rule conflict: two rules without conditions")
            catch_all = value
            continue
        indices = tuple(i for i, _ in pairs)
        if len(set(indices)) != len(indices):
            raise ValueError(f"rule conditions name a feature twice: {list(conditions)}")
        key = pairs[0][1] if len(pairs) == 1 else tuple(v for _, v in pairs)
        table = tables.setdefault(indices, {})
        if key in table:
            logger.error(
                "rule conflict: two rules with the same conditions", extra={"conditions": conditions}
            )
        table[key] = value
    width = len(features)
    ranked = sorted(tables, key=lambda idx: _pattern_rank(idx, width), reverse=True)
    return CompiledRules(tuple(features), [(idx, tables[idx]) for idx in ranked], catch_all, count)
