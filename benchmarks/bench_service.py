"""The in-memory service at a real size: adding 100k rules, and querying among them.

This case measures heksher_shm's own test service (``heksher_shm.testing.HeksherService``),
not a client: a test suite or a benchmark that seeds tens of thousands of rules waits on it.
Every operation must cost what it changes, not what the service holds. The case starts
fresh in-memory services of its own in the runner process (whatever ``--service`` says),
with 1,000 settings (``int`` and ``str`` alternately, configurable by ``user``, ``theme``
and ``environment``: the big settings of the other cases), and adds rules one setting
after the other in turn, so that every setting grows as the service does:

* **admin helper**: 100k rules (``--quick``: 10k) with ``HeksherService.add_rule()`` in the
  runner, as a test seeds its service. Timed (wall) per tenth of the rules. Target: 100k
  in under 60 s (``--quick``: the same rate), and the last tenth no more than twice the
  first per rule (flat: the cost does not grow with the rules held).
* **over HTTP**: ``POST /api/v1/rules``, one request per rule, 100k rules (``--quick``: 2k),
  from a child process over one keep-alive connection (``http.client``, whose own CPU per
  request is a fraction of httpx's). What is timed against the target is the *service's*
  CPU: the runner's process time (its main thread only waits for the child meanwhile),
  per tenth; the same targets. The wall time and the client's CPU are in the note: on a
  shared 2-core machine the wall time is mostly waiting for a core.

Then, on the service holding 100k rules (``--quick``: 10k; what HTTP did not add, the
admin helper does), the same child sends the query heksher_shm's leader sends (``GET
/api/v1/query`` for all 1,000 settings, ``context_filters=*``, no metadata): the first one
(which fills the cached JSON pieces), then repeated ones, answered 200 without an
``If-None-Match`` and 304 with the ETag. And a query for 10 settings (their rules) is
timed twice: in that big service, and in a fresh service whose only rules are those 10
settings': the target is that the big service answers within 1.5x of the small one (a
query pays for what it returns, not for what the service holds).

With a real Heksher given (``--service URL`` or ``HEKSHER_TEST_URL``), the note of the HTTP
row adds the wall time the real server takes per rule for 1,000 rules added the same way
(on settings of its own, deleted at the end).
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import urlencode

from benchmarks._common import Run, child_main, commands, emit, log, summary
from benchmarks._scenario import big_rule, big_specs
from benchmarks._service import CONTEXT_FEATURES, QUERY_PATH, Rule

NAME = "service"
MODULE = "bench_service"
TITLE = "The in-memory service at a real size"
TARGET = "100k rules in < 60 s, flat per rule; a query costs what it returns"
FULL_RULES_PER_SETTING, QUICK_RULES_PER_SETTING = 100, 10
QUICK_HTTP_RULES_PER_SETTING = 2
SECONDS_PER_100K = 60.0
MAX_GROWTH = 2.0
"""The last tenth's time per rule against the first tenth's."""
MAX_QUERY_RATIO = 1.5
SMALL_QUERY_SETTINGS = 10
QUERY_REPEATS = 20
QUERY_ROUNDS = 5
"""The 10-settings query: rounds alternating between the two services, repeats per round."""
REAL_SERVER_RULES = 1000


def _rules(prefix: str, per: int, settings: int) -> list[Rule]:
    """Every rule of the big settings, setting after setting in turn (rule 0 of each, then rule 1, ...)."""
    specs = big_specs(prefix, settings)
    return [big_rule(spec, i, j) for j in range(per) for i, spec in enumerate(specs)]


def _tenths(count: int) -> list[tuple[int, int]]:
    """The rules' index ranges, a tenth of them each."""
    tenth = max(1, count // 10)
    return [(start, min(start + tenth, count)) for start in range(0, count, tenth)]


# -- child side ---------------------------------------------------------------------------------------------


class _Http:
    """One keep-alive connection (``http.client``: its own CPU per request is a fraction of httpx's)."""

    def __init__(self, url: str) -> None:
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=300)

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        sent = {"content-type": "application/json", **(headers or {})}
        self.connection.request(method, path, None if body is None else json.dumps(body), sent)
        response = self.connection.getresponse()
        response.content = response.read()
        return response


