"""One flag (a setting) as the provider resolves it, and the snapshot it is read from.

A :class:`Flag` answers contexts for one setting and keeps its answers (the
:class:`~openfeature.flag_evaluation.FlagResolutionDetails`, shared and
read-only) until what they were made from changes:

* a setting this process has (a :class:`~heksher_shm.Setting` fed by the
  client) answers through :meth:`Setting._explain <heksher_shm.Setting>`:
  ``get()``'s value, and the conditions of the rule it came from, which name
  the rule in the snapshot. Its answers last while the setting's state does
  (the object ``get()`` reads, replaced whole on every change) and no newer
  snapshot waits for it;
* a setting only another process declared is read from the snapshot: its
  blob (default and rules as raw JSON) converted with the type string its
  declaration published, and compiled like the client's own rules. Its
  answers last while the snapshot's generation and the client's defaults do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import msgspec
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import (
    FlagNotFoundError,
    GeneralError,
    InvalidContextError,
    ParseError,
    TargetingKeyMissingError,
)
from openfeature.flag_evaluation import FlagResolutionDetails, Reason

from heksher_shm._model.resolve import NO_MATCH, CompiledRules, compile_rules
from heksher_shm._model.snapshot import Head, Outcome, RuleRecord, SettingBlob, decode_blob, decode_head
from heksher_shm.exceptions import SegmentError
from heksher_shm.openfeature.kinds import JsonType, Kind, parse
from heksher_shm.setting import Setting

__all__ = [
    "CACHE_LIMIT",
    "Flag",
    "Moved",
    "RuleInfo",
    "SnapshotView",
    "details",
    "features_of",
    "foreign_flag",
    "own_flag",
    "read_view",
    "resolve_foreign",
    "resolve_own",
]

CACHE_LIMIT = 4096
"""Contexts a flag keeps answers for (as ``get()`` keeps values); emptied when full."""

_json = msgspec.json.Decoder()
_READ_ROUNDS = 20

# The outcomes whose declared type the service holds, best first; "outdated" and "mismatch" still say
# how the declaring process reads the setting (it converts with its own type, as the provider then does).
_TRUSTED = {"created": 0, "upgraded": 0, "uptodate": 0, "outdated": 1, "mismatch": 2, "rejected": 3}


def features_of(
    context: EvaluationContext | None, targeting_key: str, service_features: Sequence[str]
) -> dict[str, str]:
    """The context features an evaluation context gives: its attributes, and its targeting key as
    the feature named *targeting_key*.

    Raises:
        InvalidContextError: an attribute that is not one of the service's context features, a value
            that is not a string, or a targeting key that disagrees with the attribute it fills.
    """
    if context is None:
        return {}
    known = set(service_features)
    features: dict[str, str] = {}
    for name, value in context.attributes.items():
        if known and name not in known:
            raise InvalidContextError(
                f"{name!r} is not a context feature of the Heksher service ({list(service_features)})"
            )
        if not isinstance(value, str):
            raise InvalidContextError(
                f"context feature {name!r} must be a string, got {type(value).__name__}: {value!r}"
            )
        features[name] = value
    target = context.targeting_key
    if target:
        if known and targeting_key not in known:
            raise InvalidContextError(
                f"the targeting key fills the context feature {targeting_key!r}, which the Heksher service "
                f"does not have (it has {list(service_features)}): pass targeting_key= to HeksherProvider"
            )
        given = features.get(targeting_key)
        if given is not None and given != target:
            raise InvalidContextError(
                f"the targeting key {target!r} and the attribute {targeting_key}={given!r} disagree"
            )
        features[targeting_key] = target
    return features


@dataclass(frozen=True)
class RuleInfo:
    """A rule as flag metadata names it."""

    rule_id: int
    metadata: bytes


@dataclass
class SnapshotView:
    """One generation of the snapshot, read for the flags that need it."""

    generation: int
    head: Head | None
    entries: dict[str, int] = field(default_factory=dict)
    """Setting name -> blob index."""
    digests: dict[str, bytes] = field(default_factory=dict)
    declared: dict[str, Outcome] = field(default_factory=dict)
    """Setting name -> the outcome of its declaration that says best how it reads (see _TRUSTED)."""
    blobs: dict[str, SettingBlob] = field(default_factory=dict)
    rules: dict[str, dict[frozenset[tuple[str, str]], RuleInfo]] = field(default_factory=dict)

    def blob(self, source: Any, name: str) -> SettingBlob | None:
        """The decoded blob of setting *name*; None when the snapshot has moved on (read it again).

        Raises:
            SegmentError: the blob fails its checks.
            msgspec.DecodeError: it is not a blob.
        """
        blob = self.blobs.get(name)
        if blob is None:
            read = source.read_blobs(self.generation, [self.entries[name]])
            if read is None:
                return None
            blob = self.blobs[name] = decode_blob(read[0])
        return blob

    def rule(self, source: Any, name: str, conditions: Sequence[tuple[str, str]]) -> RuleInfo | None:
        """The rule of setting *name* with exactly these conditions, if the snapshot holds it.

        Raises:
            Moved: the snapshot moved on (read it again).
        """
        index = self.rules.get(name)
        if index is None:
            if name not in self.entries:
                return None
            try:
                blob = self.blob(source, name)
            except (SegmentError, ValueError):
                return None
            if blob is None:
                raise Moved
            index = self.rules[name] = {
                _key(r.conditions): RuleInfo(r.rule_id, r.metadata) for r in blob.rules
            }
        return index.get(_key(conditions))


def _key(conditions: Sequence[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    return frozenset((f, v) for f, v in conditions)


def read_view(source: Any) -> SnapshotView:
    """The snapshot the source holds now (generation 0, no head: nothing published).

    Raises:
        SegmentError, ValueError: the segment is damaged or holds a foreign head.
    """
    for _ in range(_READ_ROUNDS):
        generation = source.generation()
        read = source.read_head()
        if read is None:
            return SnapshotView(generation, None)
        head = decode_head(read.head)
        view = SnapshotView(read.generation, head)
        for entry in head.settings:
            view.entries[entry.name] = entry.blob
            view.digests[entry.name] = entry.digest
        ranks: dict[str, int] = {}
        for outcome in head.outcomes.values():
            rank = _TRUSTED.get(outcome.outcome or "")
            if (
                outcome.error is None
                and outcome.type
                and rank is not None
                and rank < ranks.get(outcome.name, 9)
            ):
                ranks[outcome.name] = rank
                view.declared[outcome.name] = outcome
        return view
    raise SegmentError("the snapshot kept changing while being read")


class Flag:
    """One setting's answers, and what they are valid for (see the module docstring)."""

    __slots__ = (
        "cache",
        "client",
        "contextvars",
        "default",
        "defaults",
        "generation",
        "kind",
        "name",
        "order",
        "rules",
        "setting",
        "source",
        "state",
        "type",
        "words",
    )

    def __init__(self, name: str, client: Any, kind: Kind, type_: JsonType) -> None:
        self.name = name
        self.client = client
        self.kind = kind
        self.type = type_
        self.cache: dict[Any, FlagResolutionDetails[Any]] = {}
        self.setting: Setting[Any] | None = None
        self.state: Any = None
        """The setting's state the answers were made from (see ``Setting._explain``)."""
        self.contextvars: tuple[ContextVar[str], ...] = ()
        # A foreign setting's: the source's words, the generation and defaults it was read for, its
        # default, its rules (values: _Hit) and features in the service's order.
        self.source: Any = None
        self.words: Any = (0, 0, 0)
        self.generation = -1
        self.defaults = -1
        self.default: Any = None
        self.rules: CompiledRules | None = None
        self.order: tuple[str, ...] = ()

    def remember(self, key: Any, details: FlagResolutionDetails[Any]) -> None:
        """Keep *details* as the answer for *key* (the cache is emptied when full, as ``get()``'s is)."""
        cache = self.cache
        if len(cache) >= CACHE_LIMIT:
            cache.clear()
        cache[key] = details


