"""The function that answers a context a setting's cache does not know yet: generated per setting.

``Setting.get()`` answers a repeated context from its cache; a new context
goes through the setting's *miss* function, made here each time the
setting's rules or the client's defaults change. A generic version would
loop over the features, the client's defaults and the rule patterns on
every call; this one is generated with those loops unrolled, so that a call
is a few dict probes on local names: for each feature, read the caller's
value, else the client's default, warn about an untracked value; then probe
the patterns, best first, with keys built from those locals.

Only names made here (``v0``, ``F0``, ``T0``...) appear in the generated
source: feature names, values and tables are bound as closure variables,
never written into the text, so nothing from the service or the caller can
change the code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any

from heksher_shm._model.contexts import TRACK_ALL
from heksher_shm._model.resolve import NO_MATCH, CompiledRules

__all__ = ["compile_miss"]

Miss = Callable[[dict[str, str]], Any]


def compile_miss(
    name: str,
    features: frozenset[str],
    const: Mapping[str, str],
    variables: Mapping[str, ContextVar[str]],
    tracked: Mapping[str, str | set[str]] | None,
    warn: Callable[[str, str], None] | None,
    rules: CompiledRules | None,
    fallback: Any,
) -> Miss:
    """Make the miss function of setting *name*: its value for a context the cache does not hold.

    Args:
        name: the setting's name, for error messages.
        features: the setting's configurable features; any other keyword raises :class:`ValueError`.
        const: the client's plain defaults (``set_defaults(theme="light")``).
        variables: the client's ``ContextVar`` defaults; a plain default of the same feature wins.
        tracked: tracked values per feature (``TRACK_ALL`` or a set); ``None``: warn about nothing.
        warn: called with (feature, value) for a value the caller passed that is not tracked.
        rules: the compiled rules; ``None`` before any were received (the fallback is then returned
            for any context and no feature is required).
        fallback: the value when no rule matches.
    """

    def check_keys(contexts: dict[str, str]) -> None:
        redundant = sorted(contexts.keys() - features)
        raise ValueError(f"the following keys are not configurable for {name}: {redundant}")

    if rules is None:

        def no_rules(contexts: dict[str, str]) -> Any:
            if not contexts.keys() <= features:
                check_keys(contexts)
            return fallback

        return no_rules

    order = rules.features  # every feature a rule may condition on, in the service's order
    # Features outside `order` are read only to warn about untracked values.
    extra = sorted(features.difference(order))

    def missing(values: tuple[str | None, ...]) -> RuntimeError:
        feature = min(f for f, v in zip(order, values, strict=True) if v is None)
        return RuntimeError(
            f"configurable context feature {feature} of {name} is missing from both "
            "the arguments and the client's defaults"
        )

    bound: dict[str, Any] = {
        "features": features,
        "check_keys": check_keys,
        "missing": missing,
        "warn": warn,
        "NO_MATCH": NO_MATCH,
        "otherwise": rules.catch_all if rules.catch_all is not NO_MATCH else fallback,
    }
    body = ["if not contexts.keys() <= features:", "    check_keys(contexts)"]
    required: list[str] = []
    for i, feature in enumerate([*order, *extra]):
        local, used = f"v{i}", i < len(order)
        bound[f"F{i}"] = feature
        body.append(f"{local} = contexts.get(F{i})")
        values = tracked.get(feature) if tracked is not None and warn is not None else TRACK_ALL
        if values is not TRACK_ALL:
            # An untracked feature (values None) warns about any value; a tracked one about the others.
            check = "" if values is None else f" and {local} not in W{i}"
            bound[f"W{i}"] = values
            body.append(f"if {local} is not None{check}:")
            body.append(f"    warn(F{i}, {local})")
        if not used:
            continue
        if feature in const:
            bound[f"C{i}"] = const[feature]
            body += [f"if {local} is None:", f"    {local} = C{i}"]
        elif feature in variables:
            bound[f"V{i}"] = variables[feature]
            body += [
                f"if {local} is None:",
                "    try:",
                f"        {local} = V{i}.get()  # the variable's own default counts",
                "    except LookupError:",
                "        pass",
            ]
        required.append(local)
    if required:
        locals_ = ", ".join(f"v{i}" for i in range(len(order)))
        body.append(f"if {' or '.join(f'{v} is None' for v in required)}:")
        body.append(f"    raise missing(({locals_},))")
    for j, (indices, table) in enumerate(rules.patterns):
        bound[f"T{j}"] = table
        key = f"v{indices[0]}" if len(indices) == 1 else f"({', '.join(f'v{i}' for i in indices)})"
        body += [f"value = T{j}.get({key}, NO_MATCH)", "if value is not NO_MATCH:", "    return value"]
    body.append("return otherwise")
    return _build(bound, body)


def _build(bound: dict[str, Any], body: list[str]) -> Miss:
    """Make ``def miss(contexts): <body>`` with *bound*'s names bound to its values."""
    source = "\n".join(
        [
            f"def factory({', '.join(bound)}):",
            "    def miss(contexts):",
            *(f"        {line}" for line in body),
            "    return miss",
        ]
    )
    miss: Miss = _factory(source)(**bound)
    return miss


@functools.lru_cache(maxsize=512)
def _factory(source: str) -> Callable[..., Miss]:
    """Compile *source* once per shape: settings alike in features, defaults and patterns share it."""
    namespace: dict[str, Any] = {}
    exec(compile(source, "<heksher_shm miss>", "exec"), namespace)  # only names made here: see above
    factory: Callable[..., Miss] = namespace["factory"]
    return factory
