"""Request validation as the real server's FastAPI (pydantic 1) does it, and its 422 shapes.

:class:`Fields` reads fields out of a JSON body, a query or path parameters, collecting errors the way
pydantic 1 words them; :meth:`Fields.check` raises :class:`Invalid`, which the API answers with
``422 {"detail": [...]}``.  Pure: bytes and dicts in, values or errors out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from heksher_shm.testing._types import VERSION_RE, reject_constant

__all__ = ["MISSING", "Fields", "Invalid", "path_int"]


class Invalid(Exception):
    """Request validation failed: answered 422 with FastAPI's ``{"detail": [...]}``."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors)
        self.errors = errors


MISSING: Any = object()
"""The default of a required field (and what reading a missing one returns)."""
_TRUE_WORDS = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE_WORDS = frozenset({"0", "off", "f", "false", "n", "no"})


class Fields:
    """Reads fields out of a JSON body or the query, collecting errors in FastAPI/pydantic 1 form."""

    def __init__(self, where: str, data: Mapping[str, Any]) -> None:
        self.where = where
        self.data = data
        self.errors: list[dict[str, Any]] = []

    @classmethod
    def body(cls, body: bytes, path: Fields | None = None) -> Fields:
        """The fields of a JSON ``body``; errors of ``path`` (the path parameters) are reported with it.

        Like FastAPI, a body that is not JSON is reported alone, anything else together with the path.
        """
        errors = list(path.errors) if path is not None else []
        if not body.strip():
            errors.append({"loc": ["body"], "msg": "field required", "type": "value_error.missing"})
            raise Invalid(errors)
        try:
            data = json.loads(body, parse_constant=reject_constant)
        except json.JSONDecodeError as exc:
            doc = body.decode("utf-8", "replace")
            ctx = {"msg": exc.msg, "doc": doc, "pos": exc.pos, "lineno": exc.lineno, "colno": exc.colno}
            raise Invalid(
                [{"loc": ["body", exc.pos], "msg": str(exc), "type": "value_error.jsondecode", "ctx": ctx}]
            ) from None
        except ValueError as exc:  # NaN and the like: not JSON, though Python's parser takes them
            error = {"loc": ["body", 0], "msg": str(exc), "type": "value_error.jsondecode"}
            raise Invalid([error]) from None
        if not isinstance(data, dict):
            errors.append({"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"})
            raise Invalid(errors)
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

    def raw(self, name: str, default: Any = MISSING) -> Any:
        """Any JSON value; required unless a default is given."""
        if name in self.data:
            return self.data[name]
        if default is MISSING:
            self.error([name], "field required", "value_error.missing")
        return default

    def none_refused(self, name: str, value: Any, default: Any) -> bool:
        """Whether ``value`` is a ``null`` where none is allowed (only optional fields take it); says so."""
        if value is None and default is not None:
            self.error([name], "none is not an allowed value", "type_error.none.not_allowed")
            return True
        return False

    def string(self, name: str, pattern: re.Pattern[str] | None = None, default: Any = MISSING) -> Any:
        """A string, matched in full against ``pattern``; ``None`` passes when it is the default."""
        value = _as_str(self.raw(name, default))
        if value is MISSING or (value is None and default is None) or self.none_refused(name, value, default):
            return value
        if not isinstance(value, str):
            self.error([name], "str type expected", "type_error.str")
        elif pattern is not None and not pattern.fullmatch(value):
            self.regex_error([name], pattern)
        return value

    def string_list(self, name: str, pattern: re.Pattern[str]) -> Any:
        """A non-empty list of distinct strings matching ``pattern``."""
        value = self.raw(name)
        if value is MISSING or self.none_refused(name, value, MISSING):
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
        default: Any = MISSING,
    ) -> Any:
        """A JSON object whose keys (and, with ``value_pattern``, string values) match the patterns."""
        value = _as_dict(self.raw(name, default))
        if value is MISSING or self.none_refused(name, value, default):
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
        """Raise :class:`Invalid` if anything went wrong."""
        if self.errors:
            raise Invalid(self.errors)


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


def path_int(name: str, text: str) -> int:
    path = Fields("path", {name: text})
    value = path.integer(name)
    path.check()
    return int(value)