@dataclass(frozen=True)
class _Hit:
    """A foreign setting's rule, compiled: its id, converted value and raw metadata."""

    rule_id: int
    value: Any
    metadata: bytes


def own_flag(setting: Setting[Any], client: Any) -> Flag:
    """The flag of a setting this process has; it answers as the setting's ``get()`` does."""
    type_ = parse(setting.type.heksher_string())
    assert type_ is not None, setting.type  # the client's own types all have a type string we read
    flag = Flag(setting.name, client, type_.kind, type_)
    flag.setting = setting
    flag.state = setting._state
    flag.contextvars = _variables(client, setting.configurable_features)
    return flag


def foreign_flag(view: SnapshotView, source: Any, client: Any, name: str) -> Flag:
    """The flag of a setting only other processes declared, read from the snapshot *view*.

    Raises:
        FlagNotFoundError: the snapshot does not hold it, or holds no declaration of it that succeeded.
        GeneralError: its type string is one this version does not read.
        ParseError: the service's default does not convert to the declared type.
    """
    outcome = view.declared.get(name)
    if name not in view.entries or outcome is None or view.head is None:
        raise FlagNotFoundError(
            f"no setting {name!r} in the host's snapshot: no process declared it"
            if name not in view.entries
            else f"setting {name!r} is in the host's snapshot, but no declaration of it succeeded"
        )
    type_ = parse(outcome.type)
    if type_ is None:
        raise GeneralError(
            f"setting {name!r} has the type {outcome.type!r}, which this version does not read"
        )
    try:
        blob = view.blob(source, name)
    except (SegmentError, ValueError) as e:
        raise GeneralError(f"setting {name!r}: the host's snapshot is damaged: {e}") from None
    if blob is None:
        raise Moved
    flag = Flag(name, client, type_.kind, type_)
    flag.source = source
    flag.words = source.words
    flag.generation = view.generation
    flag.defaults = client._defaults_version
    try:
        flag.default = type_.convert(_json.decode(blob.default))
    except (TypeError, msgspec.DecodeError) as e:
        raise ParseError(
            f"setting {name!r}: the service's default does not convert to {type_.string}: {e}"
        ) from None
    position = {f: i for i, f in enumerate(view.head.context_features)}
    order = tuple(sorted(outcome.features, key=lambda f: (position.get(f, len(position)), f)))
    flag.order = order
    flag.rules = compile_rules(order, _hits(blob.rules, frozenset(order), type_))
    flag.contextvars = _variables(client, order)
    return flag


