"""The engine: the background life of every client, and what it runs on.

The core (no I/O: it yields effects, reads a clock it is handed; checked by
``tests/test_layers.py``), imports pointing down the list::

    engine.py       Engine: a follower until it holds the lock, then a leader for a term
    follower.py       sleep, apply, report, judge the leader, replace a stuck one
    leader.py         a term: begin it, then each wake's work and when to wake next
    updating.py       query, publish, acknowledge, back off, check the segment
    declaring.py      declarations: concurrent, retried
    context.py      what the parts share: settings, clock, randomness, troubles
    term.py         a term's bookkeeping: what to query, what to acknowledge
    answers.py      what the service's answers mean (outcomes, query results)
    effects.py      what the engine yields: service, client and host effects
    host.py         the ports: the Host the host effects stand for, the Clock
    policy.py       the numbers it works by
    health.py       backoff, jitter, and the log of troubles

Around it (I/O)::

    drivers.py      the two drivers of the effects: blocking and asyncio, side by side
    sleeping.py       how each sleeps until woken (a wake pipe and poll(); a waker on the loop)
    shared.py       the shared host: the segment, the lock, the registry, doorbells, the leader watch
    keeping.py        the hosts' last-known-good file
    local.py        the in-process host (shared=False)
"""
