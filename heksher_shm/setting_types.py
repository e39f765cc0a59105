"""Setting types: how a Python type maps to a Heksher type string and back.

Every type converts a JSON value sent by the service into an immutable Python
value (:meth:`SettingType.convert_from_heksher`) and a local default into the
JSON value declared to the service (:meth:`SettingType.convert_to_heksher`).
Conversion reports *coercions*: parts of the server value that had to be
dropped to fit the local type (an unknown flag name, a sequence element of the
wrong type). A value that cannot be converted at all raises :class:`TypeError`.

This module does no I/O.
"""

from __future__ import annotations

import collections.abc
import enum
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Generic, TypeVar

import msgspec

__all__ = [
    "Conversion",
    "HeksherEnum",
    "HeksherFlags",
    "HeksherMapping",
    "HeksherSequence",
    "PrimitiveSettingType",
    "SettingType",
    "setting_type",
]

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)
F = TypeVar("F", bound=enum.IntFlag)

_PRIMITIVES = (int, float, str, bool)


def _json_text(value: Any) -> str:
    return msgspec.json.encode(value).decode()


@dataclass(frozen=True)
class Conversion(Generic[T]):
    """The result of converting a server value: the value and the coercions it needed."""

    value: T
    coercions: Sequence[str] = ()


class SettingType(ABC, Generic[T]):
    """A setting's type, as the Heksher service knows it and as Python sees it."""

    @abstractmethod
    def heksher_string(self) -> str:
        """The type string declared to the service, e.g. ``Sequence<int>``."""

    @abstractmethod
    def convert_from_heksher(self, x: Any) -> Conversion[T]:
        """Convert a JSON-decoded server value to an immutable Python value.

        Raises:
            TypeError: the value cannot be converted at all.
        """

    @abstractmethod
    def convert_to_heksher(self, x: T) -> Any:
        """Convert a Python value (typically the local default) to a JSON-serialisable value."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SettingType) and self.heksher_string() == other.heksher_string()

    def __hash__(self) -> int:
        return hash(self.heksher_string())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.heksher_string()}>"


class PrimitiveSettingType(SettingType[T]):
    """``int``, ``float``, ``str`` or ``bool``.

    The accepted JSON types follow Python's ``isinstance``, as heksher 0.2.2
    does: a ``float`` setting accepts integers.
    """

    def __init__(self, name: str, accepted: tuple[type, ...]) -> None:
        self.name = name
        self.accepted = accepted

    def heksher_string(self) -> str:
        return self.name

    def convert_from_heksher(self, x: Any) -> Conversion[T]:
        if not isinstance(x, self.accepted):
            raise TypeError(f"expected a value of type {self.name}, got {type(x).__name__}: {x!r}")
        return Conversion(typing.cast(T, x))

    def convert_to_heksher(self, x: T) -> Any:
        return x


class HeksherEnum(SettingType[E]):
    """An :class:`enum.Enum` whose member values are primitives (``Enum[...]`` on the service)."""

    def __init__(self, enum_type: type[E]) -> None:
        for member in enum_type:
            if type(member.value) not in _PRIMITIVES:
                raise TypeError(
                    f"enum member {member!r} has a value of type {type(member.value).__name__}; "
                    "Heksher enums take int, float, str or bool values"
                )
        self.type_ = enum_type

    def heksher_string(self) -> str:
        return "Enum[" + ",".join(sorted(_json_text(m.value) for m in self.type_)) + "]"

    def convert_from_heksher(self, x: Any) -> Conversion[E]:
        try:
            return Conversion(self.type_(x))
        except ValueError:
            raise TypeError(f"{x!r} is not a value of {self.type_.__name__}") from None

    def convert_to_heksher(self, x: E) -> Any:
        return x.value


class HeksherFlags(SettingType[F]):
    """An :class:`enum.IntFlag`, sent as a list of member *names* (``Flags[...]`` on the service).

    Names the local type does not know are dropped, as a coercion.
    """

    def __init__(self, flags_type: type[F]) -> None:
        self.type_ = flags_type

    def heksher_string(self) -> str:
        return "Flags[" + ",".join(sorted(_json_text(name) for name in self.type_.__members__)) + "]"

    def convert_from_heksher(self, x: Any) -> Conversion[F]:
        if not isinstance(x, list):
            raise TypeError(f"expected a list of flag names, got {type(x).__name__}: {x!r}")
        value = self.type_(0)
        coercions: list[str] = []
        for name in x:
            if not isinstance(name, str):
                raise TypeError(f"expected a flag name string, got {type(name).__name__}: {name!r}")
            member = self.type_.__members__.get(name)
            if member is None:
                coercions.append(f"dropped flag {name!r}, unknown to {self.type_.__name__}")
            else:
                value |= member
        return Conversion(value, tuple(coercions))

    def convert_to_heksher(self, x: F) -> Any:
        # Iterating a flag class yields its canonical single-bit members, so
        # composite aliases (``RW = R | W``) are not declared twice.
        return [member.name for member in self.type_ if x & member]


class HeksherSequence(SettingType[Sequence[T]]):
    """A sequence of another type (``Sequence<T>``); values are tuples.

    Elements that fail to convert are dropped, as a coercion.
    """

    def __init__(self, inner: Any) -> None:
        self.inner: SettingType[T] = setting_type(inner)

    def heksher_string(self) -> str:
        return f"Sequence<{self.inner.heksher_string()}>"

    def convert_from_heksher(self, x: Any) -> Conversion[Sequence[T]]:
        if not isinstance(x, list):
            raise TypeError(f"expected a list, got {type(x).__name__}: {x!r}")
        values: list[T] = []
        coercions: list[str] = []
        for i, element in enumerate(x):
            try:
                converted = self.inner.convert_from_heksher(element)
            except TypeError as e:
                coercions.append(f"dropped element {i}: {e}")
                continue
            values.append(converted.value)
            coercions.extend(f"element {i}: {c}" for c in converted.coercions)
        return Conversion(tuple(values), tuple(coercions))

    def convert_to_heksher(self, x: Sequence[T]) -> Any:
        return [self.inner.convert_to_heksher(v) for v in x]


class HeksherMapping(SettingType[Mapping[str, T]]):
    """A mapping from strings to another type (``Mapping<T>``); values are read-only mappings.

    Values that fail to convert are dropped, as a coercion.
    """

    def __init__(self, inner: Any) -> None:
        self.inner: SettingType[T] = setting_type(inner)

    def heksher_string(self) -> str:
        return f"Mapping<{self.inner.heksher_string()}>"

    def convert_from_heksher(self, x: Any) -> Conversion[Mapping[str, T]]:
        if not isinstance(x, dict):
            raise TypeError(f"expected an object, got {type(x).__name__}: {x!r}")
        values: dict[str, T] = {}
        coercions: list[str] = []
        for key, element in x.items():
            try:
                converted = self.inner.convert_from_heksher(element)
            except TypeError as e:
                coercions.append(f"dropped key {key!r}: {e}")
                continue
            values[key] = converted.value
            coercions.extend(f"key {key!r}: {c}" for c in converted.coercions)
        return Conversion(MappingProxyType(values), tuple(coercions))

    def convert_to_heksher(self, x: Mapping[str, T]) -> Any:
        return {k: self.inner.convert_to_heksher(v) for k, v in x.items()}


_SIMPLE: dict[Any, SettingType[Any]] = {
    int: PrimitiveSettingType("int", (int,)),
    float: PrimitiveSettingType("float", (int, float)),
    str: PrimitiveSettingType("str", (str,)),
    bool: PrimitiveSettingType("bool", (bool,)),
}


def setting_type(arg: Any) -> SettingType[Any]:
    """Turn a type argument into a :class:`SettingType`.

    Accepts a :class:`SettingType`, ``int``/``float``/``str``/``bool``, an
    :class:`enum.IntFlag` or :class:`enum.Enum` subclass, ``Sequence[T]`` or
    ``Mapping[str, T]`` (from :mod:`typing` or :mod:`collections.abc`).

    Raises:
        TypeError: *arg* is none of these.
    """
    if isinstance(arg, SettingType):
        return arg
    simple = _SIMPLE.get(arg)
    if simple is not None:
        return simple
    if isinstance(arg, type):
        if issubclass(arg, enum.IntFlag):
            return HeksherFlags(arg)
        if issubclass(arg, enum.Enum):
            return HeksherEnum(arg)
    origin = typing.get_origin(arg)
    if origin is collections.abc.Sequence:
        (inner,) = typing.get_args(arg)
        return HeksherSequence(inner)
    if origin is collections.abc.Mapping:
        key, inner = typing.get_args(arg)
        if key is not str:
            raise TypeError(f"mapping setting types need str keys, got {arg!r}")
        return HeksherMapping(inner)
    raise TypeError(f"cannot use {arg!r} as a setting type{_suggestion(arg, origin)}")


def _suggestion(arg: Any, origin: Any) -> str:
    """What to write instead of a concrete container type (refused, as heksher 0.2.2 refuses them)."""
    if arg in (dict, list, tuple) or origin in (dict, list, tuple):
        return f"; use {_abstract(arg)} (from typing or collections.abc)"
    return ""


def _abstract(arg: Any) -> str:
    """*arg* spelled with the abstract containers setting types accept (``T`` where it says nothing)."""
    origin, args = typing.get_origin(arg) or arg, typing.get_args(arg)
    if origin in (dict, collections.abc.Mapping):
        return f"Mapping[str, {_abstract(args[1]) if len(args) == 2 else 'T'}]"
    if origin in (list, collections.abc.Sequence) or origin is tuple:
        return f"Sequence[{_abstract(args[0]) if args else 'T'}]"
    return arg.__name__ if isinstance(arg, type) else repr(arg)
