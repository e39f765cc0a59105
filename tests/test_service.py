"""The in-memory Heksher service, over real HTTP on 127.0.0.1.

Each test talks to the service the way a client would (httpx, keep-alive) and checks the answers the
real Heksher 0.5.7 gives: statuses, bodies and body kinds (JSON, plain text, empty).
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

import heksher_shm
import heksher_shm.testing
from heksher_shm.testing import (
    Fault,
    HeksherService,
    ServiceError,
    parse_setting_type,
)

Factory = Callable[..., HeksherService]


def http_client(service: HeksherService, timeout: float = 10) -> httpx.Client:
    # verify=False: plain HTTP needs no CA bundle, and loading it costs ~30 ms per client
    return httpx.Client(base_url=service.url, timeout=timeout, verify=False)


@pytest.fixture
def client(heksher_service: HeksherService) -> Iterator[httpx.Client]:
    with http_client(heksher_service) as http:
        yield http


def declare(client: httpx.Client, name: str = "cache_size", **fields: Any) -> httpx.Response:
    body = {"name": name, "configurable_features": ["user", "theme"], "type": "int", "default_value": 10}
    body.update(fields)
    return client.post("/api/v1/settings/declare", json=body)


def add_rule(client: httpx.Client, setting: str, value: Any, **feature_values: str) -> int:
    response = client.post(
        "/api/v1/rules", json={"setting": setting, "feature_values": feature_values, "value": value}
    )
    assert response.status_code == 201, response.text
    rule_id: int = response.json()["rule_id"]
    return rule_id


def query(client: httpx.Client, **params: str) -> httpx.Response:
    return client.get("/api/v1/query", params=params)


def rule_ids(response: httpx.Response, setting: str = "cache_size") -> list[int]:
    assert response.status_code == 200, response.text
    return [rule["rule_id"] for rule in response.json()["settings"][setting]["rules"]]


def assert_text(response: httpx.Response, status: int, fragment: str = "") -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert fragment in response.text


def assert_empty(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.content == b""


def assert_422(response: httpx.Response, *loc: str | int) -> None:
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert all({"loc", "msg", "type"} <= error.keys() for error in errors)
    assert [*loc] in [error["loc"] for error in errors], errors


# ---------------------------------------------------------------------------------------------------------
# Package surface


def test_all_is_complete() -> None:
    # pytest's assertion rewriting adds `@py_...` names to plugin packages: not identifiers, skipped
    public = {name for name in vars(heksher_shm.testing) if name.isidentifier() and not name.startswith("_")}
    assert public - {"pytest_plugin"} == set(heksher_shm.testing.__all__)


# Each module of the service and the modules it may import: only ones further down this list.
LAYERS = [
    "_types",
    "_errors",
    "_faults",
    "_records",
    "_validation",
    "_declare",
    "_query",
    "_store",
    "_race",
    "_api",
    "_http",
    "_service",
    "__init__",
    "pytest_plugin",
]


def test_service_modules_import_only_downwards() -> None:
    package = Path(heksher_shm.testing.__file__).parent
    assert {path.stem for path in package.glob("*.py")} == set(LAYERS)
    for module in LAYERS:
        tree = ast.parse((package / f"{module}.py").read_text())
        imported = {
            node.module.rpartition(".")[2]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            and node.module is not None
            and node.module.startswith("heksher_shm.testing.")
        }
        upward = {name for name in imported if LAYERS.index(name) >= LAYERS.index(module)}
        assert not upward, f"{module} imports {upward}, which are not below it"


def test_setting_type_is_a_deprecated_alias_of_service_type() -> None:
    with pytest.warns(DeprecationWarning, match=r"testing\.SettingType is deprecated.*ServiceType"):
        alias = heksher_shm.testing.SettingType
    assert alias is heksher_shm.testing.ServiceType
    assert alias is not heksher_shm.SettingType
    with pytest.warns(DeprecationWarning, match="ServiceType"):
        from heksher_shm.testing import SettingType  # noqa: F401
    assert isinstance(parse_setting_type("Sequence<int>"), heksher_shm.testing.ServiceType)
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        heksher_shm.testing.NoSuchName  # noqa: B018


def test_importing_the_package_does_not_import_pytest() -> None:
    code = "import sys, heksher_shm.testing; assert 'pytest' not in sys.modules, 'pytest imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------------------------------------------------
# Health and context features


def test_health(client: httpx.Client) -> None:
    response = client.get("/api/health")
    assert response.status_code == 200
    assert response.json() == {"version": "0.5.7"}


def test_unknown_route_and_method(client: httpx.Client) -> None:
    assert client.get("/api/v2/nothing").json() == {"detail": "Not Found"}
    response = client.put("/api/health")
    assert response.status_code == 405
    assert response.json() == {"detail": "Method Not Allowed"}


def test_context_features_list_and_index(client: httpx.Client) -> None:
    assert client.get("/api/v1/context_features").json() == {
        "context_features": ["user", "theme", "environment"]
    }
    assert client.get("/api/v1/context_features/theme").json() == {"index": 1}
    assert_empty(client.get("/api/v1/context_features/nope"), 404)


def test_context_features_add_and_delete(client: httpx.Client) -> None:
    assert_empty(client.post("/api/v1/context_features", json={"context_feature": "region"}), 204)
    assert client.get("/api/v1/context_features").json()["context_features"][-1] == "region"
    assert_text(
        client.post("/api/v1/context_features", json={"context_feature": "region"}), 409, "already exists"
    )
    assert_422(
        client.post("/api/v1/context_features", json={"context_feature": "no-dash"}),
        "body",
        "context_feature",
    )
    assert_422(client.post("/api/v1/context_features", json={}), "body", "context_feature")

    assert declare(client, configurable_features=["user"]).status_code == 200
    assert_text(client.delete("/api/v1/context_features/user"), 409, "at least one setting")
    assert_empty(client.delete("/api/v1/context_features/region"), 204)
    assert_empty(client.delete("/api/v1/context_features/region"), 404)


def test_chunked_request_body(client: httpx.Client) -> None:
    chunks = iter([b'{"context_feature":', b' "region"}'])
    assert_empty(client.post("/api/v1/context_features", content=chunks), 204)
    assert client.get("/api/v1/context_features/region").json() == {"index": 3}


def test_context_features_move(client: httpx.Client) -> None:
    def order() -> list[str]:
        features: list[str] = client.get("/api/v1/context_features").json()["context_features"]
        return features

    assert_empty(client.patch("/api/v1/context_features/user/index", json={"to_after": "environment"}), 204)
    assert order() == ["theme", "environment", "user"]
    assert_empty(client.patch("/api/v1/context_features/user/index", json={"to_before": "theme"}), 204)
    assert order() == ["user", "theme", "environment"]
    assert_empty(client.patch("/api/v1/context_features/theme/index", json={"to_before": "theme"}), 204)
    assert order() == ["user", "theme", "environment"]
    assert_empty(client.patch("/api/v1/context_features/nope/index", json={"to_after": "user"}), 404)
    assert_empty(client.patch("/api/v1/context_features/user/index", json={"to_after": "nope"}), 404)
    assert_422(client.patch("/api/v1/context_features/user/index", json={}), "body", "to_after")


def test_conditions_follow_the_context_feature_order(client: httpx.Client) -> None:
    declare(client)
    add_rule(client, "cache_size", 1, theme="dark", user="alice")
    rule = query(client).json()["settings"]["cache_size"]["rules"][0]
    assert rule["context_features"] == [["user", "alice"], ["theme", "dark"]]
    client.patch("/api/v1/context_features/user/index", json={"to_after": "theme"})
    rule = query(client).json()["settings"]["cache_size"]["rules"][0]
    assert rule["context_features"] == [["theme", "dark"], ["user", "alice"]]
    assert client.get("/api/v1/rules/1").json()["feature_values"] == [["theme", "dark"], ["user", "alice"]]


# ---------------------------------------------------------------------------------------------------------
# Declarations


def test_declare_created_then_uptodate(client: httpx.Client) -> None:
    response = declare(client)
    assert (response.status_code, response.json()) == (200, {"outcome": "created"})
    response = declare(client)
    assert (response.status_code, response.json()) == (200, {"outcome": "uptodate"})
    # configurable features compare as a set
    response = declare(client, configurable_features=["theme", "user"])
    assert response.json() == {"outcome": "uptodate"}


def test_declare_mismatch_at_the_same_version(client: httpx.Client) -> None:
    declare(client)
    response = declare(client, default_value=11)
    assert response.status_code == 409
    assert response.json() == {
        "outcome": "mismatch",
        "differences": [{"level": "minor", "attribute": "default_value", "latest_value": 10}],
    }


def test_declare_upgraded_outdated_rejected(client: httpx.Client) -> None:
    declare(client, metadata={"owner": "a"})
    response = declare(client, default_value=20, metadata={"owner": "b"}, version="1.1")
    assert response.status_code == 200
    assert response.json() == {
        "outcome": "upgraded",
        "previous_version": "1.0",
        "differences": [
            {"level": "minor", "attribute": "default_value", "latest_value": 10},
            {"level": "minor", "attribute": "metadata", "latest_value": {"owner": "a"}},
        ],
    }
    detail = client.get("/api/v1/settings/cache_size").json()
    assert (detail["version"], detail["default_value"], detail["metadata"]) == ("1.1", 20, {"owner": "b"})

    response = declare(client, metadata={"owner": "a"})
    assert response.status_code == 200
    assert response.json() == {
        "outcome": "outdated",
        "latest_version": "1.1",
        "differences": [
            {"level": "minor", "attribute": "default_value", "latest_value": 20},
            {"level": "minor", "attribute": "metadata", "latest_value": {"owner": "b"}},
        ],
    }

    # adding a configurable feature is major: refused on a minor bump, accepted on a major one
    wider = ["user", "theme", "environment"]
    response = declare(
        client, default_value=20, metadata={"owner": "b"}, configurable_features=wider, version="1.2"
    )
    assert response.status_code == 409
    assert response.json() == {
        "outcome": "rejected",
        "previous_version": "1.1",
        "differences": [
            {"level": "major", "attribute": "configurable_features", "latest_value": ["user", "theme"]}
        ],
    }
    response = declare(
        client, default_value=20, metadata={"owner": "b"}, configurable_features=wider, version="2.0"
    )
    assert (response.status_code, response.json()["outcome"]) == (200, "upgraded")
    assert client.get("/api/v1/settings/cache_size").json()["configurable_features"] == wider


def test_major_bump_is_refused_only_on_a_mismatch(client: httpx.Client) -> None:
    declare(client, type="float", default_value=1.5)
    add_rule(client, "cache_size", 2.5, user="alice")
    response = declare(client, type="str", default_value="x", version="2.0")
    assert response.status_code == 409
    assert response.json() == {
        "outcome": "rejected",
        "previous_version": "1.0",
        "differences": [
            {"level": "minor", "attribute": "default_value", "latest_value": 1.5},
            {"level": "mismatch", "message": "setting type incompatible with values for rules: [1]"},
        ],
    }


@pytest.mark.parametrize(
    ("stored", "rules", "declared", "expected"),
    [
        pytest.param(
            {},
            [],
            {"configurable_features": ["user"]},
            [{"level": "minor", "message": "removal of configurable features ['theme']"}],
            id="removing-an-unused-feature-is-minor",
        ),
        pytest.param(
            {},
            [{"theme": "dark"}],
            {"configurable_features": ["user"]},
            [
                {
                    "level": "mismatch",
                    "message": "configurable features ['theme'] are still in use by rules [1]",
                }
            ],
            id="removing-a-used-feature-is-a-mismatch",
        ),
        pytest.param(
            {},
            [],
            {"configurable_features": ["user", "environment"]},
            [{"level": "major", "attribute": "configurable_features", "latest_value": ["user", "theme"]}],
            id="adding-and-removing-features-is-major",
        ),
        pytest.param(
            {"type": "float", "default_value": 1.5},
            [],
            {"type": "int", "default_value": 1},
            [
                {"level": "minor", "attribute": "type", "latest_value": "float"},
                {"level": "minor", "attribute": "default_value", "latest_value": 1.5},
            ],
            id="narrowing-the-type-is-minor",
        ),
        pytest.param(
            {"type": "float", "default_value": 1.5},
            [{"user": "alice", "value": 2.5}],
            {"type": "int", "default_value": 1},
            [
                {"level": "minor", "attribute": "default_value", "latest_value": 1.5},
                {"level": "mismatch", "message": "setting type incompatible with values for rules: [1]"},
            ],
            id="narrowing-below-a-rule-value-is-a-mismatch",
        ),
        pytest.param(
            {},
            [{"user": "alice", "value": 3}],
            {"type": "float"},
            [{"level": "major", "attribute": "type", "latest_value": "int"}],
            id="widening-the-type-is-major",
        ),
        pytest.param(
            {"type": 'Enum["a","b"]', "default_value": "a"},
            [],
            {"type": 'Enum["a","b","c"]'},
            [{"level": "major", "attribute": "type", "latest_value": 'Enum["a","b"]'}],
            id="enum-superset-is-major",
        ),
        pytest.param(
            {"type": 'Flags["a","b","c"]', "default_value": ["a"]},
            [],
            {"type": 'Flags["b","a"]'},
            [{"level": "minor", "attribute": "type", "latest_value": 'Flags["a","b","c"]'}],
            id="flags-subset-is-minor",
        ),
        pytest.param(
            {"type": "Mapping<float>", "default_value": {}},
            [],
            {"type": "Mapping<int>"},
            [{"level": "minor", "attribute": "type", "latest_value": "Mapping<float>"}],
            id="mapping-follows-its-inner-type",
        ),
        pytest.param(
            {"type": "Sequence<int>", "default_value": []},
            [],
            {"type": "Sequence<str>"},
            [{"level": "major", "attribute": "type", "latest_value": "Sequence<int>"}],
            id="unrelated-type-is-major",
        ),
    ],
)
def test_difference_levels(
    client: httpx.Client,
    stored: dict[str, Any],
    rules: list[dict[str, Any]],
    declared: dict[str, Any],
    expected: list[dict[str, Any]],
) -> None:
    assert declare(client, **stored).status_code == 200
    for conditions in rules:
        value = conditions.pop("value", stored.get("default_value", 10))
        add_rule(client, "cache_size", value, **conditions)
    response = declare(client, **{**stored, **declared, "version": "2.0"})
    assert response.json()["differences"] == expected
    has_mismatch = any(difference["level"] == "mismatch" for difference in expected)
    assert response.status_code == (409 if has_mismatch else 200)


def test_minor_bump_with_only_minor_changes_is_accepted(client: httpx.Client) -> None:
    declare(client, type="float", default_value=1.5)
    response = declare(client, type="int", default_value=1, configurable_features=["user"], version="1.1")
    assert (response.status_code, response.json()["outcome"]) == (200, "upgraded")
    assert client.get("/api/v1/settings/cache_size").json()["type"] == "int"


def test_outdated_differences_describe_the_stored_declaration(client: httpx.Client) -> None:
    declare(client, type="int")
    declare(client, type="float", configurable_features=["user", "theme", "environment"], version="2.0")
    response = declare(client, type="int")
    assert response.json() == {
        "outcome": "outdated",
        "latest_version": "2.0",
        "differences": [
            {
                "level": "major",
                "attribute": "configurable_features",
                "latest_value": ["user", "theme", "environment"],
            },
            {"level": "major", "attribute": "type", "latest_value": "float"},
        ],
    }


def test_declare_errors(client: httpx.Client) -> None:
    assert_text(declare(client, version="1.1"), 400, "newly created settings must have version 1.0")
    assert_text(
        declare(client, configurable_features=["user", "planet"]), 404, "are not acceptable context features"
    )
    declare(client)
    # adding an unknown feature to an existing setting: FastAPI's JSON detail this time
    response = declare(client, configurable_features=["user", "planet"], version="2.0")
    assert response.status_code == 404
    assert "planet" in response.json()["detail"]


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"name": "bad name"}, ("body", "name")),
        ({"name": None}, ("body", "name")),
        ({"configurable_features": []}, ("body", "configurable_features")),
        ({"configurable_features": ["user", "user"]}, ("body", "configurable_features")),
        ({"configurable_features": ["us-er"]}, ("body", "configurable_features", 0)),
        ({"type": "integer"}, ("body", "type")),
        ({"type": "Enum[[1]]"}, ("body", "type")),
        ({"default_value": "ten"}, ("body", "__root__")),
        ({"metadata": {"bad key": 1}}, ("body", "metadata", "__key__")),
        ({"metadata": 5}, ("body", "metadata")),  # not [] : pydantic 1 reads it as {}, and so do we
        ({"alias": "cache_size"}, ("body", "__root__")),
        ({"version": "1"}, ("body", "version")),
    ],
)
def test_declare_validation(client: httpx.Client, fields: dict[str, Any], loc: tuple[str | int, ...]) -> None:
    assert_422(declare(client, **fields), *loc)


def test_declare_missing_field_and_bad_json(client: httpx.Client) -> None:
    assert_422(client.post("/api/v1/settings/declare", json={"name": "a"}), "body", "default_value")
    response = client.post("/api/v1/settings/declare", content=b"{not json")
    assert_422(response, "body", 1)
    assert response.json()["detail"][0]["type"] == "value_error.jsondecode"
    assert_422(client.post("/api/v1/settings/declare", content=b"[1, 2]"), "body")
    assert_422(client.post("/api/v1/settings/declare", content=b""), "body")


# ---------------------------------------------------------------------------------------------------------
# Types


@pytest.mark.parametrize(
    ("declared", "stored", "default"),
    [
        ('Enum["red","blue"]', 'Enum["blue","red"]', "red"),
        ('Enum ["red", "blue", "red"]', 'Enum["blue","red"]', "blue"),
        ('Enum[true, 1, 1.0, "1"]', 'Enum["1",1,true]', 1),
        ("Flags[3, 1, 2]", "Flags[1,2,3]", [2]),
        ('Sequence<Enum["b","a"]>', 'Sequence<Enum["a","b"]>', ["a"]),
        ("Mapping< Sequence<float> >", "Mapping<Sequence<float>>", {"x": [1.5]}),
    ],
)
def test_type_strings_are_normalised(client: httpx.Client, declared: str, stored: str, default: Any) -> None:
    assert declare(client, type=declared, default_value=default).json() == {"outcome": "created"}
    assert client.get("/api/v1/settings/cache_size").json()["type"] == stored
    assert declare(client, type=stored, default_value=default).json() == {"outcome": "uptodate"}


@pytest.mark.parametrize(
    ("type_", "good", "bad"),
    [
        ("int", [0, -3, 2.0], [1.5, True, "1", None, [1]]),
        ("float", [1, 1.5, -0.25], [True, "1.5", None]),
        ("str", ["", "x"], [1, True, None, ["x"]]),
        ("bool", [True, False], [0, 1, "true", None]),
        ('Enum["a",1,false]', ["a", 1, 1.0, False], ["b", 0, True, None, ["a"]]),
        ('Flags["a","b"]', [[], ["a"], ["b", "a"]], [["a", "a"], ["c"], "a", [["a"]]]),
        ("Sequence<int>", [[], [1, 2]], [[1.5], [True], {}, 1]),
        ("Mapping<bool>", [{}, {"x": True}], [{"x": 1}, [True], "x"]),
        ("Sequence<Mapping<str>>", [[{"a": "b"}], []], [[{"a": 1}], [["a"]]]),
    ],
)
def test_rule_values_are_type_checked(
    client: httpx.Client, type_: str, good: list[Any], bad: list[Any]
) -> None:
    default = good[0]
    assert (
        declare(client, type=type_, default_value=default, configurable_features=["user"]).status_code == 200
    )
    for index, value in enumerate(good):
        response = client.post(
            "/api/v1/rules",
            json={"setting": "cache_size", "feature_values": {"user": f"u{index}"}, "value": value},
        )
        assert response.status_code == 201, (value, response.text)
    for value in bad:
        response = client.post(
            "/api/v1/rules", json={"setting": "cache_size", "feature_values": {"user": "bad"}, "value": value}
        )
        assert_text(response, 400, "rule value is incompatible with setting type")


@pytest.mark.parametrize(
    ("smaller", "larger"),
    [
        ("int", "float"),
        ("Enum[0,1]", "Enum[0,1,2]"),
        ('Flags["a"]', 'Flags["a","b"]'),
        ("Sequence<int>", "Sequence<float>"),
        ("Mapping<Enum[1]>", "Mapping<Enum[1,2]>"),
        ("Sequence<Sequence<int>>", "Sequence<Sequence<float>>"),
    ],
)
def test_type_order(smaller: str, larger: str) -> None:
    low, high = parse_setting_type(smaller), parse_setting_type(larger)
    assert low.is_subtype_of(high)
    assert not high.is_subtype_of(low)
    assert not low.is_subtype_of(low)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("str", "bool"),
        ("int", "str"),
        ("Enum[true,false]", "bool"),
        ("Enum[0,1]", "Flags[0,1,2]"),
        ("Flags[0,1]", "Sequence<int>"),
        ("Sequence<int>", "Mapping<float>"),
        ("Enum[0,1]", "Enum[1,2]"),
    ],
)
def test_unordered_types(left: str, right: str) -> None:
    a, b = parse_setting_type(left), parse_setting_type(right)
    assert not a.is_subtype_of(b)
    assert not b.is_subtype_of(a)


@pytest.mark.parametrize(
    "text", ["", "Int", "Enum", "Enum[", "Enum{}", "Enum[null]", "Sequence<>", "Mapping<x>"]
)
def test_bad_type_strings(text: str) -> None:
    with pytest.raises(ValueError, match=r"setting type|primitives"):
        parse_setting_type(text)


# ---------------------------------------------------------------------------------------------------------
# Aliases


def test_rename_through_alias(client: httpx.Client) -> None:
    declare(client, name="foo")
    add_rule(client, "foo", 20, user="alice")
    response = declare(client, name="bar", alias="foo")
    assert response.status_code == 409
    assert response.json()["differences"] == [{"level": "minor", "attribute": "name", "latest_value": "foo"}]

    response = declare(client, name="bar", alias="foo", version="1.1")
    assert response.json() == {
        "outcome": "upgraded",
        "previous_version": "1.0",
        "differences": [{"level": "minor", "attribute": "name", "latest_value": "foo"}],
    }
    assert declare(client, name="baz", alias="bar", version="1.2").json()["outcome"] == "upgraded"

    detail = client.get("/api/v1/settings/foo").json()
    assert (detail["name"], detail["aliases"]) == ("baz", ["bar", "foo"])  # aliases are listed sorted
    assert list(query(client, settings="foo").json()["settings"]) == ["baz"]
    assert rule_ids(query(client, settings="bar,foo"), "baz") == [1]
    assert client.get("/api/v1/rules/1").json()["setting"] == "baz"
    assert add_rule(client, "foo", 30, user="bob") == 2
    assert client.get(
        "/api/v1/rules/search", params={"setting": "bar", "feature_values": "user:bob"}
    ).json() == {"rule_id": 2}
    listing = client.get("/api/v1/settings", params={"include_additional_data": "true"}).json()
    assert listing["settings"][0]["aliases"] == ["foo", "bar"]  # in the order given, unlike the above
    # an old client still declaring the old name at the old version is told it is outdated
    old = declare(client, name="foo")
    assert old.json() == {
        "outcome": "outdated",
        "latest_version": "1.2",
        "differences": [{"level": "minor", "attribute": "name", "latest_value": "baz"}],
    }
    assert declare(client, name="baz", alias="bar", version="1.2").json() == {"outcome": "uptodate"}
    assert_empty(client.delete("/api/v1/settings/bar"), 204)
    assert_text(client.get("/api/v1/settings/foo"), 404)


def test_alias_errors(client: httpx.Client) -> None:
    response = declare(client, name="bar", alias="ghost")
    assert response.status_code == 404
    assert response.json() == {"detail": "alias ghost does not exist"}
    declare(client, name="foo")
    declare(client, name="other")
    response = declare(client, name="other", alias="foo")
    assert response.status_code == 409
    assert response.json() == {"detail": "alias foo is an alias of unrelated setting foo"}


# ---------------------------------------------------------------------------------------------------------
# Query


@pytest.fixture
def four_rules(client: httpx.Client) -> list[int]:
    declare(client)
    declare(client, name="other", type="str", default_value="x")
    return [
        add_rule(client, "cache_size", 20, user="alice"),
        add_rule(client, "cache_size", 30, user="alice", theme="dark"),
        add_rule(client, "cache_size", 40, theme="dark"),
        add_rule(client, "cache_size", 50, user="bob"),
    ]


def test_query_shape(client: httpx.Client, four_rules: list[int]) -> None:
    response = query(client, settings="cache_size", context_filters="user:(alice)")
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "settings": {
            "cache_size": {
                "default_value": 10,
                "rules": [{"value": 20, "context_features": [["user", "alice"]], "rule_id": 1}],
            }
        }
    }
    with_metadata = query(
        client, settings="cache_size", context_filters="user:(bob)", include_metadata="true"
    )
    assert with_metadata.json()["settings"]["cache_size"]["rules"] == [
        {"value": 50, "context_features": [["user", "bob"]], "rule_id": 4, "metadata": {}}
    ]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, [1, 2, 3, 4]),
        ({"context_filters": "*"}, [1, 2, 3, 4]),
        ({"context_filters": ""}, []),
        ({"context_filters": "user:(alice)"}, [1]),
        ({"context_filters": "user:(alice),theme:(dark)"}, [1, 2, 3]),
        ({"context_filters": "user:(alice,bob),theme:*"}, [1, 2, 3, 4]),
        ({"context_filters": "theme:*"}, [3]),
        ({"context_filters": "user:*,theme:(light)"}, [1, 4]),
        ({"context_filters": "user:(alice),planet:(mars)"}, [1]),
        ({"context_filters": "planet:(mars)"}, []),
    ],
)
def test_query_filters(
    client: httpx.Client, four_rules: list[int], params: dict[str, str], expected: list[int]
) -> None:
    assert rule_ids(query(client, settings="cache_size", **params)) == expected


def test_query_settings_selection(client: httpx.Client, four_rules: list[int]) -> None:
    assert sorted(query(client).json()["settings"]) == ["cache_size", "other"]
    assert query(client, settings="").json() == {"settings": {}}
    assert list(query(client, settings="other").json()["settings"]) == ["other"]
    assert query(client, settings="other").json()["settings"]["other"] == {"default_value": "x", "rules": []}
    assert_text(query(client, settings="other,ghost,spirit"), 404, "['ghost', 'spirit']")


def test_query_errors(client: httpx.Client, four_rules: list[int]) -> None:
    assert_text(query(client, context_filters="user:(alice),user:(bob)"), 400, "repeated")
    assert_422(query(client, context_filters="user:alice"), "query", "context_filters")
    assert_422(query(client, settings="a b"), "query", "settings")
    assert_422(query(client, include_metadata="perhaps"), "query", "include_metadata")


@pytest.mark.parametrize(("emulate", "expected"), [(True, []), (False, [1])])
def test_filter_feature_names_bug(
    heksher_service_factory: Factory, emulate: bool, expected: list[int]
) -> None:
    service = heksher_service_factory(
        context_features=["user", "trust_level", "Tier"], emulate_filter_bug=emulate
    )
    service.declare("cache_size", "int", 10)
    service.add_rule("cache_size", {"trust_level": "high"}, 1)
    service.add_rule("cache_size", {"Tier": "gold"}, 2)
    with http_client(service) as http:
        # the buggy parser reads these as filters on `level` and `ier`, unknown features it then drops
        assert rule_ids(query(http, context_filters="trust_level:(high)")) == expected
        assert rule_ids(query(http, context_filters="Tier:(gold)")) == ([] if emulate else [2])
        assert rule_ids(query(http, context_filters="trust_level:*,Tier:*")) == ([] if emulate else [1, 2])
        # only the global wildcard reaches such rules through the bug
        assert rule_ids(query(http, context_filters="*")) == [1, 2]


def test_etag_cycle(client: httpx.Client, four_rules: list[int]) -> None:
    first = query(client, settings="cache_size")
    etag = first.headers["etag"]
    assert etag == f'"{hashlib.md5(first.content).hexdigest()}"'
    for header in (etag, "*", f'"nope", {etag}', f"W/{etag}"):
        cached = query_with(client, header)
        assert (cached.status_code, cached.content) == (304, b"")
    assert query_with(client, '"something-else"').status_code == 200

    client.put("/api/v1/rules/1/value", json={"value": 21})
    changed = query_with(client, etag)
    assert changed.status_code == 200
    assert changed.headers["etag"] != etag
    assert changed.json()["settings"]["cache_size"]["rules"][0]["value"] == 21


def query_with(client: httpx.Client, if_none_match: str) -> httpx.Response:
    return client.get(
        "/api/v1/query", params={"settings": "cache_size"}, headers={"If-None-Match": if_none_match}
    )


# ---------------------------------------------------------------------------------------------------------
# Settings


def test_settings_listing(client: httpx.Client) -> None:
    declare(client, name="zeta", metadata={"k": 1})
    declare(client, name="alpha", type="str", default_value="a", configurable_features=["theme"])
    plain = client.get("/api/v1/settings").json()
    assert plain == {
        "settings": [
            {"name": "alpha", "type": "str", "default_value": "a", "version": "1.0"},
            {"name": "zeta", "type": "int", "default_value": 10, "version": "1.0"},
        ]
    }
    for word in ("true", "True", "1", "yes"):
        full = client.get("/api/v1/settings", params={"include_additional_data": word}).json()["settings"]
        assert full[1] == {
            "name": "zeta",
            "type": "int",
            "default_value": 10,
            "version": "1.0",
            "configurable_features": ["user", "theme"],
            "metadata": {"k": 1},
            "aliases": [],
        }
    assert client.get("/api/v1/settings", params={"include_additional_data": "false"}).json() == plain
    response = client.get("/api/v1/settings", params={"include_additional_data": "maybe"})
    assert_422(response, "query", "include_additional_data")


def test_setting_detail_and_delete(client: httpx.Client) -> None:
    declare(client, metadata={"owner": "me"})
    add_rule(client, "cache_size", 20, user="alice")
    assert client.get("/api/v1/settings/cache_size").json() == {
        "name": "cache_size",
        "configurable_features": ["user", "theme"],
        "type": "int",
        "default_value": 10,
        "metadata": {"owner": "me"},
        "aliases": [],
        "version": "1.0",
    }
    assert_text(client.get("/api/v1/settings/ghost"), 404, "the setting ghost does not exist")
    assert_empty(client.delete("/api/v1/settings/cache_size"), 204)
    assert_text(client.delete("/api/v1/settings/cache_size"), 404, "setting name not found")
    assert_empty(client.get("/api/v1/rules/1"), 404)
    assert declare(client).json() == {"outcome": "created"}


# ---------------------------------------------------------------------------------------------------------
# Rules


def test_rule_create_errors(client: httpx.Client) -> None:
    declare(client)

    def post(**body: Any) -> httpx.Response:
        return client.post("/api/v1/rules", json={"setting": "cache_size", "value": 1, **body})

    assert_text(post(setting="ghost", feature_values={"user": "a"}), 422, "setting not found with name ghost")
    assert_text(post(feature_values={"environment": "prod"}), 400, "not configurable")
    assert_text(post(feature_values={"user": "a"}, value="one"), 400, "incompatible")
    assert post(feature_values={"user": "a"}).status_code == 201
    assert_text(post(feature_values={"user": "a"}, value=2), 409, "rule already exists")
    assert_422(post(feature_values={}), "body", "feature_values")
    assert_422(post(feature_values={"user": "a b"}), "body", "feature_values", "user")
    assert_422(post(feature_values={"user": "a"}, metadata={"no spaces": 1}), "body", "metadata", "__key__")
    assert_422(
        client.post("/api/v1/rules", json={"setting": "cache_size", "feature_values": {"user": "b"}}),
        "body",
        "value",
    )


def test_rule_search_get_update_delete(client: httpx.Client) -> None:
    declare(client)
    rule_id = add_rule(client, "cache_size", 20, user="alice", theme="dark")
    search = "/api/v1/rules/search"
    found = client.get(search, params={"setting": "cache_size", "feature_values": "theme:dark,user:alice"})
    assert found.json() == {"rule_id": rule_id}
    assert_empty(client.get(search, params={"setting": "cache_size", "feature_values": "user:alice"}), 404)
    assert_empty(client.get(search, params={"setting": "ghost", "feature_values": "user:alice"}), 404)
    assert_422(
        client.get(search, params={"setting": "cache_size", "feature_values": "user"}),
        "query",
        "feature_values",
    )

    assert client.get(f"/api/v1/rules/{rule_id}").json() == {
        "setting": "cache_size",
        "value": 20,
        "feature_values": [["user", "alice"], ["theme", "dark"]],
        "metadata": {},
    }
    assert_empty(client.put(f"/api/v1/rules/{rule_id}/value", json={"value": 21}), 204)
    assert_empty(client.patch(f"/api/v1/rules/{rule_id}", json={"value": 22}), 204)
    assert client.get(f"/api/v1/rules/{rule_id}").json()["value"] == 22
    assert_text(client.put(f"/api/v1/rules/{rule_id}/value", json={"value": "x"}), 400, "incompatible")
    assert_text(client.put("/api/v1/rules/99/value", json={"value": 1}), 404)  # text/plain, but empty
    assert_422(client.put(f"/api/v1/rules/{rule_id}/value", json={}), "body", "value")
    assert_422(client.get("/api/v1/rules/one"), "path", "rule_id")

    assert_empty(client.delete(f"/api/v1/rules/{rule_id}"), 204)
    assert_empty(client.delete(f"/api/v1/rules/{rule_id}"), 404)
    assert_empty(client.get(f"/api/v1/rules/{rule_id}"), 404)
    assert add_rule(client, "cache_size", 20, user="alice") == rule_id + 1  # ids are never reused


def test_rule_metadata(client: httpx.Client) -> None:
    declare(client)
    response = client.post(
        "/api/v1/rules",
        json={"setting": "cache_size", "feature_values": {"user": "a"}, "value": 1, "metadata": {"by": "me"}},
    )
    path = f"/api/v1/rules/{response.json()['rule_id']}/metadata"

    def metadata() -> Any:
        return client.get(path).json()

    assert metadata() == {"metadata": {"by": "me"}}
    assert_empty(client.post(path, json={"metadata": {"why": "test"}}), 204)
    assert metadata() == {"metadata": {"by": "me", "why": "test"}}
    assert_empty(client.put(f"{path}/when", json={"value": [1, 2]}), 204)
    assert metadata() == {"metadata": {"by": "me", "why": "test", "when": [1, 2]}}
    assert_empty(client.delete(f"{path}/why"), 204)
    assert_empty(client.delete(f"{path}/never-there"), 204)
    assert metadata() == {"metadata": {"by": "me", "when": [1, 2]}}
    assert_empty(client.put(path, json={"metadata": {"only": True}}), 204)
    assert metadata() == {"metadata": {"only": True}}
    assert query(client, include_metadata="1").json()["settings"]["cache_size"]["rules"][0]["metadata"] == {
        "only": True
    }
    assert_empty(client.delete(path), 204)
    assert metadata() == {"metadata": {}}
    assert_422(client.put(f"{path}/bad key", json={"value": 1}), "path", "key")
    assert_422(client.post(path, json={"metadata": {"bad key": 1}}), "body", "metadata", "__key__")
    for method in ("GET", "POST", "PUT", "DELETE"):
        body = None if method in ("GET", "DELETE") else {"metadata": {"a": 1}}
        assert_empty(client.request(method, "/api/v1/rules/99/metadata", json=body), 404)
    assert_empty(client.put("/api/v1/rules/99/metadata/a", json={"value": 1}), 404)
    assert_empty(client.delete("/api/v1/rules/99/metadata/a"), 404)


# ---------------------------------------------------------------------------------------------------------
# Python helpers


def test_admin_helpers(heksher_service: HeksherService) -> None:
    service = heksher_service
    assert service.declare("cache_size", "int", 10, ["user"]) == {"outcome": "created"}
    assert service.declare("cache_size", "int", 10, ["user"]) == {"outcome": "uptodate"}
    with pytest.raises(ServiceError) as mismatch:
        service.declare("cache_size", "int", 11, ["user"])
    assert mismatch.value.status == 409
    rule_id = service.add_rule("cache_size", {"user": "alice"}, 20, metadata={"k": "v"})
    with pytest.raises(ServiceError) as wrong:
        service.add_rule("cache_size", {"user": "bob"}, "twenty")
    assert (wrong.value.status, wrong.value.kind) == (400, "text")
    service.set_rule_value(rule_id, 25)
    (rule,) = service.rules
    assert (rule.rule_id, rule.setting, rule.feature_values, rule.value, rule.metadata) == (
        rule_id,
        "cache_size",
        (("user", "alice"),),
        25,
        {"k": "v"},
    )
    info = service.settings["cache_size"]
    assert (info.type, info.default_value, info.configurable_features, info.version) == (
        "int",
        10,
        ("user",),
        "1.0",
    )
    service.delete_rule(rule_id)
    assert service.rules == []
    with pytest.raises(ServiceError):
        service.delete_rule(rule_id)
    with pytest.raises(ValueError, match="must match"):
        service.declare("other", "int", "ten")
    service.delete_setting("cache_size")
    assert service.settings == {}
    assert service.context_features == ["user", "theme", "environment"]
    assert service.count() == 0  # helpers bypass HTTP


# ---------------------------------------------------------------------------------------------------------
# Request records


def test_request_records_and_counters(heksher_service: HeksherService, client: httpx.Client) -> None:
    client.get("/api/health")
    query(client, settings="", context_filters="user:(a)")
    query(client, settings="ghost")
    assert heksher_service.count() == 3
    assert heksher_service.count(method="GET", path="/api/v1/query") == 2
    assert heksher_service.count(path="/api/v1/query", status=404) == 1
    assert heksher_service.count(method="post") == 0
    record = heksher_service.requests[1]
    assert (record.method, record.path, record.status, record.fault) == ("GET", "/api/v1/query", 200, None)
    assert record.query == {"settings": "", "context_filters": "user:(a)"}
    assert record.query_string.startswith("settings=&context_filters=user")
    assert heksher_service.requests[0].time <= record.time <= time.monotonic()
    heksher_service.reset_requests()
    assert heksher_service.requests == []


def test_wait_for_requests(heksher_service: HeksherService) -> None:
    def poll() -> None:
        with http_client(heksher_service) as http:
            for _ in range(3):
                http.get("/api/health")

    worker = threading.Thread(target=poll)
    worker.start()
    try:
        assert heksher_service.wait_for_requests(3, path="/api/health", timeout=10)
    finally:
        worker.join()
    assert not heksher_service.wait_for_requests(4, timeout=0.01)


def test_concurrent_clients(heksher_service: HeksherService) -> None:
    heksher_service.declare("cache_size", "int", 10)

    def work(worker: int) -> list[int]:
        ids = []
        with http_client(heksher_service) as http:
            for index in range(10):
                ids.append(add_rule(http, "cache_size", index, user=f"w{worker}", theme=f"t{index}"))
                assert query(http, settings="cache_size").status_code == 200
        return ids

    with ThreadPoolExecutor(8) as pool:
        ids = [rule_id for chunk in pool.map(work, range(8)) for rule_id in chunk]
    assert sorted(ids) == list(range(1, 81))
    assert heksher_service.count(method="POST", path="/api/v1/rules", status=201) == 80


# ---------------------------------------------------------------------------------------------------------
# Faults


def test_status_fault_for_a_count(heksher_service: HeksherService, client: httpx.Client) -> None:
    injected = heksher_service.inject_fault(Fault(status=500), count=2)
    assert_text(client.get("/api/health"), 500, "Internal Server Error")
    assert_text(client.get("/api/v1/context_features"), 500)
    assert client.get("/api/health").status_code == 200
    assert (injected.triggered, injected.remaining) == (2, 0)
    assert [r.fault for r in heksher_service.requests] == ["status", "status", None]

    heksher_service.inject_fault(Fault(status=503, body={"detail": "db down"}), path="/api/health")
    assert client.get("/api/health").json() == {"detail": "db down"}
    assert client.get("/api/v1/context_features").status_code == 200
    heksher_service.clear_faults()
    assert client.get("/api/health").status_code == 200


def test_fault_scope_by_method_and_pattern(heksher_service: HeksherService, client: httpx.Client) -> None:
    injected = heksher_service.inject_fault(
        Fault(status=502, body="bad gateway"), method="GET", path=re.compile(r"/api/v1/context_features.*")
    )
    assert_text(client.get("/api/v1/context_features/user"), 502, "bad gateway")
    assert client.post("/api/v1/context_features", json={"context_feature": "x"}).status_code == 204
    assert client.get("/api/health").status_code == 200
    injected.remove()
    injected.remove()
    assert client.get("/api/v1/context_features/user").status_code == 200


def test_probabilistic_fault_is_seeded(heksher_service_factory: Factory) -> None:
    def pattern() -> list[int]:
        service = heksher_service_factory()
        service.inject_fault(Fault(status=500), path="/api/health", probability=0.5, seed=1234)
        with http_client(service) as http:
            return [http.get("/api/health").status_code for _ in range(40)]

    first = pattern()
    assert set(first) == {200, 500}
    assert pattern() == first


def test_delay_fault(heksher_service: HeksherService, client: httpx.Client) -> None:
    heksher_service.inject_fault(Fault(delay=0.2), count=1)
    started = time.monotonic()
    assert client.get("/api/health").status_code == 200
    assert time.monotonic() - started >= 0.19
    assert heksher_service.requests[-1].fault == "delay"


def test_malformed_body_fault(heksher_service: HeksherService, client: httpx.Client) -> None:
    heksher_service.inject_fault(Fault.malformed_body(), count=1)
    response = client.get("/api/v1/query")
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()


def test_truncated_body_fault(heksher_service: HeksherService, client: httpx.Client) -> None:
    heksher_service.declare("cache_size", "int", 10)
    heksher_service.inject_fault(Fault.truncated_body(), count=1)
    with pytest.raises(httpx.RemoteProtocolError):
        client.get("/api/v1/query")
    assert client.get("/api/v1/query").status_code == 200  # a fresh connection works


def test_dropped_connection_fault(heksher_service: HeksherService, client: httpx.Client) -> None:
    heksher_service.inject_fault(Fault.dropped_connection(), method="POST", count=1)
    with pytest.raises(httpx.RemoteProtocolError):
        declare(client)
    assert heksher_service.settings == {}  # the request was not served
    record = heksher_service.requests[-1]
    assert (record.status, record.fault) == (None, "dropped_connection")
    assert declare(client).json() == {"outcome": "created"}


def test_wrong_shape_and_huge_body_faults(heksher_service: HeksherService, client: httpx.Client) -> None:
    heksher_service.inject_fault(Fault.wrong_shape(), count=1)
    heksher_service.inject_fault(Fault.wrong_shape({"settings": [1]}), path="/api/health", count=1)
    assert client.get("/api/v1/query").json() == ["not", "an", "object"]
    assert client.get("/api/health").json() == {"settings": [1]}
    heksher_service.inject_fault(Fault.huge_body(size=2_000_000), count=1)
    response = client.get("/api/v1/query")
    assert response.status_code == 200
    assert len(response.content) >= 2_000_000 - 64
    assert response.json()["settings"] == {}


def test_wrong_etag_fault(heksher_service: HeksherService, client: httpx.Client) -> None:
    heksher_service.declare("cache_size", "int", 10)
    heksher_service.inject_fault(Fault.wrong_etag('"stale"'))
    assert query(client).headers["etag"] == '"stale"'
    heksher_service.add_rule("cache_size", {"user": "alice"}, 20)
    # the rules changed, but the lying tag still matches
    assert query_with(client, '"stale"').status_code == 304


def test_fault_validation() -> None:
    with pytest.raises(ValueError, match="needs"):
        Fault()
    with pytest.raises(ValueError, match="status"):
        Fault(kind="status")
    assert Fault(status=500).kind == "status"
    assert Fault(delay=1).kind == "delay"


# ---------------------------------------------------------------------------------------------------------
# Lifecycle


def test_stop_is_prompt_with_open_keepalive_connections(heksher_service_factory: Factory) -> None:
    service = heksher_service_factory()
    service.inject_fault(Fault(delay=60), path="/api/v1/query")
    with http_client(service) as idle, http_client(service, timeout=0.2) as stuck:
        assert idle.get("/api/health").status_code == 200  # leaves a keep-alive connection open
        with pytest.raises(httpx.ReadTimeout):
            stuck.get("/api/v1/query")  # leaves a handler sleeping in its delay
        started = time.monotonic()
        service.stop()
        assert time.monotonic() - started < 0.5
        assert not service.running
        with pytest.raises(httpx.TransportError):
            idle.get("/api/health")


def test_restart_keeps_port_and_state(heksher_service_factory: Factory) -> None:
    service = heksher_service_factory()
    service.declare("cache_size", "int", 10)
    url = service.url
    service.stop()
    service.stop()  # idempotent
    service.start()
    assert service.url == url
    with http_client(service) as http:
        assert list(query(http).json()["settings"]) == ["cache_size"]


def test_factory_options(heksher_service_factory: Factory) -> None:
    service = heksher_service_factory(context_features=["tenant"], version="0.6.0")
    with http_client(service) as http:
        assert http.get("/api/health").json() == {"version": "0.6.0"}
        assert http.get("/api/v1/context_features").json() == {"context_features": ["tenant"]}


def test_serve_in_a_child_process() -> None:
    code = (
        "from heksher_shm.cli.serve import serve\nraise SystemExit(serve('127.0.0.1', 0, ['user', 'theme']))"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        match = re.fullmatch(
            r"heksher-shm: in-memory Heksher service listening on (http://127\.0\.0\.1:\d+) "
            r"\(context features: user, theme\)\n",
            line,
        )
        assert match, line
        assert httpx.get(f"{match[1]}/api/v1/context_features").json() == {
            "context_features": ["user", "theme"]
        }
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()


def test_serve_reports_a_busy_port(
    heksher_service: HeksherService, capsys: pytest.CaptureFixture[str]
) -> None:
    from heksher_shm.cli.serve import serve

    assert serve(heksher_service.host, heksher_service.port, ["user"]) == 1
    assert f"cannot serve on 127.0.0.1:{heksher_service.port}" in capsys.readouterr().err
