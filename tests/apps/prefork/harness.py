"""What the prefork tests share: real servers and pools in their own sessions, HTTP sweeps, the checks.

A :class:`Server` is a real gunicorn, uvicorn or uwsgi, and a
:class:`PoolDriver` a process that owns a ``multiprocessing`` pool, each
started in a new session so that a ``finally`` can kill the whole process
group, orphans included. A *sweep* sends requests from several threads at
once, each on a new connection so that they spread over the workers, until a
condition on the answers holds or a deadline passes.

The five checks every scenario makes: :func:`every_worker_answers`,
:func:`one_poller`, :func:`propagates`, :func:`kill_leader` (then
:func:`propagates` again), and a graceful stop followed by
:func:`starts_again`. :func:`full_run` and :func:`master_leads_run` chain them.
Every wait polls something observable under a named deadline; the only timed
wait is :func:`one_poller`'s measurement window.

A failed check says which one, who was who (:func:`describe`) and what every
thread of every process of the server was doing at that moment
(:func:`tests.apps.prefork.stacks.dump_stacks`, read with py-spy before the
server is killed, and every greenlet's, which the test app writes to the log
when asked): a worker that does not answer shows where it waits.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from heksher_shm.status import SegmentStatus, list_segments, segment_status
from heksher_shm.testing import HeksherService
from tests import _semaphores
from tests.apps.prefork.stacks import GREENLETS_ENV, dump_stacks, greenlet_dumps

HERE = Path(__file__).resolve().parent
TIMING = bool(os.environ.get("HEKSHER_PREFORK_TIMING"))
"""Set HEKSHER_PREFORK_TIMING=1 (and run pytest with -s) to print each step's duration and measurements."""

F = TypeVar("F", bound=Callable[..., Any])


def step(fn: F) -> F:
    """Print how long *fn* took and what it measured, when TIMING is on."""
    if not TIMING:
        return fn

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.monotonic()
        result = fn(*args, **kwargs)
        shown = result if isinstance(result, (Traffic, Propagation, Takeover, float)) else ""
        print(f"    {fn.__name__}: {time.monotonic() - t0:.2f}s {shown}", file=sys.stderr)
        return result

    return timed  # type: ignore[return-value]


QUERY = "/api/v1/query"
DECLARE = "/api/v1/settings/declare"
SETTING = "cache_size"
DEFAULT = 10
MARGIN = 0.5
"""Seconds a rule change may take beyond one update interval to reach every worker (check 3)."""


def free_port() -> int:
    """A port nothing listens on right now (bind port 0, read it back)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def until(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.01) -> Any:
    """Poll *predicate* until it returns something truthy; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        # a poll period, not a guess: the deadline above is what bounds the wait
        time.sleep(step)


@dataclass(frozen=True)
class Answer:
    """One HTTP answer from a worker: when the request started and ended (monotonic), who, what."""

    started: float
    ended: float
    pid: int
    value: int
    leading: bool


