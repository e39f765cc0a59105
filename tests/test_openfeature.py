"""The OpenFeature provider, through the SDK's own API, in real processes that follow a leader.

A spawned worker leads (it declares every setting of SPECS); the test process,
or another spawned worker, follows with a client of its own and evaluates
flags with ``api.get_client().get_*_details(...)`` after
``api.set_provider_and_wait(HeksherProvider())`` (``set_provider`` before openfeature-sdk 0.10).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from openfeature import api
from openfeature.evaluation_context import EvaluationContext
from openfeature.event import ProviderEvent
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason
from openfeature.provider import ProviderStatus

import heksher_shm as heksher
from heksher_shm.openfeature import HeksherProvider
from heksher_shm.openfeature.kinds import Kind, parse
from heksher_shm.status import ENV_STALE_AFTER
from heksher_shm.testing import Fault, HeksherService
from tests._integration_workers import Color, Spec, set_provider, worker
from tests._procs import Worker
from tests._support import FEATURES

SPAWN = multiprocessing.get_context("spawn")

SPECS: list[Spec] = [
    ("cache_size", "int", ["user"], 10),
    ("greeting", "str", ["user", "theme"], "hi"),
    ("ratio", "float", ["user"], 0.5),
    ("enabled", "bool", ["user"], False),
    ("limits", "seq_int", ["user"], [1]),
    ("weights", "map_int", ["user"], {"a": 1}),
    ("color", "color", ["user"], Color.RED),
]


class Proc(Worker):
    """A spawned worker of tests._integration_workers (it declares *specs*), ready."""

    def __init__(self, url: str, kind: str, specs: list[Spec], interval: float = 60, **extra: Any) -> None:
        super().__init__(url, kind, specs, interval, target=worker, **extra)
        self.ready(60)


@pytest.fixture(autouse=True)
def _fresh_sdk() -> Iterator[None]:
    yield
    api.clear_providers()
    from openfeature import _event_support

    _event_support.clear()


@pytest.fixture
def rules(service: HeksherService, workers: list[Proc]) -> dict[str, int]:
    """A leader that declared every setting of SPECS, and rules on them it has queried."""
    leader = Proc(service.url, "thread", SPECS, track={"user": heksher.TRACK_ALL, "theme": heksher.TRACK_ALL})
    workers.append(leader)
    ids = {
        "cache_size": service.add_rule(
            "cache_size", {"user": "alice"}, 20, metadata={"owner": "ops", "n": [1]}
        ),
        "greeting": service.add_rule("greeting", {"user": "alice", "theme": "dark"}, "hello"),
        "limits": service.add_rule("limits", {"user": "alice"}, [5, 6]),
        "weights": service.add_rule("weights", {"user": "alice"}, {"b": 2}),
        "color": service.add_rule("color", {"user": "alice"}, "green"),
        "ratio": service.add_rule("ratio", {"user": "alice"}, 2),
    }
    assert leader.ask("leading") is True
    leader.ask("reload")
    return ids


def _follower(kind: str, service: HeksherService) -> Any:
    client_class = heksher.ThreadHeksherClient if kind == "thread" else heksher.AsyncHeksherClient
    client = client_class(service.url, 60, FEATURES)
    client.track_contexts(user=heksher.TRACK_ALL, theme=heksher.TRACK_ALL)
    return client


@pytest.fixture
async def follower(
    request: pytest.FixtureRequest, service: HeksherService, rules: dict[str, int]
) -> AsyncIterator[Any]:
    """This process, following: its own settings cache_size and color (the rest only the leader has)."""
    kind = request.param
    own = [
        heksher.Setting("cache_size", int, ["user"], 10),
        heksher.Setting("color", Color, ["user"], Color.RED),
    ]
    client = _follower(kind, service)
    if kind == "thread":
        client.set_as_main()
    else:
        await client.set_as_main()
    assert not client.leading
    set_provider(HeksherProvider())
    assert api.get_client().get_provider_status() == ProviderStatus.READY
    yield client, own
    if kind == "thread":
        client.close()
    else:
        await client.aclose()


async def _details(
    kind: str, resolver: str, key: str, default: Any, context: EvaluationContext | None
) -> Any:
    sdk = api.get_client()
    if kind == "async":
        return await getattr(sdk, f"get_{resolver}_details_async")(key, default, context)
    return getattr(sdk, f"get_{resolver}_details")(key, default, context)


@pytest.mark.parametrize("follower", ["thread", "async"], indirect=True)
async def test_a_follower_resolves_its_own_and_the_hosts_settings(
    follower: Any, rules: dict[str, int]
) -> None:
    client, _ = follower
    kind = "thread" if isinstance(client, heksher.ThreadHeksherClient) else "async"
    alice, bob = EvaluationContext("alice"), EvaluationContext("bob")

    # Its own setting: get()'s answer, the rule's id and metadata.
    found = await _details(kind, "integer", "cache_size", 0, alice)
    assert (found.value, found.reason, found.error_code) == (20, Reason.TARGETING_MATCH, None)
    assert dict(found.flag_metadata) == {
        "rule_id": rules["cache_size"],
        "rule_metadata.owner": "ops",
        "rule_metadata.n": "[1]",
    }
    assert found.variant == f"rule-{rules['cache_size']}"
    found = await _details(kind, "integer", "cache_size", 0, bob)
    assert (found.value, found.reason, found.variant, dict(found.flag_metadata)) == (
        10,
        Reason.DEFAULT,
        "default",
        {},
    )
    found = await _details(kind, "integer", "cache_size", 0, EvaluationContext(None, {"user": "alice"}))
    assert found.value == 20
    found = await _details(kind, "string", "color", "", alice)
    assert (found.value, found.reason) == ("green", Reason.TARGETING_MATCH)

    # Settings only the leader declared, read from the host's snapshot with their declared types.
    found = await _details(kind, "string", "greeting", "", EvaluationContext("alice", {"theme": "dark"}))
    assert (found.value, found.reason, found.flag_metadata["rule_id"]) == (
        "hello",
        Reason.TARGETING_MATCH,
        rules["greeting"],
    )
    found = await _details(kind, "string", "greeting", "", EvaluationContext("alice", {"theme": "light"}))
    assert (found.value, found.reason) == ("hi", Reason.DEFAULT)
    found = await _details(kind, "object", "limits", [], alice)
    assert (found.value, found.reason) == ([5, 6], Reason.TARGETING_MATCH)
    found.value.append(7)  # each caller's value is its own
    assert (await _details(kind, "object", "limits", [], alice)).value == [5, 6]
    assert (await _details(kind, "object", "weights", {}, alice)).value == {"b": 2}
    assert (await _details(kind, "object", "weights", {}, bob)).value == {"a": 1}
    found = await _details(kind, "float", "ratio", 0.0, alice)
    assert (found.value, type(found.value)) == (2.0, float)
    assert (await _details(kind, "float", "ratio", 0.0, bob)).value == 0.5
    found = await _details(kind, "boolean", "enabled", True, bob)
    assert (found.value, found.reason) == (False, Reason.DEFAULT)


@pytest.mark.parametrize("follower", ["thread", "async"], indirect=True)
async def test_errors(follower: Any) -> None:
    client, _ = follower
    kind = "thread" if isinstance(client, heksher.ThreadHeksherClient) else "async"
    alice = EvaluationContext("alice")
    cases: list[tuple[str, str, Any, EvaluationContext | None, ErrorCode, str]] = [
        ("string", "cache_size", "x", alice, ErrorCode.TYPE_MISMATCH, "of type int"),
        ("integer", "greeting", 1, alice, ErrorCode.TYPE_MISMATCH, "of type str"),
        ("float", "cache_size", 1.0, alice, ErrorCode.TYPE_MISMATCH, "not float"),
        ("integer", "no_such_setting", 3, alice, ErrorCode.FLAG_NOT_FOUND, "no process declared it"),
        (
            "integer",
            "cache_size",
            3,
            EvaluationContext("alice", {"colour": "x"}),
            ErrorCode.INVALID_CONTEXT,
            "colour",
        ),
        (
            "integer",
            "cache_size",
            3,
            EvaluationContext("alice", {"theme": 3}),
            ErrorCode.INVALID_CONTEXT,
            "string",
        ),
        (
            "integer",
            "cache_size",
            3,
            EvaluationContext("alice", {"user": "bob"}),
            ErrorCode.INVALID_CONTEXT,
            "disagree",
        ),
        ("integer", "cache_size", 3, None, ErrorCode.TARGETING_KEY_MISSING, "user"),
        ("string", "greeting", "x", alice, ErrorCode.INVALID_CONTEXT, "theme"),
        (
            "string",
            "greeting",
            "x",
            EvaluationContext(None, {"theme": "dark"}),
            ErrorCode.TARGETING_KEY_MISSING,
            "user",
        ),
    ]
    for resolver, key, default, context, code, words in cases:
        found = await _details(kind, resolver, key, default, context)
        assert (found.value, found.reason, found.error_code) == (default, Reason.ERROR, code), (key, context)
        assert words in (found.error_message or ""), found.error_message


def test_events_fire_in_the_leader_and_in_a_follower(
    service: HeksherService, rules: dict[str, int], workers: list[Proc], monkeypatch: pytest.MonkeyPatch
) -> None:
    """READY, CONFIGURATION_CHANGED (with the names), ERROR, STALE, READY again: in a spawned follower and in
    this process (a follower too), from the wake-ups that run on_update_ok/on_update_error."""
    leader = workers[0]
    other = Proc(service.url, "async", SPECS[:1])
    workers.append(other)
    assert other.ask("leading") is False
    client = _follower("thread", service)
    seen: list[tuple[str, list[str] | None]] = []
    arrived = threading.Condition()

    def record(name: str) -> Any:
        def handle(details: Any) -> None:
            with arrived:
                seen.append((name, details.flags_changed))
                arrived.notify_all()

        return handle

    def wait_for(name: str, since: int) -> list[tuple[str, list[str] | None]]:
        """The events from number *since* on, once one of them is *name*."""
        with arrived:
            assert arrived.wait_for(lambda: any(e[0] == name for e in seen[since:]), 30), (name, seen)
            return seen[since:]

    with client:
        for event in ProviderEvent:
            api.add_handler(event, record(event.value))
        set_provider(HeksherProvider())
        sdk = api.get_client()
        wait_for("PROVIDER_READY", 0)

        service.set_rule_value(rules["cache_size"], 21)
        service.set_rule_value(rules["greeting"], "hey")
        since = len(seen)
        client.reload()  # the leader queries for this process; both followers wake to the new snapshot
        changed = [
            e
            for e in wait_for("PROVIDER_CONFIGURATION_CHANGED", since)
            if e[0] == "PROVIDER_CONFIGURATION_CHANGED"
        ]
        assert changed == [("PROVIDER_CONFIGURATION_CHANGED", ["cache_size", "greeting"])]
        events = other.ask("wait_event", "PROVIDER_CONFIGURATION_CHANGED", 1, 30)
        assert ("PROVIDER_CONFIGURATION_CHANGED", ["cache_size", "greeting"], None) in events
        events = leader.ask("wait_event", "PROVIDER_CONFIGURATION_CHANGED", 1, 30)
        assert ("PROVIDER_CONFIGURATION_CHANGED", ["cache_size", "greeting"], None) in events
        assert sdk.get_integer_value("cache_size", 0, EvaluationContext("alice")) == 21

        service.inject_fault(Fault(status=500), path="/api/v1/query")
        since = len(seen)
        client.reload()  # fails: ERROR in every process (the rules are fresh still)
        wait_for("PROVIDER_ERROR", since)
        assert sdk.get_provider_status() == ProviderStatus.ERROR
        errors = other.ask("wait_event", "PROVIDER_ERROR", 1, 30)
        assert [e[0] for e in errors].count("PROVIDER_ERROR") == 1
        found = sdk.get_integer_details("cache_size", 0, EvaluationContext("alice"))
        assert (found.value, found.reason) == (21, Reason.TARGETING_MATCH)  # the last rules serve on

        monkeypatch.setenv(ENV_STALE_AFTER, "0.05")
        last_ok = client.shared_status().last_update_ok
        assert last_ok is not None
        deadline = time.monotonic() + 10
        while time.time() - last_ok <= 0.05 and time.monotonic() < deadline:
            time.sleep(0.01)  # until the rules are older than the bound: a condition, not a guess
        since = len(seen)
        client.reload()  # fails again, now past the bound
        wait_for("PROVIDER_STALE", since)
        assert sdk.get_provider_status() == ProviderStatus.STALE
        found = sdk.get_integer_details("cache_size", 0, EvaluationContext("alice"))
        assert (found.value, found.reason, found.flag_metadata["rule_id"]) == (
            21,
            Reason.STALE,
            rules["cache_size"],
        )

        service.clear_faults()
        monkeypatch.delenv(ENV_STALE_AFTER)
        since = len(seen)
        client.reload()
        wait_for("PROVIDER_READY", since)
        assert sdk.get_provider_status() == ProviderStatus.READY
        found = sdk.get_integer_details("cache_size", 0, EvaluationContext("alice"))
        assert (found.value, found.reason) == (21, Reason.TARGETING_MATCH)
        statuses = [e[0] for e in other.ask("wait_event", "PROVIDER_READY", 2, 30)]
        assert statuses.count("PROVIDER_ERROR") == 1
        assert statuses.count("PROVIDER_READY") >= 2


def test_a_spawned_follower_evaluates_through_the_sdk(
    service: HeksherService, rules: dict[str, int], workers: list[Proc]
) -> None:
    """A worker process of each client kind, following: its own setting and the leader's only."""
    for kind in ("thread", "async"):
        proc = Proc(service.url, kind, SPECS[:1])
        workers.append(proc)
        assert proc.ask("leading") is False
        found = proc.ask("eval", "integer", "cache_size", 0, "alice", None)
        assert (found["value"], found["reason"]) == (20, "TARGETING_MATCH")
        assert found["flag_metadata"]["rule_id"] == rules["cache_size"]
        found = proc.ask("eval", "string", "greeting", "", "alice", {"theme": "dark"})
        assert (found["value"], found["reason"]) == ("hello", "TARGETING_MATCH")
        found = proc.ask("eval", "integer", "greeting", 0, "alice", {"theme": "dark"})
        assert found["error_code"] == "TYPE_MISMATCH"


