"""Process-wide state and hooks: what belongs to the process rather than to one client.

Modules, each one job::

    main.py         the process's live settings and its main client
    fork.py         everything reset in a forked child: one hook, one fixed order
    servers.py      the application server it runs under (uwsgi's master, its fork hook)
    threads.py      the threads heksher_shm starts, which never take the process's signals
    monkey.py       no thread of heksher_shm lives through a gevent monkey-patch
    gc.py           pausing the garbage collector around bulk decoding
"""
