"""Setting types as OpenFeature sees them: which typed resolver serves a setting, and its values as JSON.

A setting's Heksher type string (``int``, ``Enum["a","b"]``, ``Sequence<int>``...)
decides its OpenFeature flag type (:class:`Kind`): ``bool`` is boolean,
``str`` string, ``int`` integer, ``float`` float; an enum is the type its
members share (an enum mixing member types has none: every typed resolver
answers ``TYPE_MISMATCH``); flags, sequences and mappings are objects (a list
of flag names, a list, an object). Values are handed out as the JSON values
the service sends (enum members as their values, flags as the list of their
names), with floats as floats.

For a setting this process declares, its own :class:`~heksher_shm.SettingType`
converts; for one only another process declared, :func:`parse` reads the type
string from the snapshot and converts the service's JSON the way the
setting's own type would (the same coercions: unknown flag names, and
sequence elements or mapping values of the wrong type, are dropped).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

__all__ = ["JsonType", "Kind", "kind_of_value", "parse"]


class Kind(enum.Enum):
    """The OpenFeature flag type of a setting (its typed resolver)."""

    BOOLEAN = "boolean"
    STRING = "string"
    INTEGER = "integer"
    FLOAT = "float"
    OBJECT = "object"
    NONE = "no OpenFeature type"
    """An enum whose members mix types."""


@dataclass(frozen=True)
class JsonType:
    """A parsed type string: its kind, and how a JSON value is checked (``convert`` raises
    :class:`TypeError` for a value the type cannot hold)."""

    string: str
    kind: Kind
    convert: Callable[[Any], Any]


_SEQUENCE = re.compile(r"Sequence<(.+)>")
_MAPPING = re.compile(r"Mapping<(.+)>")
_ENUM = re.compile(r"Enum\[(.*)\]")
_FLAGS = re.compile(r"Flags\[(.*)\]")


def parse(type_string: str) -> JsonType | None:
    """The type a Heksher type string names; None for a string this version does not know."""
    simple = _PRIMITIVES.get(type_string)
    if simple is not None:
        kind, accepted = simple
        return JsonType(type_string, kind, _primitive(type_string, accepted))
    for pattern, container in ((_SEQUENCE, _sequence), (_MAPPING, _mapping)):
        match = pattern.fullmatch(type_string)
        if match is not None:
            inner = parse(match[1])
            return None if inner is None else JsonType(type_string, Kind.OBJECT, container(inner))
    for pattern, make in ((_ENUM, _enum), (_FLAGS, _flags)):
        match = pattern.fullmatch(type_string)
        if match is not None:
            try:
                members = msgspec.json.decode(f"[{match[1]}]")
            except msgspec.DecodeError:
                return None
            return make(type_string, members)
    return None


def kind_of_value(value: object) -> Kind:
    """The kind of a primitive JSON value."""
    if isinstance(value, bool):
        return Kind.BOOLEAN
    if isinstance(value, int):
        return Kind.INTEGER
    if isinstance(value, float):
        return Kind.FLOAT
    if isinstance(value, str):
        return Kind.STRING
    return Kind.NONE


# As the client's own primitive types: Python's isinstance, so a float setting accepts integers.
_PRIMITIVES: dict[str, tuple[Kind, tuple[type, ...]]] = {
    "int": (Kind.INTEGER, (int,)),
    "float": (Kind.FLOAT, (int, float)),
    "str": (Kind.STRING, (str,)),
    "bool": (Kind.BOOLEAN, (bool,)),
}


def _primitive(name: str, accepted: tuple[type, ...]) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if not isinstance(value, accepted):
            raise TypeError(f"expected a value of type {name}, got {type(value).__name__}: {value!r}")
        return value

    return convert


def _sequence(inner: JsonType) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {type(value).__name__}: {value!r}")
        kept = []
        for element in value:
            try:
                kept.append(inner.convert(element))
            except TypeError:
                continue  # dropped, as the setting's own type drops it (a coercion)
        return kept

    return convert


def _mapping(inner: JsonType) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if not isinstance(value, dict):
            raise TypeError(f"expected an object, got {type(value).__name__}: {value!r}")
        kept = {}
        for key, element in value.items():
            try:
                kept[key] = inner.convert(element)
            except TypeError:
                continue
        return kept

    return convert


def _enum(type_string: str, members: list[Any]) -> JsonType:
    kinds = {kind_of_value(m) for m in members}
    if kinds == {Kind.INTEGER, Kind.FLOAT}:
        kinds = {Kind.FLOAT}
    kind = kinds.pop() if len(kinds) == 1 else Kind.NONE

    def convert(value: Any) -> Any:
        for member in members:
            # As Enum(value) finds a member: by equality, so 1 finds 1.0 (and the member is what is given).
            if member == value and kind_of_value(member) is not Kind.NONE:
                return member
        raise TypeError(f"{value!r} is not a member of {type_string}")

    return JsonType(type_string, kind, convert)


def _flags(type_string: str, names: list[Any]) -> JsonType:
    known = {name for name in names if isinstance(name, str)}

    def convert(value: Any) -> Any:
        if not isinstance(value, list):
            raise TypeError(f"expected a list of flag names, got {type(value).__name__}: {value!r}")
        for name in value:
            if not isinstance(name, str):
                raise TypeError(f"expected a flag name string, got {type(name).__name__}: {name!r}")
        return [
            name for name in dict.fromkeys(value) if name in known
        ]  # unknown ones dropped, as the type does

    return JsonType(type_string, Kind.OBJECT, convert)