def body(params: dict[str, Any]) -> None:
    http = _Http(params["url"])

    def add(setting: str, conditions: dict[str, str], value: Any) -> None:
        body = {"setting": setting, "feature_values": conditions, "value": value, "metadata": {}}
        response = http.request("POST", "/api/v1/rules", body)
        if response.status != 201:
            raise RuntimeError(f"POST /api/v1/rules answered {response.status}: {response.content!r}")

    def query(names: list[str], etag: str | None) -> tuple[float, Any]:
        path = (
            QUERY_PATH
            + "?"
            + urlencode(
                {"settings": ",".join(sorted(names)), "context_filters": "*", "include_metadata": "false"}
            )
        )
        begun = time.perf_counter()
        response = http.request("GET", path, headers={"If-None-Match": etag} if etag else {})
        elapsed = time.perf_counter() - begun
        if response.status not in (200, 304):
            raise RuntimeError(f"GET {QUERY_PATH} answered {response.status}: {response.content[:200]!r}")
        return elapsed, response

    made: dict[tuple[str, int, int], list[Rule]] = {}
    emit("ready")
    for command in commands():
        if command["cmd"] == "add":
            key = (command["prefix"], command["per"], command["settings"])
            rules = made[key] = made.get(key) or _rules(*key)
            begun, cpu = time.perf_counter(), time.process_time()
            for setting, conditions, value in rules[command["start"] : command["stop"]]:
                add(setting, conditions, value)
            emit("done", wall=time.perf_counter() - begun, cpu=time.process_time() - cpu)
        elif command["cmd"] == "query":
            names, repeats = command["names"], command["repeats"]
            first, response = query(names, None)
            etag, size = response.getheader("etag"), len(response.content)
            full = [query(names, None)[0] for _ in range(repeats)]
            conditional = []
            for _ in range(repeats):
                elapsed, response = query(names, etag)
                if response.status != 304:
                    raise RuntimeError(f"a repeated query with its ETag answered {response.status}")
                conditional.append(elapsed)
            emit("done", first=first, full=full, conditional=conditional, bytes=size)
        else:
            raise ValueError(f"unknown command {command!r}")


# -- runner side --------------------------------------------------------------------------------------------


def _fresh_service() -> Any:
    from heksher_shm.testing import HeksherService

    service = HeksherService(context_features=CONTEXT_FEATURES).start()
    for name, type_, features, default in big_specs(""):
        service.declare(name, type_, default, features)
    return service


def _add_row(how: str, rules: int, tenths: list[float], unit_note: str, extra: str = "") -> dict[str, Any]:
    per_tenth = rules / len(tenths)
    first, last = tenths[0] / per_tenth * 1000, tenths[-1] / per_tenth * 1000
    total = sum(tenths)
    budget = SECONDS_PER_100K * rules / 100_000
    growth = last / first if first > 0 else float("inf")
    return {
        "label": f"Add {rules:,} rules to the in-memory service, {how}",
        "unit": "s",
        "ours": summary([total]),
        "peer": None,
        "ratio": None,
        "target": f"< {budget:g} s, last tenth <= {MAX_GROWTH:g}x the first",
        "met": total < budget and growth <= MAX_GROWTH,
        "note": f"{unit_note}: {first:.3f} ms per rule in the first tenth, {last:.3f} in the last "
        f"({growth:.2f}x){extra}",
    }


def _add_over_http(child: Any, prefix: str, per: int, settings: int) -> dict[str, list[float]]:
    """Have *child* add the rules a tenth at a time; each tenth's wall time, its CPU and the service's CPU.

    The service runs in this process, whose main thread only waits for the child meanwhile: this
    process's CPU time over a tenth is the service's.
    """
    measured: dict[str, list[float]] = {"wall": [], "client_cpu": [], "service_cpu": []}
    for start, stop in _tenths(per * settings):
        cpu = time.process_time()
        done = child.ask(
            "add", prefix=prefix, per=per, settings=settings, start=start, stop=stop, timeout=1800
        )
        measured["service_cpu"].append(time.process_time() - cpu)
        measured["wall"].append(done["wall"])
        measured["client_cpu"].append(done["cpu"])
    return measured