def fetch(port: int, user: str = "alice", timeout: float = 5.0) -> Answer:
    """One request on a new connection (so successive requests can land on different workers)."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", f"/?user={user}", headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise AssertionError(f"HTTP {response.status}: {body[:500]!r}")
    data = json.loads(body)
    return Answer(started, time.monotonic(), int(data["pid"]), int(data[SETTING]), bool(data["leading"]))


@dataclass
class Sweep:
    """The answers of one sweep, by pid."""

    answers: list[Answer] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def by_pid(self) -> dict[int, list[Answer]]:
        result: dict[int, list[Answer]] = {}
        for a in self.answers:
            result.setdefault(a.pid, []).append(a)
        return result

    def pids(self) -> set[int]:
        return {a.pid for a in self.answers}


def sweep(
    port: int,
    done: Callable[[Sweep], bool],
    timeout: float,
    what: str,
    threads: int = 8,
    tolerate_errors: bool = False,
    must_finish: bool = True,
) -> Sweep:
    """Request from *threads* threads at once until ``done(sweep)`` or the deadline.

    Fails at the deadline unless *must_finish* is false (then it only sends traffic).
    """
    result = Sweep()
    lock = threading.Lock()
    stop = threading.Event()
    deadline = time.monotonic() + timeout

    def run() -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                answer = fetch(port)
            except (OSError, http.client.HTTPException, AssertionError, ValueError) as e:
                with lock:
                    result.errors.append(repr(e))
                    # asked after a failure too: Background's stop must not wait for a success
                    if done(result):
                        stop.set()
                continue
            with lock:
                result.answers.append(answer)
                if done(result):
                    stop.set()

    workers = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout + 10)
    if not tolerate_errors:
        assert not result.errors, f"{what}: failed requests {result.errors[:5]}"
    if must_finish and not stop.is_set():
        raise AssertionError(
            f"{what}: not within {timeout}s; pids seen {sorted(result.pids())}, "
            f"values {sorted({a.value for a in result.answers})}, errors {result.errors[:3]}"
        )
    return result


def session(sid: int) -> set[int]:
    """The live (non-zombie) processes of session *sid*."""
    found = set()
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.add(proc.pid)
    return found


class Background:
    """Traffic from a few threads in the background, until :meth:`stop`."""

    def __init__(self, port: int, threads: int = 4) -> None:
        self._stop = threading.Event()
        self._result: list[Sweep] = []
        self._thread = threading.Thread(target=self._run, args=(port, threads), daemon=True)
        self._thread.start()

    def _run(self, port: int, threads: int) -> None:
        done = self._stop.is_set
        self._result.append(sweep(port, lambda s: done(), 300, "", threads, True, must_finish=False))

    def stop(self) -> Sweep:
        self._stop.set()
        self._thread.join(30)
        assert self._result, "the background traffic did not stop"
        return self._result[0]


class Server:
    """A real server process (gunicorn, uvicorn, uwsgi) in its own session, logging to a file."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], cwd: Path, port: int, log: Path) -> None:
        self.argv = list(argv)
        self.port = port
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.process.pid

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def children(self) -> set[int]:
        """The master's live workers: its direct children, less zombies and helpers (resource tracker)."""
        try:
            kids = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return set()
        alive = set()
        for kid in kids:
            with contextlib.suppress(psutil.Error):
                if kid.status() != psutil.STATUS_ZOMBIE and not any(
                    "resource_tracker" in part for part in kid.cmdline()
                ):
                    alive.add(kid.pid)
        return alive

    def group(self) -> set[int]:
        """Every live process of the server's session (master, workers, orphans)."""
        return session(self.pid)

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    @step
    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20.0) -> float:
        """Ask the master to shut down; return how long until the whole session was gone."""
        t0 = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not stop within {timeout}s") from None
        until(lambda: not self.group(), timeout, "the server's processes exit")
        return time.monotonic() - t0

    def close(self) -> None:
        """Kill whatever is left of the session (for ``finally``)."""
        if self.process.poll() is None or self.group():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
        self._log.close()


Start = Callable[[str], Server]
"""Starts one server; the argument tells its log file apart (``""``, ``"-again"``)."""


class CheckFailed(AssertionError):
    """A check failed; its message holds who was who and every thread's stack (see :func:`check`)."""


@contextlib.contextmanager
def shown_on_failure(server: Server) -> Iterator[None]:
    """Print the tail of the server's log when the block fails (pytest shows it with the failure).

    A failure that is not a :class:`CheckFailed` (a pytest timeout, an assertion
    outside :func:`check`) also prints every thread's stack, read before the
    server is killed.
    """
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        print(f"---- {server.log_path.name} ----\n{server.log()[-6000:]}")
        if not isinstance(e, CheckFailed):
            print(stacks(server))
        raise


def describe(server: Server | None = None) -> str:
    """Who is who, for a failure message: the master, its workers, and each segment's status.

    Reads what is there now and never waits (a failure message must not hang).
    """
    lines = []
    if server is not None:
        lines.append(
            f"master {server.pid} ({'running' if server.process.poll() is None else 'exited'}), "
            f"workers {sorted(server.children())}, session {sorted(server.group())}"
        )
    try:
        segments = list_segments()
    except Exception as e:
        return "\n".join([*lines, f"segments: unreadable ({e!r})"])
    if not segments:
        lines.append("segments: none")
    for path in segments:
        try:
            st = segment_status(path)
        except Exception as e:
            lines.append(f"segment {path.name}: unreadable ({e!r})")
            continue
        leader = st.leader
        who = "none" if leader is None else f"{leader.pid} ({'alive' if leader.alive else 'dead'})"

        def age(seconds: float | None) -> str:
            return "never" if seconds is None else f"{seconds:.2f}s"

        lines.append(
            f"segment {st.name}: verdict {st.verdict}, leader {who}, generation {st.generation}, "
            f"heartbeat age {age(st.heartbeat_age)}, last update age {age(st.last_update_age)}, "
            f"last error {st.last_error!r} ({st.error_count} errors), "
            f"attached {sorted(p.pid for p in st.processes)}"
            + (f", problem {st.problem}" if st.problem else "")
        )
    return "\n".join(lines)


