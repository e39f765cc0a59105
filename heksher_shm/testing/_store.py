"""The store behind :class:`~heksher_shm.testing.HeksherService`: :class:`HeksherState`.

Everything here is pure: no sockets, no clocks, no threads other than one lock that makes
:class:`HeksherState` safe to share between the server's handler threads and the test that drives it.
The API (``_api.py``) turns the results and :class:`~heksher_shm.testing.ServiceError` exceptions into
responses that look like the ones a real Heksher 0.5.7 server sends.  How a declaration of an existing
setting is judged lives in ``_declare.py``; query answers in ``_query.py``; the types in ``_types.py``.

Every operation costs what it touches, not what the service holds: each setting keeps its own rules
(by id and by conditions), so adding, finding or deleting a rule, declaring a setting that has rules and
querying some settings never walk the rules of other settings (``benchmarks/bench_service.py`` measures
it with 100k rules).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from heksher_shm.testing._declare import judge
from heksher_shm.testing._errors import ServiceError, set_text
from heksher_shm.testing._query import (
    Admitted,
    ordered_conditions,
    setting_answer,
    setting_changed,
    setting_json,
)
from heksher_shm.testing._records import Declaration, RuleInfo, SettingInfo, StoredRule, StoredSetting
from heksher_shm.testing._types import CONTEXT_FEATURE_RE, JSONValue, copy_json

__all__ = ["FilterMap", "HeksherState"]

FilterMap = Mapping[str, "Sequence[str] | None"]
"""Query filters: a context feature to the values admitted (``None``: any value)."""


class HeksherState:
    """Context features, settings and rules of one in-memory Heksher service.

    Every public method takes the one lock, so the state can be shared by the server's threads and the
    test.  Methods return fresh JSON-ready structures (never references into the state) and raise
    :class:`ServiceError` where a real server would answer with an error.
    """

    def __init__(self, context_features: Iterable[str]) -> None:
        self._lock = threading.Lock()
        self._features: list[str] = []
        for feature in context_features:
            if not CONTEXT_FEATURE_RE.fullmatch(feature) or feature in self._features:
                raise ValueError(f"invalid or repeated context feature {feature!r}")
            self._features.append(feature)
        self._settings: dict[str, StoredSetting] = {}
        self._aliases: dict[str, str] = {}  # alias -> canonical name
        self._rules: dict[int, StoredRule] = {}  # every rule by id; each setting also keeps its own
        self._next_rule_id = 1
        # how many settings are configurable by each context feature: deleting one checks this, not them all
        self._feature_users: dict[str, int] = {}
        # bumped when context features move: the cached query JSON lists conditions in that order
        self._feature_order = 0

    # -- context features ------------------------------------------------------------------------------------

    def context_features(self) -> list[str]:
        """The context features, in order."""
        with self._lock:
            return list(self._features)

    def context_feature_index(self, name: str) -> int | None:
        """The 0-based position of a context feature, ``None`` when it does not exist."""
        with self._lock:
            return self._features.index(name) if name in self._features else None

    def add_context_feature(self, name: str) -> None:
        """Append a context feature (409 when it exists)."""
        with self._lock:
            if name in self._features:
                raise ServiceError.text(409, "context feature already exists")
            if not CONTEXT_FEATURE_RE.fullmatch(name):
                raise ValueError(f"invalid context feature name {name!r}")
            self._features.append(name)

    def delete_context_feature(self, name: str) -> None:
        """Remove a context feature (404 when unknown, 409 while a setting is configurable by it)."""
        with self._lock:
            if name not in self._features:
                raise ServiceError.empty(404)
            if self._feature_users.get(name, 0):
                raise ServiceError.text(
                    409, "context feature can't be deleted, there is at least one setting configured by it"
                )
            self._features.remove(name)

    def move_context_feature(self, name: str, target: str, *, before: bool) -> None:
        """Move ``name`` right after (or right before) ``target`` (404 when either is unknown)."""
        with self._lock:
            if name not in self._features or target not in self._features:
                raise ServiceError.empty(404)
            if name == target:
                return
            self._features.remove(name)
            index = self._features.index(target)
            self._features.insert(index if before else index + 1, name)
            self._feature_order += 1

    # -- settings --------------------------------------------------------------------------------------------

    def _lookup(self, name: str) -> StoredSetting | None:
        setting = self._settings.get(name)
        if setting is None and name in self._aliases:
            setting = self._settings[self._aliases[name]]
        return setting

    def _count_users(self, features: Iterable[str], change: int) -> None:
        for feature in features:
            self._feature_users[feature] = self._feature_users.get(feature, 0) + change

    def creates(self, declaration: Declaration) -> bool:
        """Whether :meth:`declare` would create a new setting for ``declaration`` (now; nothing changes)."""
        with self._lock:
            return (
                declaration.alias is None
                and self._lookup(declaration.name) is None
                and declaration.version == "1.0"
                and set(declaration.configurable_features) <= set(self._features)
            )

    def declare(self, declaration: Declaration, *, expect_new: bool = False) -> tuple[int, dict[str, Any]]:
        """Apply a declaration; return the HTTP status (200 or 409) and the outcome body.

        ``expect_new`` is for a declaration that found no such setting a moment ago (:meth:`creates`) and
        now inserts it, as the real server does in two steps: if another declaration created the setting
        in between, the insert fails on the unique name, which the real server answers with a bare 500
        (:meth:`ServiceError.internal`).
        """
        with self._lock:
            existing = self._lookup(declaration.name)
            if expect_new and existing is not None:
                raise ServiceError.internal()
            if declaration.alias is not None:
                target = self._lookup(declaration.alias)
                if target is None:
                    raise ServiceError.detail(404, f"alias {declaration.alias} does not exist")
                # either a rename (the alias is the current canonical name of a setting the new name does not
                # already belong to) or a repeat of an alias the setting already has
                renaming = existing is None and declaration.alias == target.name
                if not (renaming or existing is target):
                    raise ServiceError.detail(
                        409, f"alias {declaration.alias} is an alias of unrelated setting {target.name}"
                    )
                existing = target
            if existing is None:
                return self._create(declaration)

            rules = list(existing.rules.values())
            status, outcome, upgrade = judge(existing, declaration, rules, self._features)
            if upgrade:
                self._upgrade(existing, declaration)
            return status, outcome

    def _create(self, declaration: Declaration) -> tuple[int, dict[str, Any]]:
        if declaration.version != "1.0":
            raise ServiceError.text(400, "newly created settings must have version 1.0")
        unknown = [cf for cf in declaration.configurable_features if cf not in self._features]
        if unknown:
            raise ServiceError.text(404, f"{set_text(unknown)} are not acceptable context features")
        self._settings[declaration.name] = StoredSetting(
            name=declaration.name,
            type=declaration.type,
            default_value=copy.deepcopy(declaration.default_value),
            configurable_features=list(declaration.configurable_features),
            metadata=copy.deepcopy(dict(declaration.metadata)),
            aliases=[],
            version=declaration.version,
        )
        self._count_users(declaration.configurable_features, +1)
        return 200, {"outcome": "created"}

    def _upgrade(self, setting: StoredSetting, declaration: Declaration) -> None:
        if declaration.name != setting.name:
            old_name = setting.name
            del self._settings[old_name]
            # renaming back to an old alias turns that alias into the name again
            setting.aliases = [alias for alias in setting.aliases if alias != declaration.name] + [old_name]
            setting.name = declaration.name
            self._settings[setting.name] = setting
            self._aliases.pop(setting.name, None)
            for alias in setting.aliases:
                self._aliases[alias] = setting.name
        self._count_users(setting.configurable_features, -1)
        self._count_users(declaration.configurable_features, +1)
        setting.configurable_features = list(declaration.configurable_features)
        setting.type = declaration.type
        setting.default_value = copy.deepcopy(declaration.default_value)
        setting.metadata = copy.deepcopy(dict(declaration.metadata))
        setting.version = declaration.version
        setting_changed(setting)

    def setting_details(self, name: str) -> dict[str, Any]:
        """``GET /api/v1/settings/{name}``: the setting found by name or alias (404 text otherwise)."""
        with self._lock:
            setting = self._lookup(name)
            if setting is None:
                raise ServiceError.text(404, f"the setting {name} does not exist")
            return {
                "name": setting.name,
                "configurable_features": setting.ordered_features(self._features),
                "type": str(setting.type),
                "default_value": copy.deepcopy(setting.default_value),
                "metadata": copy.deepcopy(setting.metadata),
                "aliases": sorted(setting.aliases),  # sorted here, in the order given in the listing
                "version": setting.version,
            }

    def list_settings(self, *, include_additional_data: bool) -> dict[str, Any]:
        """``GET /api/v1/settings``: every setting, sorted by name."""
        with self._lock:
            listing = []
            for name in sorted(self._settings):
                setting = self._settings[name]
                entry: dict[str, Any] = {
                    "name": setting.name,
                    "type": str(setting.type),
                    "default_value": copy.deepcopy(setting.default_value),
                    "version": setting.version,
                }
                if include_additional_data:
                    entry["configurable_features"] = setting.ordered_features(self._features)
                    entry["metadata"] = copy.deepcopy(setting.metadata)
                    entry["aliases"] = list(setting.aliases)  # in the order given (sorted by name above)
                listing.append(entry)
            return {"settings": listing}

    def delete_setting(self, name: str) -> None:
        """Delete a setting (by name or alias), its aliases and its rules (404 text when unknown)."""
        with self._lock:
            setting = self._lookup(name)
            if setting is None:
                raise ServiceError.text(404, "setting name not found")
            del self._settings[setting.name]
            for alias in setting.aliases:
                self._aliases.pop(alias, None)
            self._count_users(setting.configurable_features, -1)
            for rule_id in setting.rules:
                del self._rules[rule_id]

    def settings_snapshot(self) -> dict[str, SettingInfo]:
        """A copy of every setting, keyed by canonical name."""
        with self._lock:
            return {
                name: SettingInfo(
                    name=setting.name,
                    type=str(setting.type),
                    default_value=copy.deepcopy(setting.default_value),
                    configurable_features=tuple(setting.ordered_features(self._features)),
                    metadata=copy.deepcopy(setting.metadata),
                    aliases=tuple(setting.aliases),
                    version=setting.version,
                )
                for name, setting in sorted(self._settings.items())
            }

    # -- query -----------------------------------------------------------------------------------------------

    def _query_targets(self, names: Sequence[str] | None) -> list[StoredSetting]:
        """The settings a query asks for, sorted by name (404 text when a name is unknown)."""
        if names is None:
            targets = list(self._settings.values())
        else:
            # the real server's SQL leaves this order open; PostgreSQL's DISTINCT gives it sorted
            unknown = sorted({name for name in names if self._lookup(name) is None})
            if unknown:
                raise ServiceError.text(404, f"the following are not setting names: {unknown}")
            targets = list(
                {id(s): s for s in (self._lookup(name) for name in names) if s is not None}.values()
            )
        return sorted(targets, key=lambda s: s.name)

    def _admitted(self, filters: FilterMap | None) -> Admitted:
        if filters is None:
            return None
        return {
            feature: None if values is None else frozenset(values)
            for feature, values in filters.items()
            if feature in self._features
        }

    def query(
        self, names: Sequence[str] | None, filters: FilterMap | None, *, include_metadata: bool
    ) -> dict[str, Any]:
        """``GET /api/v1/query``.

        ``names`` is ``None`` for every setting; ``filters`` maps a context feature to the admitted values
        (``None`` admits any value) or is ``None`` to admit every rule.  A rule is returned only when each
        of its conditions is admitted; filters on unknown features are dropped.
        """
        with self._lock:
            admitted = self._admitted(filters)
            return {
                "settings": {
                    setting.name: setting_answer(setting, self._features, admitted, include_metadata)
                    for setting in self._query_targets(names)
                }
            }

    def query_json(
        self, names: Sequence[str] | None, filters: FilterMap | None, *, include_metadata: bool
    ) -> bytes:
        """:meth:`query`'s answer as the compact JSON the API sends: the same bytes as dumping it.

        Built from pieces cached with each setting and rule (``_query.py``): a repeated query for 1,000
        settings joins 1,000 pieces, whatever number of rules they hold.
        """
        with self._lock:
            admitted = self._admitted(filters)
            parts = [
                setting_json(setting, self._features, self._feature_order, admitted, include_metadata)
                for setting in self._query_targets(names)
            ]
            return b'{"settings":{' + b",".join(parts) + b"}}"

    # -- rules -----------------------------------------------------------------------------------------------

    def _find_rule(self, setting: StoredSetting, feature_values: Mapping[str, str]) -> StoredRule | None:
        return setting.rule_by_conditions.get(frozenset(feature_values.items()))

    def add_rule(
        self,
        setting: str,
        feature_values: Mapping[str, str],
        value: JSONValue,
        metadata: Mapping[str, JSONValue] | None = None,
    ) -> int:
        """``POST /api/v1/rules``: add a rule and return its id."""
        with self._lock:
            target = self._lookup(setting)
            if target is None:
                raise ServiceError.text(422, f"setting not found with name {setting}")
            if not feature_values:
                raise ServiceError.text(422, "feature_values must not be empty")
            for feature, feature_value in feature_values.items():
                if not (
                    CONTEXT_FEATURE_RE.fullmatch(feature) and CONTEXT_FEATURE_RE.fullmatch(feature_value)
                ):
                    raise ServiceError.text(422, f"invalid condition {feature}={feature_value}")
            not_configurable = feature_values.keys() - set(target.configurable_features)
            if not_configurable:
                raise ServiceError.text(
                    400, f"setting is not configurable at context features {set_text(not_configurable)}"
                )
            if not target.type.validate(value):
                raise ServiceError.text(400, f"rule value is incompatible with setting type {target.type}")
            if self._find_rule(target, feature_values) is not None:
                raise ServiceError.text(409, "rule already exists")
            rule_id = self._next_rule_id
            self._next_rule_id += 1
            rule = StoredRule(
                rule_id=rule_id,
                setting=target,
                feature_values=dict(feature_values),
                value=copy_json(value),
                metadata=copy.deepcopy(dict(metadata or {})),
            )
            self._rules[rule_id] = target.rules[rule_id] = rule
            target.rule_by_conditions[rule.conditions_key] = rule
            setting_changed(target)
            return rule_id

    def search_rule(self, setting: str, feature_values: Mapping[str, str]) -> int | None:
        """The id of the rule of ``setting`` with exactly these conditions, if any."""
        with self._lock:
            target = self._lookup(setting)
            rule = None if target is None else self._find_rule(target, feature_values)
            return None if rule is None else rule.rule_id

    def _rule(self, rule_id: int, missing: ServiceError) -> StoredRule:
        rule = self._rules.get(rule_id)
        if rule is None:
            raise missing
        return rule

    def rule_details(self, rule_id: int) -> dict[str, Any]:
        """``GET /api/v1/rules/{id}`` (404 with an empty body when unknown)."""
        with self._lock:
            rule = self._rule(rule_id, ServiceError.empty(404))
            return {
                "setting": rule.setting.name,
                "value": copy.deepcopy(rule.value),
                "feature_values": ordered_conditions(rule, self._features),
                "metadata": copy.deepcopy(rule.metadata),
            }

    def set_rule_value(self, rule_id: int, value: JSONValue) -> None:
        """``PUT /api/v1/rules/{id}/value`` (404 empty text when unknown, 400 text on a wrong value type)."""
        with self._lock:
            rule = self._rule(rule_id, ServiceError.text(404, ""))
            if not rule.setting.type.validate(value):
                raise ServiceError.text(
                    400, f"rule value is incompatible with setting type {rule.setting.type}"
                )
            rule.value = copy_json(value)
            setting_changed(rule.setting)

    def delete_rule(self, rule_id: int) -> None:
        """``DELETE /api/v1/rules/{id}`` (404 with an empty body when unknown)."""
        with self._lock:
            rule = self._rule(rule_id, ServiceError.empty(404))
            del self._rules[rule_id]
            del rule.setting.rules[rule_id]
            del rule.setting.rule_by_conditions[rule.conditions_key]
            setting_changed(rule.setting)

    def rules_snapshot(self) -> list[RuleInfo]:
        """A copy of every rule, by id."""
        with self._lock:
            return [
                RuleInfo(
                    rule_id=rule.rule_id,
                    setting=rule.setting.name,
                    feature_values=tuple((f, v) for f, v in ordered_conditions(rule, self._features)),
                    value=copy_json(rule.value),
                    metadata=copy.deepcopy(rule.metadata),
                )
                for rule in self._rules.values()
            ]

    # -- rule metadata (a missing rule is a 404 with an empty body on all of these) --------------------------

    def rule_metadata(self, rule_id: int) -> dict[str, Any]:
        """``GET /api/v1/rules/{id}/metadata``."""
        with self._lock:
            return {"metadata": copy.deepcopy(self._rule(rule_id, ServiceError.empty(404)).metadata)}

    def update_rule_metadata(self, rule_id: int, metadata: Mapping[str, JSONValue]) -> None:
        """``POST /api/v1/rules/{id}/metadata``: merge keys into the metadata.

        Merging nothing succeeds without looking for the rule, as on the real server.
        """
        if not metadata:
            return
        with self._lock:
            rule = self._rule(rule_id, ServiceError.empty(404))
            rule.metadata.update(copy.deepcopy(dict(metadata)))
            setting_changed(rule.setting)

    def replace_rule_metadata(self, rule_id: int, metadata: Mapping[str, JSONValue]) -> None:
        """``PUT /api/v1/rules/{id}/metadata``: replace the whole metadata."""
        with self._lock:
            rule = self._rule(rule_id, ServiceError.empty(404))
            rule.metadata = copy.deepcopy(dict(metadata))
            setting_changed(rule.setting)

    def set_rule_metadata_key(self, rule_id: int, key: str, value: JSONValue) -> None:
        """``PUT /api/v1/rules/{id}/metadata/{key}``."""
        with self._lock:
            rule = self._rule(rule_id, ServiceError.empty(404))
            rule.metadata[key] = copy_json(value)
            setting_changed(rule.setting)

    def delete_rule_metadata(self, rule_id: int) -> None:
        """``DELETE /api/v1/rules/{id}/metadata``."""
        with self._lock:
            rule = self._rule(rule_id, ServiceError.empty(404))
            rule.metadata = {}
            setting_changed(rule.setting)

    def delete_rule_metadata_key(self, rule_id: int, key: str) -> None:
        """``DELETE /api/v1/rules/{id}/metadata/{key}`` (a missing key is not an error)."""
        with self._lock:
            rule = self._rule(rule_id, ServiceError.empty(404))
            rule.metadata.pop(key, None)
            setting_changed(rule.setting)
