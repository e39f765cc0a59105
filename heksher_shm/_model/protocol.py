"""The Heksher v1 HTTP API as the clients use it: requests to build, typed responses to decode.

Every body the service sends is decoded into a msgspec struct. A body that is
not JSON, or JSON of the wrong shape, raises
:class:`~heksher_shm.exceptions.HeksherProtocolError` naming the endpoint, the
status and what was wrong, never a bare ``KeyError`` from deep inside.

Rule and default values stay raw JSON (:class:`msgspec.Raw`): they travel to
other processes untouched, and each process converts them with its own types.

This module does no I/O: the clients send what it builds and hand it what
they receive.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from typing import Any, Final, TypeVar

import msgspec

from heksher_shm.exceptions import HeksherProtocolError

__all__ = [
    "CONTEXT_FEATURES",
    "DECLARE",
    "HEALTH",
    "QUERY",
    "SETTINGS",
    "ContextFeaturesResponse",
    "DeclarationBody",
    "DeclareResponse",
    "Difference",
    "QueryResponse",
    "QueryRule",
    "QuerySetting",
    "RawQueryResponse",
    "SettingData",
    "SettingsResponse",
    "declaration_digest",
    "decode",
    "query_params",
    "query_settings",
]

HEALTH: Final = "/api/health"
CONTEXT_FEATURES: Final = "/api/v1/context_features"
DECLARE: Final = "/api/v1/settings/declare"
QUERY: Final = "/api/v1/query"
SETTINGS: Final = "/api/v1/settings"

T = TypeVar("T")

_ABSENT = msgspec.Raw(b"")


class ContextFeaturesResponse(msgspec.Struct):
    """``GET /api/v1/context_features``."""

    context_features: list[str]


class Difference(msgspec.Struct):
    """One difference between a declaration and the service's stored one."""

    level: str
    attribute: str | None = None
    latest_value: msgspec.Raw = msgspec.field(default_factory=lambda: _ABSENT)
    """The stored declaration's value of :attr:`attribute`, as raw JSON (empty when absent)."""
    message: str | None = None


class DeclareResponse(msgspec.Struct):
    """``POST /api/v1/settings/declare``, for every outcome."""

    outcome: str
    differences: list[Difference] = []
    previous_version: str | None = None
    latest_version: str | None = None


class QueryRule(msgspec.Struct):
    """One rule of a query result; conditions follow the service's feature order."""

    value: msgspec.Raw
    context_features: list[tuple[str, str]]
    rule_id: int
    metadata: dict[str, Any] | None = None


class QuerySetting(msgspec.Struct):
    """One setting of a query result."""

    default_value: msgspec.Raw
    rules: list[QueryRule]


class QueryResponse(msgspec.Struct):
    """``GET /api/v1/query``."""

    settings: dict[str, QuerySetting]


class RawQueryResponse(msgspec.Struct):
    """``GET /api/v1/query``, each setting left as raw JSON to be decoded on its own (see the engine)."""

    settings: dict[str, msgspec.Raw]


class SettingData(msgspec.Struct):
    """A setting as the service describes it, as returned by ``get_settings()``.

    Attributes:
        name: the setting's name.
        configurable_features: the context features it can be configured by.
        type: its type string, by Heksher specs.
        default_value: its default value.
        metadata: its metadata.
        aliases: its former names.
        version: the version of its latest declaration.
    """

    name: str
    configurable_features: list[str]
    type: str
    default_value: Any
    metadata: dict[str, Any]
    aliases: list[str]
    version: str


class SettingsResponse(msgspec.Struct):
    """``GET /api/v1/settings?include_additional_data=true``."""

    settings: list[SettingData]


class DeclarationBody(msgspec.Struct, omit_defaults=True):
    """The body of a declaration request."""

    name: str
    configurable_features: list[str]
    type: str
    default_value: Any
    metadata: dict[str, Any]
    version: str
    alias: str | None = None


