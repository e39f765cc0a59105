"""The last-known-good file: the latest good snapshot, kept on disk for a start without the service.

The shared segment outlives any one process but not a reboot or a new
container. With ``snapshot_file=`` (or ``HEKSHER_SHM_SNAPSHOT_FILE``), the
leader also writes each new snapshot it published into that file; a leader
that finds no snapshot in the segment starts from the file instead, and if
the service cannot be reached it publishes it (saying so, and reported
stale: nothing is updated). The file is written atomically (a temporary file
in the same folder, ``fsync``, ``rename``, then ``fsync`` of the folder),
``0600``, at most once per update and only when the rules changed.

Format::

    offset  size  field
         0     8  magic                  b"HKSHMLKG"
         8     4  version  u32           VERSION
        12     4  reserved               zero
        16     8  body length  u64
        24    16  BLAKE2b-128 of the body
        40     -  body: a MessagePack Kept

A file is refused, with a warning that says why, and never served when it is
not ours (another user's, a symbolic link, not a regular file, writable by
others: the same policy as the segment's files), is not such a file, has
another version or snapshot format, fails its checksum, or was written for
another service URL or other context features.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

import msgspec

from heksher_shm._model.snapshot import FORMAT as SNAPSHOT_FORMAT
from heksher_shm._shm import files
from heksher_shm.exceptions import SegmentError

__all__ = ["ENV_SNAPSHOT_FILE", "VERSION", "Kept", "KeptFile", "KeptFileError"]

ENV_SNAPSHOT_FILE = "HEKSHER_SHM_SNAPSHOT_FILE"
"""The environment variable that names the last-known-good file when ``snapshot_file`` is not given."""

MAGIC = b"HKSHMLKG"
VERSION = 1
_HEADER = struct.Struct("<8sIIQ16s")
MAX_BYTES = 1 << 30
"""Largest file read (1 GiB)."""


class KeptFileError(SegmentError):
    """The last-known-good file cannot be used (the message names the file and why)."""


class Kept(msgspec.Struct, frozen=True):
    """What the file holds: a snapshot as published, and whom it was written for."""

    service_url: str
    context_features: list[str]
    snapshot_format: int
    written: float
    """When it was written (epoch seconds)."""
    head: bytes
    blobs: list[bytes]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Kept)


@dataclass(frozen=True)
class KeptFile:
    """The last-known-good file of one service URL and its context features."""

    path: Path
    service_url: str
    context_features: tuple[str, ...]

    def write(self, head: bytes, blobs: list[bytes], written: float) -> None:
        """Replace the file atomically with this snapshot (made ``0600``, synced to disk).

        Raises:
            KeptFileError: it cannot be written (the message names the file and why).
        """
        body = _encoder.encode(
            Kept(_url(self.service_url), list(self.context_features), SNAPSHOT_FORMAT, written, head, blobs)
        )
        digest = hashlib.blake2b(body, digest_size=16).digest()
        folder = self.path.parent
        temp = folder / f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                with open(fd, "wb", closefd=True) as out:
                    out.write(_HEADER.pack(MAGIC, VERSION, 0, len(body), digest))
                    out.write(body)
                    out.flush()
                    os.fsync(out.fileno())
                os.rename(temp, self.path)  # one step: readers see the old file or the new one
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise
            _sync_folder(folder)
        except OSError as error:
            raise KeptFileError(
                f"snapshot file {self.path}: cannot write it: {error.strerror or error}"
            ) from error

    def read(self) -> Kept | None:
        """The snapshot in the file; None when there is no file.

        Raises:
            KeptFileError: the file exists but must not be served (the message says why).
        """
        try:
            fd = files.open_private_file("snapshot file", self.path, create=False, writable=False)
        except SegmentError as error:
            if not os.path.lexists(self.path):
                return None
            raise KeptFileError(str(error)) from error
        try:
            data = _read_all(fd)
        except OSError as error:
            raise KeptFileError(f"snapshot file {self.path}: cannot read it: {error.strerror}") from error
        finally:
            os.close(fd)
        return self._check(data)

    def _check(self, data: bytes) -> Kept:
        where = f"snapshot file {self.path}"
        if len(data) < _HEADER.size or data[:8] != MAGIC:
            raise KeptFileError(f"{where}: not a heksher_shm snapshot file")
        _, version, _, length, digest = _HEADER.unpack_from(data)
        if version != VERSION:
            raise KeptFileError(f"{where}: file version {version}, this heksher_shm reads version {VERSION}")
        body = data[_HEADER.size :]
        if len(body) != length or hashlib.blake2b(body, digest_size=16).digest() != digest:
            raise KeptFileError(f"{where}: checksum mismatch: the file is damaged or incomplete")
        try:
            kept = _decoder.decode(body)
        except msgspec.DecodeError as error:
            raise KeptFileError(f"{where}: not a snapshot ({error})") from error
        if kept.snapshot_format != SNAPSHOT_FORMAT:
            raise KeptFileError(
                f"{where}: written with snapshot format {kept.snapshot_format}, "
                f"this heksher_shm reads format {SNAPSHOT_FORMAT}"
            )
        if kept.service_url != _url(self.service_url):
            raise KeptFileError(
                f"{where}: written for service {kept.service_url}, not {_url(self.service_url)}"
            )
        if tuple(kept.context_features) != self.context_features:
            raise KeptFileError(
                f"{where}: written for context features {kept.context_features}, "
                f"not {list(self.context_features)}"
            )
        return kept


def _url(service_url: str) -> str:
    return service_url.rstrip("/")


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    if size > MAX_BYTES:
        raise OSError(0, f"{size} bytes, over the limit of {MAX_BYTES}")
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _sync_folder(folder: Path) -> None:
    """Make the rename durable (a crash right after it must not lose the new file)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
