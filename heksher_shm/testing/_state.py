"""The in-memory model behind :class:`~heksher_shm.testing.HeksherService`.

Everything here is pure: no sockets, no clocks, no threads other than one lock
that makes :class:`HeksherState` safe to share between the server's handler
threads and the test that drives it.  The HTTP layer (``_server.py``) turns
the results and :class:`ServiceError` exceptions into responses that look like
the ones a real Heksher 0.5.7 server sends.

Setting types
-------------
Type strings are parsed into :class:`SettingType` objects and printed back in
their normal form: ``Enum``/``Flags`` members are de-duplicated (``1`` and
``1.0`` are one member, ``1`` and ``true`` are two) and sorted by their JSON
text, so ``Enum["red", "blue"]`` is stored as ``Enum["blue","red"]``.

A value belongs to a type as follows: ``int`` takes whole JSON numbers (the
real server also accepts ``2.0``), ``float`` takes any number, ``str`` and
``bool`` take only their own JSON type (``true`` is never a number),
``Enum[...]`` takes one of its members, ``Flags[...]`` takes a list of distinct
members, ``Sequence<T>`` a list of ``T`` and ``Mapping<T>`` an object whose
values are ``T``.

Type ``A`` is a *subtype* of ``B`` when every value of ``A`` is a value of
``B``, with ``A != B``: ``int < float``; ``Enum[X] < Enum[Y]`` and
``Flags[X] < Flags[Y]`` when ``X`` is a proper subset of ``Y``;
``Sequence<A> < Sequence<B>`` and ``Mapping<A> < Mapping<B>`` when ``A < B``.
Nothing else is ordered (``Enum[true,false]`` is not a supertype of ``bool``,
``Sequence<int>`` is not a supertype of ``Flags[0,1]``).

How a declaration differs from the stored setting
--------------------------------------------------
Each difference has a level.  When a declaration upgrades a setting (its
version is higher), the differences are classified like this:

=========================  ============================================  ========  ===============
attribute                  change                                        level     reported as
=========================  ============================================  ========  ===============
``configurable_features``  only removals, no rule uses a removed one     minor     message
``configurable_features``  any addition (with or without removals)       major     stored value
``configurable_features``  a removed feature is used by some rule        mismatch  message
``type``                   narrowed to a subtype, every rule fits        minor     stored value
``type``                   widened or unrelated, every rule fits         major     stored value
``type``                   some rule's value does not fit the new type   mismatch  message
``name``                   renamed (the old name is kept as an alias)    minor     stored value
``default_value``          changed                                       minor     stored value
``metadata``               changed                                       minor     stored value
=========================  ============================================  ========  ===============

"stored value" means ``{"level", "attribute", "latest_value"}`` with the stored
setting's value, "message" means ``{"level", "message"}``.  Differences are
listed minor first, then major, then mismatch.

A minor version bump is refused (``rejected``) on any major difference, a
major bump only on a mismatch.  A declaration at the same version with any
difference is a ``mismatch``.  A declaration at a lower version is
``outdated`` and its differences describe the stored (newer) declaration:
the classification above is applied as if upgrading *from* the declaration
*to* the stored setting, without looking at rules.

Two deliberate departures from the real server: the rules are checked for
every type change (the real server skips the check when the type is
narrowed, which can leave rules whose values no longer fit), and JSON values
are compared the JSON way (``true`` differs from ``1``; Python's ``==`` would
call them equal).
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "CONTEXT_FEATURE_RE",
    "METADATA_KEY_RE",
    "SETTING_NAME_RE",
    "VERSION_RE",
    "ContainerType",
    "Declaration",
    "HeksherState",
    "OptionsType",
    "PrimitiveType",
    "RuleInfo",
    "ServiceError",
    "SettingInfo",
    "SettingType",
    "json_equal",
    "parse_setting_type",
]

SETTING_NAME_RE = re.compile(r"[a-zA-Z_0-9.]+")
"""Setting names and aliases (matched in full)."""
CONTEXT_FEATURE_RE = re.compile(r"[a-zA-Z_0-9]+")
"""Context feature names and the values rules match them against (matched in full)."""
METADATA_KEY_RE = re.compile(r"[a-zA-Z0-9_-]+")
"""Metadata keys of settings and rules (matched in full)."""
VERSION_RE = re.compile(r"[0-9]+\.[0-9]+")
"""Setting versions, ``major.minor`` (matched in full)."""

JSONValue = Any
"""A value as :func:`json.loads` returns it."""


# ---------------------------------------------------------------------------------------------------------
# JSON values


def _json_key(value: JSONValue) -> object:
    """A hashable stand-in for a JSON value, equal exactly when the JSON values are equal.

    Numbers compare by value (``1 == 1.0``), booleans are not numbers, objects ignore key order.
    """
    if value is None:
        return ("null",)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("num", value)
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, list):
        return ("list", tuple(_json_key(item) for item in value))
    if isinstance(value, dict):
        return ("object", frozenset((key, _json_key(item)) for key, item in value.items()))
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def json_equal(left: JSONValue, right: JSONValue) -> bool:
    """Whether two parsed JSON values are equal in JSON terms (``true != 1``, ``1 == 1.0``)."""
    return _json_key(left) == _json_key(right)


def _is_primitive(value: JSONValue) -> bool:
    return isinstance(value, (str, bool, int, float))


# ---------------------------------------------------------------------------------------------------------
# Setting types


class SettingType:
    """A parsed Heksher type string; ``str()`` gives its normal form."""

    def validate(self, value: JSONValue) -> bool:
        """Whether a parsed JSON value is a value of this type."""
        raise NotImplementedError

    def is_subtype_of(self, other: SettingType) -> bool:
        """Whether every value of this type is a value of ``other``, the two types being different."""
        raise NotImplementedError


@dataclass(frozen=True)
class PrimitiveType(SettingType):
    """``int``, ``float``, ``str`` or ``bool``."""

    name: Literal["int", "float", "str", "bool"]

    def validate(self, value: JSONValue) -> bool:
        """See :meth:`SettingType.validate`."""
        if self.name == "bool":
            return isinstance(value, bool)
        if self.name == "str":
            return isinstance(value, str)
        if isinstance(value, bool):
            return False
        if self.name == "float":
            return isinstance(value, (int, float))
        # the real server accepts any whole number for int, 2.0 included
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())

    def is_subtype_of(self, other: SettingType) -> bool:
        """See :meth:`SettingType.is_subtype_of`: only ``int < float``."""
        return isinstance(other, PrimitiveType) and self.name == "int" and other.name == "float"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class OptionsType(SettingType):
    """``Enum[...]`` (one of the members) or ``Flags[...]`` (a list of distinct members)."""

    kind: Literal["Enum", "Flags"]
    keys: frozenset[object]
    """The members as :func:`_json_key` keys: what equality and ordering look at."""
    members: tuple[str, ...] = field(compare=False)
    """The members' JSON texts, sorted: what ``str()`` prints."""

    @classmethod
    def of(cls, kind: Literal["Enum", "Flags"], members: Iterable[JSONValue]) -> OptionsType:
        """Build the type from its members (JSON primitives); later duplicates are dropped."""
        texts: dict[object, str] = {}
        for member in members:
            if not _is_primitive(member):
                raise ValueError(f"{kind} members must be JSON primitives, got {member!r}")
            texts.setdefault(_json_key(member), json.dumps(member))
        return cls(kind, frozenset(texts), tuple(sorted(texts.values())))

    def validate(self, value: JSONValue) -> bool:
        """See :meth:`SettingType.validate`."""
        if self.kind == "Enum":
            return _is_primitive(value) and _json_key(value) in self.keys
        if not isinstance(value, list):
            return False
        seen: set[object] = set()
        for item in value:
            if not _is_primitive(item):
                return False
            key = _json_key(item)
            if key in seen or key not in self.keys:
                return False
            seen.add(key)
        return True

    def is_subtype_of(self, other: SettingType) -> bool:
        """See :meth:`SettingType.is_subtype_of`: a proper subset of the members, same kind."""
        return isinstance(other, OptionsType) and other.kind == self.kind and self.keys < other.keys

    def __str__(self) -> str:
        return f"{self.kind}[{','.join(self.members)}]"