def test_no_main_client_yet_then_one() -> None:
    """Set before any client is main: not ready (the SDK says ERROR); ready once one is."""
    ready = threading.Event()
    api.add_handler(ProviderEvent.PROVIDER_READY, lambda _: ready.set())
    ready.clear()  # the no-op provider's immediate READY
    cache_size = heksher.Setting("cache_size", int, ["user"], 10)
    with contextlib.suppress(Exception):  # set_provider_and_wait raises what initialize raised (0.10)
        set_provider(HeksherProvider())
    sdk = api.get_client()
    assert sdk.get_provider_status() == ProviderStatus.ERROR
    with (
        HeksherService(context_features=FEATURES) as service,
        heksher.ThreadHeksherClient(service.url, 60, FEATURES) as client,
    ):
        found = sdk.get_integer_details("cache_size", 0, EvaluationContext("alice"))
        assert (found.value, found.reason) == (10, Reason.DEFAULT)
        client.reload()  # the first update it hears of makes it ready
        assert ready.wait(30)
        assert sdk.get_provider_status() == ProviderStatus.READY
    del cache_size


def test_stub_client() -> None:
    """With a stub main client (users' tests), the provider answers from the stub rules."""
    from heksher_shm.clients.stub import Rule, SyncStubHeksherClient

    cache_size = heksher.Setting("cache_size", int, ["user"], 10)
    other = heksher.Setting("other", str, ["user"], "x")
    assert other.get(user="bob") == "x"
    client = SyncStubHeksherClient()
    client.set_as_main()
    client[cache_size].rules = [Rule({"user": "alice"}, 20)]
    set_provider(HeksherProvider())
    sdk = api.get_client()
    found = sdk.get_integer_details("cache_size", 0, EvaluationContext("alice"))
    assert (found.value, found.reason, dict(found.flag_metadata)) == (20, Reason.TARGETING_MATCH, {})
    assert sdk.get_integer_value("cache_size", 0, EvaluationContext("bob")) == 10
    assert sdk.get_string_value("other", "", EvaluationContext("bob")) == "x"
    client[cache_size].rules = 30
    assert sdk.get_integer_value("cache_size", 0, EvaluationContext("bob")) == 30
    assert sdk.get_integer_details("nothing", 0).error_code == ErrorCode.FLAG_NOT_FOUND


