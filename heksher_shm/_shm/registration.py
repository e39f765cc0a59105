"""A registration: what one process asks of the leader, as stored in its registry file.

The record (:class:`Registration`), its JSON encoding and the checks its
decoder's types cannot express (:func:`validate_registration`). Where the
files live and how the leader reads them is :mod:`heksher_shm._shm.registry`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Literal

import msgspec

from heksher_shm._shm.identity import ProcessIdentity

__all__ = [
    "REGISTRATION_FORMAT",
    "Registration",
    "decode_registration",
    "encode_declaration",
    "encode_registration",
    "validate_registration",
]

REGISTRATION_FORMAT = 1
"""The registration format this module writes and reads; files with another ``format`` are rejected."""

_NAME_RE = re.compile(r"[a-zA-Z_0-9.]+")
_VERSION_RE = re.compile(r"[0-9]+\.[0-9]+")


class Registration(msgspec.Struct, frozen=True, kw_only=True):
    """What one process asks of the leader. Stored as JSON in the process's registry file.

    Attributes:
        format: :data:`REGISTRATION_FORMAT`. Fields may be added without
            changing it (readers ignore unknown fields); anything a reader
            would misread needs a new format.
        pid: the registering process.
        create_time: its start time, as in
            :class:`~heksher_shm._shm.identity.ProcessIdentity`.
        pidns: its PID namespace, as in
            :class:`~heksher_shm._shm.identity.ProcessIdentity` (``0``:
            unknown, taken for the reader's own).
        kind: which client registered: ``"async"`` or ``"thread"``.
        declarations: the declaration bodies the process needs declared, each a
            JSON object with at least a ``name`` (``[a-zA-Z_0-9.]+``) and a
            ``version`` (``<major>.<minor>``); otherwise passed through as is.
        tracked: context feature -> the values the process tracks, or ``"*"``
            for all values.
        reload_seq: numbers the process's requests; the leader acknowledges the
            latest in the snapshot it publishes.
        query_seq: the latest request that asks for a fresh query (``reload()``);
            other requests only need their declarations and a covering snapshot.
        updated: ``time.time()`` of the last write; :meth:`Registry.write` sets it.
    """

    format: int = REGISTRATION_FORMAT
    pid: int
    create_time: float
    pidns: int = 0
    kind: Literal["async", "thread"]
    declarations: list[msgspec.Raw] = msgspec.field(default_factory=list)
    tracked: dict[str, list[str] | str] = msgspec.field(default_factory=dict)
    reload_seq: int = 0
    query_seq: int = 0
    updated: float = 0.0

    @property
    def identity(self) -> ProcessIdentity:
        """The identity of the registered process."""
        return ProcessIdentity(self.pid, self.create_time, self.pidns)


class _DeclarationHead(msgspec.Struct):
    # Only the fields the registry validates; the rest of the body is opaque.
    name: str
    version: str


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Registration)
_head_decoder = msgspec.json.Decoder(_DeclarationHead)


def encode_registration(registration: Registration) -> bytes:
    """The JSON bytes of *registration*, as written to its file."""
    return _encoder.encode(registration)


def decode_registration(data: bytes) -> Registration:
    """The registration in *data*; raises :class:`msgspec.DecodeError` when it holds none."""
    return _decoder.decode(data)


def encode_declaration(body: Mapping[str, object]) -> msgspec.Raw:
    """Encode one declaration body (a JSON object) for :attr:`Registration.declarations`."""
    return msgspec.Raw(_encoder.encode(body))


def validate_registration(registration: Registration) -> str | None:
    """Return what is wrong with ``registration``, or ``None`` when it is valid.

    Checks what the decoder's types cannot: the format, the identity, each
    declaration's ``name`` and ``version``, and the ``tracked`` values.
    """
    if registration.format != REGISTRATION_FORMAT:
        return f"unsupported format {registration.format} (this version reads {REGISTRATION_FORMAT})"
    if registration.pid <= 0:
        return f"invalid pid {registration.pid}"
    if not (math.isfinite(registration.create_time) and registration.create_time >= 0):
        return f"invalid create_time {registration.create_time}"
    if not 0 <= registration.pidns < 1 << 64:
        return f"invalid pidns {registration.pidns}"
    if registration.reload_seq < 0:
        return f"invalid reload_seq {registration.reload_seq}"
    if not 0 <= registration.query_seq <= registration.reload_seq:
        return f"invalid query_seq {registration.query_seq} (reload_seq {registration.reload_seq})"
    for index, raw in enumerate(registration.declarations):
        try:
            head = _head_decoder.decode(raw)
        except msgspec.DecodeError as error:
            return f"declaration {index}: {error}"
        if not _NAME_RE.fullmatch(head.name):
            return f"declaration {index}: invalid name {head.name!r}"
        if not _VERSION_RE.fullmatch(head.version):
            return f"declaration {index} ({head.name}): invalid version {head.version!r}"
    for feature, values in registration.tracked.items():
        if not feature:
            return "tracked: empty context feature name"
        if isinstance(values, str) and values != "*":
            return f"tracked[{feature!r}]: expected a list of values or '*', not {values!r}"
    return None
