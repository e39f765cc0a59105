"""pytest fixtures for :class:`~heksher_shm.testing.HeksherService`.

pytest loads this module through the ``heksher_shm`` ``pytest11`` entry point, so any test in a project
with heksher_shm installed can ask for the fixtures:

``heksher_service``
    A started service with context features ``user``, ``theme`` and ``environment``, stopped after the
    test.

``heksher_service_factory``
    A function taking :class:`~heksher_shm.testing.HeksherService`'s keyword arguments that starts one
    more service per call (``context_features`` defaults as above); all are stopped after the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from heksher_shm.testing._service import DEFAULT_CONTEXT_FEATURES, HeksherService

__all__ = ["heksher_service", "heksher_service_factory"]


@pytest.fixture
def heksher_service() -> Iterator[HeksherService]:
    """A started in-memory Heksher service with context features user, theme and environment."""
    with HeksherService(context_features=DEFAULT_CONTEXT_FEATURES) as service:
        yield service


@pytest.fixture
def heksher_service_factory() -> Iterator[Callable[..., HeksherService]]:
    """A factory of started services, ``factory(**HeksherService kwargs)``; all stop at teardown."""
    started: list[HeksherService] = []

    def factory(**kwargs: Any) -> HeksherService:
        kwargs.setdefault("context_features", DEFAULT_CONTEXT_FEATURES)
        service = HeksherService(**kwargs).start()
        started.append(service)
        return service

    try:
        yield factory
    finally:
        for service in reversed(started):
            service.stop()