def test_provider_arguments() -> None:
    with pytest.raises(ValueError, match="targeting_key"):
        HeksherProvider(targeting_key="no spaces")
    with pytest.raises(TypeError, match="heksher_shm client"):
        HeksherProvider(client=object())
    assert HeksherProvider().get_metadata().name == "heksher_shm"


@pytest.mark.parametrize(
    ("type_string", "kind", "value", "converted"),
    [
        ("int", Kind.INTEGER, 3, 3),
        ("float", Kind.FLOAT, 3, 3),
        ("str", Kind.STRING, "a", "a"),
        ("bool", Kind.BOOLEAN, True, True),
        ('Enum["a","b"]', Kind.STRING, "b", "b"),
        ("Enum[1,2]", Kind.INTEGER, 2, 2),
        ("Enum[1,2.5]", Kind.FLOAT, 2.5, 2.5),
        ('Enum[1,"a"]', Kind.NONE, "a", "a"),
        ('Flags["r","w"]', Kind.OBJECT, ["w", "x", "w"], ["w"]),
        ("Sequence<int>", Kind.OBJECT, [1, "a", 2], [1, 2]),
        ("Mapping<Sequence<str>>", Kind.OBJECT, {"a": ["x"], "b": 3}, {"a": ["x"]}),
    ],
)
def test_declared_types(type_string: str, kind: Kind, value: Any, converted: Any) -> None:
    parsed = parse(type_string)
    assert parsed is not None
    assert parsed.kind is kind
    assert parsed.convert(value) == converted


