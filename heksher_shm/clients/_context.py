"""Context manager behaviour shared by the real clients and their stubs."""

from __future__ import annotations

from types import TracebackType
from typing import Any, TypeVar

__all__ = ["AsyncMainContext", "SyncMainContext"]

S = TypeVar("S", bound="SyncMainContext")
A = TypeVar("A", bound="AsyncMainContext")


class SyncMainContext:
    """``with client:`` makes the client main on entry and closes it on exit."""

    set_as_main: Any
    close: Any

    def __enter__(self: S) -> S:
        self.set_as_main()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncMainContext:
    """``async with client:`` makes the client main on entry and closes it on exit."""

    set_as_main: Any
    aclose: Any

    async def __aenter__(self: A) -> A:
        await self.set_as_main()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