def stacks(server: Server) -> str:
    """Every thread's stack of every live process of *server*'s session: master, workers, others."""
    workers = server.children()
    roles = [("master", server.pid)] if server.process.poll() is None else []
    roles += [("worker", pid) for pid in sorted(workers)]
    roles += [("other process", pid) for pid in sorted(server.group() - workers - {server.pid})]
    if not roles:
        return "no stacks: none of the server's processes is alive"
    # The greenlets first: a process that answers with them is not stuck in native code.
    greenlets = greenlet_dumps([pid for _, pid in roles], server.log)
    return dump_stacks(roles) + (f"\n{greenlets}" if greenlets else "")


@contextlib.contextmanager
def check(name: str, server: Server | None = None) -> Iterator[None]:
    """Name the check a failure belongs to, with the worker pids, the leader's status and every thread's
    stack at that moment (:class:`CheckFailed`)."""
    try:
        yield
    except AssertionError as e:
        shown = f"check {name} failed: {e}\n{describe(server)}"
        if server is not None:
            shown += f"\n{stacks(server)}"
        raise CheckFailed(shown) from e


def server_env(url: str, interval: float, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HEKSHER_URL=url, HEKSHER_UPDATE_INTERVAL=str(interval), PYTHONUNBUFFERED="1", **extra)
    env[GREENLETS_ENV] = "1"  # the test app writes its greenlets' stacks to the log when asked
    return env


def gunicorn_base(port: int, *options: str) -> list[str]:
    """The start of every gunicorn command line of the tests: bound to *port*, without a control socket.

    gunicorn 24 and later open a control socket at one fixed path per user
    (``~/.gunicorn/gunicorn.ctl``): two servers at once, in one test or in two
    runs on one machine, would fight over it. The tests do not use it.
    """
    from gunicorn.config import KNOWN_SETTINGS

    no_control = [f for s in KNOWN_SETTINGS if s.name == "control_socket_disable" for f in s.cli]
    return [sys.executable, "-m", "gunicorn", *no_control, *options, "--bind", f"127.0.0.1:{port}"]


def gunicorn(port: int, worker_class: str, workers: int, *options: str) -> list[str]:
    """A gunicorn command line for ``wsgi_app.py``; options given here override a ``--config`` file's."""
    argv = gunicorn_base(port, *options)
    argv += ["--workers", str(workers), "--worker-class", worker_class, "--graceful-timeout", "10"]
    if worker_class == "gthread":
        argv += ["--threads", "4"]
    return [*argv, "--chdir", str(HERE), "wsgi_app:app"]


def the_segment() -> Path:
    """The one segment in this test's ``HEKSHER_SHM_DIR``."""
    segments = until(list_segments, 30, "a segment is created")
    assert len(segments) == 1, segments
    return Path(segments[0])


def status() -> SegmentStatus:
    return segment_status(the_segment())


def leader_pid(timeout: float = 5.0) -> int:
    """The live leader's pid; waits out a takeover in progress (a recycled leader, say)."""

    def led() -> bool:
        leader = status().leader
        return leader is not None and leader.alive

    until(led, timeout, "a live leader")
    leader = status().leader
    assert leader is not None, status()
    return leader.pid


@step
def wait_workers(server: Server, count: int, timeout: float = 60.0) -> set[int]:
    """Wait until the master has *count* live workers, and every one of them answered."""
    until(lambda: len(server.children()) == count, timeout, f"{count} workers are up")

    def all_answered(s: Sweep) -> bool:
        return server.children() <= s.pids()

    # a readiness poll: refused or reset connections are expected while workers boot
    sweep(server.port, all_answered, timeout, "every worker answers", tolerate_errors=True)
    return server.children()


