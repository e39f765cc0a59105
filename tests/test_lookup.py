"""The generated lookup (``heksher_shm._model.lookup``) against a reference written plainly.

The reference does what the docs say ``get()`` does with a context: refuse
keys that are not configurable, warn about values the client does not track,
complete the context from the client's defaults (a plain default before a
``ContextVar``), require every feature once rules exist, then resolve with
:meth:`CompiledRules.resolve` (itself checked against the service's tree walk
in ``test_resolve.py``).

The lookup keeps a cache, so it is checked twice: with a cache that keeps
nothing (every call resolves, and warns exactly as the reference does), and
with a real one over sequences of calls that repeat, clear the cache and turn
its keys coarse, against a reference that warns once per feature and value
(as the client does).
"""

from __future__ import annotations

import itertools
import random
import sys
import threading
from contextvars import Context, ContextVar, copy_context
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from heksher_shm._model.contexts import TRACK_ALL
from heksher_shm._model.lookup import compile_lookup
from heksher_shm._model.resolve import NO_MATCH, CompiledRules, compile_rules

FEATURES = ("a", "b", "c")
VALUES = ("x", "y", "z")
OTHERS = ("p", "q")  # values no rule conditions on
LEFT_OUT = object()  # a feature not passed at all
FALLBACK = "fallback"


def own_default_too(var: ContextVar[str]) -> str | None:
    """The variable's value; unset, its own default if it was made with one."""
    try:
        return var.get()
    except LookupError:
        return None


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
        if v is not None
        and tracked is not None
        and tracked.get(f) is not TRACK_ALL
        and v not in (tracked.get(f) or ())
    ]
    namespace = {f: v for f, v in contexts.items() if v is not None}  # None: not given
    for f in features - namespace.keys():
        if f in const:
            namespace[f] = const[f]
        elif f in variables and (value := own_default_too(variables[f])) is not None:
            namespace[f] = value
    absent = sorted(set(rules.features) - namespace.keys())
    if absent:
        return RuntimeError(absent[0]), warnings
    found = rules.resolve(namespace)  # the catch-all rule, if any, when no pattern matches
    return FALLBACK if found is NO_MATCH else found, warnings


class KeepsNothing(dict[Any, Any]):
    """A cache that never holds an answer: every call resolves."""

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


def outcome(lookup: Any, contexts: dict[str, str]) -> Any:
    try:
        return lookup(dict(contexts))
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
    st.sampled_from((*FEATURES, "unknown")), st.sampled_from(VALUES + OTHERS), max_size=4
)
defaults = st.dictionaries(
    st.sampled_from(FEATURES),
    st.sampled_from(("const", "var", "unset var", "var with own default")),
    max_size=3,
)
tracking = st.none() | st.dictionaries(
    st.sampled_from(FEATURES), st.just(TRACK_ALL) | st.sets(st.sampled_from(VALUES + OTHERS)), max_size=3
)
variable_values = st.dictionaries(st.sampled_from(FEATURES), st.sampled_from((None, *VALUES, *OTHERS)))
"""Per call: the value each context variable is set to (None: left unset)."""


def make_variables(kinds: dict[str, str]) -> dict[str, ContextVar[str]]:
    variables: dict[str, ContextVar[str]] = {}
    for f, kind in kinds.items():
        if kind == "var with own default":
            variables[f] = ContextVar(f"test_{f}", default="y")
        elif kind != "const":
            variables[f] = ContextVar(f"test_{f}")
            if kind == "var":
                variables[f].set("z")
    return variables


def compile_case(
    rules: dict[Any, Any] | None, configurable: list[str], kinds: dict[str, str]
) -> tuple[frozenset[str], CompiledRules | None, dict[str, str], dict[str, ContextVar[str]]]:
    features = frozenset(configurable)
    compiled = None
    if rules is not None:
        usable = {tuple(sorted(c)): v for c, v in rules.items() if {f for f, _ in c} <= features}
        compiled = compile_rules([f for f in FEATURES if f in features], usable.items())
    const = {f: "y" for f, kind in kinds.items() if kind == "const"}
    return features, compiled, const, make_variables(kinds)


