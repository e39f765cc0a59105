"""The generated miss function (``heksher_shm._model.lookup``) against a reference written plainly.

The reference does what the docs say ``get()`` does with a context: refuse
keys that are not configurable, warn about values the client does not track,
complete the context from the client's defaults (a plain default before a
``ContextVar``), require every feature once rules exist, then resolve with
:meth:`CompiledRules.resolve` (itself checked against the service's tree walk
in ``test_resolve.py``).
"""

from __future__ import annotations

from contextvars import ContextVar, copy_context
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from heksher_shm._model.contexts import TRACK_ALL
from heksher_shm._model.lookup import compile_miss
from heksher_shm._model.resolve import NO_MATCH, CompiledRules, compile_rules

FEATURES = ("a", "b", "c")
VALUES = ("x", "y", "z")
FALLBACK = "fallback"


def reference(
    features: frozenset[str],
    const: dict[str, str],
    variables: dict[str, ContextVar[str]],
    tracked: dict[str, Any] | None,
    rules: CompiledRules | None,
    contexts: dict[str, str],
) -> tuple[Any, list[tuple[str, str]]]:
    """(the value or the exception raised, the warnings issued)."""
    if not contexts.keys() <= features:
        return ValueError(sorted(contexts.keys() - features)), []
    if rules is None:
        return FALLBACK, []
    warnings = [
        (f, v)
        for f, v in sorted(contexts.items())
        if tracked is not None and tracked.get(f) is not TRACK_ALL and v not in (tracked.get(f) or ())
    ]
    namespace = dict(contexts)
    for f in features - namespace.keys():
        if f in const:
            namespace[f] = const[f]
        elif f in variables and (value := variables[f].get(None)) is not None:
            namespace[f] = value
    absent = sorted(set(rules.features) - namespace.keys())
    if absent:
        return RuntimeError(absent[0]), warnings
    found = rules.resolve(namespace)  # the catch-all rule, if any, when no pattern matches
    return FALLBACK if found is NO_MATCH else found, warnings


def outcome(miss: Any, contexts: dict[str, str]) -> Any:
    try:
        return miss(dict(contexts))
    except (ValueError, RuntimeError) as e:
        return e


def same(got: Any, expected: Any) -> bool:
    if isinstance(expected, ValueError):
        return isinstance(got, ValueError) and str(expected.args[0]) in str(got)
    if isinstance(expected, RuntimeError):
        return isinstance(got, RuntimeError) and f"feature {expected.args[0]} " in str(got)
    return bool(got == expected)


rule_sets = st.dictionaries(
    st.lists(st.sampled_from(FEATURES), unique=True, max_size=3).flatmap(
        lambda fs: st.tuples(*(st.tuples(st.just(f), st.sampled_from(VALUES)) for f in fs))
    ),
    st.integers(0, 1000),
    max_size=12,
)
partial_contexts = st.dictionaries(
    st.sampled_from((*FEATURES, "unknown")), st.sampled_from(VALUES), max_size=4
)
defaults = st.dictionaries(
    st.sampled_from(FEATURES), st.sampled_from(("const", "var", "unset var")), max_size=3
)
tracking = st.none() | st.dictionaries(
    st.sampled_from(FEATURES), st.just(TRACK_ALL) | st.sets(st.sampled_from(VALUES)), max_size=3
)


@settings(max_examples=500, deadline=None)
@given(
    st.none() | rule_sets,
    st.lists(st.sampled_from(FEATURES), unique=True, min_size=1),
    defaults,
    tracking,
    st.lists(partial_contexts, min_size=1, max_size=8),
)
def test_generated_matches_reference(
    rules: dict[Any, Any] | None,
    configurable: list[str],
    kinds: dict[str, str],
    tracked: dict[str, Any] | None,
    calls: list[dict[str, str]],
) -> None:
    features = frozenset(configurable)
    compiled = None
    if rules is not None:
        usable = {tuple(sorted(c)): v for c, v in rules.items() if {f for f, _ in c} <= features}
        compiled = compile_rules([f for f in FEATURES if f in features], usable.items())
    const = {f: "y" for f, kind in kinds.items() if kind == "const"}
    variables: dict[str, ContextVar[str]] = {}
    for f, kind in kinds.items():
        variables[f] = ContextVar(f"test_{f}")
        if kind == "var":
            variables[f].set("z")
    warned: list[tuple[str, str]] = []
    miss = compile_miss(
        "s", features, const, variables, tracked, lambda f, v: warned.append((f, v)), compiled, FALLBACK
    )
    for contexts in calls:
        warned.clear()
        expected, warnings = reference(features, const, variables, tracked, compiled, contexts)
        got = outcome(miss, contexts)
        assert same(got, expected), (contexts, got, expected)
        if not isinstance(expected, ValueError):
            assert sorted(warned) == warnings, contexts


def test_generated_source_holds_no_outside_text() -> None:
    """Feature names and values are bound, not written into the code: a hostile name stays a name."""
    hostile = "a'); import os; os._exit(3); ('"
    compiled = compile_rules([hostile], [(((hostile, "v"),), 1)])
    miss = compile_miss("s", frozenset([hostile]), {}, {}, {hostile: {"w"}}, None, compiled, 0)
    assert miss({hostile: "v"}) == 1
    assert miss({hostile: "other"}) == 0


def test_contextvar_default_is_read_per_call() -> None:
    var: ContextVar[str] = ContextVar("theme_for_test")
    compiled = compile_rules(["theme"], [((("theme", "dark"),), 1)])
    miss = compile_miss("s", frozenset(["theme"]), {}, {"theme": var}, None, None, compiled, 0)
    with pytest.raises(RuntimeError, match="feature theme of s is missing"):
        miss({})

    def in_dark() -> Any:
        var.set("dark")
        return miss({})

    assert copy_context().run(in_dark) == 1
    assert miss({"theme": "light"}) == 0
