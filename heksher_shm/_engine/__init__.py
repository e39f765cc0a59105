"""The engine: the background life of every client, and what it runs on.

Modules, each one job, imports pointing down the list::

    engine.py       Engine: a follower until it holds the lock, then a leader
    following.py      the follower's side: sleep, apply, report, judge the leader
    leading.py        the leader's term: start, cycle, when to query
    publishing.py     query, publish, acknowledge, back off, check the segment
    declaring.py      declarations: concurrent, retried
    core.py           the state both roles share
    answers.py      what the service's answers mean (outcomes, query results)
    term.py         a term's bookkeeping: what to query, what to acknowledge
    effects.py      what the engine yields (Call, Calls, Compute, Wait, Apply, Report)
    ports.py        what it works with, as protocols (Transport, Lock, WishSource, Host)
    policy.py       the numbers it works by
    health.py       backoff and the log of troubles
    drivers.py      the two drivers of the effects: blocking and asyncio, side by side
    local.py        the in-process transport (shared=False)
    shared.py       the shared-memory transport: the segment, the registry, doorbells, the leader watch
"""