@step
def every_worker_answers(server: Server, value: int, timeout: float = 30.0) -> Sweep:
    """Check 1: every live worker answers *value* (and no answer is anything else)."""
    workers = server.children()
    result = sweep(server.port, lambda s: workers <= s.pids(), timeout, "every worker answers")
    wrong = [a for a in result.answers if a.value != value]
    assert not wrong, f"expected {value} from every worker, got {wrong[:5]}"
    assert len(result.pids()) >= 2, "the requests reached a single worker"
    return result


@dataclass(frozen=True)
class Traffic:
    """Check 2's measurement: queries the service saw over a window."""

    queries: int
    declarations: int
    seconds: float
    interval: float

    @property
    def per_interval(self) -> float:
        return self.queries / (self.seconds / self.interval)


@step
def one_poller(
    service: HeksherService,
    interval: float,
    intervals: int = 3,
    allowance: int = 0,
    extra: Callable[[], int] | None = None,
) -> Traffic:
    """Check 2: over a few update intervals the service sees the queries of one poller, not one per worker.

    *allowance* (plus what *extra* returns at the end of the window) adds
    requests that workers' start-ups legitimately cause: a new leader's first
    query and its declarations (once per term), and the update a booting
    worker asks for when the snapshot does not serve it yet.
    """
    t0 = time.monotonic()
    before = [r for r in service.requests if r.path == QUERY]
    # The window lasts *intervals* update intervals, and until that many queries
    # came (which also proves that somebody polls).
    assert service.wait_for_requests(
        len(before) + intervals, path=QUERY, timeout=intervals * interval + 10
    ), "nobody polls the service"
    end = t0 + intervals * interval
    while time.monotonic() < end:
        time.sleep(end - time.monotonic())  # the rest of the measurement window, not a synchronisation
    t1 = time.monotonic()
    if extra is not None:
        allowance += extra()
    window = [r for r in service.requests if t0 <= r.time <= t1]
    queries = sum(1 for r in window if r.path == QUERY)
    declarations = sum(1 for r in window if r.path == DECLARE)
    traffic = Traffic(queries, declarations, t1 - t0, interval)
    assert queries <= (t1 - t0) / interval + 2 + allowance, traffic
    # With workers recycled during the window (*extra*), a leader term started just before it may
    # declare inside it, and one started just before its end may declare before the replacement
    # worker's boot is logged: one declaration at each edge beyond the boots counted.
    edges = 2 if extra is not None else 0
    assert declarations <= allowance + edges, traffic
    return traffic


@dataclass(frozen=True)
class Propagation:
    """Check 3's measurement: seconds from the rule change to each worker's first new answer."""

    first_new: dict[int, float]

    @property
    def earliest(self) -> float:
        return min(self.first_new.values())

    @property
    def slowest(self) -> float:
        return max(self.first_new.values())


@step
def propagates(
    server: Server,
    service: HeksherService,
    rule: int,
    value: int,
    interval: float,
    margin: float = MARGIN,
    workers: set[int] | None = None,
    min_pids: int = 2,
    settle: int | None = None,
) -> Propagation:
    """Check 3: after a rule change, every worker answers the new value within interval + margin.

    Requests go out from the moment of the change; per worker, every request
    sent after the deadline must answer the new value, and so must every
    request sent after that worker's first answer with the new value. The
    sweep ends once every worker in *workers* (default: the master's current
    children) answered after the deadline, or, with *settle*, once the last
    *settle* answers are all new and *min_pids* workers answered it (for
    workers that come and go, pass ``workers=set()``).
    """
    expected = server.children() if workers is None else workers
    t0 = time.monotonic()
    service.set_rule_value(rule, value)
    deadline = t0 + interval + margin

    def settled(s: Sweep) -> bool:
        if settle is not None:
            recent = sorted(s.answers, key=lambda a: a.ended)[-settle:]
            fresh = {a.pid for a in s.answers if a.value == value}
            return len(recent) == settle and all(a.value == value for a in recent) and len(fresh) >= min_pids
        late = {a.pid for a in s.answers if a.started > deadline}
        return expected <= late and len(late) >= min_pids

    result = sweep(server.port, settled, interval + margin + 30, f"every worker answers {value}")
    first_new: dict[int, float] = {}
    for pid, answers in result.by_pid().items():
        new_ends = [a.ended for a in answers if a.value == value]
        if new_ends:
            first_new[pid] = min(new_ends) - t0
        for a in answers:
            if a.value == value:
                continue
            assert a.started <= deadline, (
                f"worker {pid} still answered {a.value} {a.started - t0:.3f}s after the change "
                f"(bound {interval + margin}s)"
            )
            # happens-before: a request sent after this worker answered the new value gets it too
            assert not new_ends or a.started < min(new_ends), (
                f"worker {pid} went back to {a.value} after answering {value}"
            )
    missing = expected - set(first_new)
    assert not missing, f"workers {missing} never answered {value}"
    return Propagation(first_new)