@dataclass(frozen=True)
class ContainerType(SettingType):
    """``Sequence<T>`` (a JSON list) or ``Mapping<T>`` (a JSON object, keys are strings)."""

    kind: Literal["Sequence", "Mapping"]
    inner: SettingType

    def validate(self, value: JSONValue) -> bool:
        """See :meth:`SettingType.validate`."""
        if self.kind == "Sequence":
            return isinstance(value, list) and all(self.inner.validate(item) for item in value)
        return isinstance(value, dict) and all(self.inner.validate(item) for item in value.values())

    def is_subtype_of(self, other: SettingType) -> bool:
        """See :meth:`SettingType.is_subtype_of`: the same container over a subtype."""
        return (
            isinstance(other, ContainerType)
            and other.kind == self.kind
            and self.inner.is_subtype_of(other.inner)
        )

    def __str__(self) -> str:
        return f"{self.kind}<{self.inner}>"


_PRIMITIVES: dict[str, PrimitiveType] = {
    "int": PrimitiveType("int"),
    "float": PrimitiveType("float"),
    "str": PrimitiveType("str"),
    "bool": PrimitiveType("bool"),
}
# the same grammar as the real server: a prefix, optional blanks, then a JSON list / an inner type
_OPTIONS_RE = re.compile(r"(?P<kind>Flags|Enum)\s*(?P<members>.*)", re.DOTALL)
_CONTAINER_RE = re.compile(r"(?P<kind>Sequence|Mapping)\s*<(?P<inner>.*)>", re.DOTALL)