CASES = (
    st.none() | rule_sets,
    st.lists(st.sampled_from(FEATURES), unique=True, min_size=1),
    defaults,
    tracking,
)
"""A case's rules, configurable features, client defaults and tracked values (see :func:`compile_case`)."""


@settings(max_examples=500, deadline=None)
@given(
    *CASES,
    st.lists(partial_contexts, min_size=1, max_size=8),
    st.sampled_from((0, 1000)),
)
def test_every_call_resolved_matches_reference(
    rules: dict[Any, Any] | None,
    configurable: list[str],
    kinds: dict[str, str],
    tracked: dict[str, Any] | None,
    calls: list[dict[str, str]],
    limit: int,
) -> None:
    """With a cache that keeps nothing, each call answers and warns as the reference does (limit 0: the
    lookup turns coarse at its first call)."""
    features, compiled, const, variables = compile_case(rules, configurable, kinds)
    warned: list[tuple[str, str]] = []
    lookup = compile_lookup(
        "s", features, const, variables, tracked, lambda f, v: warned.append((f, v)), compiled, FALLBACK,
        KeepsNothing(), limit,
    )  # fmt: skip
    for contexts in calls:
        warned.clear()
        expected, warnings = reference(features, const, variables, tracked, compiled, contexts)
        got = outcome(lookup, contexts)
        assert same(got, expected), (contexts, got, expected)
        if not isinstance(expected, ValueError):
            assert sorted(warned) == warnings, contexts


@settings(max_examples=500, deadline=None)
@given(
    *CASES,
    st.lists(st.tuples(partial_contexts, variable_values), min_size=1, max_size=30),
    st.sampled_from((1, 2, 3, 5, 4096)),
)
def test_cached_calls_match_reference(
    rules: dict[Any, Any] | None,
    configurable: list[str],
    kinds: dict[str, str],
    tracked: dict[str, Any] | None,
    calls: list[tuple[dict[str, str], dict[str, str | None]]],
    limit: int,
) -> None:
    """Through the cache (cleared, turning coarse, as the limit says), every call answers as the
    reference; after every call, the values warned about so far are those the reference warned about."""
    features, compiled, const, variables = compile_case(rules, configurable, kinds)
    warned: set[tuple[str, str]] = set()
    expected_warned: set[tuple[str, str]] = set()
    cache: dict[Any, Any] = {}
    lookup = compile_lookup(
        "s", features, const, variables, tracked, lambda f, v: warned.add((f, v)), compiled, FALLBACK,
        cache, limit,
    )  # fmt: skip
    for contexts, settings_ in calls:

        def call(contexts: dict[str, str] = contexts, settings_: dict[str, str | None] = settings_) -> Any:
            for f, value in settings_.items():
                if f in variables and value is not None:
                    variables[f].set(value)
            expected, warnings = reference(features, const, variables, tracked, compiled, contexts)
            return expected, warnings, outcome(lookup, contexts)

        expected, warnings, got = Context().run(call)
        assert same(got, expected), (contexts, settings_, got, expected)
        assert len(cache) <= limit
        if not isinstance(expected, ValueError):
            expected_warned.update(warnings)
        assert warned == expected_warned, (contexts, settings_)


PAIR_SETUPS = [
    # (tracked, plain defaults, which feature defaults to a ContextVar and how)
    ({"a": {"x", "p"}, "b": TRACK_ALL}, {}, ("b", "own default")),
    ({"a": TRACK_ALL, "b": {"p"}, "c": TRACK_ALL}, {"c": "y"}, ("a", "no default")),
    ({"b": TRACK_ALL}, {"a": "x"}, ("c", "own default")),  # a and c untracked: every value warned about
    (None, {}, ("b", "no default")),
]
PAIR_RULES = {(("a", "x"),): 1, (("a", "x"), ("b", "y")): 2, (("b", "y"),): 3, (("b", "x"), ("c", "y")): 4}
PAIR_VALUES = (None, "x", "y", "p", "q")


