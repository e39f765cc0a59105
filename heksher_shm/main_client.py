"""Compatibility: heksher 0.2.2 kept the process's main client in ``heksher.main_client.Main``.

Reading ``heksher_shm.main_client.Main`` gives the current main client, or
``None`` before any client became main (0.2.2 shows a placeholder that
collects settings instead). It is read-only: assigning to it does not make a
client main; call ``set_as_main()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from heksher_shm._process import main as _main

__all__ = ["Main"]

Main: Any
"""The current main client, or ``None`` (computed on each read by the module's ``__getattr__``)."""

if not TYPE_CHECKING:
    # Hidden from type checkers: a module __getattr__ would make them accept any attribute of this
    # module, a misspelled one included; they see Main, declared above (tests/test_typing.py).

    def __getattr__(name: str) -> Any:
        if name == "Main":
            return _main.current()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