_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def decode(endpoint: str, status: int, content: bytes, into: type[T]) -> T:
    """Decode *content* as *into*, or raise :class:`HeksherProtocolError` saying what was wrong."""
    decoder = _decoders.get(into)
    if decoder is None:
        decoder = _decoders[into] = msgspec.json.Decoder(into)
    try:
        return decoder.decode(content)  # type: ignore[no-any-return]
    except msgspec.DecodeError as e:
        preview = content[:200]
        problem = "empty body" if not content else f"unexpected body ({e}): {preview!r}"
        raise HeksherProtocolError(endpoint, status, problem, content) from None


_canonical = msgspec.json.Encoder(order="sorted")


_setting_decoder = msgspec.json.Decoder(QuerySetting)
_one_setting_decoder = msgspec.json.Decoder(dict[str, QuerySetting])
_COMPACT_HEAD = b'{"settings":{'
_BOUNDARY = re.compile(rb'\},"[a-zA-Z_0-9.]+":\{')
"""Where a setting may end and the next begin, in a compact query answer (setting names are
``[a-zA-Z_0-9.]+``); a candidate is confirmed only by decoding what it cuts off."""
_SPLIT_MISSES = 64
"""Candidate cuts that did not decode in a row before the split gives up (nested mappings in rule
values make a few), and the answer is decoded in one piece instead."""


def query_settings(status: int, content: bytes) -> Iterator[tuple[str, QuerySetting]]:
    """The settings of a ``GET /api/v1/query`` answer, one at a time, in the order they came.

    For the event loop's sake: a compact answer (as Heksher and the in-memory
    service send it) is cut between settings with a regular expression and
    each piece decoded on its own, so no single step holds the GIL for long
    (decoding a 100k-rule answer in one call does, for several milliseconds).
    A cut is trusted only when the piece before it decodes as exactly one
    setting: a ``},"`` inside a string or a nested object leaves an
    unterminated string or unbalanced braces, which never decode. Whatever
    cannot be cut so (another layout, many nested mappings) is decoded in one
    piece, with the same result.

    Raises:
        HeksherProtocolError: not a query answer (the message says where).
    """
    position = len(_COMPACT_HEAD)
    if content.startswith(_COMPACT_HEAD) and content.endswith(b"}}"):
        misses = 0
        for match in _BOUNDARY.finditer(content, position):
            end = match.start() + 1
            try:
                piece = _one_setting_decoder.decode(b"{" + content[position:end] + b"}")
            except msgspec.DecodeError:
                misses += 1
                if misses > _SPLIT_MISSES:
                    break
                continue
            if len(piece) != 1:
                break
            misses = 0
            yield from piece.items()
            position = end + 1
        rest = b"{" + content[position:-2] + b"}"
        try:
            yield from _one_setting_decoder.decode(rest).items()
        except msgspec.DecodeError:
            if position != len(_COMPACT_HEAD):  # cut somewhere: only the rest is wrong
                raise HeksherProtocolError(
                    QUERY, status, f"unexpected body after byte {position}: {rest[:200]!r}", content
                ) from None
        else:
            return
    raw = decode(QUERY, status, content, RawQueryResponse)
    for name, value in raw.settings.items():
        try:
            yield name, _setting_decoder.decode(value)
        except msgspec.DecodeError as e:
            raise HeksherProtocolError(QUERY, status, f"setting {name!r}: {e}", content) from None


def declaration_digest(body: DeclarationBody) -> str:
    """A stable digest of a declaration, so identical declarations are sent once per leader term."""
    return hashlib.sha256(_canonical.encode(body)).hexdigest()[:32]


def query_params(settings: Iterable[str], filters: str) -> dict[str, str]:
    """The parameters of a query for *settings* (any order) and a ``context_filters`` string.

    Rule metadata is asked for: the OpenFeature provider shows the matching
    rule's metadata, in any process of the host.
    """
    return {
        "settings": ",".join(sorted(settings)),
        "context_filters": filters,
        "include_metadata": "true",
    }
