"""The Heksher v1 HTTP API without sockets: a parsed :class:`Request` in, a :class:`Response` out.

:class:`Api` routes a request to its endpoint, which validates the fields (``_validation.py``), calls
the store (``_store.py``) and shapes the answer as a real Heksher 0.5.7 server does, error bodies and
known bugs included.  The socket server (``_http.py``) parses requests and sends responses; nothing
here does I/O.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from heksher_shm.testing._errors import ServiceError
from heksher_shm.testing._race import RaceGate
from heksher_shm.testing._records import Declaration
from heksher_shm.testing._store import HeksherState
from heksher_shm.testing._types import (
    CONTEXT_FEATURE_RE,
    METADATA_KEY_RE,
    SETTING_NAME_RE,
    VERSION_RE,
    dump_json,
    parse_setting_type,
)
from heksher_shm.testing._validation import MISSING, Fields, Invalid, path_int

__all__ = [
    "HEKSHER_VERSION",
    "JSON_TYPE",
    "TEXT_TYPE",
    "Api",
    "Request",
    "Response",
    "crash_response",
    "json_response",
    "text_response",
]

HEKSHER_VERSION = "0.5.7"
"""The Heksher version the service reports from ``/api/health`` and imitates."""

JSON_TYPE = "application/json"
"""The content type of JSON bodies."""
TEXT_TYPE = "text/plain; charset=utf-8"
"""The content type of plain-text bodies."""


@dataclass
class Request:
    """A request as the socket server parsed it (path unquoted, the last value of each query parameter)."""

    method: str
    path: str
    query: dict[str, str]
    headers: Mapping[str, str]
    body: bytes
    etag_override: str | None = None  # a wrong_etag fault: the tag the query endpoint claims and honours


@dataclass
class Response:
    """A response for the socket server to send."""

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    crashed: bool = False  # sent like uvicorn's answer to an unhandled exception: chunked, then closed


def json_response(status: int, value: Any) -> Response:
    """``value`` as a compact JSON body."""
    return Response(status, dump_json(value), [("content-type", JSON_TYPE)])


def text_response(status: int, text: str) -> Response:
    """``text`` as a plain-text body."""
    return Response(status, text.encode("utf-8"), [("content-type", TEXT_TYPE)])


def crash_response() -> Response:
    """What uvicorn answers when the application raises (the real server on a database error)."""
    return Response(500, b"Internal Server Error", [("content-type", TEXT_TYPE)], crashed=True)


def _error_response(error: ServiceError) -> Response:
    if error.kind == "json":
        return json_response(error.status, error.body)
    if error.kind == "text":
        return text_response(error.status, str(error.body))
    if error.kind == "internal":
        return crash_response()
    return Response(error.status)


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

_Endpoint = Callable[["Api", Request, dict[str, str]], Response]


class Api:
    """The Heksher v1 HTTP API over a :class:`HeksherState`: requests in, responses out, no I/O."""

    def __init__(
        self, state: HeksherState, *, emulate_filter_bug: bool, version: str, races: RaceGate
    ) -> None:
        self.state = state
        self.filter_re = _FILTER_BUGGY_RE if emulate_filter_bug else _FILTER_FIXED_RE
        self.version = version
        self.races = races  # holds declarations of new settings so that they race (see _race.py)

    def handle(self, request: Request) -> Response:
        """Answer ``request``: its endpoint's response, or FastAPI's 404/405/422 when it has none."""
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
            except Invalid as invalid:
                return json_response(422, {"detail": invalid.errors})
        if path_known:
            return json_response(405, {"detail": "Method Not Allowed"})
        return json_response(404, {"detail": "Not Found"})

    # -- health and context features

    def health(self, request: Request, params: dict[str, str]) -> Response:
        return json_response(200, {"version": self.version})

    def list_context_features(self, request: Request, params: dict[str, str]) -> Response:
        return json_response(200, {"context_features": self.state.context_features()})

    def get_context_feature(self, request: Request, params: dict[str, str]) -> Response:
        index = self.state.context_feature_index(params["name"])
        return Response(404) if index is None else json_response(200, {"index": index})

    def add_context_feature(self, request: Request, params: dict[str, str]) -> Response:
        fields = Fields.body(request.body)
        name = fields.string("context_feature", CONTEXT_FEATURE_RE)
        fields.check()
        self.state.add_context_feature(name)
        return Response(204)

    def delete_context_feature(self, request: Request, params: dict[str, str]) -> Response:
        self.state.delete_context_feature(params["name"])
        return Response(204)

    def move_context_feature(self, request: Request, params: dict[str, str]) -> Response:
        fields = Fields.body(request.body)
        # like the real server's Union[after, before]: `to_after` wins when both are given
        before = "to_after" not in fields.data and "to_before" in fields.data
        target = fields.string("to_before" if before else "to_after")
        fields.check()
        self.state.move_context_feature(params["name"], target, before=before)
        return Response(204)

    # -- settings

    def declare(self, request: Request, params: dict[str, str]) -> Response:
        fields = Fields.body(request.body)
        name = fields.string("name", SETTING_NAME_RE)
        features = fields.string_list("configurable_features", CONTEXT_FEATURE_RE)
        type_text = fields.raw("type")
        setting_type = None
        if isinstance(type_text, str):
            try:
                setting_type = parse_setting_type(type_text)
            except ValueError as exc:
                fields.error(["type"], str(exc), "value_error")
        elif type_text is not MISSING and not fields.none_refused("type", type_text, MISSING):
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
        return json_response(status, outcome)

    def list_settings(self, request: Request, params: dict[str, str]) -> Response:
        fields = Fields("query", request.query)
        additional = fields.boolean("include_additional_data", False)
        fields.check()
        return json_response(200, self.state.list_settings(include_additional_data=additional))

    def get_setting(self, request: Request, params: dict[str, str]) -> Response:
        return json_response(200, self.state.setting_details(params["name"]))

    def delete_setting(self, request: Request, params: dict[str, str]) -> Response:
        self.state.delete_setting(params["name"])
        return Response(204)

    # -- query

    def query(self, request: Request, params: dict[str, str]) -> Response:
        fields = Fields("query", request.query)
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
                    return text_response(400, f"context name repeated in context filter: {feature}")
                filters[feature] = None if match["values"] is None else match["values"].split(",")

        body = self.state.query_json(names, filters, include_metadata=include_metadata)
        etag = request.etag_override or f'"{hashlib.md5(body).hexdigest()}"'
        if_none_match = request.headers.get("if-none-match")
        if if_none_match is not None and (if_none_match.strip() == "*" or etag in if_none_match):
            return Response(304, b"", [("etag", etag)])
        return Response(200, body, [("content-type", JSON_TYPE), ("etag", etag)])

    # -- rules

    def _rule_id(self, params: dict[str, str]) -> int:
        return path_int("rule_id", params["rule_id"])

    def _rule_and_body(self, request: Request, params: dict[str, str]) -> tuple[int, Fields]:
        """The rule id from the path and the body's fields; their errors are reported together."""
        path = Fields("path", params)
        rule_id = path.integer("rule_id")
        if "key" in params and not METADATA_KEY_RE.fullmatch(params["key"]):
            path.regex_error(["key"], METADATA_KEY_RE)
        return rule_id, Fields.body(request.body, path)

    def add_rule(self, request: Request, params: dict[str, str]) -> Response:
        fields = Fields.body(request.body)
        setting = fields.string("setting", SETTING_NAME_RE)
        feature_values = fields.mapping("feature_values", CONTEXT_FEATURE_RE, CONTEXT_FEATURE_RE)
        if isinstance(feature_values, dict) and not feature_values:
            fields.error(["feature_values"], "feature_values must not be empty", "value_error")
        value = fields.raw("value")
        metadata = fields.mapping("metadata", METADATA_KEY_RE, default={})
        fields.check()
        rule_id = self.state.add_rule(setting, feature_values, value, metadata)
        response = json_response(201, {"rule_id": rule_id})
        response.headers.append(("location", f"/{rule_id}"))  # sic: relative to nothing, as the real one
        return response

    def search_rule(self, request: Request, params: dict[str, str]) -> Response:
        fields = Fields("query", request.query)
        setting = fields.string("setting")
        conditions = fields.string("feature_values", _SEARCH_CONDITIONS_RE)
        fields.check()
        feature_values = dict(pair.split(":", 1) for pair in conditions.split(","))
        rule_id = self.state.search_rule(setting, feature_values)
        return Response(404) if rule_id is None else json_response(200, {"rule_id": rule_id})

    def get_rule(self, request: Request, params: dict[str, str]) -> Response:
        return json_response(200, self.state.rule_details(self._rule_id(params)))

    def set_rule_value(self, request: Request, params: dict[str, str]) -> Response:
        rule_id, fields = self._rule_and_body(request, params)
        value = fields.raw("value")
        fields.check()
        self.state.set_rule_value(rule_id, value)
        return Response(204)

    def delete_rule(self, request: Request, params: dict[str, str]) -> Response:
        self.state.delete_rule(self._rule_id(params))
        return Response(204)

    def get_rule_metadata(self, request: Request, params: dict[str, str]) -> Response:
        return json_response(200, self.state.rule_metadata(self._rule_id(params)))

    def _metadata_body(self, request: Request, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        rule_id, fields = self._rule_and_body(request, params)
        metadata = fields.mapping("metadata", METADATA_KEY_RE, default={})
        fields.check()
        return rule_id, dict(metadata)

    def update_rule_metadata(self, request: Request, params: dict[str, str]) -> Response:
        self.state.update_rule_metadata(*self._metadata_body(request, params))
        return Response(204)

    def replace_rule_metadata(self, request: Request, params: dict[str, str]) -> Response:
        self.state.replace_rule_metadata(*self._metadata_body(request, params))
        return Response(204)

    def delete_rule_metadata(self, request: Request, params: dict[str, str]) -> Response:
        self.state.delete_rule_metadata(self._rule_id(params))
        return Response(204)

    def _metadata_key(self, params: dict[str, str]) -> str:
        key = params["key"]
        if not METADATA_KEY_RE.fullmatch(key):
            fields = Fields("path", {})
            fields.regex_error(["key"], METADATA_KEY_RE)
            fields.check()
        return key

    def set_rule_metadata_key(self, request: Request, params: dict[str, str]) -> Response:
        rule_id, fields = self._rule_and_body(request, params)
        value = fields.raw("value")
        fields.check()
        self.state.set_rule_metadata_key(rule_id, params["key"], value)
        return Response(204)

    def delete_rule_metadata_key(self, request: Request, params: dict[str, str]) -> Response:
        rule_id = self._rule_id(params)
        self.state.delete_rule_metadata_key(rule_id, self._metadata_key(params))
        return Response(204)


def _route(method: str, path: str, handler: _Endpoint) -> tuple[str, re.Pattern[str], _Endpoint]:
    return method, re.compile(re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path)), handler


