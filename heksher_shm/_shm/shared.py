"""Joining a host's shared cache: where its files are, and the engine's view of them.

One *segment* serves every process on the host that uses the same service
URL and context features (or the same explicit ``segment_name``)::

    <shm dir>/                  HEKSHER_SHM_DIR, else /dev/shm/heksher_shm-<uid>, else <tmp>/...
        <name>.seg                  the memory-mapped snapshot (heksher_shm._shm.segment)
        <name>.lock                 the election lock (heksher_shm._shm.election)
        <name>.seg.d/               one registration per live process (heksher_shm._shm.registry)
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from heksher_shm._engine import Wish
from heksher_shm._protocol import DeclarationBody
from heksher_shm._shm.election import LeaderLock
from heksher_shm._shm.identity import ProcessIdentity
from heksher_shm._shm.layout import FORMAT_VERSION
from heksher_shm._shm.registry import Registration, Registry, registry_directory
from heksher_shm._shm.segment import Segment, resolve_shm_dir
from heksher_shm._snapshot import FORMAT as SNAPSHOT_FORMAT
from heksher_shm.exceptions import SegmentError

__all__ = [
    "SEGMENT_NAME",
    "RegistrySource",
    "SegmentObserver",
    "SharedParts",
    "default_segment_name",
    "open_shared",
    "wish_key",
]

logger = logging.getLogger("heksher_shm.shared")

SEGMENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
"""What a segment name may look like: it becomes part of file names."""

RESCAN_INTERVAL = 1.0
"""Seconds between full registry scans even when nothing seems changed (to notice dead processes)."""


def default_segment_name(service_url: str, context_features: Sequence[str]) -> str:
    """The segment shared by every client of this service URL and these context features.

    The formats of the segment and the snapshot are part of the name, so two
    incompatible versions of heksher_shm on one host never read each other's
    files: each has its own segment (and its own leader).
    """
    key = f"{service_url.rstrip('/')}\n{','.join(context_features)}\n{FORMAT_VERSION}.{SNAPSHOT_FORMAT}"
    return "heksher-" + hashlib.sha256(key.encode()).hexdigest()[:20]


def wish_key(identity: ProcessIdentity) -> str:
    """How a process is named in acknowledgements: its pid and start time (PID reuse safe)."""
    return f"{identity.pid}-{round(identity.create_time * 1_000_000)}"


@dataclass(frozen=True)
class SharedParts:
    """The files of one segment, opened."""

    directory: Path
    name: str
    segment: Segment
    lock: LeaderLock
    registry: Registry


def open_shared(
    service_url: str,
    context_features: Sequence[str],
    *,
    shm_dir: str | None,
    segment_name: str | None,
) -> SharedParts:
    """Open (creating as needed) the segment for this service and features.

    Raises:
        ValueError: *segment_name* is not a usable name.
        heksher_shm.exceptions.SegmentError: a file or folder is not safe to use
            (another user's, a symlink, the wrong kind of file...).
    """
    if segment_name is None:
        segment_name = default_segment_name(service_url, context_features)
    elif not SEGMENT_NAME.fullmatch(segment_name):
        raise ValueError(f"segment_name must match {SEGMENT_NAME.pattern}, got {segment_name!r}")
    directory = resolve_shm_dir(shm_dir)
    segment_path = directory / f"{segment_name}.seg"
    lock_path = directory / f"{segment_name}.lock"
    _check_lock_file(lock_path)
    lock = LeaderLock(lock_path)
    registry = Registry(registry_directory(segment_path))
    segment = Segment.open(segment_path)
    return SharedParts(directory, segment_name, segment, lock, registry)


def _check_lock_file(path: Path) -> None:
    """Refuse an impostor lock file now, with a clear error, rather than in the background loop."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise SegmentError(f"lock file {path}: is a symbolic link; refusing to follow it")
    if not stat.S_ISREG(st.st_mode):
        raise SegmentError(f"lock file {path}: is not a regular file")
    if st.st_uid != os.geteuid():
        raise SegmentError(
            f"lock file {path}: is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
        )


_declaration_decoder = msgspec.json.Decoder(DeclarationBody)


class RegistrySource:
    """Every live process's wishes, read from the registry (cheaply, when it changed)."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._wishes: list[Wish] | None = None
        self._by_registration: dict[int, tuple[Registration, Wish]] = {}
        self._scanned = 0.0

    def changed(self) -> bool:
        return self._wishes is None or self._registry.changed()

    def wishes(self) -> list[Wish]:
        now = time.monotonic()
        if (
            self._wishes is not None
            and not self._registry.changed()
            and now - self._scanned < RESCAN_INTERVAL
        ):
            return self._wishes
        result = self._registry.scan()
        self._scanned = now
        wishes = []
        by_registration: dict[int, tuple[Registration, Wish]] = {}
        for registration in result.registrations:
            cached = self._by_registration.get(id(registration))
            wish = cached[1] if cached is not None and cached[0] is registration else _wish_of(registration)
            by_registration[id(registration)] = (registration, wish)
            wishes.append(wish)
        self._by_registration = by_registration
        self._wishes = wishes
        return wishes


_logged_malformed: set[tuple[int, bytes]] = set()


def _wish_of(registration: Registration) -> Wish:
    declarations = []
    for raw in registration.declarations:
        try:
            declarations.append(_declaration_decoder.decode(raw))
        except msgspec.DecodeError as e:
            seen = (registration.pid, bytes(raw))
            if seen not in _logged_malformed and len(_logged_malformed) < 1024:  # once each
                _logged_malformed.add(seen)
                logger.warning(
                    "skipping a malformed declaration in a registration",
                    extra={"pid": registration.pid, "problem": str(e)},
                )
    return Wish(
        wish_key(registration.identity), declarations, dict(registration.tracked), registration.reload_seq
    )


class SegmentObserver:
    """The update marks a follower watches: last success, error count, last error."""

    def __init__(self, segment: Segment) -> None:
        self._segment = segment

    def update_marks(self) -> tuple[float, int, str | None]:
        status = self._segment.status()
        return (status.last_update_ok or 0.0, status.error_count, status.last_error)

    def heartbeat(self) -> float | None:
        return self._segment.heartbeat()
