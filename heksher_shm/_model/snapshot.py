"""What a leader publishes and every process reads: the snapshot's head and blobs.

A snapshot is one *head* and one *blob* per setting. The head is small: the
service's context features, one entry per setting (name, blob index, digest
of the blob), the outcome of every declaration made this term, and the
term (fencing token) of the leader that published it. A blob holds one setting's default
and rules with their values as raw JSON, exactly as the service sent them.

A process decodes the head of each new snapshot, then only the blobs of the
settings *it* uses whose digest changed, and converts raw values with its own
types and validators. Both are msgpack, with array-like structs to keep the
segment compact.

This module does no I/O.
"""

from __future__ import annotations

import hashlib

import msgspec

from heksher_shm._model.protocol import QuerySetting

__all__ = [
    "FORMAT",
    "Ack",
    "Head",
    "Outcome",
    "RuleRecord",
    "SettingBlob",
    "SettingEntry",
    "blob_of",
    "decode_ack",
    "decode_blob",
    "decode_head",
    "encode_ack",
    "encode_head",
]

FORMAT = 3
"""Version of the head/blob encoding; a reader refuses heads of another version."""


class RuleRecord(msgspec.Struct, array_like=True, frozen=True):
    """A rule: its id, its (feature, value) conditions in service order, its raw JSON value, and its
    metadata as raw JSON (empty when it has none; the OpenFeature provider shows it)."""

    rule_id: int
    conditions: list[tuple[str, str]]
    value: bytes
    metadata: bytes = b""


class SettingBlob(msgspec.Struct, array_like=True, frozen=True):
    """One setting's raw default and rules."""

    default: bytes
    rules: list[RuleRecord]


class SettingEntry(msgspec.Struct, array_like=True, frozen=True):
    """Where a setting's blob is and a digest to tell whether it changed."""

    name: str
    blob: int
    digest: bytes
    rule_count: int


class Outcome(msgspec.Struct, array_like=True, frozen=True):
    """What the service answered to one declaration.

    ``status`` is the HTTP status, 0 when no response came; ``error`` is set
    when the declaration failed; ``default`` is the service's newer default
    (raw JSON) when the outcome was ``outdated`` and the default differed;
    ``error_id`` says which exception the leader kept for the error
    (meaningful in the leader's own process only). ``type`` and ``features``
    are the declaration's type string and configurable features (empty when
    the declaration failed): what a process that does not declare the
    setting itself needs to read its rules (the OpenFeature provider).
    """

    name: str
    outcome: str | None
    status: int
    error: str | None = None
    default: bytes | None = None
    error_id: str = ""
    type: str = ""
    features: tuple[str, ...] = ()

    @property
    def settled(self) -> bool:
        """Whether the leader is done with this declaration for its term: it succeeded, or failed in a
        way it does not retry (the service answered with a status below 500)."""
        return self.error is None or 0 < self.status < 500


class Ack(msgspec.Struct, array_like=True, frozen=True):
    """The leader's answer to a process's request number ``seq`` (``error`` set when it failed).

    Written by the leader where that process alone reads it (not in the
    snapshot: answering a new process costs one small write, not a republish
    of every rule). A successful answer names the snapshot that serves the
    request: the process waits until it has applied that snapshot, or a later
    one of the same term.
    """

    seq: int
    error: str | None = None
    error_id: str = ""
    """Which exception the leader kept for this error (meaningful in the leader's own process only)."""
    term: int = 0
    """The term of the leader that answered."""
    generation: int = 0
    """The generation that serves the request (0: none, with an error)."""


_ack_encoder = msgspec.msgpack.Encoder()
_ack_decoder = msgspec.msgpack.Decoder(Ack)


def encode_ack(ack: Ack) -> bytes:
    """Encode an acknowledgement."""
    return _ack_encoder.encode(ack)


def decode_ack(data: bytes) -> Ack:
    """Decode an acknowledgement; raises :class:`msgspec.DecodeError` for anything else."""
    return _ack_decoder.decode(data)


class Head(msgspec.Struct, frozen=True):
    """The snapshot's table of contents."""

    format: int
    term: int
    """The fencing token of the leader that published it."""
    published: float
    context_features: list[str]
    settings: list[SettingEntry]
    outcomes: dict[str, Outcome]
    ok: bool
    error: str | None = None
    update_interval: float = 0.0
    queried: float = 0.0
    """When the service answered the query behind these rules (monotonic seconds, host-wide on Linux)."""
    filters: str | None = None
    """The ``context_filters`` of the query behind these rules (None: unknown)."""
    as_of: float = 0.0
    """When the service answered the query behind these rules (epoch seconds; 0.0: unknown)."""
    restored: str | None = None
    """Where these rules were restored from when the service could not be reached (the last-known-good
    file), or None: they came from the service in this segment's lifetime."""
    etag: str = ""
    """The ETag of the query behind these rules (a new leader asks with it: unchanged rules cost a 304)."""


_head_encoder = msgspec.msgpack.Encoder()
_head_decoder = msgspec.msgpack.Decoder(Head)
_blob_encoder = msgspec.msgpack.Encoder()
_blob_decoder = msgspec.msgpack.Decoder(SettingBlob)
_metadata_encoder = msgspec.json.Encoder()


def blob_of(result: QuerySetting) -> tuple[bytes, bytes, int]:
    """Encode a setting's query result as a blob: (blob bytes, digest, rule count)."""
    blob = SettingBlob(
        bytes(result.default_value),
        [
            RuleRecord(r.rule_id, r.context_features, bytes(r.value), _metadata_json(r.metadata))
            for r in result.rules
        ],
    )
    data = _blob_encoder.encode(blob)
    return data, hashlib.blake2b(data, digest_size=16).digest(), len(result.rules)


def _metadata_json(metadata: dict[str, object] | None) -> bytes:
    # Most rules have none: an empty field costs the blob one byte where "{}" would cost three.
    return _metadata_encoder.encode(metadata) if metadata else b""


def encode_head(head: Head) -> bytes:
    """Encode a head."""
    return _head_encoder.encode(head)


def decode_head(data: bytes) -> Head:
    """Decode a head; raises :class:`msgspec.DecodeError` or :class:`ValueError` for a foreign one."""
    head = _head_decoder.decode(data)
    if head.format != FORMAT:
        raise ValueError(f"snapshot head format {head.format}, this version reads {FORMAT}")
    return head


def decode_blob(data: bytes | memoryview) -> SettingBlob:
    """Decode a setting's blob."""
    return _blob_decoder.decode(data)