@dataclass(frozen=True)
class Takeover:
    """Check 4's measurement."""

    old: int
    new: int
    seconds: float


def leader_settled(among: set[int], timeout: float = 10.0) -> int:
    """Wait until a live process among *among* leads and has finished an update since then.

    A new leader declares once at the start of its term; waiting for its
    first update keeps that declaration out of a measurement that follows.
    """

    def leading() -> int | None:
        leader = status().leader
        return leader.pid if leader is not None and leader.alive and leader.pid in among else None

    pid = int(until(leading, timeout, "a new worker leads"))
    since = time.time()
    until(lambda: (status().last_update_ok or 0.0) > since, timeout, "the new leader updates")
    return pid


@step
def kill_leader(timeout: float = 10.0) -> Takeover:
    """Check 4, first half: SIGKILL the leader and wait for another live process to lead."""
    old = leader_pid()
    os.kill(old, signal.SIGKILL)
    return _taken_over(old, timeout)


def one_leader(answers: Sweep, leader: int | None) -> None:
    """Part of check 2: exactly *leader* said it leads (``None``: no worker did, the master leads)."""
    leading = {a.pid for a in answers.answers if a.leading}
    expected = set() if leader is None else {leader}
    assert leading == expected, f"workers that said they lead: {sorted(leading)}; the segment's: {leader}"


def full_run(
    start: Start,
    service: HeksherService,
    workers: int,
    interval: float,
    stop_signal: int = signal.SIGTERM,
) -> None:
    """The five checks, for a server whose leader is one of its workers (a worker is killed in check 4)."""
    rule = service.add_rule(SETTING, {"user": "alice"}, 1)
    server = start("")
    try:
        with shown_on_failure(server):
            with check("0 (the workers start)", server):
                pids = wait_workers(server, workers)
                leader = leader_pid()
                assert leader in pids, f"the leader {leader} is not a worker"
            with check("1 every_worker_answers", server):
                answers = every_worker_answers(server, 1)
            with check("2 one_poller", server):
                one_leader(answers, leader)
                # The workers elected their leader moments ago: its term's first query and
                # declaration may fall in the window (see one_poller).
                one_poller(service, interval, allowance=1)
            with check("3 propagates", server):
                propagates(server, service, rule, 2, interval)
            with check("4 kill_leader", server):
                takeover = kill_leader()
                assert takeover.old in pids, takeover
                assert takeover.seconds < 1.0, takeover
                wait_workers(server, workers)  # the master replaces the killed worker
            with check("4 propagates after the takeover", server):
                propagates(server, service, rule, 3, interval)
            with check("5 graceful stop", server):
                took = server.stop(stop_signal)
                assert took < 15, f"shutdown took {took:.1f}s"
    finally:
        server.close()
    starts_again(start, service, rule, workers, interval)


def starts_again(
    start: Start, service: HeksherService, rule: int, workers: int, interval: float, graceful: bool = False
) -> None:
    """Check 5, second half: a new server on the same folder (same segment and lock files) works.

    With *graceful*, it is then stopped with SIGTERM, which must not hang.
    """
    value = next(r.value for r in service.rules if r.rule_id == rule)
    assert isinstance(value, int)
    server = start("-again")
    try:
        with shown_on_failure(server), check("5 starts_again", server):
            wait_workers(server, workers)
            every_worker_answers(server, value)
            propagates(server, service, rule, value + 1, interval)
            if graceful:
                took = server.stop()
                assert took < 15, f"shutdown took {took:.1f}s"
    finally:
        server.close()


