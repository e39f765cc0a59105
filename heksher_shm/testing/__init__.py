"""An in-memory Heksher-compatible service for tests: :class:`HeksherService`.

It speaks the Heksher v1 HTTP API the way a real 0.5.7 server does, records requests and injects
faults.  The pytest fixtures live in :mod:`heksher_shm.testing.pytest_plugin` (loaded by pytest
automatically; importing this package does not import pytest).
"""

from heksher_shm.testing._server import (
    DEFAULT_CONTEXT_FEATURES,
    HEKSHER_VERSION,
    DeclarationRace,
    Fault,
    FaultKind,
    HeksherService,
    InjectedFault,
    RequestRecord,
)
from heksher_shm.testing._state import (
    HeksherState,
    RuleInfo,
    ServiceError,
    SettingInfo,
    SettingType,
    parse_setting_type,
)

__all__ = [
    "DEFAULT_CONTEXT_FEATURES",
    "HEKSHER_VERSION",
    "DeclarationRace",
    "Fault",
    "FaultKind",
    "HeksherService",
    "HeksherState",
    "InjectedFault",
    "RequestRecord",
    "RuleInfo",
    "ServiceError",
    "SettingInfo",
    "SettingType",
    "parse_setting_type",
]
