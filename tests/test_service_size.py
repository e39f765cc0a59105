"""The in-memory service at a real size: each operation costs what it changes, not what the service holds.

The store keeps every setting's rules with the setting (by id and by conditions) and its piece of the
query answer's JSON.  Two kinds of tests hold it to that without timing anything:

* the indexes always agree with a brute-force recomputation, and a query answers exactly what the plain
  algorithm (every rule, in id order, filtered) answers, byte for byte, after any sequence of
  operations (Hypothesis drives the sequences);
* the operations that must not depend on the number of rules held run against a store whose table of
  all rules refuses to be walked: walking it raises.

How fast it is lives in ``benchmarks/bench_service.py``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from heksher_shm.testing import HeksherState, ServiceError, parse_setting_type
from heksher_shm.testing._records import Declaration
from heksher_shm.testing._types import dump_json

FEATURES = ("user", "theme", "env")
NAMES = ("alpha", "beta", "gamma", "delta")
VALUES = ("a", "b", "c")


def declaration(name: str, features: tuple[str, ...], version: str = "1.0", **extra: Any) -> Declaration:
    return Declaration(
        name=name,
        configurable_features=features,
        type=parse_setting_type(extra.pop("type", "int")),
        default_value=extra.pop("default_value", 0),
        version=version,
        **extra,
    )


def reference_query(
    state: HeksherState,
    names: list[str] | None,
    filters: dict[str, list[str] | None] | None,
    *,
    include_metadata: bool,
) -> dict[str, Any]:
    """The answer of the plain algorithm: every rule, in id order, kept when its setting is asked for."""
    settings_by_name = state.settings_snapshot()
    canonical = {alias: info.name for info in settings_by_name.values() for alias in info.aliases}
    wanted = sorted(settings_by_name) if names is None else sorted({canonical.get(n, n) for n in names})
    features = state.context_features()
    admitted = None if filters is None else {f: v for f, v in filters.items() if f in features}
    answer: dict[str, Any] = {
        name: {"default_value": settings_by_name[name].default_value, "rules": []} for name in wanted
    }
    for info in state.rules_snapshot():
        if info.setting not in answer:
            continue
        if admitted is not None and not all(
            feature in admitted and (admitted[feature] is None or value in (admitted[feature] or ()))
            for feature, value in info.feature_values
        ):
            continue
        out: dict[str, Any] = {
            "value": info.value,
            "context_features": [list(pair) for pair in info.feature_values],
            "rule_id": info.rule_id,
        }
        if include_metadata:
            out["metadata"] = dict(info.metadata)
        answer[info.setting]["rules"].append(out)
    return {"settings": answer}


def check_indexes(state: HeksherState) -> None:
    """Every per-setting index agrees with the table of all rules; the feature counts with the settings."""
    all_rules = dict(state._rules)
    for setting in state._settings.values():
        own = {rule_id: rule for rule_id, rule in all_rules.items() if rule.setting is setting}
        assert list(setting.rules) == list(own)
        assert all(setting.rules[rule_id] is rule for rule_id, rule in own.items())
        assert setting.rule_by_conditions == {rule.conditions_key: rule for rule in own.values()}
    assert {rule.setting.name for rule in all_rules.values()} <= set(state._settings)
    users = {
        feature: sum(feature in s.configurable_features for s in state._settings.values())
        for feature in state.context_features()
    }
    assert {f: n for f, n in state._feature_users.items() if n} == {f: n for f, n in users.items() if n}


QUERIES: list[tuple[list[str] | None, dict[str, list[str] | None] | None, bool]] = [
    (None, None, False),
    (None, None, True),
    (["alpha", "gamma"], None, True),
    (None, {"user": ["a", "b"], "theme": None}, False),
    (None, {"env": None, "user": ["c"], "nope": ["x"]}, True),
]


class StoreMachine(RuleBasedStateMachine):
    """Random operations on one store; after each, the indexes and every query are checked."""

    def __init__(self) -> None:
        super().__init__()
        self.state = HeksherState(FEATURES)

    def _names(self) -> list[str]:
        return sorted(self.state.settings_snapshot())

    def _rule_ids(self) -> list[int]:
        return [info.rule_id for info in self.state.rules_snapshot()]

    @rule(
        name=st.sampled_from(NAMES),
        features=st.lists(st.sampled_from(FEATURES), min_size=1, max_size=3, unique=True),
    )
    def declare_new(self, name: str, features: list[str]) -> None:
        with contextlib.suppress(ServiceError):  # a feature deleted meanwhile
            self.state.declare(declaration(name, tuple(features)))

    @precondition(lambda self: self._names())
    @rule(
        data=st.data(),
        features=st.lists(st.sampled_from(FEATURES), min_size=1, max_size=3, unique=True),
        bump=st.sampled_from(["1.0", "1.1", "2.0"]),
        type_=st.sampled_from(["int", "float", "str"]),
        default=st.integers(0, 3),
    )
    def redeclare(self, data: Any, features: list[str], bump: str, type_: str, default: int) -> None:
        name = data.draw(st.sampled_from(self._names()))
        current = self.state.settings_snapshot()[name].version
        major, minor = (int(x) for x in current.split("."))
        step_major, step_minor = (int(x) for x in bump.split("."))
        version = (
            f"{major + step_major - 1}.{minor + step_minor}"
            if step_major > 1
            else f"{major}.{minor + step_minor}"
        )
        value: Any = str(default) if type_ == "str" else default
        with contextlib.suppress(ServiceError):
            self.state.declare(declaration(name, tuple(features), version, type=type_, default_value=value))

    @precondition(lambda self: self._names())
    @rule(data=st.data(), new_name=st.sampled_from(NAMES))
    def rename(self, data: Any, new_name: str) -> None:
        name = data.draw(st.sampled_from(self._names()))
        info = self.state.settings_snapshot()[name]
        major = int(info.version.split(".")[0])
        if new_name == name:
            return
        with contextlib.suppress(ServiceError):
            self.state.declare(
                declaration(
                    new_name,
                    info.configurable_features,
                    f"{major + 1}.0",
                    type=info.type,
                    default_value=info.default_value,
                    alias=name,
                    metadata=dict(info.metadata),
                )
            )

    @precondition(lambda self: self._names())
    @rule(
        data=st.data(),
        conditions=st.dictionaries(st.sampled_from(FEATURES), st.sampled_from(VALUES), min_size=1),
        value=st.integers(0, 9),
    )
    def add_rule(self, data: Any, conditions: dict[str, str], value: int) -> None:
        name = data.draw(st.sampled_from(self._names()))
        kind = self.state.settings_snapshot()[name].type
        with contextlib.suppress(
            ServiceError
        ):  # not configurable there, a duplicate, or a value of the wrong type
            self.state.add_rule(name, conditions, str(value) if kind == "str" else value, {"k": value})

    @precondition(lambda self: self._rule_ids())
    @rule(data=st.data(), action=st.sampled_from(["delete", "value", "meta_put", "meta_key", "meta_clear"]))
    def change_rule(self, data: Any, action: str) -> None:
        rule_id = data.draw(st.sampled_from(self._rule_ids()))
        with contextlib.suppress(ServiceError):  # a str setting's rule refuses an int value
            if action == "delete":
                self.state.delete_rule(rule_id)
            elif action == "value":
                self.state.set_rule_value(rule_id, data.draw(st.integers(10, 20)))
            elif action == "meta_put":
                self.state.replace_rule_metadata(rule_id, {"x": [1, 2], "y": "z"})
            elif action == "meta_key":
                self.state.set_rule_metadata_key(rule_id, "k", {"deep": True})
            else:
                self.state.delete_rule_metadata(rule_id)

    @precondition(lambda self: self._names())
    @rule(data=st.data())
    def delete_setting(self, data: Any) -> None:
        self.state.delete_setting(data.draw(st.sampled_from(self._names())))

    @rule(name=st.sampled_from(FEATURES), anchor=st.sampled_from(FEATURES), before=st.booleans())
    def move_feature(self, name: str, anchor: str, before: bool) -> None:
        with contextlib.suppress(ServiceError):  # deleted
            self.state.move_context_feature(name, anchor, before=before)

    @rule(name=st.sampled_from(FEATURES))
    def delete_or_add_feature(self, name: str) -> None:
        with contextlib.suppress(ServiceError):  # a setting is configurable by it
            if name in self.state.context_features():
                self.state.delete_context_feature(name)
            else:
                self.state.add_context_feature(name)

    @invariant()
    def indexes_agree(self) -> None:
        check_indexes(self.state)

    @invariant()
    def queries_agree(self) -> None:
        known = set(self._names()) | {a for i in self.state.settings_snapshot().values() for a in i.aliases}
        for names, filters, include_metadata in QUERIES:
            if names is not None and not set(names) <= known:
                continue
            expected = reference_query(self.state, names, filters, include_metadata=include_metadata)
            assert self.state.query(names, filters, include_metadata=include_metadata) == expected
            body = self.state.query_json(names, filters, include_metadata=include_metadata)
            assert body == dump_json(expected)


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# ---------------------------------------------------------------------------------------------------------
# Operations that never walk every rule


class _NoWalk(dict):  # type: ignore[type-arg]
    """A dict that can be read and changed by key but refuses to be walked."""

    def _refuse(self, *args: Any) -> Any:
        raise AssertionError("walked the table of every rule")

    __iter__ = values = items = keys = __len__ = __eq__ = __repr__ = _refuse


@pytest.fixture
def big_state() -> HeksherState:
    """A store with 50 settings of 40 rules each, whose table of all rules cannot be walked."""
    state = HeksherState(FEATURES)
    for i in range(50):
        state.declare(declaration(f"s{i:02d}", FEATURES, metadata={"n": i}))
        for j in range(40):
            state.add_rule(f"s{i:02d}", {"user": f"u{j}", "theme": "dark" if j % 2 else "light"}, j)
    state._rules = _NoWalk(state._rules)
    return state


def test_rule_operations_do_not_walk_every_rule(big_state: HeksherState) -> None:
    state = big_state
    rule_id = state.add_rule("s07", {"user": "new"}, 5, {"a": 1})
    with pytest.raises(ServiceError) as duplicate:
        state.add_rule("s07", {"user": "new"}, 6)
    assert duplicate.value.status == 409
    assert state.search_rule("s07", {"user": "new"}) == rule_id
    assert state.search_rule("s07", {"user": "nobody"}) is None
    state.set_rule_value(rule_id, 7)
    state.update_rule_metadata(rule_id, {"b": 2})
    state.set_rule_metadata_key(rule_id, "c", 3)
    state.delete_rule_metadata_key(rule_id, "a")
    assert state.rule_details(rule_id)["metadata"] == {"b": 2, "c": 3}
    state.delete_rule(rule_id)
    assert state.search_rule("s07", {"user": "new"}) is None


def test_declarations_and_queries_do_not_walk_every_rule(big_state: HeksherState) -> None:
    state = big_state
    assert state.declare(declaration("s03", FEATURES, metadata={"n": 3}))[1] == {"outcome": "uptodate"}
    status, outcome = state.declare(declaration("s04", ("user", "theme"), "2.0", metadata={"n": 4}))
    assert (status, outcome["outcome"]) == (200, "upgraded")
    status, outcome = state.declare(declaration("s05", ("env",), "2.0", metadata={"n": 5}))
    assert (status, outcome["outcome"]) == (409, "rejected")  # its rules use user and theme
    answer = state.query(["s01", "s02"], {"user": ["u1", "u2"], "theme": None}, include_metadata=True)
    assert [r["rule_id"] for r in answer["settings"]["s01"]["rules"]] == [42, 43]
    body = state.query_json(["s01", "s02"], None, include_metadata=False)
    assert body == dump_json(state.query(["s01", "s02"], None, include_metadata=False))
    state.delete_setting("s09")
    with pytest.raises(ServiceError) as in_use:
        state.delete_context_feature("user")
    assert in_use.value.status == 409
    state.add_context_feature("region")
    state.delete_context_feature("region")


def test_a_moved_feature_reorders_cached_query_answers() -> None:
    state = HeksherState(FEATURES)
    state.declare(declaration("alpha", FEATURES))
    state.add_rule("alpha", {"user": "a", "env": "b"}, 1)
    before = state.query_json(None, None, include_metadata=False)
    assert b'[["user","a"],["env","b"]]' in before
    state.move_context_feature("env", "user", before=True)
    after = state.query_json(None, None, include_metadata=False)
    assert b'[["env","b"],["user","a"]]' in after
    assert after == dump_json(state.query(None, None, include_metadata=False))
