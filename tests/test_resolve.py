"""Compiled resolution against a reference: the service's documented tree walk, written plainly."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from heksher_shm._model.resolve import NO_MATCH, compile_rules

FEATURES = ("a", "b", "c", "d")
VALUES = ("x", "y", "z")


def reference(
    features: tuple[str, ...], rules: dict[tuple[tuple[str, str], ...], Any], ctx: dict[str, str]
) -> Any:
    """Walk the features in order; at each one try the exact branch and the wildcard branch.

    The better of two matches is the one whose deepest exact condition is
    deeper; on a tie, the exact branch wins.
    """

    def walk(depth: int, chosen: tuple[tuple[str, str], ...], deepest: int) -> tuple[int, Any] | None:
        if depth == len(features):
            key = tuple(sorted(chosen))
            return (deepest, rules[key]) if key in rules else None
        feature = features[depth]
        exact = walk(depth + 1, (*chosen, (feature, ctx[feature])), depth)
        wildcard = walk(depth + 1, chosen, deepest)
        if exact and wildcard:
            return exact if exact[0] >= wildcard[0] else wildcard
        return exact or wildcard

    found = walk(0, (), -1)
    return NO_MATCH if found is None else found[1]


rule_sets = st.dictionaries(
    st.lists(st.sampled_from(FEATURES), unique=True, min_size=1).flatmap(
        lambda fs: st.tuples(*(st.tuples(st.just(f), st.sampled_from(VALUES)) for f in fs))
    ),
    st.integers(0, 1000),
    max_size=30,
)
contexts = st.fixed_dictionaries({f: st.sampled_from(VALUES) for f in FEATURES})


@settings(max_examples=400, deadline=None)
@given(rule_sets, st.lists(contexts, min_size=1, max_size=10))
def test_compiled_matches_reference(rules: dict[Any, Any], ctxs: list[dict[str, str]]) -> None:
    canonical = {tuple(sorted(conditions)): value for conditions, value in rules.items()}
    compiled = compile_rules(FEATURES, canonical.items())
    for ctx in ctxs:
        assert compiled.resolve(ctx) == reference(FEATURES, canonical, ctx)


def test_deeper_feature_wins_and_tie_prefers_earlier_exact() -> None:
    compiled = compile_rules(
        ("user", "theme", "env"),
        [
            ((("user", "alice"),), "user"),
            ((("theme", "dark"),), "theme"),
            ((("user", "alice"), ("env", "prod")), "user+env"),
            ((("theme", "dark"), ("env", "prod")), "theme+env"),
        ],
    )
    assert compiled.resolve({"user": "alice", "theme": "light", "env": "dev"}) == "user"
    assert compiled.resolve({"user": "alice", "theme": "dark", "env": "dev"}) == "theme"
    # both two-condition rules end at env: the tie goes to the one exact at the earlier feature (user)
    assert compiled.resolve({"user": "alice", "theme": "dark", "env": "prod"}) == "user+env"
    assert compiled.resolve({"user": "bob", "theme": "light", "env": "prod"}) is NO_MATCH


def test_conditions_in_any_order_and_unknown_feature() -> None:
    compiled = compile_rules(("a", "b"), [((("b", "1"), ("a", "2")), "v")])
    assert compiled.resolve({"a": "2", "b": "1"}) == "v"
    with pytest.raises(ValueError, match="zz"):
        compile_rules(("a",), [((("zz", "1"),), "v")])


def test_condition_values() -> None:
    compiled = compile_rules(
        FEATURES, [((("a", "x"),), 1), ((("a", "y"), ("c", "z")), 2), ((("c", "x"),), 3), ((), 4)]
    )
    assert compiled.condition_values() == [{"x", "y"}, set(), {"x", "z"}, set()]
