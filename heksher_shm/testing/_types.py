"""The server side's type system: Heksher type strings, parsed, and the JSON values they admit.

This is what the in-memory service knows about types, and it is *not* the client's
:class:`heksher_shm.ServiceType` (which turns Python values into type strings and back): here a type
string a client declared is parsed into a :class:`ServiceType` that can tell which JSON values belong to
it and how two types are ordered, the way a real Heksher 0.5.7 server judges them.

Type strings are parsed into :class:`ServiceType` objects and printed back in their normal form:
``Enum``/``Flags`` members are de-duplicated (``1`` and ``1.0`` are one member, ``1`` and ``true`` are
two) and sorted by their JSON text, so ``Enum["red", "blue"]`` is stored as ``Enum["blue","red"]``.

A value belongs to a type as follows: ``int`` takes whole JSON numbers (the real server also accepts
``2.0``), ``float`` takes any number, ``str`` and ``bool`` take only their own JSON type (``true`` is
never a number), ``Enum[...]`` takes one of its members, ``Flags[...]`` takes a list of distinct members,
``Sequence<T>`` a list of ``T`` and ``Mapping<T>`` an object whose values are ``T``.

Type ``A`` is a *subtype* of ``B`` when every value of ``A`` is a value of ``B``, with ``A != B``:
``int < float``; ``Enum[X] < Enum[Y]`` and ``Flags[X] < Flags[Y]`` when ``X`` is a proper subset of
``Y``; ``Sequence<A> < Sequence<B>`` and ``Mapping<A> < Mapping<B>`` when ``A < B``.  Nothing else is
ordered (``Enum[true,false]`` is not a supertype of ``bool``, ``Sequence<int>`` is not a supertype of
``Flags[0,1]``).

The formats of names (setting names, context features, metadata keys, versions) live here too: the
store, the request validation and the API all check them.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "CONTEXT_FEATURE_RE",
    "METADATA_KEY_RE",
    "SETTING_NAME_RE",
    "VERSION_RE",
    "ContainerType",
    "JSONValue",
    "OptionsType",
    "PrimitiveType",
    "ServiceType",
    "copy_json",
    "dump_json",
    "json_equal",
    "parse_setting_type",
    "reject_constant",
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


def dump_json(value: JSONValue) -> bytes:
    """``value`` as compact UTF-8 JSON, as the real server's orjson writes it."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def copy_json(value: JSONValue) -> JSONValue:
    """A copy of a JSON value that shares nothing mutable with it.

    Strings, numbers, booleans and ``null`` are immutable and returned as they are: most values and
    metadata are, and :func:`copy.deepcopy` costs microseconds even for an int, which a query over
    100k rules pays 100k times.
    """
    if value is None or type(value) in _IMMUTABLE:
        return value
    return copy.deepcopy(value)


_IMMUTABLE = frozenset({str, int, float, bool})


def _is_primitive(value: JSONValue) -> bool:
    return isinstance(value, (str, bool, int, float))


# ---------------------------------------------------------------------------------------------------------
# Types


class ServiceType:
    """A Heksher type string as the service parsed it; ``str()`` gives its normal form.

    Not the client's :class:`heksher_shm.SettingType`: this one judges JSON values and orders types the
    way the server does.  Development builds called it ``heksher_shm.testing.SettingType``; that name
    still works and warns.
    """

    def validate(self, value: JSONValue) -> bool:
        """Whether a parsed JSON value is a value of this type."""
        raise NotImplementedError

    def is_subtype_of(self, other: ServiceType) -> bool:
        """Whether every value of this type is a value of ``other``, the two types being different."""
        raise NotImplementedError


@dataclass(frozen=True)
class PrimitiveType(ServiceType):
    """``int``, ``float``, ``str`` or ``bool``."""

    name: Literal["int", "float", "str", "bool"]

    def validate(self, value: JSONValue) -> bool:
        """See :meth:`ServiceType.validate`."""
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

    def is_subtype_of(self, other: ServiceType) -> bool:
        """See :meth:`ServiceType.is_subtype_of`: only ``int < float``."""
        return isinstance(other, PrimitiveType) and self.name == "int" and other.name == "float"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class OptionsType(ServiceType):
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
        """See :meth:`ServiceType.validate`."""
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

    def is_subtype_of(self, other: ServiceType) -> bool:
        """See :meth:`ServiceType.is_subtype_of`: a proper subset of the members, same kind."""
        return isinstance(other, OptionsType) and other.kind == self.kind and self.keys < other.keys

    def __str__(self) -> str:
        return f"{self.kind}[{','.join(self.members)}]"


@dataclass(frozen=True)
class ContainerType(ServiceType):
    """``Sequence<T>`` (a JSON list) or ``Mapping<T>`` (a JSON object, keys are strings)."""

    kind: Literal["Sequence", "Mapping"]
    inner: ServiceType

    def validate(self, value: JSONValue) -> bool:
        """See :meth:`ServiceType.validate`."""
        if self.kind == "Sequence":
            return isinstance(value, list) and all(self.inner.validate(item) for item in value)
        return isinstance(value, dict) and all(self.inner.validate(item) for item in value.values())

    def is_subtype_of(self, other: ServiceType) -> bool:
        """See :meth:`ServiceType.is_subtype_of`: the same container over a subtype."""
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


def reject_constant(name: str) -> JSONValue:
    """A ``parse_constant`` for :func:`json.loads`: ``NaN`` and ``Infinity`` are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


def parse_setting_type(text: str) -> ServiceType:
    """Parse a Heksher type string; raise :class:`ValueError` when it names no type."""
    primitive = _PRIMITIVES.get(text)
    if primitive is not None:
        return primitive
    match = _OPTIONS_RE.fullmatch(text)
    if match:
        kind: Literal["Enum", "Flags"] = "Enum" if match["kind"] == "Enum" else "Flags"
        try:
            members = json.loads(match["members"], parse_constant=reject_constant)
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
