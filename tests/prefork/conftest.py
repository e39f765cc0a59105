"""What the prefork tests share: real servers and pools of real workers, started by
:mod:`tests.apps.prefork.harness`, against one in-memory service per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from heksher_shm.testing import HeksherService
from tests._support import FEATURES
from tests.apps.prefork import harness as h


@pytest.fixture
def service() -> Iterator[HeksherService]:
    """The service the workers poll, with the harness's setting declared (a default of its own)."""
    with HeksherService(context_features=FEATURES) as svc:
        svc.declare(h.SETTING, "int", h.DEFAULT, ["user"])
        yield svc
