"""Two process pools whose workers share one Heksher poller with their parent.

HEKSHER_URL=http://localhost:8888 python pool_example.py
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pool_tasks

if __name__ == "__main__":
    # The parent's client leads. With fork, the workers inherit it as followers.
    pool_tasks.start_client()
    with multiprocessing.get_context("fork").Pool(4) as pool:
        print(pool.map(pool_tasks.lookup, ["alice", "bob"]))

    # spawn and forkserver workers start afresh: each makes its own client main.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(4, mp_context=spawn, initializer=pool_tasks.start_client) as executor:
        print(list(executor.map(pool_tasks.lookup, ["alice", "bob"])))

    assert pool_tasks.client is not None
    pool_tasks.client.close()