def _real_server_note(r: Run, child_factory: Any) -> str:
    """What the real server given to the run takes per rule (empty without one)."""
    service = r.service
    if service.kind == "in-memory":
        return ""
    prefix, settings = f"{service.prefix}sv_", 10  # settings of its own: the other cases' have rules
    for name, type_, features, default in big_specs(prefix, settings):
        service.declare(name, type_, default, features)
    child = child_factory(service.url, "real")
    measured = _add_over_http(child, prefix, REAL_SERVER_RULES // settings, settings)
    child.stop()
    per_rule = sum(measured["wall"]) / REAL_SERVER_RULES * 1000
    log(f"{NAME}: the real server: {per_rule:.2f} ms per rule over {REAL_SERVER_RULES} rules")
    return (
        f"; the real Heksher at --service: {per_rule:.2f} ms per rule ({REAL_SERVER_RULES:,} rules over HTTP)"
    )


def _ms(seconds: list[float]) -> list[float]:
    return [s * 1000 for s in seconds]


def _query_rows(rules: int, per: int, everything: Any, in_big: Any, in_small: Any) -> list[dict[str, Any]]:
    ratio = summary(in_big["full"])["median"] / summary(in_small["full"])["median"]
    return [
        {
            "label": f"Query for all 1,000 settings ({rules:,} rules), 304 with the ETag",
            "unit": "ms",
            "ours": summary(_ms(everything["conditional"])),
            "peer": None,
            "ratio": None,
            "target": "",
            "met": None,
            "note": (
                f"200 without the ETag: {summary(_ms(everything['full']))['median']:.0f} ms "
                f"({everything['bytes'] / 1e6:.1f} MB); the first query, which fills the settings' cached "
                f"JSON: {everything['first'] * 1000:.0f} ms"
            ),
        },
        {
            "label": (
                f"Query for {SMALL_QUERY_SETTINGS} settings ({SMALL_QUERY_SETTINGS * per:,} rules) "
                f"among {rules:,} rules, against a service holding only theirs"
            ),
            "unit": "ms",
            "ours": summary(_ms(in_big["full"])),
            "peer": None,
            "ratio": None,
            "target": f"<= {MAX_QUERY_RATIO:g}x the small service's",
            "met": ratio <= MAX_QUERY_RATIO,
            "note": (
                f"{ratio:.2f}x the small service's {summary(_ms(in_small['full']))['median']:.2f} ms; "
                f"304: {summary(_ms(in_big['conditional']))['median']:.2f} ms "
                f"(small service: {summary(_ms(in_small['conditional']))['median']:.2f} ms)"
            ),
        },
    ]


def run(r: Run) -> dict[str, Any]:
    per = QUICK_RULES_PER_SETTING if r.quick else FULL_RULES_PER_SETTING
    names = [name for name, *_ in big_specs("")]
    rules = _rules("", per, len(names))

    def child(url: str, label: str) -> Any:
        spawned = r.spawn(MODULE, {"url": url}, label=f"{NAME}-{label}")
        spawned.expect("ready", timeout=120)
        return spawned

    # The admin helper, in this process.
    service = _fresh_service()
    helper = []
    try:
        for start, stop in _tenths(len(rules)):
            begun = time.perf_counter()
            for setting, conditions, value in rules[start:stop]:
                service.add_rule(setting, conditions, value)
            helper.append(time.perf_counter() - begun)
    finally:
        service.stop()
    del service
    log(f"{NAME}: admin helper: {len(rules)} rules in {sum(helper):.1f} s")

    # Over HTTP, then the queries, on the service holding every rule.
    big, small = _fresh_service(), _fresh_service()
    try:
        adder = child(big.url, "http")
        per_http = QUICK_HTTP_RULES_PER_SETTING if r.quick else per
        http = _add_over_http(adder, "", per_http, len(names))
        for setting, conditions, value in rules[per_http * len(names) :]:
            big.add_rule(setting, conditions, value)
        log(
            f"{NAME}: over HTTP: {per_http * len(names)} rules in {sum(http['wall']):.1f} s, the service's "
            f"CPU {sum(http['service_cpu']):.1f} s, the client's {sum(http['client_cpu']):.1f} s"
        )
        everything = adder.ask("query", names=names, repeats=QUERY_REPEATS // 2, timeout=600)
        few = names[:SMALL_QUERY_SETTINGS]
        # the same ten settings and their rules, nothing else (the other settings are declared, ruleless)
        for setting, conditions, value in rules:
            if setting in few:
                small.add_rule(setting, conditions, value)
        alone = child(small.url, "small")
        # In alternating rounds, so that whatever else the machine does hits both alike.
        in_big: dict[str, list[float]] = {"full": [], "conditional": []}
        in_small: dict[str, list[float]] = {"full": [], "conditional": []}
        for _ in range(QUERY_ROUNDS):
            for side, measured in ((adder, in_big), (alone, in_small)):
                done = side.ask("query", names=few, repeats=QUERY_REPEATS, timeout=600)
                measured["full"] += done["full"]
                measured["conditional"] += done["conditional"]
        adder.stop()
        alone.stop()
    finally:
        big.stop()
        small.stop()
    real_note = _real_server_note(r, child)

    wall_note = (
        f"; wall time {sum(http['wall']):.1f} s, of which the client used "
        f"{sum(http['client_cpu']):.1f} s of CPU{real_note}"
    )
    rows = [
        _add_row("admin helper (HeksherService.add_rule)", len(rules), helper, "wall time"),
        _add_row(
            "over HTTP (POST /api/v1/rules from another process): the service's CPU",
            per_http * len(names),
            http["service_cpu"],
            "the service's CPU",
            wall_note,
        ),
        *_query_rows(len(rules), per, everything, in_big, in_small),
    ]
    return {
        "case": NAME,
        "title": TITLE,
        "target": TARGET,
        "params": {
            "settings": len(names),
            "rules": len(rules),
            "query_repeats": QUERY_REPEATS,
            "query_rounds": QUERY_ROUNDS,
        },
        "rows": rows,
        "series": {
            "helper_tenths_s": helper,
            "http_tenths": http,
            "query_all": everything,
            "query_few_big": in_big,
            "query_few_small": in_small,
        },
    }


if __name__ == "__main__":
    child_main(body)