def _reject_constant(name: str) -> JSONValue:
    raise ValueError(f"{name} is not valid JSON")


def parse_setting_type(text: str) -> SettingType:
    """Parse a Heksher type string; raise :class:`ValueError` when it names no type."""
    primitive = _PRIMITIVES.get(text)
    if primitive is not None:
        return primitive
    match = _OPTIONS_RE.fullmatch(text)
    if match:
        kind: Literal["Enum", "Flags"] = "Enum" if match["kind"] == "Enum" else "Flags"
        try:
            members = json.loads(match["members"], parse_constant=_reject_constant)
        except ValueError as exc:
            raise ValueError(f"cannot resolve setting type {text}: {exc}") from None
        if not isinstance(members, list):
            raise ValueError(f"cannot resolve setting type {text}: expected a JSON list of members")
        return OptionsType.of(kind, members)
    match = _CONTAINER_RE.fullmatch(text)
    if match:
        container: Literal["Sequence", "Mapping"] = "Sequence" if match["kind"] == "Sequence" else "Mapping"
        return ContainerType(container, parse_setting_type(match["inner"].strip()))
    raise ValueError(f"cannot resolve setting type {text}")


# ---------------------------------------------------------------------------------------------------------
# Errors and declarations


class ServiceError(Exception):
    """A request the service refuses, with the status and body a real Heksher server answers.

    ``kind`` tells how ``body`` travels: ``"text"`` (plain text), ``"json"`` (a JSON object),
    ``"empty"`` (no body) or ``"internal"`` (the server crashed: uvicorn's bare 500, see :meth:`internal`).
    The admin helpers of :class:`~heksher_shm.testing.HeksherService` raise it too, so a test that sets up
    something impossible learns why.
    """

    def __init__(
        self,
        status: int,
        kind: Literal["text", "json", "empty", "internal"],
        body: str | dict[str, Any] = "",
    ) -> None:
        self.status = status
        self.kind = kind
        self.body = body
        super().__init__(f"{status}: {body}" if body else str(status))

    @classmethod
    def text(cls, status: int, message: str) -> ServiceError:
        """An error with a plain-text body."""
        return cls(status, "text", message)

    @classmethod
    def detail(cls, status: int, detail: str) -> ServiceError:
        """An error with a JSON ``{"detail": ...}`` body, as FastAPI's HTTPException sends."""
        return cls(status, "json", {"detail": detail})

    @classmethod
    def empty(cls, status: int) -> ServiceError:
        """An error with an empty body."""
        return cls(status, "empty")

    @classmethod
    def internal(cls) -> ServiceError:
        """An unhandled exception in the real server (a database error): 500 ``Internal Server Error``.

        Over HTTP it looks like uvicorn's answer: plain text, chunked, and the connection is closed.
        """
        return cls(500, "internal", "Internal Server Error")


