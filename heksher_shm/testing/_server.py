"""An in-memory Heksher-compatible HTTP service for tests, standard library only.

:class:`HeksherService` serves the Heksher v1 API (as a real 0.5.7 server answers it, error shapes and
known bugs included) from a :class:`~heksher_shm.testing._state.HeksherState` on a real socket, records
every request, and can be told to misbehave with :class:`Fault`.

The layers, one way: ``_Api`` turns a parsed request into a response and touches only the state;
``_Handler``/``_Server`` do the socket work (HTTP/1.1 keep-alive, faults, request records);
:class:`HeksherService` starts and stops them and offers admin helpers that skip HTTP.
"""

from __future__ import annotations

import contextlib
import hashlib
import http
import json
import logging
import random
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from heksher_shm.testing._race import DeclarationRace, RaceGate
from heksher_shm.testing._state import (
    CONTEXT_FEATURE_RE,
    METADATA_KEY_RE,
    SETTING_NAME_RE,
    VERSION_RE,
    Declaration,
    HeksherState,
    RuleInfo,
    ServiceError,
    SettingInfo,
    parse_setting_type,
)

__all__ = [
    "DEFAULT_CONTEXT_FEATURES",
    "HEKSHER_VERSION",
    "DeclarationRace",
    "Fault",
    "FaultKind",
    "HeksherService",
    "InjectedFault",
    "RequestRecord",
]

_LOG = logging.getLogger("heksher_shm.testing")

HEKSHER_VERSION = "0.5.7"
"""The Heksher version the service reports from ``/api/health`` and imitates."""
DEFAULT_CONTEXT_FEATURES = ("user", "theme", "environment")
"""The context features :class:`HeksherService` starts with unless told otherwise."""

FaultKind = Literal[
    "status",
    "delay",
    "malformed_body",
    "truncated_body",
    "dropped_connection",
    "wrong_shape",
    "huge_body",
    "wrong_etag",
]
"""What a :class:`Fault` does; see :class:`Fault`."""

_JSON_TYPE = "application/json"
_TEXT_TYPE = "text/plain; charset=utf-8"


# ---------------------------------------------------------------------------------------------------------
# Faults and records


@dataclass(frozen=True)
class Fault:
    """A way for the service to misbehave on a request; give it to :meth:`HeksherService.inject_fault`.

    ``Fault(status=500)`` answers 500 (with ``body``, or the status phrase as text) without touching the
    state; ``Fault(delay=2.0)`` waits, then serves the request normally (``delay`` also combines with
    every other kind).  The other kinds have constructors:

    * :meth:`malformed_body`: 200 with a body that is not JSON; the request is not served.
    * :meth:`truncated_body`: the request is served, but only half of the response body is sent
      after a ``Content-Length`` for all of it, then the connection is closed.
    * :meth:`dropped_connection`: the connection is closed without any response; not served.
    * :meth:`wrong_shape`: 200 with valid JSON of the wrong shape; not served.
    * :meth:`huge_body`: 200 with a valid JSON object of about ``size`` bytes; not served.
    * :meth:`wrong_etag` ("the ETag lies"): served normally, but the query endpoint sends ``etag`` instead
      of the body's digest *and* compares ``If-None-Match`` against it, so a client holding that tag gets
      a 304 although the rules changed.
    """

    status: int | None = None
    body: bytes | str | Mapping[str, Any] | Sequence[Any] | None = None
    delay: float = 0.0
    kind: FaultKind | None = None
    etag: str = '"0123456789abcdef0123456789abcdef"'
    size: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.kind is None:
            if self.status is not None:
                inferred: FaultKind = "status"
            elif self.delay > 0:
                inferred = "delay"
            else:
                raise ValueError("a Fault needs a status, a delay or a kind")
            object.__setattr__(self, "kind", inferred)
        if self.kind == "status" and self.status is None:
            raise ValueError("a status fault needs a status")
        if self.delay < 0:
            raise ValueError("delay must not be negative")

    @classmethod
    def malformed_body(cls, body: bytes = b'{"settings": {"truncated', *, delay: float = 0.0) -> Fault:
        """200 with ``body``, which is not valid JSON."""
        return cls(kind="malformed_body", body=body, delay=delay)

    @classmethod
    def truncated_body(cls, *, delay: float = 0.0) -> Fault:
        """Serve the request but send only half of the body promised by ``Content-Length``, then close."""
        return cls(kind="truncated_body", delay=delay)

    @classmethod
    def dropped_connection(cls, *, delay: float = 0.0) -> Fault:
        """Close the connection without answering."""
        return cls(kind="dropped_connection", delay=delay)

    @classmethod
    def wrong_shape(
        cls, body: Mapping[str, Any] | Sequence[Any] = ("not", "an", "object"), *, delay: float = 0.0
    ) -> Fault:
        """200 with ``body`` as JSON: valid JSON that no endpoint answers (a list by default)."""
        return cls(kind="wrong_shape", body=body, delay=delay)

    @classmethod
    def huge_body(cls, size: int = 8 * 1024 * 1024, *, delay: float = 0.0) -> Fault:
        """200 with a valid JSON object of about ``size`` bytes."""
        return cls(kind="huge_body", size=size, delay=delay)

    @classmethod
    def wrong_etag(cls, etag: str = '"0123456789abcdef0123456789abcdef"', *, delay: float = 0.0) -> Fault:
        """Serve normally but claim ``etag`` (quotes included) for the query result, and honour it."""
        return cls(kind="wrong_etag", etag=etag, delay=delay)


