"""heksher_shm: a Heksher client with one poller per host.

A drop-in replacement for ``heksher`` 0.2.2: ``import heksher_shm as heksher``.
"""

# First, for its side effect: the one at-fork hook exists before any state it resets.
from heksher_shm._process import fork as _fork  # noqa: F401, I001
from heksher_shm._model.contexts import TRACK_ALL
from heksher_shm import main_client as main_client  # heksher.main_client.Main, as in 0.2.2
from heksher_shm._version import __version__
from heksher_shm.clients.async_client import AsyncHeksherClient
from heksher_shm.clients.thread_client import ThreadHeksherClient
from heksher_shm.setting import Setting
from heksher_shm.setting_types import HeksherEnum, HeksherFlags, HeksherMapping, HeksherSequence, SettingType

__all__ = [
    "TRACK_ALL",
    "AsyncHeksherClient",
    "HeksherEnum",
    "HeksherFlags",
    "HeksherMapping",
    "HeksherSequence",
    "Setting",
    "SettingType",
    "ThreadHeksherClient",
    "__version__",
]