def _set_text(names: Iterable[str]) -> str:
    """Names as the real server prints a Python ``set`` of them (in hash order there; sorted here)."""
    return "{" + ", ".join(repr(name) for name in sorted(names)) + "}"


def _version_tuple(version: str) -> tuple[int, int]:
    major, _, minor = version.partition(".")
    return int(major), int(minor)


@dataclass(frozen=True)
class Declaration:
    """A validated ``POST /api/v1/settings/declare`` body."""

    name: str
    configurable_features: tuple[str, ...]
    type: SettingType
    default_value: JSONValue
    metadata: Mapping[str, JSONValue] = field(default_factory=dict)
    alias: str | None = None
    version: str = "1.0"

    def __post_init__(self) -> None:
        # the HTTP layer reports these as 422s first; this guards the Python helpers
        if not SETTING_NAME_RE.fullmatch(self.name):
            raise ValueError(f"invalid setting name {self.name!r}")
        if self.alias is not None and (not SETTING_NAME_RE.fullmatch(self.alias) or self.alias == self.name):
            raise ValueError(f"invalid alias {self.alias!r} for setting {self.name!r}")
        if not VERSION_RE.fullmatch(self.version):
            raise ValueError(f"invalid version {self.version!r}")
        if not self.configurable_features or len(set(self.configurable_features)) != len(
            self.configurable_features
        ):
            raise ValueError("configurable_features must be a non-empty list without repeats")
        if not self.type.validate(self.default_value):
            raise ValueError(f"type ({self.type}) and default value ({self.default_value!r}) must match")


# ---------------------------------------------------------------------------------------------------------
# Snapshots handed to tests


@dataclass(frozen=True)
class SettingInfo:
    """A copy of one stored setting, as :attr:`HeksherService.settings` shows it."""

    name: str
    type: str
    default_value: JSONValue
    configurable_features: tuple[str, ...]
    metadata: Mapping[str, JSONValue]
    aliases: tuple[str, ...]
    version: str


@dataclass(frozen=True)
class RuleInfo:
    """A copy of one stored rule; ``feature_values`` follows the context-feature order."""

    rule_id: int
    setting: str
    feature_values: tuple[tuple[str, str], ...]
    value: JSONValue
    metadata: Mapping[str, JSONValue]


@dataclass
class _Setting:
    name: str
    type: SettingType
    default_value: JSONValue
    configurable_features: list[str]
    metadata: dict[str, JSONValue]
    aliases: list[str]
    version: str


@dataclass
class _Rule:
    rule_id: int
    setting: _Setting  # by reference, so that a rename needs no rule updates
    feature_values: dict[str, str]
    value: JSONValue
    metadata: dict[str, JSONValue]


_Level = Literal["minor", "major", "mismatch"]
_LEVELS: tuple[_Level, ...] = ("minor", "major", "mismatch")
_FilterMap = Mapping[str, "Sequence[str] | None"]