class Moved(Exception):
    """The snapshot moved on while a flag was read from it: read the new one."""


def _hits(records: Sequence[RuleRecord], features: frozenset[str], type_: JsonType) -> list[tuple[Any, _Hit]]:
    hits = []
    for record in records:
        if not {f for f, _ in record.conditions} <= features:
            continue  # as the declaring process drops it (conditions on features it does not have)
        try:
            value = type_.convert(_json.decode(record.value))
        except (TypeError, msgspec.DecodeError):
            continue  # as the declaring process rejects it
        hits.append((record.conditions, _Hit(record.rule_id, value, record.metadata)))
    return hits


def _variables(client: Any, features: Sequence[str]) -> tuple[ContextVar[str], ...]:
    view = client._context_view()
    wanted = set(features)
    return tuple(
        variable for feature, variable in view.variables if feature in wanted and feature not in view.const
    )


def resolve_own(
    flag: Flag, features: dict[str, str], targeting_key: str, view: SnapshotView | None, source: Any
) -> tuple[FlagResolutionDetails[Any], Any]:
    """Resolve a setting this process has, as its ``get()`` answers (see :func:`own_flag`); the
    details, and the setting's state they hold for."""
    setting = flag.setting
    assert setting is not None
    mine = {f: v for f, v in features.items() if f in setting.configurable_features}
    try:
        value, conditions, state = setting._explain(mine)
    except RuntimeError as e:  # a configurable feature without a value or a default
        raise _missing(e, targeting_key, setting.configurable_features, mine, flag.client) from None
    except ValueError as e:
        raise InvalidContextError(str(e)) from None
    value = setting.type.convert_to_heksher(value)
    if conditions is None:
        return details(flag.kind, value, None), state
    rule = view.rule(source, setting.name, conditions) if view is not None else None
    return details(flag.kind, value, rule or RuleInfo(-1, b"")), state


def resolve_foreign(flag: Flag, features: dict[str, str], targeting_key: str) -> FlagResolutionDetails[Any]:
    """Resolve a setting only other processes declared (see :func:`foreign_flag`)."""
    namespace = {f: v for f, v in features.items() if f in flag.order}
    view = flag.client._context_view()
    for feature in flag.order:
        if feature in namespace:
            continue
        default = view.default(feature)
        if default is not None:
            namespace[feature] = default
            continue
        message = (
            f"configurable context feature {feature} of {flag.name} is missing from both the evaluation "
            "context and the client's defaults"
        )
        if feature == targeting_key:
            raise TargetingKeyMissingError(message)
        raise InvalidContextError(message)
    assert flag.rules is not None
    hit = flag.rules.resolve(namespace)
    if hit is NO_MATCH:
        return details(flag.kind, flag.default, None)
    return details(flag.kind, hit.value, RuleInfo(hit.rule_id, hit.metadata))


def _missing(
    error: RuntimeError,
    targeting_key: str,
    configurable: Sequence[str],
    given: Mapping[str, str],
    client: Any,
) -> Exception:
    view = client._context_view()
    defaulted = set(view.const) | {f for f, _ in view.variables}
    if targeting_key in configurable and targeting_key not in given and targeting_key not in defaulted:
        return TargetingKeyMissingError(str(error))
    return InvalidContextError(str(error))


_NO_METADATA: Mapping[str, bool | int | float | str] = {}


def details(kind: Kind, value: Any, rule: RuleInfo | None) -> FlagResolutionDetails[Any]:
    """The details of an answer: the value as the flag's kind hands it out, the reason, the variant
    (``rule-<id>`` or ``default``) and the flag metadata (the rule's id and metadata)."""
    if kind is Kind.FLOAT:
        value = float(value)
    if rule is None:
        return FlagResolutionDetails(
            value, reason=Reason.DEFAULT, variant="default", flag_metadata=_NO_METADATA
        )
    metadata: dict[str, bool | int | float | str] = {}
    if rule.rule_id >= 0:
        metadata["rule_id"] = rule.rule_id
    if rule.metadata:
        try:
            decoded = _json.decode(rule.metadata)
        except msgspec.DecodeError:
            decoded = {}
        for key, item in decoded.items() if isinstance(decoded, dict) else ():
            metadata[f"rule_metadata.{key}"] = (
                item if isinstance(item, (bool, int, float, str)) else msgspec.json.encode(item).decode()
            )
    variant = f"rule-{rule.rule_id}" if rule.rule_id >= 0 else "rule"
    # Read-only: the details are kept and handed to every caller with this context.
    frozen = MappingProxyType(metadata)
    return FlagResolutionDetails(value, reason=Reason.TARGETING_MATCH, variant=variant, flag_metadata=frozen)
