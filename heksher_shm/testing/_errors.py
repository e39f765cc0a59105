"""How the service refuses a request: :class:`ServiceError`, with the status and body a real server sends.

The store raises it, the API turns it into a response, and the admin helpers of
:class:`~heksher_shm.testing.HeksherService` let it through to the test.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

__all__ = ["ServiceError", "set_text"]


class ServiceError(Exception):
    """A request the service refuses, with the status and body a real Heksher server answers.

    ``kind`` tells how ``body`` travels: ``"text"`` (plain text), ``"json"`` (a JSON object),
    ``"empty"`` (no body) or ``"internal"`` (the server crashed: uvicorn's bare 500, see :meth:`internal`).
    The admin helpers of :class:`~heksher_shm.testing.HeksherService` raise it too, so a test that sets up
    something impossible learns why.
    """

    def __init__(
        self,
        status: int,
        kind: Literal["text", "json", "empty", "internal"],
        body: str | dict[str, Any] = "",
    ) -> None:
        self.status = status
        self.kind = kind
        self.body = body
        super().__init__(f"{status}: {body}" if body else str(status))

    @classmethod
    def text(cls, status: int, message: str) -> ServiceError:
        """An error with a plain-text body."""
        return cls(status, "text", message)

    @classmethod
    def detail(cls, status: int, detail: str) -> ServiceError:
        """An error with a JSON ``{"detail": ...}`` body, as FastAPI's HTTPException sends."""
        return cls(status, "json", {"detail": detail})

    @classmethod
    def empty(cls, status: int) -> ServiceError:
        """An error with an empty body."""
        return cls(status, "empty")

    @classmethod
    def internal(cls) -> ServiceError:
        """An unhandled exception in the real server (a database error): 500 ``Internal Server Error``.

        Over HTTP it looks like uvicorn's answer: plain text, chunked, and the connection is closed.
        """
        return cls(500, "internal", "Internal Server Error")


def set_text(names: Iterable[str]) -> str:
    """Names as the real server prints a Python ``set`` of them (in hash order there; sorted here)."""
    return "{" + ", ".join(repr(name) for name in sorted(names)) + "}"