# ---------------------------------------------------------------------------------------------------------
# The state


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
        self._settings: dict[str, _Setting] = {}
        self._aliases: dict[str, str] = {}  # alias -> canonical name
        self._rules: dict[int, _Rule] = {}  # insertion order is id order
        self._next_rule_id = 1

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
            if any(name in setting.configurable_features for setting in self._settings.values()):
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

    # -- settings --------------------------------------------------------------------------------------------

    def _lookup(self, name: str) -> _Setting | None:
        setting = self._settings.get(name)
        if setting is None and name in self._aliases:
            setting = self._settings[self._aliases[name]]
        return setting

    def _rules_of(self, setting: _Setting) -> list[_Rule]:
        return [rule for rule in self._rules.values() if rule.setting is setting]

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

            new_version = _version_tuple(declaration.version)
            old_version = _version_tuple(existing.version)
            if new_version == old_version:
                differences = self._differences(existing, declaration, outdated=False)
                if any(differences.values()):
                    return 409, {"outcome": "mismatch", "differences": _flatten(differences)}
                return 200, {"outcome": "uptodate"}
            if new_version < old_version:
                differences = self._differences(existing, declaration, outdated=True)
                return 200, {
                    "outcome": "outdated",
                    "latest_version": existing.version,
                    "differences": _flatten(differences),
                }

            differences = self._differences(existing, declaration, outdated=False)
            if differences["mismatch"]:
                accepted = False
            elif new_version[0] > old_version[0]:
                accepted = True
            else:
                accepted = not differences["major"]
            previous_version = existing.version
            if not accepted:
                return 409, {
                    "outcome": "rejected",
                    "previous_version": previous_version,
                    "differences": _flatten(differences),
                }
            self._upgrade(existing, declaration)
            return 200, {
                "outcome": "upgraded",
                "previous_version": previous_version,
                "differences": _flatten(differences),
            }

    def _create(self, declaration: Declaration) -> tuple[int, dict[str, Any]]:
        if declaration.version != "1.0":
            raise ServiceError.text(400, "newly created settings must have version 1.0")
        unknown = [cf for cf in declaration.configurable_features if cf not in self._features]
        if unknown:
            raise ServiceError.text(404, f"{_set_text(unknown)} are not acceptable context features")
        self._settings[declaration.name] = _Setting(
            name=declaration.name,
            type=declaration.type,
            default_value=copy.deepcopy(declaration.default_value),
            configurable_features=list(declaration.configurable_features),
            metadata=copy.deepcopy(dict(declaration.metadata)),
            aliases=[],
            version=declaration.version,
        )
        return 200, {"outcome": "created"}

    def _differences(
        self, existing: _Setting, declaration: Declaration, *, outdated: bool
    ) -> dict[_Level, list[dict[str, Any]]]:
        """Classify how ``declaration`` differs from ``existing`` (see the module docstring).

        ``outdated`` flips the direction: the change considered is from the declaration to the stored
        setting, and rules are not consulted.
        """
        found: dict[_Level, list[dict[str, Any]]] = {level: [] for level in _LEVELS}

        def attribute(level: _Level, name: str, latest_value: JSONValue) -> None:
            found[level].append(
                {"level": level, "attribute": name, "latest_value": copy.deepcopy(latest_value)}
            )

        def message(level: _Level, text: str) -> None:
            found[level].append({"level": level, "message": text})

        stored_cfs = set(existing.configurable_features)
        declared_cfs = set(declaration.configurable_features)
        if stored_cfs != declared_cfs:
            before, after = (declared_cfs, stored_cfs) if outdated else (stored_cfs, declared_cfs)
            removed = before - after
            users = [] if outdated else self._rules_using(existing, removed)
            if users:
                message(
                    "mismatch", f"configurable features {sorted(removed)} are still in use by rules {users}"
                )
            elif before > after:
                message("minor", f"removal of configurable features {sorted(removed)}")
            else:
                if not outdated:
                    unknown = after - set(self._features)
                    if unknown:
                        # this path answers with FastAPI's HTTPException, not plain text like creation does
                        raise ServiceError.detail(
                            404, f"{_set_text(unknown)} are not acceptable context features"
                        )
                attribute("major", "configurable_features", self._ordered_features(existing))

        if existing.type != declaration.type:
            old_type, new_type = (
                (declaration.type, existing.type) if outdated else (existing.type, declaration.type)
            )
            misfits = (
                []
                if outdated
                else [r.rule_id for r in self._rules_of(existing) if not new_type.validate(r.value)]
            )
            if misfits:
                message("mismatch", f"setting type incompatible with values for rules: {misfits}")
            elif new_type.is_subtype_of(old_type):
                attribute("minor", "type", str(existing.type))
            else:
                attribute("major", "type", str(existing.type))

        if declaration.name != existing.name:
            attribute("minor", "name", existing.name)
        if not json_equal(declaration.default_value, existing.default_value):
            attribute("minor", "default_value", existing.default_value)
        if not json_equal(dict(declaration.metadata), existing.metadata):
            attribute("minor", "metadata", existing.metadata)
        return found

    def _ordered_features(self, setting: _Setting) -> list[str]:
        """A setting's configurable features in context-feature order, as the real server reports them."""
        return sorted(
            setting.configurable_features,
            key=lambda f: self._features.index(f) if f in self._features else len(self._features),
        )

    def _rules_using(self, setting: _Setting, features: set[str]) -> list[int]:
        return [rule.rule_id for rule in self._rules_of(setting) if features & rule.feature_values.keys()]

    def _upgrade(self, setting: _Setting, declaration: Declaration) -> None:
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
        setting.configurable_features = list(declaration.configurable_features)
        setting.type = declaration.type
        setting.default_value = copy.deepcopy(declaration.default_value)
        setting.metadata = copy.deepcopy(dict(declaration.metadata))
        setting.version = declaration.version

    def setting_details(self, name: str) -> dict[str, Any]:
        """``GET /api/v1/settings/{name}``: the setting found by name or alias (404 text otherwise)."""
        with self._lock:
            setting = self._lookup(name)
            if setting is None:
                raise ServiceError.text(404, f"the setting {name} does not exist")
            return {
                "name": setting.name,
                "configurable_features": self._ordered_features(setting),
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
                    entry["configurable_features"] = self._ordered_features(setting)
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
            for rule in self._rules_of(setting):
                del self._rules[rule.rule_id]

    def settings_snapshot(self) -> dict[str, SettingInfo]:
        """A copy of every setting, keyed by canonical name."""
        with self._lock:
            return {
                name: SettingInfo(
                    name=setting.name,
                    type=str(setting.type),
                    default_value=copy.deepcopy(setting.default_value),
                    configurable_features=tuple(self._ordered_features(setting)),
                    metadata=copy.deepcopy(setting.metadata),
                    aliases=tuple(setting.aliases),
                    version=setting.version,
                )
                for name, setting in sorted(self._settings.items())
            }

    # -- query -----------------------------------------------------------------------------------------------

    def _ordered_conditions(self, rule: _Rule) -> list[list[str]]:
        return [
            [feature, rule.feature_values[feature]]
            for feature in self._features
            if feature in rule.feature_values
        ]

    def query(
        self, names: Sequence[str] | None, filters: _FilterMap | None, *, include_metadata: bool
    ) -> dict[str, Any]:
        """``GET /api/v1/query``.

        ``names`` is ``None`` for every setting; ``filters`` maps a context feature to the admitted values
        (``None`` admits any value) or is ``None`` to admit every rule.  A rule is returned only when each
        of its conditions is admitted; filters on unknown features are dropped.
        """
        with self._lock:
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
            admitted: dict[str, frozenset[str] | None] | None = None
            if filters is not None:
                admitted = {
                    feature: None if values is None else frozenset(values)
                    for feature, values in filters.items()
                    if feature in self._features
                }
            results: dict[str, dict[str, Any]] = {
                setting.name: {"default_value": copy.deepcopy(setting.default_value), "rules": []}
                for setting in sorted(targets, key=lambda s: s.name)
            }
            for rule in self._rules.values():
                entry = results.get(rule.setting.name)
                if entry is None or not _admits(admitted, rule):
                    continue
                out: dict[str, Any] = {
                    "value": copy.deepcopy(rule.value),
                    "context_features": self._ordered_conditions(rule),
                    "rule_id": rule.rule_id,
                }
                if include_metadata:
                    out["metadata"] = copy.deepcopy(rule.metadata)
                entry["rules"].append(out)
            return {"settings": results}

    # -- rules -----------------------------------------------------------------------------------------------

    def _find_rule(self, setting: _Setting, feature_values: Mapping[str, str]) -> _Rule | None:
        for rule in self._rules.values():
            if rule.setting is setting and rule.feature_values == dict(feature_values):
                return rule
        return None

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
                    400, f"setting is not configurable at context features {_set_text(not_configurable)}"
                )
            if not target.type.validate(value):
                raise ServiceError.text(400, f"rule value is incompatible with setting type {target.type}")
            if self._find_rule(target, feature_values) is not None:
                raise ServiceError.text(409, "rule already exists")
            rule_id = self._next_rule_id
            self._next_rule_id += 1
            self._rules[rule_id] = _Rule(
                rule_id=rule_id,
                setting=target,
                feature_values=dict(feature_values),
                value=copy.deepcopy(value),
                metadata=copy.deepcopy(dict(metadata or {})),
            )
            return rule_id

    def search_rule(self, setting: str, feature_values: Mapping[str, str]) -> int | None:
        """The id of the rule of ``setting`` with exactly these conditions, if any."""
        with self._lock:
            target = self._lookup(setting)
            rule = None if target is None else self._find_rule(target, feature_values)
            return None if rule is None else rule.rule_id

    def _rule(self, rule_id: int, missing: ServiceError) -> _Rule:
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
                "feature_values": self._ordered_conditions(rule),
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
            rule.value = copy.deepcopy(value)

    def delete_rule(self, rule_id: int) -> None:
        """``DELETE /api/v1/rules/{id}`` (404 with an empty body when unknown)."""
        with self._lock:
            self._rule(rule_id, ServiceError.empty(404))
            del self._rules[rule_id]

    def rules_snapshot(self) -> list[RuleInfo]:
        """A copy of every rule, by id."""
        with self._lock:
            return [
                RuleInfo(
                    rule_id=rule.rule_id,
                    setting=rule.setting.name,
                    feature_values=tuple((f, v) for f, v in self._ordered_conditions(rule)),
                    value=copy.deepcopy(rule.value),
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
            self._rule(rule_id, ServiceError.empty(404)).metadata.update(copy.deepcopy(dict(metadata)))

    def replace_rule_metadata(self, rule_id: int, metadata: Mapping[str, JSONValue]) -> None:
        """``PUT /api/v1/rules/{id}/metadata``: replace the whole metadata."""
        with self._lock:
            self._rule(rule_id, ServiceError.empty(404)).metadata = copy.deepcopy(dict(metadata))

    def set_rule_metadata_key(self, rule_id: int, key: str, value: JSONValue) -> None:
        """``PUT /api/v1/rules/{id}/metadata/{key}``."""
        with self._lock:
            self._rule(rule_id, ServiceError.empty(404)).metadata[key] = copy.deepcopy(value)

    def delete_rule_metadata(self, rule_id: int) -> None:
        """``DELETE /api/v1/rules/{id}/metadata``."""
        with self._lock:
            self._rule(rule_id, ServiceError.empty(404)).metadata = {}

    def delete_rule_metadata_key(self, rule_id: int, key: str) -> None:
        """``DELETE /api/v1/rules/{id}/metadata/{key}`` (a missing key is not an error)."""
        with self._lock:
            self._rule(rule_id, ServiceError.empty(404)).metadata.pop(key, None)


def _admits(admitted: Mapping[str, frozenset[str] | None] | None, rule: _Rule) -> bool:
    if admitted is None:
        return True
    for feature, value in rule.feature_values.items():
        if feature not in admitted:
            return False
        values = admitted[feature]
        if values is not None and value not in values:
            return False
    return True


def _flatten(differences: Mapping[_Level, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [difference for level in _LEVELS for difference in differences[level]]