@dataclass(frozen=True)
class RequestRecord:
    """One request the service received.

    ``query`` holds the last value of each query parameter and ``query_string`` the raw query;
    ``status`` is the status sent (``None`` when the connection was dropped); ``time`` is the
    :func:`time.monotonic` reading when the request was read; ``fault`` names the injected fault applied.
    """

    method: str
    path: str
    query: Mapping[str, str]
    query_string: str
    status: int | None
    time: float
    fault: FaultKind | None = None


class InjectedFault:
    """A fault installed by :meth:`HeksherService.inject_fault`; ``remove()`` uninstalls it."""

    def __init__(
        self,
        service: HeksherService,
        fault: Fault,
        *,
        count: int | None,
        method: str | None,
        path: str | re.Pattern[str] | None,
        probability: float,
        seed: int | None,
    ) -> None:
        self.fault = fault
        """The fault applied."""
        self.method = method.upper() if method else None
        """Only requests with this method are affected (any when ``None``)."""
        self.path = path
        """Only requests to this path (exact string, or a pattern matched in full) are affected."""
        self.probability = probability
        """The chance that a matching request is affected."""
        self.remaining = count
        """How many more requests will be affected (``None``: no limit)."""
        self.triggered = 0
        """How many requests were affected so far."""
        self._service = service
        self._random = random.Random(seed)

    def matches(self, method: str, path: str) -> bool:
        """Whether a request is in scope (the probability is not consulted)."""
        if self.method is not None and method != self.method:
            return False
        if self.path is None:
            return True
        if isinstance(self.path, str):
            return path == self.path
        return self.path.fullmatch(path) is not None

    def remove(self) -> None:
        """Uninstall the fault (nothing happens when it is already gone)."""
        self._service._remove_fault(self)

    def _roll(self) -> bool:
        return self.probability >= 1.0 or self._random.random() < self.probability


# ---------------------------------------------------------------------------------------------------------
# The API, without sockets


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, str]
    headers: Mapping[str, str]
    body: bytes
    etag_override: str | None = None


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    crashed: bool = False  # sent like uvicorn's answer to an unhandled exception: chunked, then closed


def _dump(value: Any) -> bytes:
    # compact and UTF-8, like the orjson the real server uses
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _json(status: int, value: Any) -> _Response:
    return _Response(status, _dump(value), [("content-type", _JSON_TYPE)])


def _text(status: int, text: str) -> _Response:
    return _Response(status, text.encode("utf-8"), [("content-type", _TEXT_TYPE)])


def _crash() -> _Response:
    """What uvicorn answers when the application raises (the real server on a database error)."""
    return _Response(500, b"Internal Server Error", [("content-type", _TEXT_TYPE)], crashed=True)


def _error_response(error: ServiceError) -> _Response:
    if error.kind == "json":
        return _json(error.status, error.body)
    if error.kind == "text":
        return _text(error.status, str(error.body))
    if error.kind == "internal":
        return _crash()
    return _Response(error.status)


