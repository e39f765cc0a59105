"""Checks for the application servers heksher_shm runs under (prefork servers, process pools)."""

from __future__ import annotations

__all__ = ["check_background_threads"]


def check_background_threads() -> None:
    """Say so clearly when this process cannot run background threads.

    Called when a client becomes main. (Filled in with the prefork work.)
    """
