"""The pure model: no I/O, no threads, no processes.

Modules, each one job::

    protocol.py     the Heksher v1 HTTP API as the clients use it: requests to build, answers to decode
    snapshot.py     what a leader publishes and every process reads: the head and one blob per setting
    resolve.py      rule resolution, compiled once per update
    lookup.py       the generated function that answers a context a setting's cache does not know yet
    contexts.py     TRACK_ALL and the context_filters a query asks with
"""
