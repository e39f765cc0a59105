"""The answer to ``GET /api/v1/query``, as Python values and as the JSON bytes the API sends.

Pure functions over the store's records; :class:`~heksher_shm.testing.HeksherState` calls them under
its lock with its context features in order.  A query reads only the settings it asks for and their
own rules, never the rest of the store.

Each setting keeps its piece of the JSON answer (``"name":{"default_value":...,"rules":[...]}``) in
:attr:`StoredSetting.json_cache`, by (context-feature order, with metadata, filters), so a client
polling 1,000 settings with 100 rules each costs the service 1,000 cached pieces joined, not 100k
dictionaries built and dumped again.  The store drops a setting's pieces when the setting or any of its
rules changes, or it gains or loses a rule (:func:`setting_changed`): the next query dumps that one
setting again, which costs what the setting holds.  A move of the context features changes the order
number, which is part of every key.  The bytes are exactly ``dump_json`` of :func:`setting_answer`
(``tests/test_service_size.py`` checks it after random sequences of operations).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from heksher_shm.testing._records import StoredRule, StoredSetting
from heksher_shm.testing._types import copy_json, dump_json

__all__ = [
    "Admitted",
    "admits",
    "ordered_conditions",
    "setting_answer",
    "setting_changed",
    "setting_json",
]

Admitted = Mapping[str, "frozenset[str] | None"] | None
"""The values a query admits per known context feature (``None`` for a feature: any value); ``None``:
every rule is admitted (no ``context_filters``, or ``*``)."""

_SETTING_CACHE_SIZE = 8
"""Answers kept per setting: one per (order, metadata, filters) that clients ask with, usually one."""


def ordered_conditions(rule: StoredRule, features: Sequence[str]) -> list[list[str]]:
    """The rule's conditions as ``[feature, value]`` pairs, in context-feature order."""
    return [[feature, rule.feature_values[feature]] for feature in features if feature in rule.feature_values]


def admits(admitted: Admitted, rule: StoredRule) -> bool:
    """Whether every condition of ``rule`` is admitted by the filters."""
    if admitted is None:
        return True
    for feature, value in rule.feature_values.items():
        if feature not in admitted:
            return False
        values = admitted[feature]
        if values is not None and value not in values:
            return False
    return True


def _rule_answer(rule: StoredRule, features: Sequence[str], include_metadata: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "value": copy_json(rule.value),
        "context_features": ordered_conditions(rule, features),
        "rule_id": rule.rule_id,
    }
    if include_metadata:
        out["metadata"] = {key: copy_json(value) for key, value in rule.metadata.items()}
    return out


def setting_answer(
    setting: StoredSetting, features: Sequence[str], admitted: Admitted, include_metadata: bool
) -> dict[str, Any]:
    """One setting's entry in the answer: its default and its admitted rules, in id order."""
    return {
        "default_value": copy_json(setting.default_value),
        "rules": [
            _rule_answer(rule, features, include_metadata)
            for rule in setting.rules.values()
            if admits(admitted, rule)
        ],
    }


def setting_json(
    setting: StoredSetting, features: Sequence[str], order: int, admitted: Admitted, include_metadata: bool
) -> bytes:
    """``"name":{...}``: the setting's entry as JSON, from its cache when nothing changed since.

    ``order`` numbers the context features' current order (the store's count of moves).
    """
    key = (order, include_metadata, None if admitted is None else frozenset(admitted.items()))
    cached = setting.json_cache.get(key)
    if cached is None:
        if len(setting.json_cache) >= _SETTING_CACHE_SIZE:
            setting.json_cache.clear()
        answer = setting_answer(setting, features, admitted, include_metadata)
        # one dump per setting: json's C encoder does the rules in one go
        cached = setting.json_cache[key] = dump_json(setting.name) + b":" + dump_json(answer)
    return cached


def setting_changed(setting: StoredSetting) -> None:
    """Forget the cached answers of ``setting`` (it or one of its rules changed, or it gained or lost one)."""
    setting.json_cache.clear()
