"""A small application written for heksher 0.2.2, run unchanged on either library.

Usage: python compat_app.py MODULE URL KIND   (MODULE: heksher or heksher_shm; KIND: async or thread)
Prints one JSON object of setting values.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from enum import Enum, IntFlag
from typing import Any

heksher: Any = importlib.import_module(sys.argv[1])
URL, KIND = sys.argv[2], sys.argv[3]


class Color(Enum):
    RED = "red"
    BLUE = "blue"


class Perm(IntFlag):
    READ = 1
    WRITE = 2


FEATURES = ["user", "theme"]
settings = {
    "size": heksher.Setting("compat_size", int, FEATURES, 10),
    "ratio": heksher.Setting("compat_ratio", float, FEATURES, 0.5),
    "title": heksher.Setting("compat_title", str, FEATURES, "hello"),
    "flag": heksher.Setting("compat_flag", bool, FEATURES, False),
    "color": heksher.Setting("compat_color", Color, FEATURES, Color.RED),
    "perm": heksher.Setting("compat_perm", Perm, FEATURES, Perm.READ),
    "seq": heksher.Setting("compat_seq", Sequence[int], FEATURES, (1,)),
    "map": heksher.Setting("compat_map", Mapping[str, int], FEATURES, {"a": 1}),
    "late": None,
}


@settings["size"].add_validator
def at_most_100(value: int, rule: Any, setting: Any) -> int:
    if value > 100:
        raise TypeError("too big")
    return value


seen_rules: set[str] = set()


@settings["title"].add_validator
def record_rule(value: str, rule: Any, setting: Any) -> str:
    """What a validator is handed as the rule: its id, and its context_features down to their types."""
    if rule is None:
        seen_rules.add("no rule")
    else:
        features = rule.context_features
        pairs = [type(pair).__name__ for pair in features]
        shape = [type(features).__name__, pairs, [list(pair) for pair in features]]
        seen_rules.add(json.dumps([isinstance(rule.rule_id, int), shape]))
    return value


user: ContextVar[str] = ContextVar("user", default="alice")
CONTEXTS = [
    {"user": "alice"},
    {"user": "bob"},
    {"user": "alice", "theme": "dark"},
    {"user": "carol", "theme": "dark"},
    {"theme": "light"},
]


def snapshot() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, setting in settings.items():
        for ctx in CONTEXTS:
            value = setting.get(**ctx)
            if isinstance(value, Enum):
                value = repr(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f"{name}{sorted(ctx.items())}"] = value
    out["title validator saw"] = sorted(seen_rules)
    return out


def configure(client: Any) -> None:
    client.track_contexts(user=["alice", "bob", "carol"], theme=heksher.TRACK_ALL)
    client.set_defaults(user=user, theme="light")


def run_thread() -> dict[str, Any]:
    client = heksher.ThreadHeksherClient(URL, 60, ["user", "theme", "environment"])
    configure(client)
    client.set_as_main()
    assert heksher.main_client.Main is client
    settings["late"] = heksher.Setting("compat_late", str, FEATURES, "late-default")
    client.reload()
    try:
        return snapshot()
    finally:
        client.close()


async def run_async() -> dict[str, Any]:
    client = heksher.AsyncHeksherClient(URL, 60, ["user", "theme", "environment"])
    configure(client)
    await client.set_as_main()
    assert heksher.main_client.Main is client
    settings["late"] = heksher.Setting("compat_late", str, FEATURES, "late-default")
    await client.reload()
    try:
        return snapshot()
    finally:
        await client.aclose()


print(json.dumps(run_thread() if KIND == "thread" else asyncio.run(run_async()), sort_keys=True))
