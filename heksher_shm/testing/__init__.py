"""An in-memory Heksher-compatible service for tests: :class:`HeksherService`.

It speaks the Heksher v1 HTTP API the way a real 0.5.7 server does, records requests and injects
faults.  The pytest fixtures live in :mod:`heksher_shm.testing.pytest_plugin` (loaded by pytest
automatically; importing this package does not import pytest).

The modules, each importing only those below it: ``_service`` (the facade) -> ``_http`` (sockets)
-> ``_api`` (routes) -> ``_validation`` (422s), ``_race`` and ``_store`` (the data) -> ``_query``
(query answers) and ``_declare`` (judging declarations) -> ``_records``, ``_errors`` -> ``_types``
(type strings); ``_faults`` (faults and request records) is used by the facade and the sockets.
"""

# Underscored imports keep the module's namespace equal to __all__ (tests/test_service.py checks it).
import typing as _typing
import warnings as _warnings

from heksher_shm.testing._api import HEKSHER_VERSION
from heksher_shm.testing._errors import ServiceError
from heksher_shm.testing._faults import Fault, FaultKind, InjectedFault, RequestRecord
from heksher_shm.testing._race import DeclarationRace
from heksher_shm.testing._records import RuleInfo, SettingInfo
from heksher_shm.testing._service import DEFAULT_CONTEXT_FEATURES, HeksherService
from heksher_shm.testing._store import HeksherState
from heksher_shm.testing._types import ServiceType, parse_setting_type

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
    "ServiceType",
    "SettingInfo",
    "parse_setting_type",
]

# Old names that still work, with a DeprecationWarning on each access (PEP 562).  Not in __all__, so
# `from heksher_shm.testing import *` does not warn.
_DEPRECATED = {
    # `SettingType` read as the client's heksher_shm.SettingType, which it is not
    "SettingType": ("ServiceType", ServiceType),
}

if _typing.TYPE_CHECKING:
    # Type checkers see each old name spelled out, and no module __getattr__: one would make them accept
    # any attribute of this module, a misspelled one included (tests/test_typing.py checks both).
    SettingType = ServiceType
else:

    def __getattr__(name: str) -> _typing.Any:
        if name in _DEPRECATED:
            new_name, value = _DEPRECATED[name]
            _warnings.warn(
                f"heksher_shm.testing.{name} is deprecated: use heksher_shm.testing.{new_name} (the "
                f"service's parsed type string; the client's type is heksher_shm.SettingType)",
                DeprecationWarning,
                stacklevel=2,
            )
            return value
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
