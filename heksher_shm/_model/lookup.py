"""The function that answers ``Setting.get()``: generated per setting, with its cache inside.

``Setting.get()`` checks the generation word and hands the call's keyword
arguments to the setting's lookup, made here each time the setting's rules
or the client's defaults change. The lookup builds a key from the arguments
and answers from its cache; on a miss it resolves the context and stores the
answer. A generic version would loop over the features, the client's
defaults and the rule patterns on every call; this one is generated with
those loops unrolled, so that a call is a few dict and set probes on local
names. It is three functions: ``lookup`` (the key and the cache: the hit
path), ``coarse_key`` and ``resolve`` (the miss path), so that a hit copies
into its frame only the few closure variables it uses.

The key holds the number of arguments, then one element per feature in a
fixed order (the order of the keyword arguments does not matter): the
caller's value, or ``ABSENT``; then, for a feature whose default is a
context variable, the variable's value.

The lookup starts *exact*: the key holds those values as they are. When the
cache fills up (``limit`` answers since the lookup was made), it is emptied
and the lookup turns *coarse* for good: a value that no rule conditions on,
and that the client does not warn about, is ``OTHER`` in the key (and the
variable's value counts only where the caller gave none). The answer cannot
depend on which such value it was: every rule probe misses on it alike. So a
stream of new users without rules of their own (user ids, request ids: the
common case) is answered from one cached entry, instead of a resolution and
an insertion per call. A setting whose contexts fit in its cache never
builds the value sets this takes (memory in proportion to its rules).

Why the cache answers and warns as resolving every call would:

* Two contexts with one key have the same features present, and values that
  differ only where both are ``OTHER``; completed by the client's defaults
  (constant, or in the key) they resolve alike.
* A keyword that is not a feature raises :class:`ValueError` and is never
  cached. A cached context had only features, one per element that is not
  ``ABSENT``; another context with those elements and as many arguments has
  no room for another keyword.
* A value the client warns about (untracked) stays itself in the key, so a
  hit on it follows the miss that warned about it; a hit does not warn
  again, as before (and the client logs each feature and value once).
* An unhashable value raises :class:`TypeError` before anything is warned
  about, as ``get()`` always has.

Only names made here (``v0``, ``F0``, ``T0``...) appear in the generated
source: feature names, values and tables are bound as closure variables,
never written into the text, so nothing from the service or the caller can
change the code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any, Final, NamedTuple

from heksher_shm._model.contexts import TRACK_ALL
from heksher_shm._model.resolve import NO_MATCH, CompiledRules

__all__ = ["Lookup", "compile_lookup"]

Lookup = Callable[[dict[str, str]], Any]


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


ABSENT: Final = _Marker("ABSENT")
"""In a key: the caller left the feature out (or the context variable is unset)."""
OTHER: Final = _Marker("OTHER")
"""In a coarse key: a value no rule conditions on, that the client does not warn about."""

# How a present value goes into a coarse key (an exact key always holds the value itself):
_KEEP = "keep"  # no warnings for the feature: OTHER unless a rule conditions on the value
_TRACKED = "tracked"  # a tracked set: OTHER if tracked and no rule conditions on it, else itself
_RAW = "raw"  # an untracked feature (every value is warned about): always itself


def compile_lookup(
    name: str,
    features: frozenset[str],
    const: Mapping[str, str],
    variables: Mapping[str, ContextVar[str]],
    tracked: Mapping[str, str | set[str]] | None,
    warn: Callable[[str, str], None] | None,
    rules: CompiledRules | None,
    fallback: Any,
    cache: dict[Any, Any],
    limit: int,
) -> Lookup:
    """Make the lookup of setting *name*: its value for the context passed to ``get()``.

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
        cache: where answers are kept (the lookup's own: its keys mean nothing elsewhere).
        limit: the cache is emptied when it holds this many answers.
    """
    if rules is None:

        def no_rules(contexts: dict[str, str]) -> Any:
            hash(tuple(contexts.values()))  # an unhashable value is a TypeError, as with rules
            if not contexts.keys() <= features:
                _check_keys(name, features, contexts)
            return fallback

        return no_rules

    # Features no rule conditions on come last: read only to warn about untracked values.
    every = [*rules.features, *sorted(features.difference(rules.features))]
    used = len(rules.features)
    bound: dict[str, Any] = {
        "name": name,
        "features": features,
        "order": rules.features,
        "warn": warn,
        "cache": cache,
        "limit": limit,
        "condition_values": rules.condition_values,
        "otherwise": rules.catch_all if rules.catch_all is not NO_MATCH else fallback,
    }
    kinds = []
    for i, feature in enumerate(every):
        bound[f"F{i}"] = feature
        values = tracked.get(feature) if tracked is not None and warn is not None else TRACK_ALL
        if values is TRACK_ALL:
            kinds.append(_KEEP)
        elif values is None:  # not tracked at all: every value is warned about
            kinds.append(_RAW)
        else:
            bound[f"W{i}"] = values  # the values that are not warned about
            kinds.append(_TRACKED)
    plain = tuple(i for i in range(used) if every[i] in const)
    # features whose default is a ContextVar (a plain default of the same feature wins)
    from_variables = tuple(i for i in range(used) if every[i] not in const and every[i] in variables)
    bound.update({f"C{i}": const[every[i]] for i in plain})
    bound.update({f"V{i}": variables[every[i]] for i in from_variables})
    bound.update({f"T{j}": table for j, (_, table) in enumerate(rules.patterns)})
    shape = _Shape(used, tuple(kinds), plain, from_variables, tuple(indices for indices, _ in rules.patterns))
    lookup: Lookup = _factory(shape)(**bound)
    return lookup


def _check_keys(name: str, features: frozenset[str], contexts: dict[str, str]) -> None:
    """Raise for the keywords of *contexts* that are not features of setting *name*."""
    # An unhashable value is a TypeError whatever else is wrong, as it always was.
    hash(tuple(contexts.values()))
    redundant = sorted(contexts.keys() - features)
    raise ValueError(f"the following keys are not configurable for {name}: {redundant}")


def _missing(name: str, order: tuple[str, ...], values: tuple[str | None, ...]) -> RuntimeError:
    """The error for the first feature of *order* with no value (None in *values*)."""
    feature = min(f for f, v in zip(order, values, strict=True) if v is None)
    return RuntimeError(
        f"configurable context feature {feature} of {name} is missing from both "
        "the arguments and the client's defaults"
    )


class _Shape(NamedTuple):
    """What the generated code of a lookup depends on: lookups of one shape share it."""

    used: int
    """How many features rules condition on (the first ones)."""
    kinds: tuple[str, ...]
    """For each feature, how its value goes into a coarse key (and whether it is warned about)."""
    plain: tuple[int, ...]
    """The features with a plain default (``C``)."""
    from_variables: tuple[int, ...]
    """The features with a ContextVar default (``V``) and no plain one."""
    patterns: tuple[tuple[int, ...], ...]
    """For each rule table (``T``), best first, the features it is keyed by."""

    def source(self) -> str:
        """The module that defines ``factory(<names>)``, which returns a new lookup.

        ``lookup(contexts)`` runs :meth:`hot`, which calls ``coarse_key(contexts)`` (None until
        the lookup turns coarse, then made by ``make_coarse_key``, one function per shape) and
        ``resolve(contexts, key)`` (:meth:`miss`). The markers and the error helpers are globals:
        a lookup holds only what is its own.
        """
        n = len(self.kinds)
        names = ["name", "features", "order", "warn", "cache", "limit", "condition_values", "otherwise"]
        names += [f"F{i}" for i in range(n)]
        names += [f"W{i}" for i, kind in enumerate(self.kinds) if kind == _TRACKED]
        names += [f"C{i}" for i in self.plain] + [f"V{i}" for i in self.from_variables]
        names += [f"T{j}" for j in range(len(self.patterns))]
        sets = [f"S{i}" for i, kind in enumerate(self.kinds) if kind != _RAW]
        sets += [f"S{n + i}" for i in self.from_variables]
        shared = [*(f"F{i}" for i in range(n)), *(f"V{i}" for i in self.from_variables)]
        return "\n".join(
            [
                f"def make_coarse_key({', '.join([*shared, *sets])}):",
                "    def coarse_key(contexts):",
                *(f"        {line}" for line in self.coarse()),
                "    return coarse_key",
                f"def factory({', '.join(names)}):",
                "    coarse_key = None",
                "    def lookup(contexts):",
                *(f"        {line}" for line in self.hot()),
                "    def resolve(contexts, key):",
                "        nonlocal coarse_key",
                *(f"        {line}" for line in self.miss(shared)),
                "    return lookup",
            ]
        )

    def hot(self) -> list[str]:
        """``lookup``: the key and the cache. Each name it uses is copied into every call's frame."""
        exact = [f"contexts[F{i}] if F{i} in contexts else ABSENT" for i in range(len(self.kinds))]
        exact += [f"V{i}.get(ABSENT)" for i in self.from_variables]
        return [
            "if coarse_key is None:",
            f"    key = (len(contexts), {', '.join(exact)})",
            "else:",
            "    key = coarse_key(contexts)",
            "value = cache.get(key, ABSENT)",
            "if value is not ABSENT:",
            "    return value",
            "return resolve(contexts, key)",
        ]

    def coarse(self) -> list[str]:
        """``coarse_key``: OTHER for the values that rules and warnings cannot tell apart."""
        source = _Source()
        for i, kind in enumerate(self.kinds):
            source.add(f"if F{i} in contexts:", 1, f"v{i} = contexts[F{i}]")
            if kind == _KEEP:
                source.add(f"k{i} = v{i} if v{i} in S{i} else OTHER")
            elif kind == _TRACKED:
                source.add(f"k{i} = OTHER if v{i} in S{i} else v{i}")
            else:
                source.add(f"k{i} = v{i}")
            source.add(-1, "else:", 1, f"v{i} = None", f"k{i} = ABSENT", -1)
        for i in self.from_variables:
            # The variable counts only where the caller gave no value.
            source.add(f"d{i} = V{i}.get(ABSENT) if v{i} is None else ABSENT")
            source.add(f"if d{i} not in S{len(self.kinds) + i}:", 1, f"d{i} = OTHER", -1)
        keyed = [*(f"k{i}" for i in range(len(self.kinds))), *(f"d{i}" for i in self.from_variables)]
        source.add(f"return (len(contexts), {', '.join(keyed)})")
        return source.lines

    def coarse_sets(self) -> list[str]:
        """Expressions of the sets the coarse key tests values against (``C``: the values rules
        condition each feature on)."""
        sets = []
        for i, kind in enumerate(self.kinds):
            ruled = f"C[{i}]" if i < self.used else "frozenset()"
            if kind == _KEEP:  # the values that stay themselves
                sets.append(f"{ruled} | {{None}}")
            elif kind == _TRACKED:  # the values that become OTHER
                sets.append(f"frozenset(W{i}) - {ruled} - {{None}}")
        # a variable's value stays itself if a rule names it (ABSENT: unset, its own default counts)
        return sets + [f"C[{i}] | {{ABSENT, None}}" for i in self.from_variables]

    def miss(self, shared: list[str]) -> list[str]:
        """``resolve``: check, warn, complete from the defaults, resolve, remember."""
        n, used = len(self.kinds), self.used
        source = _Source()
        source.add("if not contexts.keys() <= features:", 1, "check_keys(name, features, contexts)", -1)
        source.add(*(f"v{i} = contexts.get(F{i})" for i in range(n)))
        for i, kind in enumerate(self.kinds):
            # An untracked feature warns about any value; a tracked one about the others.
            if kind != _KEEP:
                check = "" if kind == _RAW else f" and v{i} not in W{i}"
                source.add(f"if v{i} is not None{check}:", 1, f"warn(F{i}, v{i})", -1)
        for i in range(used):
            if i in self.plain:
                source.add(f"if v{i} is None:", 1, f"v{i} = C{i}", -1)
            elif i in self.from_variables:
                source.add(f"if v{i} is None:", 1, "try:", 1, f"v{i} = V{i}.get()  # its own default counts")
                source.add(-1, "except LookupError:", 1, "pass", -2)
        if used:
            absent = " or ".join(f"v{i} is None" for i in range(used))
            source.add(
                f"if {absent}:",
                1,
                f"raise missing(name, order, ({', '.join(f'v{i}' for i in range(used))},))",
                -1,
            )
        if not self.patterns:
            source.add("value = NO_MATCH")
        for j, indices in enumerate(self.patterns):
            values = f"v{indices[0]}" if len(indices) == 1 else f"({', '.join(f'v{i}' for i in indices)})"
            probe = f"value = T{j}.get({values}, NO_MATCH)"
            # Flat, not nested: a setting may have many patterns, and Python limits indentation.
            source.add(probe if j == 0 else f"if value is NO_MATCH:\n    {probe}")
        source.add("if value is NO_MATCH:", 1, "value = otherwise", -1)
        source.add("if len(cache) >= limit:", 1, "cache.clear()", "if coarse_key is None:", 1)
        # The sets are built only now: a setting whose contexts fit in its cache never pays for them.
        source.add("C = condition_values()")
        source.add(f"coarse_key = make_coarse_key({', '.join([*shared, *self.coarse_sets()])})", -2)
        source.add("cache[key] = value", "return value")
        return source.lines


class _Source:
    """Lines of a generated function's body; a number passed to :meth:`add` moves the indentation."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.indent = 0

    def add(self, *parts: str | int) -> None:
        for part in parts:
            if isinstance(part, int):
                self.indent += part
            else:
                self.lines += ["    " * self.indent + line for line in part.split("\n")]


@functools.lru_cache(maxsize=512)
def _factory(shape: _Shape) -> Callable[..., Lookup]:
    """Generate and compile the code of *shape* once: settings alike in shape share it."""
    namespace: dict[str, Any] = {
        "ABSENT": ABSENT,
        "OTHER": OTHER,
        "NO_MATCH": NO_MATCH,
        "check_keys": _check_keys,
        "missing": _missing,
    }
    exec(compile(shape.source(), "<heksher_shm lookup>", "exec"), namespace)  # only names made here
    factory: Callable[..., Lookup] = namespace["factory"]
    return factory
