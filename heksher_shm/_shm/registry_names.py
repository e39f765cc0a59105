"""The names of the files in a segment's registry folder, and whose each one is.

See :mod:`heksher_shm._shm.registry` for the folder and what each file holds::

    <token>.reg              a process's registration
    <token>.<term>.ack       the leader's answer to its latest request, per term
    <token>.<n>.bell         a client's doorbell
    .<token>.<hex>.tmp       a write in progress, named after the writer
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from heksher_shm._shm.identity import TOKEN_PATTERN, ProcessIdentity, parse_token, token

__all__ = [
    "ACK_RE",
    "BELL_RE",
    "ENTRY_RE",
    "TEMP_RE",
    "ack_name",
    "bell_name",
    "entry_name",
    "entry_owner",
    "identity_from",
    "older_answers",
    "registry_directory",
]

ENTRY_RE = re.compile(rf"({TOKEN_PATTERN})\.reg")
TEMP_RE = re.compile(rf"\.({TOKEN_PATTERN})\.[0-9a-f]{{1,32}}\.tmp")
BELL_RE = re.compile(rf"({TOKEN_PATTERN})\.[1-9][0-9]{{0,8}}\.bell")
ACK_RE = re.compile(rf"({TOKEN_PATTERN})\.([0-9]{{1,20}})\.ack")
"""An answer, named after its process and the term of the leader that wrote it (group 2)."""


def registry_directory(segment_path: str | os.PathLike[str]) -> Path:
    """Return the registry directory that belongs to the segment at ``segment_path``."""
    return Path(f"{os.fspath(segment_path)}.d")


def entry_name(identity: ProcessIdentity) -> str:
    """The file name of the registration of the process *identity*."""
    return f"{token(identity)}.reg"


def bell_name(identity: ProcessIdentity, number: int) -> str:
    """The file name of doorbell *number* (>= 1) of the process *identity*, in the registry directory."""
    return f"{token(identity)}.{number}.bell"


def ack_name(key: str, term: int) -> str:
    """The file name of the answer of term *term* to the process whose token is *key*."""
    return f"{key}.{term}.ack"


def entry_owner(name: str) -> ProcessIdentity | None:
    """The process a registry entry belongs to, read from its file name (a registration, an answer, a
    doorbell or a write in progress); None for a name the registry never makes (``clean`` uses it)."""
    match = (
        ENTRY_RE.fullmatch(name)
        or TEMP_RE.fullmatch(name)
        or BELL_RE.fullmatch(name)
        or ACK_RE.fullmatch(name)
    )
    return None if match is None else identity_from(match)


def identity_from(match: re.Match[str]) -> ProcessIdentity:
    identity = parse_token(match[1])
    assert identity is not None  # the match is of TOKEN_PATTERN
    return identity


def older_answers(names: list[str], term: int) -> list[str]:
    """The answers among *names* written under a term older than *term* (no process reads them: each
    reads the answer of the segment's current term)."""
    return [name for name in names if (match := ACK_RE.fullmatch(name)) is not None and int(match[2]) < term]
