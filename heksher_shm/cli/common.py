"""What the ``heksher-shm`` subcommands share: exit codes, finding segments, reading snapshots, formatting.

The inspection commands (``status``, ``dump``, ``watch``) only look: they
never create the segment directory, take the leader lock, remove a
registration or publish into a segment. (Opening a segment file shorter than
its header extends it with zeros, as every opener does, so that the mapping
covers the header.)
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from heksher_shm._engine.shared import SEGMENT_NAME
from heksher_shm._model.snapshot import Head, SettingBlob, decode_blob, decode_head
from heksher_shm._shm.folder import default_shm_dirs
from heksher_shm._shm.segment import ENV_SHM_DIR, Segment, resolve_shm_dir, shm_dir_path
from heksher_shm.exceptions import SegmentError
from heksher_shm.status import list_segments

__all__ = [
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_UNHEALTHY",
    "EXIT_UNREADABLE",
    "EXIT_USAGE",
    "CliError",
    "Snapshot",
    "age",
    "clock",
    "decode_json",
    "one_line",
    "open_segment",
    "read_snapshot",
    "segment_directory",
    "select_segments",
    "show_json",
    "silence_stdout",
]

EXIT_OK = 0
"""Success; for ``status``: every segment in use is healthy (idle ones count only when named or strict)."""
EXIT_UNHEALTHY = 1
"""``status``: a segment is not healthy (empty, leaderless, unresponsive, stale; idle when named or
strict); ``demo``: it failed."""
EXIT_USAGE = 2
"""Bad command line (argparse uses 2 as well), e.g. an invalid segment name, or no segment in use (or
several) for ``watch`` to follow."""
EXIT_NOT_FOUND = 3
"""Nothing to look at: the directory, the named segment or the setting does not exist, or no segments."""
EXIT_UNREADABLE = 4
"""A segment or the directory cannot be used safely (another user's, a symlink, corrupted...)."""


def silence_stdout() -> None:
    """Point stdout at ``/dev/null``: its reader went away (``heksher-shm dump | head``).

    Whatever is still buffered, and Python's own flush at exit, then go nowhere instead of raising
    :class:`BrokenPipeError` again (which Python would report on stderr and exit 120 for).
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


class CliError(Exception):
    """An expected failure: printed as one line, without a traceback, and exits with ``code``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def segment_directory(given: str | None) -> Path:
    """The segment directory to inspect: ``given`` (``--dir``), else ``HEKSHER_SHM_DIR``, else the default.

    Unlike the clients, never creates it: a missing directory is a :class:`CliError`.
    """
    candidate, explicit = shm_dir_path(given or None)
    source = "--dir" if given else ENV_SHM_DIR if explicit else "the default"
    if not explicit:
        # The default is in $XDG_RUNTIME_DIR where there is a private one, else under /dev/shm: a
        # process started without the variable (a service manager's) uses the second. Look where
        # there is something.
        candidate = next((path for path in default_shm_dirs() if os.path.lexists(path)), candidate)
    if not os.path.lexists(candidate):
        raise CliError(
            f"segment directory {candidate} ({source}) does not exist: no heksher_shm client has run "
            f"as this user with this directory (set {ENV_SHM_DIR} or --dir to look elsewhere)",
            EXIT_NOT_FOUND,
        )
    try:
        # Checks ownership, type and mode; the directory exists, so nothing is created.
        return resolve_shm_dir(candidate)
    except SegmentError as e:
        raise CliError(
            f"{e}; the clients of this user cannot share it: each process serves without sharing, "
            "polling the service itself (see 'cannot share the host's rule cache' in the troubleshooting "
            "page for the fix)",
            EXIT_UNREADABLE,
        ) from None


def select_segments(directory: Path, name: str | None) -> list[Path]:
    """The segment files to inspect: the one called ``name``, or every one in ``directory``.

    Raises :class:`CliError` for an invalid or unknown name, or when there are none.
    """
    if name is not None:
        name = name.removesuffix(".seg")
        if not SEGMENT_NAME.fullmatch(name):
            raise CliError(
                f"{name!r} is not a segment name (letters, digits, '_', '.', '-'; as `status` lists them)",
                EXIT_USAGE,
            )
        path = directory / f"{name}.seg"
        # lexists: a symlink or a foreign file under this name is reported by Segment.open, not hidden.
        if not os.path.lexists(path):
            raise CliError(f"no segment named {name!r} in {directory}{_listing(directory)}", EXIT_NOT_FOUND)
        return [path]
    try:
        paths = list_segments(directory)
    except SegmentError as e:  # the directory changed since segment_directory() checked it
        raise CliError(str(e), EXIT_UNREADABLE) from None
    if not paths:
        raise CliError(f"no segments in {directory}: no client has shared rules there yet", EXIT_NOT_FOUND)
    return paths


def _listing(directory: Path) -> str:
    names = sorted(p.name.removesuffix(".seg") for p in directory.glob("*.seg"))
    return f"; segments there: {', '.join(names)}" if names else "; there are no segments there"


@dataclass(frozen=True)
class Snapshot:
    """One published snapshot, read whole and decoded (raw JSON values stay raw)."""

    generation: int
    head: Head
    blobs: dict[str, SettingBlob]
    """Each setting's default and rules, by setting name, in the head's order."""


_READ_ROUNDS = 20


def read_snapshot(segment: Segment) -> Snapshot | None:
    """Read and decode the current snapshot with every blob; ``None`` when nothing was published.

    Raises:
        CliError: the segment is corrupted, or kept changing while being read.
    """
    for _ in range(_READ_ROUNDS):
        try:
            read = segment.read_head()
            if read is None:
                return None
            head = decode_head(read.head)
            blobs = segment.read_blobs(read.generation, [entry.blob for entry in head.settings])
            if blobs is None:
                continue  # a new generation was published meanwhile: read that one
            decoded = {
                entry.name: decode_blob(blob) for entry, blob in zip(head.settings, blobs, strict=True)
            }
        except SegmentError as e:  # its message names the file
            raise CliError(str(e), EXIT_UNREADABLE) from None
        except ValueError as e:  # msgspec.DecodeError is a ValueError
            raise CliError(
                f"segment file {segment.path}: undecodable snapshot: {e}", EXIT_UNREADABLE
            ) from None
        return Snapshot(read.generation, head, decoded)
    raise CliError(
        f"segment file {segment.path}: the snapshot changed {_READ_ROUNDS} times while being read; try again",
        EXIT_UNREADABLE,
    )


def open_segment(path: Path) -> Segment:
    """Open an existing segment for reading, turning refusals into :class:`CliError`."""
    try:
        return Segment.open(path, create=False)
    except SegmentError as e:
        raise CliError(str(e), EXIT_UNREADABLE) from None


_json_decoder = msgspec.json.Decoder()


def decode_json(raw: bytes) -> Any:
    """A raw JSON value from the service, decoded; undecodable bytes come back as text in ``<...>``."""
    try:
        return _json_decoder.decode(raw)
    except msgspec.DecodeError:
        return f"<not JSON: {raw[:200]!r}>"


def show_json(value: Any) -> str:
    """A decoded value in one line of JSON (how values read in text output)."""
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def clock(when: float, *, precise: bool = False) -> str:
    """Local wall-clock time of an epoch timestamp: the date and time, or (``precise``) the time in ms."""
    if precise:
        return time.strftime("%H:%M:%S", time.localtime(when)) + f".{int(when * 1000) % 1000:03d}"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def age(seconds: float | None) -> str:
    """A duration for people: ``0.35 s``, ``42 s``, ``3 min 5 s``, ``2 h 4 min``, ``3 d 1 h``."""
    if seconds is None:
        return "never"
    if seconds < 10:
        return f"{seconds:.2f} s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def one_line(text: str | None, limit: int = 120) -> str:
    """Collapse whitespace (command lines may hold newlines) and cut to ``limit`` characters."""
    if text is None:
        return "?"
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