@pytest.mark.parametrize(
    ("type_string", "value"), [("int", "1"), ('Enum["a"]', "b"), ("Sequence<int>", {}), ('Flags["a"]', [1])]
)
def test_declared_types_refuse(type_string: str, value: Any) -> None:
    parsed = parse(type_string)
    assert parsed is not None
    with pytest.raises(TypeError):
        parsed.convert(value)


def test_unknown_type_strings() -> None:
    assert parse("Decimal") is None
    assert parse("Sequence<Decimal>") is None
    assert parse("Enum[not json]") is None


def _forked_child(conn: Any) -> None:
    """In a child forked from a process whose main client and provider are set: evaluate, and wait for
    the provider's CONFIGURATION_CHANGED (the client resumes as a follower, its provider with it)."""
    changed = threading.Event()
    api.add_handler(ProviderEvent.PROVIDER_CONFIGURATION_CHANGED, lambda d: changed.set())
    sdk = api.get_client()
    conn.send(sdk.get_integer_value("cache_size", 0, EvaluationContext("alice")))
    conn.send(changed.wait(30))
    conn.send(sdk.get_integer_value("cache_size", 0, EvaluationContext("alice")))


def test_a_forked_child_follows_with_the_providers_events(service: HeksherService) -> None:
    cache_size = heksher.Setting("cache_size", int, ["user"], 10)
    with heksher.ThreadHeksherClient(service.url, 60, FEATURES) as client:
        client.track_contexts(user=heksher.TRACK_ALL)
        rule = service.add_rule("cache_size", {"user": "alice"}, 20)
        client.reload()
        ready = threading.Event()
        # A handler in the parent too: the SDK's handler thread then exists before the fork.
        api.add_handler(ProviderEvent.PROVIDER_READY, lambda d: ready.set())
        set_provider(HeksherProvider())
        assert ready.wait(30)
        assert api.get_client().get_integer_value("cache_size", 0, EvaluationContext("alice")) == 20
        here, there = multiprocessing.get_context("fork").Pipe()
        child = multiprocessing.get_context("fork").Process(target=_forked_child, args=(there,), daemon=True)
        child.start()
        try:
            assert here.poll(30)
            assert here.recv() == 20
            service.set_rule_value(rule, 30)
            client.reload()  # the parent leads: it publishes, the child wakes and reports
            assert here.poll(30)
            assert here.recv() is True, "no CONFIGURATION_CHANGED in the forked child"
            assert here.recv() == 30
        finally:
            child.join(10)
            if child.is_alive():
                child.kill()
                child.join(5)
    del cache_size


@pytest.mark.parametrize("follower", ["thread"], indirect=True)
def test_a_provider_pinned_to_a_client(follower: Any, rules: dict[str, int]) -> None:
    """HeksherProvider(client), called directly (no SDK): the same answers, from that client."""
    client, _ = follower
    provider = HeksherProvider(client)
    provider.initialize(EvaluationContext())
    try:
        found = provider.resolve_integer_details("cache_size", 0, EvaluationContext("alice"))
        assert (found.value, found.reason, found.flag_metadata["rule_id"]) == (
            20,
            Reason.TARGETING_MATCH,
            rules["cache_size"],
        )
        assert provider.resolve_integer_details("cache_size", 0, EvaluationContext("alice")) is found  # kept
        assert (
            provider.resolve_string_details("greeting", "", EvaluationContext("bob", {"theme": "x"})).value
            == "hi"
        )
    finally:
        provider.shutdown()