@pytest.mark.parametrize("setup", PAIR_SETUPS)
def test_one_key_one_answer(setup: Any) -> None:
    """Every context over features a, b, c (each left out or one of PAIR_VALUES) with the variable
    unset or set: the key each is cached under, exact or coarse, never stands for two answers, nor for
    two sets of warnings (a hit does not warn)."""
    tracked, const, (var_feature, var_kind) = setup
    features = frozenset(FEATURES)
    compiled = compile_rules(FEATURES, PAIR_RULES.items())
    var: ContextVar[str] = (
        ContextVar("pair", default="y") if var_kind == "own default" else ContextVar("pair")
    )
    variables = {var_feature: var}
    every_context = [
        {f: v for f, v in zip(FEATURES, combo, strict=True) if v is not LEFT_OUT}
        for combo in itertools.product(*([LEFT_OUT, *PAIR_VALUES] for _ in FEATURES))
    ]
    answers: dict[Any, tuple[Any, list[tuple[str, str]], Any]] = {}
    for contexts, setting in itertools.product(every_context, (None, "x", "p")):
        for limit in (4096, 0):  # limit 0: the first answer turns the lookup coarse, the second is kept
            cache: dict[Any, Any] = {}
            lookup = compile_lookup(
                "s", features, const, variables, tracked, lambda f, v: None, compiled, FALLBACK, cache, limit
            )
            calls = 1 if limit else 2

            def call(contexts: dict[str, Any] = contexts, setting: str | None = setting, lookup: Any = lookup,
                     calls: int = calls) -> Any:  # fmt: skip
                if setting is not None:
                    var.set(setting)
                expected, warnings = reference(features, const, variables, tracked, compiled, contexts)
                return expected, warnings, [outcome(lookup, contexts) for _ in range(calls)][-1]

            expected, warnings, got = Context().run(call)
            assert same(got, expected), (contexts, setting, got, expected)
            if isinstance(expected, Exception):
                assert not cache
                continue
            (key,) = cache
            seen = answers.setdefault(key, (expected, warnings, (contexts, setting)))
            assert seen[:2] == (expected, warnings), (key, seen, contexts, setting)
    assert len(answers) < len(every_context) * 3  # some contexts did share a coarse key


def test_a_keyword_that_is_not_a_feature_never_hits_the_cache() -> None:
    """The key counts the arguments: ``a="x"`` is cached, ``a="x", c="x"`` still raises."""
    compiled = compile_rules(["a", "b"], [((("a", "x"),), 1)])
    for limit in (4096, 0):  # exact, then coarse keys
        lookup = compile_lookup("s", frozenset("ab"), {"b": "y"}, {}, None, None, compiled, 0, {}, limit)
        for _ in range(2):
            assert lookup({"a": "x"}) == 1
            assert lookup({"a": "x", "b": None}) == 1
            assert lookup({"b": None, "a": "x"}) == 1
            with pytest.raises(ValueError, match=r"not configurable for s: \['c'\]"):
                lookup({"a": "x", "c": "x"})
            with pytest.raises(ValueError, match=r"not configurable for s: \['c'\]"):
                lookup({"a": "x", "c": None})
        with pytest.raises(TypeError, match="unhashable"):  # as before: whatever else is wrong
            lookup({"a": "x", "c": ["x"]})
        with pytest.raises(TypeError, match="unhashable"):
            lookup({"a": ["x"]})


def test_before_any_rules() -> None:
    """The fallback for any context of features; the same errors for the rest."""
    lookup = compile_lookup("s", frozenset("ab"), {}, {}, None, None, None, "d", {}, 4096)
    assert lookup({}) == lookup({"a": "x"}) == lookup({"a": "x", "b": None}) == "d"
    with pytest.raises(ValueError, match=r"not configurable for s: \['c'\]"):
        lookup({"a": "x", "c": "x"})
    with pytest.raises(TypeError, match="unhashable"):
        lookup({"a": ["x"]})