# the order matters where paths overlap: /rules/search before /rules/{rule_id}
_ROUTES = [
    _route("GET", "/api/health", Api.health),
    _route("GET", "/api/v1/context_features", Api.list_context_features),
    _route("POST", "/api/v1/context_features", Api.add_context_feature),
    _route("GET", "/api/v1/context_features/{name}", Api.get_context_feature),
    _route("DELETE", "/api/v1/context_features/{name}", Api.delete_context_feature),
    _route("PATCH", "/api/v1/context_features/{name}/index", Api.move_context_feature),
    _route("POST", "/api/v1/settings/declare", Api.declare),
    _route("GET", "/api/v1/settings", Api.list_settings),
    _route("GET", "/api/v1/settings/{name}", Api.get_setting),
    _route("DELETE", "/api/v1/settings/{name}", Api.delete_setting),
    _route("GET", "/api/v1/query", Api.query),
    _route("POST", "/api/v1/rules", Api.add_rule),
    _route("GET", "/api/v1/rules/search", Api.search_rule),
    _route("GET", "/api/v1/rules/{rule_id}", Api.get_rule),
    _route("DELETE", "/api/v1/rules/{rule_id}", Api.delete_rule),
    _route("PATCH", "/api/v1/rules/{rule_id}", Api.set_rule_value),  # deprecated twin of PUT .../value
    _route("PUT", "/api/v1/rules/{rule_id}/value", Api.set_rule_value),
    _route("GET", "/api/v1/rules/{rule_id}/metadata", Api.get_rule_metadata),
    _route("POST", "/api/v1/rules/{rule_id}/metadata", Api.update_rule_metadata),
    _route("PUT", "/api/v1/rules/{rule_id}/metadata", Api.replace_rule_metadata),
    _route("DELETE", "/api/v1/rules/{rule_id}/metadata", Api.delete_rule_metadata),
    _route("PUT", "/api/v1/rules/{rule_id}/metadata/{key}", Api.set_rule_metadata_key),
    _route("DELETE", "/api/v1/rules/{rule_id}/metadata/{key}", Api.delete_rule_metadata_key),
]
