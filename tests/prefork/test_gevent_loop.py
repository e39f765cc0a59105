"""gunicorn ``-k gevent --preload``, over and over: a hang that shows once in a hundred runs shows here.

Each repetition is ``test_gevent.py::test_gunicorn_gevent_preload`` itself
(a fresh service, folder and server, every check and assertion of the
original), so a failure reads the same, with every thread's stack of the
master and the workers as they were when the check gave up (see
:mod:`tests.apps.prefork.stacks`).

``HEKSHER_GEVENT_LOOP`` sets how many times (default 15: about two minutes on
an idle 2-core machine; CI's bounded stress step runs 3). The loop issue 15
asked for, 200 runs, stopping at the first failure and counting them as it
goes::

    HEKSHER_GEVENT_LOOP=200 nice -n 10 .venv/bin/pytest -m stress -p no:randomly -x -q \\
        tests/prefork/test_gevent_loop.py

Leave out ``-x`` to count the failures of all 200 (pytest's summary line).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from heksher_shm.testing import HeksherService
from tests.prefork import test_gevent as case

RUNS = int(os.environ.get("HEKSHER_GEVENT_LOOP") or 15)


@pytest.mark.stress
@pytest.mark.parametrize("run", range(RUNS))
def test_gunicorn_gevent_preload_again(service: HeksherService, tmp_path: Path, run: int) -> None:
    """One more run of the --preload case (*run* only tells the repetitions apart)."""
    case.test_gunicorn_gevent_preload(service, tmp_path)