def test_new_values_without_rules_share_one_coarse_entry() -> None:
    """Once the cache has filled up, new values no rule names stop filling it; values rules name, and
    values the client warns about, keep entries of their own."""
    compiled = compile_rules(["user", "theme"], [((("user", "alice"),), 1), ((("theme", "dark"),), 2)])
    cache: dict[Any, Any] = {}
    warned: list[tuple[str, str]] = []
    tracked = {"user": TRACK_ALL, "theme": {"dark", "light"}}
    lookup = compile_lookup(
        "s", frozenset(["user", "theme"]), {"theme": "light"}, {}, tracked,
        lambda f, v: warned.append((f, v)), compiled, 0, cache, 8,
    )  # fmt: skip
    assert [lookup({"user": f"u{k}"}) for k in range(8)] == [0] * 8
    assert len(cache) == 8  # exact: one entry per user
    assert lookup({"user": "u8"}) == 0  # full: emptied, and coarse from now on
    assert len(cache) == 1
    assert [lookup({"user": f"n{k}"}) for k in range(100)] == [0] * 100
    assert len(cache) == 2  # one entry for every user without rules
    assert lookup({"user": "alice"}) == 1
    assert lookup({"user": "n1", "theme": "dark"}) == 2
    assert lookup({"user": "n2", "theme": "blue"}) == 0
    assert lookup({"user": "n3", "theme": "blue"}) == 0
    assert warned == [("theme", "blue")]
    assert len(cache) == 5


def test_threads_share_a_lookup_while_it_turns_coarse() -> None:
    """Threads that call one lookup while its cache clears and it turns coarse get the right answers
    (the switch is one assignment; an exact key stored after it is still right)."""
    compiled = compile_rules(FEATURES, PAIR_RULES.items())
    tracked = {"a": {"x", "p"}, "b": TRACK_ALL, "c": TRACK_ALL}
    users = [{"a": a, "b": b} for a in ("x", "p", "q") for b in ("x", "y", *(f"n{k}" for k in range(40)))]
    expected = [reference(frozenset(FEATURES), {"c": "y"}, {}, tracked, compiled, c)[0] for c in users]
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter lets them
    try:
        for _ in range(20):
            lookup = compile_lookup(
                "s",
                frozenset(FEATURES),
                {"c": "y"},
                {},
                tracked,
                lambda f, v: None,
                compiled,
                FALLBACK,
                {},
                16,
            )
            start = threading.Barrier(4)
            wrong: list[Any] = []

            def hammer(
                seed: int, lookup: Any = lookup, start: threading.Barrier = start, wrong: list[Any] = wrong
            ) -> None:
                order = random.Random(seed).choices(range(len(users)), k=3000)
                start.wait()
                wrong.extend((users[i], got) for i in order if (got := lookup(users[i])) != expected[i])

            threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert not wrong
    finally:
        sys.setswitchinterval(previous)


def test_many_patterns() -> None:
    """Every pattern over eight features (255 of them): the generated probes stay flat."""
    features = [f"f{i}" for i in range(8)]
    rules = []
    for mask in range(1, 256):
        conditions = tuple((features[i], "x") for i in range(8) if mask >> i & 1)
        rules.append((conditions, mask))
    compiled = compile_rules(features, rules)
    lookup = compile_lookup("s", frozenset(features), {}, {}, None, None, compiled, 0, {}, 4096)
    for mask in range(1, 256):
        contexts = {f: ("x" if mask >> i & 1 else "o") for i, f in enumerate(features)}
        assert lookup(contexts) == compiled.resolve(contexts) == mask


def test_generated_source_holds_no_outside_text() -> None:
    """Feature names and values are bound, not written into the code: a hostile name stays a name."""
    hostile = "a'); import os; os._exit(3); ('"
    compiled = compile_rules([hostile], [(((hostile, "v"),), 1)])
    lookup = compile_lookup("s", frozenset([hostile]), {}, {}, {hostile: {"w"}}, None, compiled, 0, {}, 4096)
    assert lookup({hostile: "v"}) == 1
    assert lookup({hostile: "other"}) == 0


def test_contextvar_default_is_read_per_call() -> None:
    var: ContextVar[str] = ContextVar("theme_for_test")
    compiled = compile_rules(["theme"], [((("theme", "dark"),), 1)])
    for limit in (4096, 0):
        lookup = compile_lookup(
            "s", frozenset(["theme"]), {}, {"theme": var}, None, None, compiled, 0, {}, limit
        )
        with pytest.raises(RuntimeError, match="feature theme of s is missing"):
            lookup({})

        def in_dark(lookup: Any = lookup) -> Any:
            var.set("dark")
            return lookup({})

        assert copy_context().run(in_dark) == 1
        assert lookup({"theme": "light"}) == 0
        with pytest.raises(RuntimeError, match="feature theme of s is missing"):
            lookup({})
