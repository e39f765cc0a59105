"""What the service's answers mean to the engine: declaration outcomes and query results.

Functions of a response (no effects, no state of the engine's): a
declaration's answer becomes an :class:`~heksher_shm._model.snapshot.Outcome`;
a query's answer becomes a :class:`Fresh` set of snapshot entries and blobs
(:func:`digest_query`, which a driver runs for a
:class:`~heksher_shm._engine.effects.Digest` effect).

This module does no I/O.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import httpx

from heksher_shm._model import protocol as proto
from heksher_shm._model.snapshot import Outcome, SettingEntry, blob_of
from heksher_shm.exceptions import HeksherProtocolError

__all__ = ["Fresh", "ServiceLostSettings", "declaration_outcome", "digest_query"]

logger = logging.getLogger("heksher_shm.engine")


class ServiceLostSettings(Exception):
    """The query answered 404: the service does not know (any more) a setting we query."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response.text[:200] or "404 Not Found")
        self.response = response

    def unknown(self, asked: Iterable[str]) -> set[str]:
        """The settings of *asked* that the answer names (Heksher answers "the following are not
        setting names: ['a', 'b']"); all of *asked* if it names none of them."""
        named = set(_QUOTED.findall(self.response.text)) & set(asked)
        return named or set(asked)


_QUOTED = re.compile(r"'([^']+)'")


def declaration_outcome(
    body: proto.DeclarationBody,
    result: httpx.Response | BaseException,
    failed: Callable[[str, int, BaseException], Outcome],
) -> Outcome:
    """What one declaration's answer (or error) means; *failed* makes the outcome of a failure."""
    if isinstance(result, BaseException):
        logger.debug("setting declaration failed", exc_info=result, extra={"setting_name": body.name})
        return failed(body.name, 0, result)
    response = result
    status = response.status_code
    if status == 409:
        logger.error(
            "conflict when declaring setting",
            extra={"setting_name": body.name, "response_content": response.content},
        )
    elif response.is_error:
        try:
            response.raise_for_status()
        except httpx.HTTPStatusError as e:
            logger.debug(
                "error when declaring setting",
                extra={"setting_name": body.name, "response_content": response.content},
            )
            return failed(body.name, status, e)
    try:
        answer = proto.decode(proto.DECLARE, status, response.content, proto.DeclareResponse)
    except HeksherProtocolError as e:
        return failed(body.name, status, e)
    default = None
    if answer.outcome == "outdated":
        logger.info(
            "setting is outdated",
            extra={
                "setting_name": body.name,
                "declared_version": body.version,
                "latest_version": answer.latest_version,
            },
        )
        for difference in answer.differences:
            if difference.attribute == "default_value" and bytes(difference.latest_value):
                default = bytes(difference.latest_value)
    elif answer.outcome not in ("created", "uptodate", "upgraded", "mismatch", "rejected"):
        logger.warning(
            "unexpected declaration outcome", extra={"setting_name": body.name, "outcome": answer.outcome}
        )
    # The declared type and features travel with the outcome, for the processes that read this setting
    # without declaring it (the OpenFeature provider).
    return Outcome(
        body.name,
        answer.outcome,
        status,
        None,
        default,
        type=body.type,
        features=tuple(body.configurable_features),
    )


@dataclass(frozen=True)
class Fresh:
    """What one query brought: its settings (None: unchanged, a 304) with their blobs, and its ETag."""

    entries: list[SettingEntry] | None
    blobs: list[bytes]
    etag: str
    queried: float


def digest_query(
    response: httpx.Response, queried: float, pause: Callable[[], object] | None = None
) -> Fresh:
    """Turn a query's answer (status 200) into snapshot entries and blobs.

    Settings are decoded and encoded one at a time (see
    :func:`~heksher_shm._model.protocol.query_settings`). *pause*, when given,
    is called every few settings: the asyncio driver runs this in a worker
    thread and passes a pause that offers the GIL to the event loop now and
    then, so the loop never waits for the whole answer.

    Raises:
        heksher_shm.exceptions.HeksherProtocolError: the answer is not what the API documents.
    """
    found: dict[str, tuple[bytes, bytes, int]] = {}
    for count, (name, setting) in enumerate(proto.query_settings(response.status_code, response.content)):
        found[name] = blob_of(setting)
        if pause is not None and count % _PAUSE_EVERY == 0:
            pause()
    entries: list[SettingEntry] = []
    blobs: list[bytes] = []
    for name in sorted(found):
        blob, digest, rules = found[name]
        entries.append(SettingEntry(name, len(blobs), digest, rules))
        blobs.append(blob)
    return Fresh(entries, blobs, response.headers.get("ETag", ""), queried)


_PAUSE_EVERY = 32
"""Settings digested between two calls of the pause (a call costs about 100 ns)."""
