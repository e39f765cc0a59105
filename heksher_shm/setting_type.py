"""Compatibility alias: heksher 0.2.2 kept setting types in ``heksher.setting_type``.

Code that imports ``from heksher.setting_type import HeksherEnum`` keeps
working after ``heksher`` becomes ``heksher_shm``. New code should import from
:mod:`heksher_shm` or :mod:`heksher_shm.setting_types`.
"""

from heksher_shm.setting_types import (
    Conversion,
    HeksherEnum,
    HeksherFlags,
    HeksherMapping,
    HeksherSequence,
    SettingType,
    setting_type,
)

__all__ = [
    "Conversion",
    "HeksherEnum",
    "HeksherFlags",
    "HeksherMapping",
    "HeksherSequence",
    "SettingType",
    "setting_type",
]
