"""Decoding query answers setting by setting gives exactly what decoding them whole gives."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from heksher_shm._model import protocol as proto
from heksher_shm.exceptions import HeksherProtocolError

# Values with the characters a cut between settings looks for, in strings and nested objects.
_tricky_text = st.text(alphabet='},"{:[]\\ab', max_size=12)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | _tricky_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_tricky_text, inner, max_size=3),
    max_leaves=8,
)
_names = st.from_regex(r"[a-zA-Z_0-9.]{1,12}", fullmatch=True)


def _answer(settings_: dict[str, Any], compact: bool = True) -> bytes:
    separators = (",", ":") if compact else (", ", ": ")
    return json.dumps({"settings": settings_}, separators=separators).encode()


def _plain(setting: proto.QuerySetting) -> Any:
    return msgspec.json.decode(msgspec.json.encode(setting))  # raw values as JSON, then as Python


def _whole(content: bytes) -> dict[str, Any]:
    decoded = proto.decode(proto.QUERY, 200, content, proto.QueryResponse)
    return {name: _plain(s) for name, s in decoded.settings.items()}


def _piecewise(content: bytes) -> dict[str, Any]:
    return {name: _plain(s) for name, s in proto.query_settings(200, content)}


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        _names,
        st.fixed_dictionaries(
            {
                "default_value": _json,
                "rules": st.lists(
                    st.fixed_dictionaries(
                        {
                            "value": _json,
                            "context_features": st.lists(st.tuples(_names, _names), max_size=2),
                            "rule_id": st.integers(min_value=1, max_value=10**6),
                        }
                    ),
                    max_size=4,
                ),
            }
        ),
        max_size=6,
    ),
    st.booleans(),
)
def test_piecewise_equals_whole(settings_: dict[str, Any], compact: bool) -> None:
    content = _answer(settings_, compact)
    assert _piecewise(content) == _whole(content)


def test_nested_mappings_that_look_like_cuts() -> None:
    value = {"a": {"b": 1}, "c": {"d": 'x},"e":{'}}
    content = _answer(
        {
            "first": {
                "default_value": value,
                "rules": [{"value": value, "context_features": [], "rule_id": 1}],
            },
            "second": {"default_value": '},"third":{', "rules": []},
        }
    )
    assert b'},"c":{' in content  # a candidate cut inside the first setting
    assert _piecewise(content) == _whole(content)
    assert list(dict(proto.query_settings(200, content))) == ["first", "second"]


@pytest.mark.parametrize(
    "content",
    [
        b'{"settings":{"x":[1,2]}}',
        b'{"settings":{"a":{"default_value":1,"rules":[]},"b":{"default_value":1,"rules":7}}}',
        b'{"settings":{"a":{"default_value":1,"rules":[]},"b":',
        b"not json",
    ],
)
def test_a_wrong_answer_is_a_protocol_error(content: bytes) -> None:
    with pytest.raises(HeksherProtocolError):
        list(proto.query_settings(200, content))


def test_empty_answer() -> None:
    assert list(proto.query_settings(200, b'{"settings":{}}')) == []
