"""Default context feature values, shared by the real clients and the stubs."""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

__all__ = ["ContextDefaults"]

logger = logging.getLogger("heksher_shm.client")


class ContextDefaults:
    """``set_defaults`` and how defaults fill in a ``get()`` call's context."""

    _context_features: tuple[str, ...]

    def __init__(self) -> None:
        self._const_defaults: dict[str, str] = {}
        self._var_defaults: dict[str, ContextVar[str]] = {}
        self._defaults_version = 0
        """Bumped by every ``set_defaults``: what :mod:`heksher_shm.openfeature` compares to know that
        the answers it keeps were made with the current defaults (keep it through refactors)."""

    def set_defaults(self, **kwargs: str | ContextVar[str]) -> None:
        """Set default context feature values: a string, or a :class:`~contextvars.ContextVar` read per call.

        Raises:
            ValueError: a feature already has a default.
            TypeError: a value is neither a string nor a context variable.
        """
        existing = kwargs.keys() & (self._const_defaults.keys() | self._var_defaults.keys())
        if existing:
            raise ValueError(f"defaults for context features {sorted(existing)} have already been added")
        unknown = kwargs.keys() - set(self._context_features)
        if unknown and self._context_features:
            logger.warning(
                "context features are not specified in the client", extra={"redundant_keys": unknown}
            )
        for feature, value in kwargs.items():
            if not isinstance(value, (str, ContextVar)):
                raise TypeError(f"default for {feature} must be a str or a ContextVar, got {value!r}")
        for feature, value in kwargs.items():
            if isinstance(value, str):
                self._const_defaults[feature] = value
            else:
                self._var_defaults[feature] = value
        self._defaults_version += 1
        self._defaults_changed()

    def _defaults_changed(self) -> None:
        """Hook: settings' cached answers must not outlive the defaults they used."""
