"""Child-side helpers: the same settings and client set-up with either library.

``side`` is ``"ours"`` (``import heksher_shm as heksher``) or ``"peer"``
(``import heksher``, version 0.2.2). Both use their ``ThreadHeksherClient``,
so the only difference between the sides is the library.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import Any

from benchmarks._scenario import SettingSpec
from benchmarks._service import CONTEXT_FEATURES

_TYPES = {"int": int, "str": str}


def library(side: str) -> Any:
    if side not in ("ours", "peer"):
        raise ValueError(f"side must be ours or peer, got {side!r}")
    return importlib.import_module("heksher_shm" if side == "ours" else "heksher")


def make_settings(lib: Any, specs: Sequence[SettingSpec]) -> dict[str, Any]:
    return {
        name: lib.Setting(name, _TYPES[type_], features, default) for name, type_, features, default in specs
    }


def make_client(
    lib: Any,
    url: str,
    interval: float,
    track: dict[str, Any],
    defaults: dict[str, str] | None = None,
) -> Any:
    """A client with tracked contexts and defaults set, not yet main."""
    client = lib.ThreadHeksherClient(url, interval, list(CONTEXT_FEATURES))
    client.track_contexts(**{f: (lib.TRACK_ALL if v == "*" else v) for f, v in track.items()})
    if defaults:
        client.set_defaults(**defaults)
    return client


def role(side: str, client: Any) -> str:
    """``leader``/``follower`` for ours, ``alone`` for the peer (every peer process polls)."""
    if side == "peer":
        return "alone"
    return "leader" if client.leading else "follower"


def memory() -> dict[str, float]:
    """This process's USS, PSS and RSS in MiB (psutil)."""
    import psutil

    info = psutil.Process(os.getpid()).memory_full_info()
    return {"uss": info.uss / 2**20, "pss": info.pss / 2**20, "rss": info.rss / 2**20}
