"""The engine's core, driven by hand: scripted answers, a fake clock, and the effects it yields.

No sockets, no files, no threads: each test feeds the engine what a host and
a service would answer and compares the effects it yields (the transcript).
The deterministic simulation (``tests/sim``) does this for many processes
at once; these tests pin single behaviours in a few lines each.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Generator
from typing import Any

import httpx
import pytest

from heksher_shm._engine import effects as fx
from heksher_shm._engine import policy
from heksher_shm._engine.answers import Fresh
from heksher_shm._engine.context import Context, ErrorBook
from heksher_shm._engine.engine import Engine
from heksher_shm._engine.health import DESYNC_SPREAD
from heksher_shm._engine.host import LeaderSeen, Marks, Wish
from heksher_shm._engine.local import Published
from heksher_shm._model import protocol as proto
from heksher_shm._model.snapshot import Ack, SettingEntry
from heksher_shm.exceptions import SnapshotFencedError

INTERVAL = 10.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1.7e9 + self.now


def wish(key: str = "p1", seq: int = 1) -> Wish:
    body = proto.DeclarationBody(
        name="size", configurable_features=["user"], type="int", default_value=1, metadata={}, version="1.0"
    )
    return Wish(key, {proto.declaration_digest(body): body}, {"user": ["alice"]}, seq)


def response(status: int, body: object = None, **headers: str) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers, request=httpx.Request("GET", "http://h/"))


class Run:
    """Steps an engine, answering each effect with *answer* (the default answers a calm world)."""

    def __init__(self, engine: Engine, clock: FakeClock) -> None:
        self.engine = engine
        self.clock = clock
        self.steps = engine.run()
        self.log: list[Any] = []
        self._pending: Any = None
        self._throw: BaseException | None = None

    def until(self, stop: Callable[[Any], bool], answer: Callable[[Any], Any], limit: int = 200) -> Any:
        """Run until an effect satisfies *stop* (returned, not yet answered)."""
        for _ in range(limit):
            if self._throw is not None:
                effect = self.steps.throw(self._throw)
            else:
                effect = self.steps.send(self._pending)
            self._pending, self._throw = None, None
            self.log.append(effect)
            if stop(effect):
                return effect
            try:
                self._pending = answer(effect)
            except Exception as e:
                self._throw = e
        raise AssertionError(f"no stop in {limit} effects: {[type(e).__name__ for e in self.log[-20:]]}")

    def answer(self, value: Any = None, error: BaseException | None = None) -> None:
        self._pending, self._throw = value, error


def calm(term: int = 1, wishes: list[Wish] | None = None, publish: Callable[[Any], int] | None = None) -> Any:
    """A host and service where everything works: the answer to each effect (the lock is this
    process's once)."""
    state: dict[str, Any] = {"generation": 0, "terms": 0, "published": None}

    def answer(effect: Any) -> Any:
        if isinstance(effect, fx.TakeLead):
            state["terms"] += 1
            return term if state["terms"] == 1 else None
        if isinstance(effect, fx.KeepsLead):
            return True
        if isinstance(effect, fx.ScanWishes):
            return wishes if wishes is not None else [wish()]
        if isinstance(effect, fx.ReadHead):
            return state["published"] and state["published"][0]
        if isinstance(effect, fx.ReadBlobs):
            return list(state["published"][1])
        if isinstance(effect, fx.Call):
            if effect.path == proto.CONTEXT_FEATURES:
                return response(200, {"context_features": ["user"]})
            return response(200, {"settings": {}}, ETag='"1"')
        if isinstance(effect, fx.Calls):
            return [response(201, {"outcome": "created"}) for _ in effect.calls]
        if isinstance(effect, fx.Digest):
            return Fresh([SettingEntry("size", 0, b"d", 0)], [b"blob"], '"1"', effect.queried)
        if isinstance(effect, fx.Compute):
            return effect.fn()
        if isinstance(effect, fx.Publish):
            if publish is not None:
                return publish(effect)
            state["generation"] += 1
            state["published"] = (Published(state["generation"], effect.head, 1, effect.term), effect.blobs)
            return state["generation"]
        if isinstance(effect, fx.Housekeep):
            return False
        if isinstance(effect, fx.ReadMarks):
            return Marks(0.0, 0, None)
        if isinstance(effect, fx.DamageReports):
            return 0
        return None

    return answer


def engine(clock: FakeClock, seed: int = 1, shared: bool = True) -> Engine:
    return Engine(
        Context(
            update_interval=INTERVAL,
            context_features=["user"],
            shared=shared,
            clock=clock,
            rng=random.Random(seed),
            errors=ErrorBook(1),
        )
    )


def names(effects: list[Any]) -> list[str]:
    return [type(e).__name__ for e in effects]


def test_a_first_term_declares_queries_publishes_and_answers() -> None:
    clock = FakeClock()
    run = Run(engine(clock), clock)
    wait = run.until(lambda e: isinstance(e, fx.Wait), calm())
    assert names(run.log) == [
        "TakeLead",
        "Announce",
        "Beat",  # progress promised before any slow work
        "ScanWishes",
        "RingAll",  # followers watch the new leader from now on
        "ReadHead",  # nothing to inherit
        "RestoreKept",  # nor a last-known-good file
        "Call",  # the service's context features
        "KeepsLead",
        "ScanWishes",
        "DamageReports",  # a check of the segment only when a process reported damage
        "KeepsLead",  # a replaced leader declares nothing
        "Calls",  # the declaration
        "CountDeclarations",
        "Call",  # the query
        "Digest",
        "KeepsLead",  # checked right before writing
        "Compute",
        "Publish",
        "KeepSnapshot",  # new rules: the last-known-good file (if any) gets them
        "RecordOk",
        "Acknowledge",
        "Apply",
        "RingAll",
        "Housekeep",
        "Beat",
        "Wait",
    ]
    publish = next(e for e in run.log if isinstance(e, fx.Publish))
    assert publish.term == 1  # the fencing token of the term
    assert publish.busy  # beaten while it runs
    ack = next(e for e in run.log if isinstance(e, fx.Acknowledge))
    assert ack.acks == {"p1": Ack(1, None, "", 1, 1)}  # request 1 of p1: served by term 1, generation 1
    # the first success of a term draws its next wait: hosts that started together spread out
    assert INTERVAL * (1 - DESYNC_SPREAD) <= wait.timeout <= INTERVAL * (1 + DESYNC_SPREAD)
    assert run.engine.leading


def test_a_replaced_leader_steps_down_when_its_publish_is_fenced() -> None:
    """The issue-15 hole, at the engine's level: a leader that was replaced while stopped finds its
    publish refused (a newer term began); it steps down and follows, and never applies its rules."""
    clock = FakeClock()

    def fenced(effect: Any) -> int:
        raise SnapshotFencedError("segment: term 1 was replaced by term 2; not publishing")

    run = Run(engine(clock), clock)
    run.until(lambda e: isinstance(e, fx.LookAtLeader), calm(publish=fenced))
    after = names(run.log[run.log.index(next(e for e in run.log if isinstance(e, fx.Publish))) :])
    assert after[:4] == ["Publish", "GiveUpLead", "RingAll", "TakeLead"]
    assert "Apply" not in after[:3]
    assert not run.engine.leading


def test_a_follower_replaces_a_leader_that_broke_its_promise() -> None:
    clock = FakeClock()
    run = Run(engine(clock), clock)
    seen = LeaderSeen((42, 1.0), 99, False, clock.now - 30, clock.now - 20, 0.0)

    def answer(effect: Any) -> Any:
        if isinstance(effect, fx.TakeLead):
            return None  # the stuck leader holds the lock
        if isinstance(effect, fx.LookAtLeader):
            return seen
        if isinstance(effect, fx.TryTakeover):
            return True
        if isinstance(effect, fx.SeizeLead):
            return 5
        return calm()(effect)

    run.until(lambda e: isinstance(e, fx.Announce), answer)
    assert names(run.log) == [
        "TakeLead",
        "Apply",
        "ReadMarks",
        "Housekeep",
        "LookAtLeader",  # promised 20 s ago: over UNRESPONSIVE_AFTER
        "TryTakeover",  # one process at a time
        "LookAtLeader",  # judged again under the takeover lock
        "SeizeLead",
        "Beat",
        "RingAnswered",
        "EndTakeover",
        "Announce",  # term 5 begins
    ]
    assert run.engine.leader is not None
    assert run.engine.leader.term.number == 5


def test_a_follower_trusts_a_busy_leader_and_sleeps_until_its_promise() -> None:
    clock = FakeClock()
    run = Run(engine(clock), clock)
    seen = LeaderSeen((42, 1.0), 99, False, clock.now, clock.now + 7.0, 0.0)

    def answer(effect: Any) -> Any:
        if isinstance(effect, fx.TakeLead):
            return None
        if isinstance(effect, fx.LookAtLeader):
            return seen
        return calm()(effect)

    wait = run.until(lambda e: isinstance(e, fx.Wait), answer)
    assert "TryTakeover" not in names(run.log)
    assert wait.leader_exit == 99  # and the leader's exit wakes it at once
    assert wait.timeout == pytest.approx(7.0 + policy.UNRESPONSIVE_AFTER + 0.01)


def test_failing_queries_back_off_and_a_reload_gets_the_standing_error() -> None:
    clock = FakeClock()
    run = Run(engine(clock), clock)
    failing = calm()

    def answer(effect: Any) -> Any:
        if isinstance(effect, fx.Call) and effect.path == proto.QUERY:
            return response(503, {"detail": "down"})
        return failing(effect)

    asked: list[float] = []

    def timed(effect: Any) -> Any:
        if isinstance(effect, fx.Call) and effect.path == proto.QUERY:
            asked.append(clock.now)
        return answer(effect)

    wait = run.until(lambda e: isinstance(e, fx.Wait), timed)
    while clock.now < 1000.0 + 8 * INTERVAL:
        clock.now += wait.timeout
        wait = run.until(lambda e: isinstance(e, fx.Wait), timed)
    steps = [b - a for a, b in itertools.pairwise(asked)]
    # equal jitter: half a step, plus up to the other half; doubling from 0.5 s up to the interval
    assert 0.25 <= steps[0] <= 0.5
    assert 0.5 <= steps[1] <= 1.0
    assert 1.0 <= steps[2] <= 2.0
    assert all(INTERVAL <= step <= INTERVAL * 1.25 for step in steps[5:])  # then one per interval at most
    errors = [e for e in run.log if isinstance(e, fx.RecordError)]
    assert len(errors) == len(asked)
    assert "503" in errors[0].message

    # a reload() during the backoff gets the standing error at once, without a query
    clock.now += wait.timeout / 2  # its ring wakes the leader half-way to its next query
    mark, count = len(run.log), len(asked)
    reloading = Wish("p1", wish().declarations, {"user": ["alice"]}, 2, query_seq=2)
    run.answer(False)
    run.until(
        lambda e: isinstance(e, fx.Wait), lambda e: [reloading] if isinstance(e, fx.ScanWishes) else timed(e)
    )
    (ack,) = [e for e in run.log[mark:] if isinstance(e, fx.Acknowledge)]
    assert ack.acks["p1"].seq == 2
    assert "503" in (ack.acks["p1"].error or "")
    assert len(asked) == count


def test_an_update_with_nothing_to_ask_neither_ends_nor_resets_a_backoff() -> None:
    """Queries fail; the only process that wanted a setting leaves, so an update comes with nothing to
    ask: that says nothing of the service (no "recovered", no success recorded), the leader sleeps
    an interval (it has nothing to ask: waking at each backoff step, it woke every 0.4 s while idle,
    simulated seed 1066967), and once a process wants a setting again the backoff goes on where it
    was (simulated seed 1712689: it restarted at its first step, 0.5 s, after two failures)."""
    clock = FakeClock()
    run = Run(engine(clock), clock)
    calm_world = calm()
    present = {"wishes": [wish()]}
    asked: list[float] = []

    def answer(effect: Any) -> Any:
        if isinstance(effect, fx.ScanWishes):
            return present["wishes"]
        if isinstance(effect, fx.Call) and effect.path == proto.QUERY:
            asked.append(clock.now)
            return response(503, {"detail": "down"})
        return calm_world(effect)

    def step() -> None:
        clock.now += wait.timeout
        run.answer(False)

    wait = run.until(lambda e: isinstance(e, fx.Wait), answer)  # the first query failed
    step()
    wait = run.until(lambda e: isinstance(e, fx.Wait), answer)  # the second
    present["wishes"] = []
    idle_from, wakes = clock.now, 0
    while clock.now < idle_from + 3 * INTERVAL:  # nothing to ask: an update per interval at most
        step()
        wait = run.until(lambda e: isinstance(e, fx.Wait), answer)
        wakes += 1
    assert len(asked) == 2
    assert wakes <= 6, wakes
    present["wishes"] = [wish()]
    while len(asked) == 2:
        step()
        wait = run.until(lambda e: isinstance(e, fx.Wait), answer)
    assert len(asked) == 3  # the third query failed
    assert 1.0 <= wait.timeout <= 2.0  # the step after three failures in a row
    assert not [e for e in run.log if isinstance(e, fx.RecordOk)]


def test_a_lost_setting_that_cannot_be_declared_again_is_no_longer_asked_for() -> None:
    """The service lost its data; one setting's declaration is refused now (a new setting must be
    version 1.0). After the 404 the leader declares again and queries once more without it, and from
    then on one query per update: asked for, it would fail every query, twice per backoff step."""
    clock = FakeClock()
    sized = wish()
    gone = proto.DeclarationBody(
        name="gone", configurable_features=["user"], type="int", default_value=1, metadata={}, version="1.1"
    )
    both = Wish("p1", {**sized.declarations, proto.declaration_digest(gone): gone}, {"user": ["alice"]}, 1)
    base = calm(wishes=[both])
    lost = False
    queried: list[str] = []

    def answer(effect: Any) -> Any:
        if isinstance(effect, fx.Call) and effect.path == proto.QUERY:
            asked = (effect.params or {})["settings"]
            queried.append(asked)
            if lost and "gone" in asked.split(","):
                text = "the following are not setting names: ['gone']"
                return httpx.Response(404, text=text, request=httpx.Request("GET", "http://h/"))
        if isinstance(effect, fx.Calls) and lost:
            return [
                response(400, {"detail": "newly created settings must have version 1.0"})
                if b'"gone"' in (call.content or b"")
                else response(201, {"outcome": "created"})
                for call in effect.calls
            ]
        if isinstance(effect, fx.Digest):
            entries = [SettingEntry("size", 0, b"d", 0), SettingEntry("gone", 1, b"g", 0)][: 1 if lost else 2]
            return Fresh(entries, [b"blob"] * len(entries), '"1"', effect.queried)
        return base(effect)

    run = Run(engine(clock), clock)
    wait = run.until(lambda e: isinstance(e, fx.Wait), answer)
    assert queried == ["gone,size"]
    lost = True
    for _ in range(3):
        clock.now += wait.timeout
        mark = len(run.log)
        wait = run.until(lambda e: isinstance(e, fx.Wait), answer)
        assert not [e for e in run.log[mark:] if isinstance(e, fx.RecordError)]
    assert queried == ["gone,size", "gone,size", "size", "size", "size"]
    assert wait.timeout >= INTERVAL * (1 - DESYNC_SPREAD)


def test_a_new_registration_is_answered_without_a_republish() -> None:
    """Acknowledging a process that needs nothing new is one small write, not a snapshot (O(1))."""
    clock = FakeClock()
    run = Run(engine(clock), clock)
    wishes = [wish("p1")]
    answer = calm(wishes=wishes)
    first = run.until(lambda e: isinstance(e, fx.Wait), answer)
    published = sum(isinstance(e, fx.Publish) for e in run.log)
    wishes.append(wish("p2"))  # a newcomer with the same declaration
    clock.now += 0.1  # woken by its ring, long before the next update
    assert first.timeout > 1
    mark = len(run.log)
    run.until(lambda e: isinstance(e, fx.Wait), answer)
    new = run.log[mark:]
    assert sum(isinstance(e, fx.Publish) for e in new) == 0
    assert sum(isinstance(e, fx.Calls) for e in new) == 0  # declared already this term
    (ack,) = [e for e in new if isinstance(e, fx.Acknowledge)]
    assert list(ack.acks) == ["p2"]
    assert sum(isinstance(e, fx.Publish) for e in run.log) == published


def test_a_ring_from_a_registration_costs_no_segment_check_and_a_damage_report_does() -> None:
    """The idle 1 x 1,000 benchmark: a leader woken 1 ms after its first publish by its own process's
    registration read back its 1,000 blobs 2 s later (VERIFY_INTERVAL). A wake that the registrations
    explain checks nothing; one after a process reported damage (the counter moved) checks, right away
    or (within VERIFY_INTERVAL of the last check) at a wake of its own, VERIFY_INTERVAL after it."""
    clock = FakeClock()
    interval = 100.0  # the first update's wait is drawn: at least 25 s, far beyond these wakes
    context = Context(
        update_interval=interval,
        context_features=["user"],
        shared=True,
        clock=clock,
        rng=random.Random(1),
        errors=ErrorBook(1),
    )
    run = Run(Engine(context), clock)
    wishes = [wish("p1")]
    reports = {"count": 7}  # what earlier terms left: the term's first publish covers it
    calm_world = calm(wishes=wishes)

    def answer(effect: Any) -> Any:
        if isinstance(effect, fx.DamageReports):
            return reports["count"]
        return calm_world(effect)

    def next_wake(advance: float) -> tuple[float, list[Any]]:
        clock.now += advance
        mark = len(run.log)
        wait = run.until(lambda e: isinstance(e, fx.Wait), answer)
        return clock.now + wait.timeout, run.log[mark:]

    def checks(effects: list[Any]) -> list[str]:
        return [type(e).__name__ for e in effects if isinstance(e, fx.ReadHead | fx.ReadBlobs)]

    update_due, _ = next_wake(0.0)
    wishes.append(wish("p2"))  # a newcomer rings, 1 ms after the publish
    wake_at, new = next_wake(0.001)
    assert checks(new) == []
    assert wake_at == update_due  # and no wake of its own for a check
    wake_at, new = next_wake(3.0)  # rung again (a process added a setting): still nothing to check
    assert (checks(new), wake_at) == ([], update_due)

    reports["count"] += 1  # a process found the snapshot damaged, then rang
    wake_at, new = next_wake(0.5)
    assert (checks(new), wake_at) == (["ReadHead", "ReadBlobs"], update_due)
    checked = clock.now
    reports["count"] += 1  # another report, 1 ms after that check: put off, with a wake of its own
    wake_at, new = next_wake(0.001)
    assert checks(new) == []
    assert wake_at == pytest.approx(checked + policy.VERIFY_INTERVAL)
    wake_at, new = next_wake(wake_at - clock.now)
    assert (checks(new), wake_at) == (["ReadHead", "ReadBlobs"], update_due)


def test_closing_mid_term_lets_go_of_the_lock() -> None:
    clock = FakeClock()
    eng = engine(clock)
    run = Run(eng, clock)
    run.until(lambda e: isinstance(e, fx.Wait), calm())
    assert names(eng.closing_effects()) == ["GiveUpLead", "RingAll"]
    eng.closed = True
    rest: list[Any] = []
    steps: Generator[Any, Any, None] = run.steps
    try:
        effect = steps.send(False)
        while True:
            rest.append(effect)
            effect = steps.send(calm()(effect))
    except StopIteration:
        pass
    assert names(rest)[-2:] == ["GiveUpLead", "RingAll"]
    assert eng.closing_effects() == []


def test_a_new_term_over_fresh_rules_queries_when_the_old_leader_would_have() -> None:
    """A takeover (or a new main client in one process) costs the service no query: rules queried
    less than an interval ago are inherited with their ETag, and the first query comes on schedule.
    They are published again under the new term before its declarations (its first snapshot does
    not wait for them), with the previous term's declaration outcomes until its own replace them."""
    from heksher_shm._model.snapshot import FORMAT, Head, Outcome, decode_head, encode_head

    clock = FakeClock()
    queried = clock.now - 2.0  # the old leader queried 2 s ago, at a 10 s interval
    (digest,) = wish().declarations
    old_outcome = Outcome("size", "uptodate", 200, type="int", features=("user",))
    head = Head(
        format=FORMAT,
        term=1,
        published=clock.wall(),
        context_features=["user"],
        settings=[SettingEntry("size", 0, b"d", 0)],
        outcomes={digest: old_outcome, "gone": old_outcome},
        ok=True,
        queried=queried,
        filters="user:(alice)",
        etag='"7"',
    )
    answer = calm(term=2)

    def inherit(effect: Any) -> Any:
        if isinstance(effect, fx.ReadHead):
            return Published(5, encode_head(head), 1, 1)
        if isinstance(effect, fx.ReadBlobs):
            return [b"blob"]
        return answer(effect)

    run = Run(engine(clock), clock)
    wait = run.until(lambda e: isinstance(e, fx.Wait), inherit)
    assert not [e for e in run.log if isinstance(e, fx.Call) and e.path == proto.QUERY]
    steps = [e for e in run.log if isinstance(e, fx.Publish | fx.Acknowledge | fx.Calls)]
    assert [type(e).__name__ for e in steps] == [
        "Publish",  # the term's first snapshot: the adopted rules, before any declaration
        "Calls",  # the term's declarations
        "Publish",  # with their outcomes (an answer names a snapshot of the term that has them)
        "Acknowledge",
    ]
    first, second = (decode_head(e.head) for e in steps if isinstance(e, fx.Publish))
    assert (first.term, second.term) == (2, 2)
    assert [s.name for s in first.settings] == [s.name for s in second.settings] == ["size"]
    assert first.outcomes == {digest: old_outcome, "gone": old_outcome}
    assert set(second.outcomes) == {digest}  # the term's own outcomes only
    assert first.etag == second.etag == '"7"'
    assert wait.timeout == pytest.approx(queried + INTERVAL - clock.now)
    clock.now += wait.timeout
    run.until(lambda e: isinstance(e, fx.Wait), inherit)
    (query,) = [e for e in run.log if isinstance(e, fx.Call) and e.path == proto.QUERY]
    assert query.headers == {"If-None-Match": '"7"'}  # unchanged rules will cost a 304


def test_a_setting_whose_declaration_was_refused_is_queried_once_another_one_created_it() -> None:
    """A declaration refused for good (a new setting declared at version 1.1: a 400) leaves its setting
    out of the query while nothing shows the service has it; once another process's declaration of it
    succeeded this term, it is queried, even after that process is gone."""
    from heksher_shm._engine.term import Term, query_spec
    from heksher_shm._model.snapshot import Outcome

    (first,) = wish().declarations.values()
    newer = proto.DeclarationBody(
        name="size", configurable_features=["user"], type="int", default_value=3, metadata={}, version="1.1"
    )
    refused = Wish("p1", {proto.declaration_digest(newer): newer}, {"user": ["alice"]}, 1)
    term = Term(1)
    term.declared[proto.declaration_digest(newer)] = Outcome("size", None, 400, error="400 Bad Request")
    assert query_spec(term, [refused])[0] == ()
    term.declared[proto.declaration_digest(first)] = Outcome("size", "created", 200)  # by p2, gone since
    assert query_spec(term, [refused])[0] == ("size",)


def test_a_setting_refused_as_new_is_looked_for_at_each_update_and_queried_once_it_exists() -> None:
    """A declaration refused as a new setting (a 400 to version 1.1) says the service lacks the setting.
    Someone else may create it later (another host, or a leader replaced while its declarations were on
    their way: simulated seeds 1007892, 1277433, 1292264, where the term never learned of it and the
    process never got its rules). The leader asks for it at each scheduled update, never in between, and
    queries it from the update that finds it; it is declared once all the same."""
    clock = FakeClock()
    run = Run(engine(clock), clock)
    newer = proto.DeclarationBody(
        name="size", configurable_features=["user"], type="int", default_value=3, metadata={}, version="1.1"
    )
    wishes = [Wish("p1", {proto.declaration_digest(newer): newer}, {"user": ["alice"]}, 1)]
    calm_world = calm(wishes=wishes)
    exists = {"size": False}
    looked: list[float] = []
    queried: list[str] = []

    def answer(effect: Any) -> Any:
        if isinstance(effect, fx.Calls) and effect.calls[0].path == proto.DECLARE:
            return [response(400, "new setting must have version 1.0") for _ in effect.calls]
        if isinstance(effect, fx.Calls):
            assert [c.path for c in effect.calls] == ["/api/v1/settings/size"]
            looked.append(clock.now)
            return [response(200 if exists["size"] else 404, {}) for _ in effect.calls]
        if isinstance(effect, fx.Call) and effect.path == proto.QUERY:
            queried.append(str((effect.params or {}).get("settings")))
        return calm_world(effect)

    def next_wake(advance: float) -> Any:
        clock.now += advance
        return run.until(lambda e: isinstance(e, fx.Wait), answer)

    wait = run.until(lambda e: isinstance(e, fx.Wait), answer)
    assert looked == [clock.now]  # the term's first update: looked for at once, missing
    assert queried == []  # nothing to query
    wishes.append(wish("p2"))  # a ring in between (a newcomer; its 1.0 is refused too, in this world)
    wait = next_wake(0.01)
    assert len(looked) == 1  # not looked for between updates
    wishes.pop()
    wait = next_wake(wait.timeout)  # the next update: looked for, still missing
    assert len(looked) == 2
    assert not any("size" in q for q in queried)
    exists["size"] = True  # someone else created it
    wait = next_wake(wait.timeout)
    assert len(looked) == 3
    assert queried
    assert "size" in queried[-1]  # queried at the update that found it
    wait = next_wake(wait.timeout)
    assert len(looked) == 3  # found: not looked for again
    declared = [
        c
        for e in run.log
        if isinstance(e, fx.Calls)
        for c in e.calls
        if c.path == proto.DECLARE and b'"version":"1.1"' in (c.content or b"")
    ]
    assert len(declared) == 1  # declared once this term, whatever happened since