class _Invalid(Exception):
    """Request validation failed: answered 422 with FastAPI's ``{"detail": [...]}``."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors)
        self.errors = errors


_MISSING: Any = object()
_TRUE_WORDS = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE_WORDS = frozenset({"0", "off", "f", "false", "n", "no"})


class _Fields:
    """Reads fields out of a JSON body or the query, collecting errors in FastAPI/pydantic 1 form."""

    def __init__(self, where: str, data: Mapping[str, Any]) -> None:
        self.where = where
        self.data = data
        self.errors: list[dict[str, Any]] = []

    @classmethod
    def body(cls, request: _Request, path: _Fields | None = None) -> _Fields:
        """The JSON body's fields; errors of ``path`` (the path parameters) are reported with the body's.

        Like FastAPI, a body that is not JSON is reported alone, anything else together with the path.
        """
        errors = list(path.errors) if path is not None else []
        if not request.body.strip():
            errors.append({"loc": ["body"], "msg": "field required", "type": "value_error.missing"})
            raise _Invalid(errors)
        try:
            data = json.loads(request.body, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            doc = request.body.decode("utf-8", "replace")
            ctx = {"msg": exc.msg, "doc": doc, "pos": exc.pos, "lineno": exc.lineno, "colno": exc.colno}
            raise _Invalid(
                [{"loc": ["body", exc.pos], "msg": str(exc), "type": "value_error.jsondecode", "ctx": ctx}]
            ) from None
        except ValueError as exc:  # NaN and the like: not JSON, though Python's parser takes them
            error = {"loc": ["body", 0], "msg": str(exc), "type": "value_error.jsondecode"}
            raise _Invalid([error]) from None
        if not isinstance(data, dict):
            errors.append({"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"})
            raise _Invalid(errors)
        fields = cls("body", data)
        fields.errors = errors
        return fields

    def integer(self, name: str) -> Any:
        """An integer written in decimal (a path parameter)."""
        text = self.data[name]
        if not re.fullmatch(r"[+-]?[0-9]+", text.strip()):
            self.error([name], "value is not a valid integer", "type_error.integer")
            return None
        return int(text)

    def error(self, loc: Sequence[str | int], msg: str, kind: str, **ctx: Any) -> None:
        error: dict[str, Any] = {"loc": [self.where, *loc], "msg": msg, "type": kind}
        if ctx:
            error["ctx"] = ctx
        self.errors.append(error)

    def regex_error(self, loc: Sequence[str | int], pattern: re.Pattern[str]) -> None:
        # the real server's patterns are ours with a `$` (pydantic 1 matches from the start anyway)
        text = f"^{pattern.pattern}$" if pattern is VERSION_RE else f"{pattern.pattern}$"
        self.error(loc, f'string does not match regex "{text}"', "value_error.str.regex", pattern=text)

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        """Any JSON value; required unless a default is given."""
        if name in self.data:
            return self.data[name]
        if default is _MISSING:
            self.error([name], "field required", "value_error.missing")
        return default

    def _none(self, name: str, value: Any, default: Any) -> bool:
        """Whether ``value`` is a ``null`` where none is allowed (only optional fields take it); says so."""
        if value is None and default is not None:
            self.error([name], "none is not an allowed value", "type_error.none.not_allowed")
            return True
        return False

    def string(self, name: str, pattern: re.Pattern[str] | None = None, default: Any = _MISSING) -> Any:
        """A string, matched in full against ``pattern``; ``None`` passes when it is the default."""
        value = _as_str(self.raw(name, default))
        if value is _MISSING or (value is None and default is None) or self._none(name, value, default):
            return value
        if not isinstance(value, str):
            self.error([name], "str type expected", "type_error.str")
        elif pattern is not None and not pattern.fullmatch(value):
            self.regex_error([name], pattern)
        return value

    def string_list(self, name: str, pattern: re.Pattern[str]) -> Any:
        """A non-empty list of distinct strings matching ``pattern``."""
        value = self.raw(name)
        if value is _MISSING or self._none(name, value, _MISSING):
            return value
        if not isinstance(value, list):
            self.error([name], "value is not a valid list", "type_error.list")
            return value
        if not value:
            self.error(
                [name], "ensure this value has at least 1 items", "value_error.list.min_items", limit_value=1
            )
        value = [_as_str(item) for item in value]
        for index, item in enumerate(value):
            if not isinstance(item, str):
                self.error([name, index], "str type expected", "type_error.str")
            elif not pattern.fullmatch(item):
                self.regex_error([name, index], pattern)
        if all(isinstance(item, str) for item in value) and len(set(value)) != len(value):
            self.error([name], "the list has duplicated items", "value_error.list.unique_items")
        return value

    def mapping(
        self,
        name: str,
        key_pattern: re.Pattern[str],
        value_pattern: re.Pattern[str] | None = None,
        default: Any = _MISSING,
    ) -> Any:
        """A JSON object whose keys (and, with ``value_pattern``, string values) match the patterns."""
        value = _as_dict(self.raw(name, default))
        if value is _MISSING or self._none(name, value, default):
            return value
        if not isinstance(value, dict):
            self.error([name], "value is not a valid dict", "type_error.dict")
            return value
        if value_pattern is not None:
            value = {key: _as_str(item) for key, item in value.items()}
        for key, item in value.items():
            if not key_pattern.fullmatch(key):
                self.regex_error([name, "__key__"], key_pattern)
            if value_pattern is None:
                continue
            if not isinstance(item, str):
                self.error([name, key], "str type expected", "type_error.str")
            elif not value_pattern.fullmatch(item):
                self.regex_error([name, key], value_pattern)
        return value

    def boolean(self, name: str, default: bool) -> bool:
        """A query flag read the way pydantic 1 reads booleans (``true``, ``True``, ``1``, ``yes``...)."""
        value = self.data.get(name)
        if value is None:
            return default
        word = str(value).lower()
        if word in _TRUE_WORDS:
            return True
        if word not in _FALSE_WORDS:
            self.error([name], "value could not be parsed to a boolean", "type_error.bool")
        return False

    def root_error(self, msg: str, kind: str) -> None:
        """A whole-model error (pydantic's ``__root__``)."""
        self.error(["__root__"], msg, kind)

    def check(self) -> None:
        """Raise :class:`_Invalid` if anything went wrong."""
        if self.errors:
            raise _Invalid(self.errors)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _as_str(value: Any) -> Any:
    """A JSON number as the string pydantic 1 makes of it for a string field (``1.0`` -> ``"1.0"``)."""
    if isinstance(value, (int, float)):  # booleans too, as pydantic 1 does: true -> "True"
        return str(value)
    return value


def _as_dict(value: Any) -> Any:
    """A list of pairs as the object pydantic 1 makes of it where an object is expected (``[]`` -> ``{}``)."""
    if isinstance(value, list):
        try:
            return dict(value)
        except (TypeError, ValueError):
            return value
    return value


def _path_int(name: str, text: str) -> int:
    path = _Fields("path", {name: text})
    value = path.integer(name)
    path.check()
    return int(value)


_SETTINGS_PARAM_RE = re.compile(r"([a-zA-Z_0-9.]+(,[a-zA-Z_0-9.]+)*)?")
_NAME = r"[a-zA-Z_0-9]+"
_ONE_FILTER = rf"{_NAME}:(\*|\({_NAME}(,{_NAME})*\))"
_FILTERS_PARAM_RE = re.compile(rf"(\*|{_ONE_FILTER}(,{_ONE_FILTER})*)?")
# The real 0.5.7 server extracts the filters with `[a-z]+` for the feature name (its validation regex allows
# `[a-zA-Z_0-9]+`), so `trust_level:(x)` is read as a filter on `level` and `User:(x)` as one on `ser`; both
# are then dropped as unknown features, and rules conditioned on those features never match a value filter.
_FILTER_BUGGY_RE = re.compile(r"(?P<key>[a-z]+):(\((?P<values>[^)]+)\)|\*)")
_FILTER_FIXED_RE = re.compile(rf"(?P<key>{_NAME}):(\((?P<values>[^)]+)\)|\*)")
_SEARCH_CONDITIONS_RE = re.compile(rf"{_NAME}:{_NAME}(,{_NAME}:{_NAME})*")

_Endpoint = Callable[["_Api", _Request, dict[str, str]], _Response]


class _Api:
    """The Heksher v1 HTTP API over a :class:`HeksherState`: requests in, responses out, no I/O."""

    def __init__(
        self, state: HeksherState, *, emulate_filter_bug: bool, version: str, races: RaceGate
    ) -> None:
        self.state = state
        self.filter_re = _FILTER_BUGGY_RE if emulate_filter_bug else _FILTER_FIXED_RE
        self.version = version
        self.races = races  # holds declarations of new settings so that they race (see _race.py)

    def handle(self, request: _Request) -> _Response:
        path_known = False
        for method, pattern, handler in _ROUTES:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            path_known = True
            if method != request.method:
                continue
            try:
                return handler(self, request, match.groupdict())
            except ServiceError as error:
                return _error_response(error)
            except _Invalid as invalid:
                return _json(422, {"detail": invalid.errors})
        if path_known:
            return _json(405, {"detail": "Method Not Allowed"})
        return _json(404, {"detail": "Not Found"})

    # -- health and context features

    def health(self, request: _Request, params: dict[str, str]) -> _Response:
        return _json(200, {"version": self.version})

    def list_context_features(self, request: _Request, params: dict[str, str]) -> _Response:
        return _json(200, {"context_features": self.state.context_features()})

    def get_context_feature(self, request: _Request, params: dict[str, str]) -> _Response:
        index = self.state.context_feature_index(params["name"])
        return _Response(404) if index is None else _json(200, {"index": index})

    def add_context_feature(self, request: _Request, params: dict[str, str]) -> _Response:
        fields = _Fields.body(request)
        name = fields.string("context_feature", CONTEXT_FEATURE_RE)
        fields.check()
        self.state.add_context_feature(name)
        return _Response(204)

    def delete_context_feature(self, request: _Request, params: dict[str, str]) -> _Response:
        self.state.delete_context_feature(params["name"])
        return _Response(204)

    def move_context_feature(self, request: _Request, params: dict[str, str]) -> _Response:
        fields = _Fields.body(request)
        # like the real server's Union[after, before]: `to_after` wins when both are given
        before = "to_after" not in fields.data and "to_before" in fields.data
        target = fields.string("to_before" if before else "to_after")
        fields.check()
        self.state.move_context_feature(params["name"], target, before=before)
        return _Response(204)

    # -- settings

    def declare(self, request: _Request, params: dict[str, str]) -> _Response:
        fields = _Fields.body(request)
        name = fields.string("name", SETTING_NAME_RE)
        features = fields.string_list("configurable_features", CONTEXT_FEATURE_RE)
        type_text = fields.raw("type")
        setting_type = None
        if isinstance(type_text, str):
            try:
                setting_type = parse_setting_type(type_text)
            except ValueError as exc:
                fields.error(["type"], str(exc), "value_error")
        elif type_text is not _MISSING and not fields._none("type", type_text, _MISSING):
            fields.error(["type"], f"expected string, got {type(type_text).__name__}", "value_error")
        default_value = fields.raw("default_value")
        metadata = fields.mapping("metadata", METADATA_KEY_RE, default={})
        alias = fields.string("alias", SETTING_NAME_RE, default=None)
        version = fields.string("version", VERSION_RE, default="1.0")
        fields.check()
        assert setting_type is not None  # checked above: a type error would have been raised
        if not setting_type.validate(default_value):
            fields.root_error(
                f"type ({setting_type}) and default value ({default_value}) must match", "type_error"
            )
        if alias == name:
            fields.root_error(f"name ({name}) and alias ({alias}) must differ", "value_error")
        fields.check()
        declaration = Declaration(
            name=name,
            configurable_features=tuple(features),
            type=setting_type,
            default_value=default_value,
            metadata=metadata,
            alias=alias,
            version=version,
        )
        status, outcome = self.races.declare(self.state, declaration)
        return _json(status, outcome)

    def list_settings(self, request: _Request, params: dict[str, str]) -> _Response:
        fields = _Fields("query", request.query)
        additional = fields.boolean("include_additional_data", False)
        fields.check()
        return _json(200, self.state.list_settings(include_additional_data=additional))

    def get_setting(self, request: _Request, params: dict[str, str]) -> _Response:
        return _json(200, self.state.setting_details(params["name"]))

    def delete_setting(self, request: _Request, params: dict[str, str]) -> _Response:
        self.state.delete_setting(params["name"])
        return _Response(204)

    # -- query

    def query(self, request: _Request, params: dict[str, str]) -> _Response:
        fields = _Fields("query", request.query)
        raw_settings = fields.string("settings", _SETTINGS_PARAM_RE, default=None)
        raw_filters = fields.string("context_filters", _FILTERS_PARAM_RE, default="*")
        include_metadata = fields.boolean("include_metadata", False)
        fields.check()

        names: list[str] | None = None
        if raw_settings is not None:
            names = raw_settings.split(",") if raw_settings else []
        filters: dict[str, list[str] | None] | None = None
        if raw_filters != "*":
            filters = {}
            for match in self.filter_re.finditer(raw_filters):
                feature = match["key"]
                if feature in filters:
                    return _text(400, f"context name repeated in context filter: {feature}")
                filters[feature] = None if match["values"] is None else match["values"].split(",")

        body = _dump(self.state.query(names, filters, include_metadata=include_metadata))
        etag = request.etag_override or f'"{hashlib.md5(body).hexdigest()}"'
        if_none_match = request.headers.get("if-none-match")
        if if_none_match is not None and (if_none_match.strip() == "*" or etag in if_none_match):
            return _Response(304, b"", [("etag", etag)])
        return _Response(200, body, [("content-type", _JSON_TYPE), ("etag", etag)])

    # -- rules

    def _rule_id(self, params: dict[str, str]) -> int:
        return _path_int("rule_id", params["rule_id"])

    def _rule_and_body(self, request: _Request, params: dict[str, str]) -> tuple[int, _Fields]:
        """The rule id from the path and the body's fields; their errors are reported together."""
        path = _Fields("path", params)
        rule_id = path.integer("rule_id")
        if "key" in params and not METADATA_KEY_RE.fullmatch(params["key"]):
            path.regex_error(["key"], METADATA_KEY_RE)
        return rule_id, _Fields.body(request, path)

    def add_rule(self, request: _Request, params: dict[str, str]) -> _Response:
        fields = _Fields.body(request)
        setting = fields.string("setting", SETTING_NAME_RE)
        feature_values = fields.mapping("feature_values", CONTEXT_FEATURE_RE, CONTEXT_FEATURE_RE)
        if isinstance(feature_values, dict) and not feature_values:
            fields.error(["feature_values"], "feature_values must not be empty", "value_error")
        value = fields.raw("value")
        metadata = fields.mapping("metadata", METADATA_KEY_RE, default={})
        fields.check()
        rule_id = self.state.add_rule(setting, feature_values, value, metadata)
        response = _json(201, {"rule_id": rule_id})
        response.headers.append(("location", f"/{rule_id}"))  # sic: relative to nothing, as the real one
        return response

    def search_rule(self, request: _Request, params: dict[str, str]) -> _Response:
        fields = _Fields("query", request.query)
        setting = fields.string("setting")
        conditions = fields.string("feature_values", _SEARCH_CONDITIONS_RE)
        fields.check()
        feature_values = dict(pair.split(":", 1) for pair in conditions.split(","))
        rule_id = self.state.search_rule(setting, feature_values)
        return _Response(404) if rule_id is None else _json(200, {"rule_id": rule_id})

    def get_rule(self, request: _Request, params: dict[str, str]) -> _Response:
        return _json(200, self.state.rule_details(self._rule_id(params)))

    def set_rule_value(self, request: _Request, params: dict[str, str]) -> _Response:
        rule_id, fields = self._rule_and_body(request, params)
        value = fields.raw("value")
        fields.check()
        self.state.set_rule_value(rule_id, value)
        return _Response(204)

    def delete_rule(self, request: _Request, params: dict[str, str]) -> _Response:
        self.state.delete_rule(self._rule_id(params))
        return _Response(204)

    def get_rule_metadata(self, request: _Request, params: dict[str, str]) -> _Response:
        return _json(200, self.state.rule_metadata(self._rule_id(params)))

    def _metadata_body(self, request: _Request, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        rule_id, fields = self._rule_and_body(request, params)
        metadata = fields.mapping("metadata", METADATA_KEY_RE, default={})
        fields.check()
        return rule_id, dict(metadata)

    def update_rule_metadata(self, request: _Request, params: dict[str, str]) -> _Response:
        self.state.update_rule_metadata(*self._metadata_body(request, params))
        return _Response(204)

    def replace_rule_metadata(self, request: _Request, params: dict[str, str]) -> _Response:
        self.state.replace_rule_metadata(*self._metadata_body(request, params))
        return _Response(204)

    def delete_rule_metadata(self, request: _Request, params: dict[str, str]) -> _Response:
        self.state.delete_rule_metadata(self._rule_id(params))
        return _Response(204)

    def _metadata_key(self, params: dict[str, str]) -> str:
        key = params["key"]
        if not METADATA_KEY_RE.fullmatch(key):
            fields = _Fields("path", {})
            fields.regex_error(["key"], METADATA_KEY_RE)
            fields.check()
        return key

    def set_rule_metadata_key(self, request: _Request, params: dict[str, str]) -> _Response:
        rule_id, fields = self._rule_and_body(request, params)
        value = fields.raw("value")
        fields.check()
        self.state.set_rule_metadata_key(rule_id, params["key"], value)
        return _Response(204)

    def delete_rule_metadata_key(self, request: _Request, params: dict[str, str]) -> _Response:
        rule_id = self._rule_id(params)
        self.state.delete_rule_metadata_key(rule_id, self._metadata_key(params))
        return _Response(204)


def _route(method: str, path: str, handler: _Endpoint) -> tuple[str, re.Pattern[str], _Endpoint]:
    return method, re.compile(re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path)), handler


# the order matters where paths overlap: /rules/search before /rules/{rule_id}
_ROUTES = [
    _route("GET", "/api/health", _Api.health),
    _route("GET", "/api/v1/context_features", _Api.list_context_features),
    _route("POST", "/api/v1/context_features", _Api.add_context_feature),
    _route("GET", "/api/v1/context_features/{name}", _Api.get_context_feature),
    _route("DELETE", "/api/v1/context_features/{name}", _Api.delete_context_feature),
    _route("PATCH", "/api/v1/context_features/{name}/index", _Api.move_context_feature),
    _route("POST", "/api/v1/settings/declare", _Api.declare),
    _route("GET", "/api/v1/settings", _Api.list_settings),
    _route("GET", "/api/v1/settings/{name}", _Api.get_setting),
    _route("DELETE", "/api/v1/settings/{name}", _Api.delete_setting),
    _route("GET", "/api/v1/query", _Api.query),
    _route("POST", "/api/v1/rules", _Api.add_rule),
    _route("GET", "/api/v1/rules/search", _Api.search_rule),
    _route("GET", "/api/v1/rules/{rule_id}", _Api.get_rule),
    _route("DELETE", "/api/v1/rules/{rule_id}", _Api.delete_rule),
    _route("PATCH", "/api/v1/rules/{rule_id}", _Api.set_rule_value),  # deprecated twin of PUT .../value
    _route("PUT", "/api/v1/rules/{rule_id}/value", _Api.set_rule_value),
    _route("GET", "/api/v1/rules/{rule_id}/metadata", _Api.get_rule_metadata),
    _route("POST", "/api/v1/rules/{rule_id}/metadata", _Api.update_rule_metadata),
    _route("PUT", "/api/v1/rules/{rule_id}/metadata", _Api.replace_rule_metadata),
    _route("DELETE", "/api/v1/rules/{rule_id}/metadata", _Api.delete_rule_metadata),
    _route("PUT", "/api/v1/rules/{rule_id}/metadata/{key}", _Api.set_rule_metadata_key),
    _route("DELETE", "/api/v1/rules/{rule_id}/metadata/{key}", _Api.delete_rule_metadata_key),
]


# ---------------------------------------------------------------------------------------------------------
# Sockets


class _Server(ThreadingHTTPServer):
    """A threading HTTP server that tracks its connections so that ``stop()`` can cut them."""

    daemon_threads = True
    block_on_close = False  # we join our own threads, with a deadline

    def __init__(self, address: tuple[str, int], service: HeksherService) -> None:
        self.service = service
        self._tracked = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._connection_threads: set[threading.Thread] = set()
        self._wake_reader, self._wake_writer = socket.socketpair()
        super().__init__(address, _Handler)  # a failed bind calls server_close(), closing the pair too

    def run(self) -> None:
        """Accept connections until :meth:`wake` is called.

        Unlike ``serve_forever()``, which notices ``shutdown()`` only at its next poll, this loop waits on
        the listening socket and a wake-up socket together, so stopping costs no poll interval.
        """
        # non-blocking accept: a client that gives up between select() and accept() must not hang the loop
        self.socket.setblocking(False)
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self._wake_reader:
                        return
                    self._accept()

    def _accept(self) -> None:
        try:
            request, client_address = self.get_request()
        except OSError:
            return  # nothing to accept after all
        request.setblocking(True)  # handlers read and write in blocking mode
        try:
            self.process_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def wake(self) -> None:
        """Make :meth:`run` return."""
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"x")

    def server_close(self) -> None:
        super().server_close()
        self._wake_reader.close()
        self._wake_writer.close()

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            daemon=True,
            name=f"heksher-shm-testing-{client_address}",
        )
        with self._tracked:
            self._connections.add(request)
            self._connection_threads.add(thread)
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._tracked:
                self._connection_threads.discard(threading.current_thread())

    def shutdown_request(self, request: Any) -> None:
        with self._tracked:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # connections cut by stop() or by clients are routine here; keep stderr quiet
        _LOG.debug("connection from %s ended with an error", client_address, exc_info=True)

    def cut_connections(self) -> None:
        """Shut down every open client connection, waking handler threads blocked on reads."""
        with self._tracked:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by its handler
                connection.shutdown(socket.SHUT_RDWR)

    def join_threads(self, timeout: float) -> None:
        """Wait (up to ``timeout`` seconds in all) for the connection threads to finish."""
        deadline = time.monotonic() + timeout
        with self._tracked:
            threads = list(self._connection_threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients hold long-lived connections
    # One buffered write per response and no Nagle: headers and body sent as separate small segments
    # otherwise meet the peer's delayed ACK and cost ~40 ms per request on a keep-alive connection.
    wbufsize = -1
    disable_nagle_algorithm = True
    server: _Server

    def version_string(self) -> str:
        return "uvicorn"  # the Server header of a real Heksher

    def log_message(self, format: str, *args: Any) -> None:
        _LOG.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_GET
    do_PUT = do_GET
    do_PATCH = do_GET
    do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _serve(self) -> None:
        service = self.server.service
        received = time.monotonic()
        try:
            body = self._read_body()
        except ValueError:
            self.close_connection = True
            self._send(_text(400, "bad request body framing"))
            return
        url = urlsplit(self.path)
        path = unquote(url.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        method = self.command.upper()

        def record(status: int | None, fault: FaultKind | None) -> None:
            service._record(RequestRecord(method, path, query, url.query, status, received, fault))

        fault = service._pick_fault(method, path)
        if fault is not None and fault.delay > 0 and service._stopping.wait(fault.delay):
            record(None, fault.kind)
            self.close_connection = True
            return
        kind = fault.kind if fault is not None else None
        request = _Request(method, path, query, _HeaderView(self.headers), body)

        if fault is None or kind in ("delay", "truncated_body", "wrong_etag"):
            if fault is not None and kind == "wrong_etag":
                request.etag_override = fault.etag
            try:
                response = service._api.handle(request)
            except Exception:  # a bug here: answer like uvicorn does, and say so
                _LOG.exception("in-memory Heksher service failed on %s %s", method, path)
                response = _crash()
        elif kind == "status":
            assert fault.status is not None
            response = _fault_body_response(fault.status, fault.body)
        elif kind == "malformed_body":
            raw = fault.body if isinstance(fault.body, bytes) else str(fault.body).encode()
            response = _Response(200, raw, [("content-type", _JSON_TYPE)])
        elif kind == "wrong_shape":
            response = _json(200, _plain_json(fault.body))
        elif kind == "huge_body":
            response = _json(200, {"settings": {}, "padding": "x" * max(0, fault.size - 30)})
        else:  # dropped_connection
            record(None, kind)
            self.close_connection = True
            return

        record(response.status, kind)
        if response.crashed:
            self.close_connection = True
            self._send_chunked(response)
        elif kind == "truncated_body":
            self.close_connection = True
            self._send(response, truncate=True)
        else:
            self._send(response)

    def _send(self, response: _Response, *, truncate: bool = False) -> None:
        self.send_response(response.status)
        for name, value in response.headers:
            self.send_header(name, value)
        body = response.body
        if response.status not in (204, 304):  # these never carry a body, nor its length
            # a truncated body still promises its full length (at least one byte more than is sent)
            self.send_header("content-length", str(max(len(body), 1) if truncate else len(body)))
        if self.close_connection:
            self.send_header("connection", "close")
        self.end_headers()
        if body and response.status not in (204, 304):
            self.wfile.write(body[: len(body) // 2] if truncate else body)
        self.wfile.flush()

    def _send_chunked(self, response: _Response) -> None:
        """Send the body as one chunk, as uvicorn streams its error page."""
        self.send_response(response.status)
        for name, value in response.headers:
            self.send_header(name, value)
        self.send_header("transfer-encoding", "chunked")
        if self.close_connection:
            self.send_header("connection", "close")
        self.end_headers()
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(response.body), response.body))
        self.wfile.flush()


class _HeaderView(Mapping[str, str]):
    """Case-insensitive read access to the request headers."""

    def __init__(self, message: Any) -> None:
        self._headers: dict[str, str] = {name.lower(): str(value) for name, value in message.items()}

    def __getitem__(self, key: str) -> str:
        return self._headers[key.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._headers)

    def __len__(self) -> int:
        return len(self._headers)


def _fault_body_response(
    status: int, body: bytes | str | Mapping[str, Any] | Sequence[Any] | None
) -> _Response:
    if body is None:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "Injected fault"
        return _text(status, phrase)
    if isinstance(body, bytes):
        return _Response(status, body, [("content-type", _TEXT_TYPE)])
    if isinstance(body, str):
        return _text(status, body)
    return _json(status, _plain_json(body))


def _plain_json(body: object) -> Any:
    """Mappings and sequences given to a :class:`Fault` as the dicts and lists ``json`` can write."""
    if isinstance(body, Mapping):
        return dict(body)
    if isinstance(body, Sequence) and not isinstance(body, (str, bytes)):
        return list(body)
    return body


# ---------------------------------------------------------------------------------------------------------
# The service


class HeksherService:
    """An in-memory Heksher service listening on a real socket, for tests.

    ::

        with HeksherService(context_features=["user", "theme", "environment"]) as service:
            service.declare("cache_size", "int", 10)
            service.add_rule("cache_size", {"user": "alice"}, 20)
            httpx.get(f"{service.url}/api/v1/query").json()
            # {"settings": {"cache_size": {"default_value": 10, "rules": [{"value": 20, ...}]}}}

    ``port=0`` picks a free port; once started, the service keeps that port across ``stop()``/``start()``
    so clients can reconnect after a simulated outage, and it keeps its settings and rules too.
    ``emulate_filter_bug`` reproduces the real server reading filter feature names as ``[a-z]+``
    (see ``GET /api/v1/query``).  The constructor takes plain values only, so a child process can build
    its own service from the same arguments.

    **Declaration races.**  A real Heksher creates a setting in two steps (look the name up, then insert
    it), so two clients declaring the same *new* setting at the same moment race: one gets
    ``200 {"outcome": "created"}``, the other a bare ``500`` (plain text ``Internal Server Error``, and the
    connection is closed); declaring again answers ``uptodate``.  This service answers declarations in one
    step, so it races only when a test asks: :meth:`race_declarations` holds the next declaration that
    would create a setting until ``parties`` declarations of that setting are held together (or a
    timeout), then the first to arrive creates it and each other one gets the 500, every time::

        race = service.race_declarations(parties=2)
        ...  # two clients declare the same new setting
        assert race.wait(10) and sorted(race.statuses) == [200, 500]

    The admin helper :meth:`declare` never races.
    """

    def __init__(
        self,
        context_features: Sequence[str] = DEFAULT_CONTEXT_FEATURES,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        emulate_filter_bug: bool = True,
        version: str = HEKSHER_VERSION,
    ) -> None:
        self.host = host
        """The address the service listens on."""
        self.port = port
        """The port the service listens on (the real one once started)."""
        self.state = HeksherState(context_features)
        """The model behind the service; tests may call it directly."""
        self._races = RaceGate()
        self._api = _Api(
            self.state, emulate_filter_bug=emulate_filter_bug, version=version, races=self._races
        )
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._log = threading.Condition()  # guards _requests and _faults
        self._requests: list[RequestRecord] = []
        self._faults: list[InjectedFault] = []

    # -- lifecycle

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8123`` (valid once started)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the service is accepting connections."""
        return self._server is not None

    def start(self) -> HeksherService:
        """Start listening (no-op when running); returns ``self``."""
        if self._server is not None:
            return self
        self._stopping.clear()
        self._races.reopen()
        server = _Server((self.host, self.port), self)
        self.port = server.server_address[1]
        thread = threading.Thread(
            target=server.run,
            daemon=True,
            name=f"heksher-shm-testing-{self.port}",
        )
        thread.start()
        self._server, self._thread = server, thread
        _LOG.debug("in-memory Heksher service listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop listening and cut open connections; returns promptly even with keep-alive clients."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        self._stopping.set()  # wakes handlers sleeping in a delay fault
        self._races.close()  # and handlers holding a declaration for a race
        server.wake()
        thread.join()  # no new connections after this
        server.cut_connections()
        server.server_close()
        server.join_threads(timeout=1.0)
        _LOG.debug("in-memory Heksher service on port %s stopped", self.port)

    def __enter__(self) -> HeksherService:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- request records

    def _record(self, record: RequestRecord) -> None:
        with self._log:
            self._requests.append(record)
            self._log.notify_all()

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of the requests received so far, oldest first."""
        with self._log:
            return list(self._requests)

    def count(self, method: str | None = None, path: str | None = None, status: int | None = None) -> int:
        """How many recorded requests match the method, path and status given (``None`` matches any)."""
        with self._log:
            return sum(1 for record in self._requests if _record_matches(record, method, path, status))

    def wait_for_requests(
        self,
        count: int,
        *,
        method: str | None = None,
        path: str | None = None,
        status: int | None = None,
        timeout: float = 5.0,
    ) -> bool:
        """Block until at least ``count`` matching requests are recorded; ``False`` on timeout."""
        with self._log:
            return self._log.wait_for(
                lambda: sum(1 for r in self._requests if _record_matches(r, method, path, status)) >= count,
                timeout,
            )

    def reset_requests(self) -> None:
        """Forget the recorded requests."""
        with self._log:
            self._requests.clear()

    # -- faults

    def inject_fault(
        self,
        fault: Fault,
        *,
        count: int | None = None,
        method: str | None = None,
        path: str | re.Pattern[str] | None = None,
        probability: float = 1.0,
        seed: int | None = None,
    ) -> InjectedFault:
        """Make matching requests misbehave as ``fault`` says.

        ``count`` limits how many requests are affected (no limit by default), ``method`` and ``path``
        (an exact path or a pattern matched in full) narrow the requests in scope, and ``probability``
        affects only that fraction of them, drawn from a generator seeded with ``seed``.  The first
        installed fault that applies wins.
        """
        if not 0.0 <= probability <= 1.0:
            raise ValueError("probability must be between 0 and 1")
        if count is not None and count < 1:
            raise ValueError("count must be positive")
        injected = InjectedFault(
            self, fault, count=count, method=method, path=path, probability=probability, seed=seed
        )
        with self._log:
            self._faults.append(injected)
        return injected

    def clear_faults(self) -> None:
        """Remove every injected fault."""
        with self._log:
            self._faults.clear()

    def _remove_fault(self, injected: InjectedFault) -> None:
        with self._log:
            if injected in self._faults:
                self._faults.remove(injected)

    def _pick_fault(self, method: str, path: str) -> Fault | None:
        with self._log:
            for injected in self._faults:
                if not injected.matches(method, path) or not injected._roll():
                    continue
                injected.triggered += 1
                if injected.remaining is not None:
                    injected.remaining -= 1
                    if injected.remaining <= 0:
                        self._faults.remove(injected)
                return injected.fault
        return None

    # -- declaration races

    def race_declarations(
        self, parties: int = 2, *, setting: str | None = None, timeout: float = 10.0
    ) -> DeclarationRace:
        """Make the next declarations of a new setting race, as they do on a real server.

        The next ``POST /api/v1/settings/declare`` that would create a setting (``setting``, when given) is
        held until ``parties`` declarations of that setting are held, or for ``timeout`` seconds at most;
        then the first to arrive creates the setting and each other one is answered with the real server's
        bare ``500``.  Returns a :class:`DeclarationRace` whose ``wait()`` and ``statuses`` tell how it
        went.  Several calls arm several races, caught in turn.
        """
        if parties < 1:
            raise ValueError("a race needs at least one party")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        race = DeclarationRace(parties, setting, timeout)
        self._races.arm(race)
        return race

    # -- admin helpers, straight on the state (no HTTP, not recorded)

    def declare(
        self,
        name: str,
        type: str,
        default_value: Any,
        configurable_features: Sequence[str] | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        alias: str | None = None,
        version: str = "1.0",
    ) -> dict[str, Any]:
        """Declare a setting as ``POST /api/v1/settings/declare`` would; returns the outcome body.

        ``configurable_features`` defaults to every context feature.  Raises :class:`ServiceError` where
        the endpoint would answer an error status (a 409 outcome included) and :class:`ValueError` for
        input the endpoint would reject with 422.
        """
        declaration = Declaration(
            name=name,
            configurable_features=tuple(
                self.state.context_features() if configurable_features is None else configurable_features
            ),
            type=parse_setting_type(type),
            default_value=default_value,
            metadata=dict(metadata or {}),
            alias=alias,
            version=version,
        )
        status, outcome = self.state.declare(declaration)
        if status != 200:
            raise ServiceError(status, "json", outcome)
        return outcome

    def add_rule(
        self,
        setting: str,
        feature_values: Mapping[str, str],
        value: Any,
        metadata: Mapping[str, Any] | None = None,
    ) -> int:
        """Add a rule (as ``POST /api/v1/rules``) and return its id; raises :class:`ServiceError`."""
        return self.state.add_rule(setting, feature_values, value, metadata)

    def set_rule_value(self, rule_id: int, value: Any) -> None:
        """Change a rule's value (as ``PUT /api/v1/rules/{id}/value``); raises :class:`ServiceError`."""
        self.state.set_rule_value(rule_id, value)

    def delete_rule(self, rule_id: int) -> None:
        """Delete a rule (as ``DELETE /api/v1/rules/{id}``); raises :class:`ServiceError`."""
        self.state.delete_rule(rule_id)

    def delete_setting(self, name: str) -> None:
        """Delete a setting and its rules (as ``DELETE /api/v1/settings/{name}``)."""
        self.state.delete_setting(name)

    @property
    def settings(self) -> dict[str, SettingInfo]:
        """A snapshot of the settings, keyed by canonical name."""
        return self.state.settings_snapshot()

    @property
    def rules(self) -> list[RuleInfo]:
        """A snapshot of the rules, by id."""
        return self.state.rules_snapshot()

    @property
    def context_features(self) -> list[str]:
        """The context features, in order."""
        return self.state.context_features()


def _record_matches(record: RequestRecord, method: str | None, path: str | None, status: int | None) -> bool:
    return (
        (method is None or record.method == method.upper())
        and (path is None or record.path == path)
        and (status is None or record.status == status)
    )
