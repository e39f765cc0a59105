"""What a setting's raw rules become: converted with its own type, ``on_coerce`` and validators,
filtered by the client's tracked values, and compiled (:mod:`heksher_shm._model.resolve`).

Pure but for the log: :class:`~heksher_shm.clients._feed.SettingsFeed` decides when, and swaps the
result in.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from heksher_shm._model.contexts import TRACK_ALL
from heksher_shm._model.resolve import CompiledRules, compile_rules
from heksher_shm._model.snapshot import SettingBlob
from heksher_shm.setting import QueriedRule, Setting

__all__ = ["compile_blob", "convert_default"]

logger = logging.getLogger("heksher_shm.client")

_json_decoder = msgspec.json.Decoder()


def convert_default(setting: Setting[Any], raw_json: bytes) -> bool:
    """Convert the service's default for *setting* and keep it there; False when its type refuses it
    (logged). A validator's or ``on_coerce``'s other errors propagate."""
    raw = _json_decoder.decode(raw_json)
    try:
        converted = setting._convert(raw, None)
    except TypeError:
        logger.warning(
            "setting default value discarded due to conversion error",
            exc_info=True,
            extra={"setting_name": setting.name, "new_default": raw},
        )
        return False
    if converted.coercions:
        logger.warning(
            "setting default value coerced to local value",
            extra={"setting_name": setting.name, "new_default": raw, "coercions": converted.coercions},
        )
    setting.server_default_value = converted.value
    return True


def compile_blob(
    setting: Setting[Any],
    blob: SettingBlob,
    service_order: Sequence[str],
    tracked: Mapping[str, str | set[str]],
) -> CompiledRules:
    """Convert one setting's raw rules with its own type and validators, keep those on *tracked* values,
    convert the service's default too, and compile the rules in the service's order of features.

    A value its type refuses (a :class:`TypeError`) drops that rule, logged; any other error of a
    validator or ``on_coerce`` propagates: the whole update of the setting fails.
    """
    position = {f: i for i, f in enumerate(service_order)}
    features = sorted(
        setting.configurable_features,
        key=lambda f: (position.get(f, len(position)), setting.configurable_features.index(f)),
    )
    feature_set = frozenset(features)
    rules: list[tuple[Sequence[tuple[str, str]], Any]] = []
    rejected: list[tuple[int, str]] = []
    coerced: list[tuple[int, Sequence[str]]] = []
    for record in blob.rules:
        conditions = record.conditions
        unknown = {f for f, _ in conditions} - feature_set
        if unknown:
            rejected.append((record.rule_id, f"rule refers to unrecognized features {sorted(unknown)}"))
            continue
        if not all(tracked.get(f) == TRACK_ALL or v in tracked.get(f, ()) for f, v in conditions):
            continue  # another process tracks these contexts; this one does not
        # Lists of [feature, value] lists, the service's JSON as heksher 0.2.2 hands it to validators.
        rule = QueriedRule(record.rule_id, [list(pair) for pair in conditions])
        try:
            raw = _json_decoder.decode(record.value)
        except msgspec.DecodeError as e:
            rejected.append((record.rule_id, f"rule value rejected: {e!r}"))
            continue
        # Only a TypeError rejects one value; anything else a validator or on_coerce raises
        # fails the whole update of this setting (see _feed._PendingRules), as in heksher 0.2.2.
        try:
            converted = setting._convert(raw, rule)
        except TypeError as e:
            rejected.append((record.rule_id, f"rule value could not be converted: {e!r}"))
            continue
        if converted.coercions:
            coerced.append((record.rule_id, converted.coercions))
        rules.append((conditions, converted.value))
    if rejected:
        logger.warning(
            "setting update rejected rules",
            extra={"setting_name": setting.name, "rejected_rules": rejected},
        )
    if coerced:
        logger.info(
            "setting update coerced values", extra={"setting_name": setting.name, "coercions": coerced}
        )
    convert_default(setting, blob.default)
    return compile_rules(features, rules)