def master_leads_run(start: Start, service: HeksherService, workers: int, interval: float) -> Takeover | None:
    """The five checks, for a server whose master loaded the app and so leads (``--preload``).

    Check 4 here: a killed worker changes nothing (the master replaces it with
    a fork of itself, whose client resumes as a follower); a killed master
    takes its workers with it (gunicorn's exit when they notice, uwsgi's at
    once), so nobody is left to update. Returns the takeover seen among the
    orphans before they exit, if any. Then the next start on the same folder
    must work.
    """
    rule = service.add_rule(SETTING, {"user": "alice"}, 1)
    server = start("")
    takeover: Takeover | None = None
    try:
        with shown_on_failure(server):
            with check("0 (the workers start)", server):
                pids = wait_workers(server, workers)
                leader = leader_pid()
                assert leader == server.pid, f"the leader {leader} is not the master {server.pid}"
            with check("1 every_worker_answers", server):
                answers = every_worker_answers(server, 1)
            with check("2 one_poller", server):
                one_leader(answers, None)
                one_poller(service, interval)
            with check("3 propagates", server):
                propagates(server, service, rule, 2, interval)
            with check("4 a killed worker is replaced, the master still leads", server):
                os.kill(min(pids), signal.SIGKILL)
                wait_workers(server, workers)
                leader = leader_pid()
                assert leader == server.pid, f"the leader {leader} is not the master {server.pid}"
                propagates(server, service, rule, 3, interval)
            with check("4 the master is killed", server):
                orphans = server.children()
                os.kill(server.pid, signal.SIGKILL)
                # Followers try the lock every 20 ms: an orphan still alive by then takes over.
                with contextlib.suppress(AssertionError):
                    takeover = _taken_over(server.pid, 2.0)
                # gunicorn's orphans notice at their next request or select timeout: send some
                sweep(server.port, lambda s: False, 0.5, "", tolerate_errors=True, must_finish=False)
                until(lambda: not server.group(), 20, "the orphaned workers exit")
                assert takeover is None or takeover.new in orphans, (takeover, orphans)
    finally:
        server.close()
    # the master was killed above: the graceful stop is checked on the new start
    starts_again(start, service, rule, workers, interval, graceful=True)
    return takeover


def _taken_over(old: int, timeout: float) -> Takeover:
    t0 = time.monotonic()

    def new_leader() -> int | None:
        leader = status().leader
        if leader is not None and leader.pid != old and leader.alive:
            return leader.pid
        return None

    new = until(new_leader, timeout, "another process takes over", step=0.005)
    return Takeover(old, int(new), time.monotonic() - t0)


def read_logs(directory: Path, prefix: str) -> str:
    """Every log a test's servers wrote (``<prefix>*.log`` in *directory*)."""
    return "".join(p.read_text(errors="replace") for p in sorted(directory.glob(f"{prefix}*.log")))


class PoolDriver:
    """``pool_app.py`` in its own session: a process pool the test commands over a pipe."""

    def __init__(
        self, kind: str, method: str, mode: str, workers: int, env: dict[str, str], log: Path
    ) -> None:
        self._log = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.log_path = log
        self._semaphore_prefix = env.get(_semaphores.PREFIX_ENV)
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "pool_app.py"), kind, method, mode, str(workers)],
            cwd=HERE,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,
        )
        self.pid = self.process.pid
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = self.receive(60)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("@@ "):
                self._lines.put(line[3:])
        self._lines.put(None)

    def receive(self, timeout: float = 60) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the pool driver did not answer within {timeout}s") from None
        assert line is not None, f"the pool driver exited:\n{self.log()[-3000:]}"
        return dict(json.loads(line))

    def ask(self, timeout: float = 60, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self.receive(timeout)

    def answers(self, **command: Any) -> list[dict[str, Any]]:
        reply = self.ask(**command)
        assert "answers" in reply, reply
        return list(reply["answers"])

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def group(self) -> set[int]:
        """Every live process of the driver's session (driver, workers, forkserver, orphans)."""
        return session(self.pid)

    def close(self) -> None:
        if self.process.poll() is None or self.group():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        # The SIGKILL took the resource tracker too: remove the pool's semaphores, which pool_app.py named
        # after this session and the driver's pid (tests/_semaphores.py).
        if self._semaphore_prefix:
            _semaphores.remove(f"{self._semaphore_prefix}-{self.pid}-")
        for stream in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()
        self._log.close()
