"""The settings and rules the cases use, defined once so that both sides and the service agree.

Children rebuild the setting list from the same few parameters, so nothing big
travels on a command line.

* **small**: a handful of ``int`` settings configurable by ``user`` and
  ``theme``, 20 user rules each, and on the first setting the rules that the
  ``get()`` cases resolve: ``{user: alice}``, ``{user: alice, theme: dark}``,
  ``{theme: light}``, ``{user: bob}``. Clients track every user and the themes
  ``dark`` and ``light``, and default ``theme`` to ``light``.
* **three**: the same shape with all three features (``user``, ``theme``,
  ``environment``) for the ``get()`` case with a client default: 20 user
  rules each, and on the first setting rules that only match with
  ``environment=prod``. Clients track every user, the themes ``dark`` and
  ``light`` and the environments ``prod`` and ``staging``, and default
  ``environment`` to ``prod``.
* **big**: 1,000 settings (``int`` and ``str`` alternately) configurable by
  all three features, with the same number of rules each (1, 10 or 100: 1k,
  10k or 100k rules), spread over four condition shapes. Clients track
  everything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks._service import CONTEXT_FEATURES, BenchService, Rule

SettingSpec = tuple[str, str, list[str], Any]
"""(name, Heksher type, configurable features, default value)"""

SMALL_FEATURES = ["user", "theme"]
SMALL_TRACK: dict[str, Any] = {"user": "*", "theme": ["dark", "light"]}
SMALL_DEFAULTS = {"theme": "light"}
SMALL_USER_RULES = 20

THREE_FEATURES = list(CONTEXT_FEATURES)
THREE_TRACK: dict[str, Any] = {"user": "*", "theme": ["dark", "light"], "environment": ["prod", "staging"]}
THREE_DEFAULTS = {"environment": "prod"}

BIG_SETTINGS = 1000
BIG_TRACK: dict[str, Any] = {"user": "*", "theme": "*", "environment": "*"}


def small_specs(
    prefix: str, stem: str, count: int, features: Sequence[str] = tuple(SMALL_FEATURES)
) -> list[SettingSpec]:
    return [(f"{prefix}{stem}{i}", "int", list(features), i) for i in range(count)]


def seed_small(service: BenchService, stem: str, count: int) -> dict[str, Any]:
    """Declare ``count`` small settings named ``<stem><i>`` and add their rules; returns rule ids."""
    specs = small_specs(service.prefix, stem, count)
    for name, type_, features, default in specs:
        service.declare(name, type_, default, features)
    first = specs[0][0]
    named: list[Rule] = [
        (first, {"user": "alice"}, 1),
        (first, {"user": "alice", "theme": "dark"}, 2),
        (first, {"theme": "light"}, 3),
        (first, {"user": "bob"}, 4),
    ]
    users: list[Rule] = [
        (name, {"user": f"r{k}"}, 100 + k) for name, _, _, _ in specs for k in range(SMALL_USER_RULES)
    ]
    ids = service.add_rules(named + users)
    return {"names": [s[0] for s in specs], "alice": ids[0], "light": ids[2]}


def seed_three(service: BenchService, stem: str, count: int) -> dict[str, Any]:
    """Declare ``count`` three-feature settings named ``<stem><i>`` and add their rules.

    ``get(user="alice", theme="dark")`` on the first one, with ``environment`` defaulting
    to ``prod``, matches three of its rules (the ``{user: alice, environment: prod}`` one
    wins); without the default it would match none of them.
    """
    specs = small_specs(service.prefix, stem, count, THREE_FEATURES)
    for name, type_, features, default in specs:
        service.declare(name, type_, default, features)
    first = specs[0][0]
    named: list[Rule] = [
        (first, {"user": "alice", "theme": "dark", "environment": "staging"}, 1),
        (first, {"user": "alice", "environment": "prod"}, 2),
        (first, {"theme": "dark", "environment": "prod"}, 3),
        (first, {"environment": "prod"}, 4),
        (first, {"user": "bob"}, 5),
    ]
    users: list[Rule] = [
        (name, {"user": f"r{k}"}, 100 + k) for name, _, _, _ in specs for k in range(SMALL_USER_RULES)
    ]
    service.add_rules(named + users)
    return {"names": [s[0] for s in specs]}


def big_specs(prefix: str, count: int = BIG_SETTINGS) -> list[SettingSpec]:
    features = list(CONTEXT_FEATURES)
    return [
        (f"{prefix}b{i:04d}", "int", features, 0)
        if i % 2 == 0
        else (f"{prefix}b{i:04d}", "str", features, "d")
        for i in range(count)
    ]


def big_rule(spec: SettingSpec, i: int, j: int) -> Rule:
    name, type_, _, _ = spec
    shape = j % 4
    if shape == 0:
        conditions = {"user": f"u{j}"}
    elif shape == 1:
        conditions = {"user": f"u{j}", "theme": "dark"}
    elif shape == 2:
        conditions = {"theme": f"t{j}", "environment": "prod"}
    else:
        conditions = {"environment": f"e{j}"}
    value: Any = j * 7 + i if type_ == "int" else f"value-{i}-{j}"
    return name, conditions, value


def big_value(spec: SettingSpec, i: int, j: int, version: int) -> Any:
    """A new value for rule ``j`` of setting ``i`` (changes with ``version``)."""
    return 1_000_000 * version + j * 7 + i if spec[1] == "int" else f"value-{i}-{j}-v{version}"


def grow_big(service: BenchService, shared: dict[str, Any], per_setting: int) -> dict[str, Any]:
    """Make sure the big settings exist with ``per_setting`` rules each (rules are only ever added)."""
    big = shared.get("big")
    if big is None:
        specs = big_specs(service.prefix)
        for name, type_, features, default in specs:
            service.declare(name, type_, default, features)
        big = shared["big"] = {"specs": specs, "per": 0, "ids": [[] for _ in specs], "version": 0}
    if per_setting > big["per"]:
        specs: Sequence[SettingSpec] = big["specs"]
        new = [big_rule(spec, i, j) for i, spec in enumerate(specs) for j in range(big["per"], per_setting)]
        ids = service.add_rules(new)
        width = per_setting - big["per"]
        for i in range(len(specs)):
            big["ids"][i].extend(ids[i * width : (i + 1) * width])
        big["per"] = per_setting
    return big


def change_every_big_setting(service: BenchService, big: dict[str, Any]) -> dict[str, Any]:
    """Change rule 0 of every big setting: every setting's blob changes. Returns the new values."""
    big["version"] += 1
    version = big["version"]
    changes = [(big["ids"][i][0], big_value(spec, i, 0, version)) for i, spec in enumerate(big["specs"])]
    service.set_rule_values(changes)
    return {big["specs"][0][0]: changes[0][1]}


def change_one_big_rule(service: BenchService, big: dict[str, Any]) -> dict[str, Any]:
    """Change rule 0 of the first big setting only. Returns its new value, by setting name."""
    big["version"] += 1
    spec = big["specs"][0]
    value = big_value(spec, 0, 0, big["version"])
    service.set_rule_value(big["ids"][0][0], value)
    return {spec[0]: value}


def specs_from(params: dict[str, Any]) -> list[SettingSpec]:
    """Rebuild a setting list in a child from ``{"kind": "small"|"three"|"big", ...}``."""
    kind = params["kind"]
    if kind == "small":
        return small_specs(params["prefix"], params["stem"], params["count"])
    if kind == "three":
        return small_specs(params["prefix"], params["stem"], params["count"], THREE_FEATURES)
    if kind == "big":
        specs = big_specs(params["prefix"], params.get("count", BIG_SETTINGS))
        only = params.get("only")
        return specs if only is None else [specs[i] for i in only]
    raise ValueError(f"unknown setting kind {kind!r}")
