"""A client's constructor arguments, refused at once when wrong, naming the argument (not later, in the
background)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from heksher_shm._engine.shared import SEGMENT_NAME
from heksher_shm._shm.lastgood import ENV_SNAPSHOT_FILE, KeptFile

__all__ = ["check_arguments", "check_http_client_args", "kept_file"]


def check_arguments(
    service_url: object,
    update_interval: object,
    context_features: object,
    http_client_args: object,
    startup_timeout: object,
    segment_name: object,
) -> None:
    """Refuse a wrong constructor argument at once, naming it (not later, in the background)."""
    if not isinstance(service_url, str) or not service_url:
        raise TypeError(f"service_url must be a non-empty string, got {service_url!r}")
    _check_seconds("update_interval", update_interval)
    if (
        isinstance(context_features, str)
        or not isinstance(context_features, Sequence)
        or not all(isinstance(f, str) for f in context_features)
    ):
        raise TypeError(f"context_features must be a sequence of names, got {context_features!r}")
    if http_client_args is not None and not isinstance(http_client_args, Mapping):
        raise TypeError(f"http_client_args must be a mapping, got {http_client_args!r}")
    _check_seconds("startup_timeout", startup_timeout)
    if segment_name is not None and not (
        isinstance(segment_name, str) and SEGMENT_NAME.fullmatch(segment_name)
    ):
        raise ValueError(f"segment_name must match {SEGMENT_NAME.pattern}, got {segment_name!r}")


class _NoTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Stands in for the real transport while ``http_client_args`` are tried (nothing is sent)."""


def check_http_client_args(
    http_class: type[httpx.Client] | type[httpx.AsyncClient], service_url: str, args: Mapping[str, Any]
) -> None:
    """Refuse ``http_client_args`` the HTTP client would refuse, now rather than in the background.

    Only the leader builds its HTTP client (followers never send a request), and building one costs
    30-50 ms (its TLS context), so the arguments are tried on a client with a stand-in transport: a
    misspelled keyword or a wrong type fails here, naming it. What only the real transport reads
    (``verify``, ``cert``, proxies) is checked when the leader builds it; a failure then is the
    update's error (``on_update_error``, the log).
    """
    if "base_url" in args:
        raise ValueError("http_client_args must not hold base_url: service_url is the base URL")
    trial = {**args, "transport": args.get("transport", _NoTransport())}
    try:
        # Not closed: closing would close a transport of theirs.
        client = http_class(base_url=service_url, **trial)
    except (TypeError, ValueError) as error:
        raise type(error)(f"http_client_args are refused by {http_class.__qualname__}: {error}") from error
    _check_timeout(client.timeout)


def _check_timeout(timeout: httpx.Timeout) -> None:
    """httpx takes any value as a timeout and fails only when a request uses it: refuse it now."""
    for phase in ("connect", "read", "write", "pool"):
        value = getattr(timeout, phase)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and not (number and value >= 0):
            raise TypeError(
                f"http_client_args timeout must be None, a number of seconds or an httpx.Timeout of them; "
                f"its {phase} timeout is {value!r}"
            )


def _check_seconds(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def kept_file(snapshot_file: object, service_url: str, context_features: tuple[str, ...]) -> KeptFile | None:
    """The client's last-known-good file: ``snapshot_file``, else ``HEKSHER_SHM_SNAPSHOT_FILE``, else none.

    Raises:
        TypeError: *snapshot_file* is not a path.
    """
    if snapshot_file is None:
        snapshot_file = os.environ.get(ENV_SNAPSHOT_FILE) or None
    if snapshot_file is None:
        return None
    if not isinstance(snapshot_file, (str, os.PathLike)) or not os.fspath(snapshot_file):
        raise TypeError(f"snapshot_file must be a path, got {snapshot_file!r}")
    return KeptFile(Path(os.path.abspath(os.fspath(snapshot_file))), service_url, context_features)
