"""A client's context defaults and tracked contexts, and the view of them a setting resolves with.

Held by every client, real or stub (the stubs track nothing, and their view
warns about nothing).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from contextvars import ContextVar

from heksher_shm._model.contexts import TRACK_ALL
from heksher_shm.setting import _ContextView

__all__ = ["Contexts"]

logger = logging.getLogger("heksher_shm.client")

_UNTRACKED_WARNINGS = 1024
"""Distinct untracked context values warned about (once each) before falling silent."""


class Contexts:
    """Default context values (constants or context variables) and tracked context values.

    Args:
        tracking: whether tracked values matter (real clients); a stub's
            view says nothing is tracked, and warns about nothing.
    """

    def __init__(self, *, tracking: bool = True) -> None:
        self.const: dict[str, str] = {}
        self.variables: dict[str, ContextVar[str]] = {}
        self.tracked: dict[str, str | set[str]] = {}
        """Per feature: ``TRACK_ALL`` or the set of values tracked."""
        self._tracking = tracking
        self._warned: set[tuple[str, str]] = set()
        self.version = 0
        """Bumped by every change of the defaults: what keeps an answer made with them (the OpenFeature
        provider's) from outliving them."""

    def add_defaults(self, defaults: Mapping[str, str | ContextVar[str]], features: Sequence[str]) -> None:
        """Add default values (see ``set_defaults``); nothing is added when one is refused. A feature
        not among *features* (when there are any) is added, with a warning.

        Raises:
            ValueError: a feature already has a default.
            TypeError: a value is neither a string nor a context variable.
        """
        existing = defaults.keys() & (self.const.keys() | self.variables.keys())
        if existing:
            raise ValueError(f"defaults for context features {sorted(existing)} have already been added")
        unknown = defaults.keys() - set(features)
        if unknown and features:
            logger.warning(
                "context features are not specified in the client", extra={"redundant_keys": unknown}
            )
        for feature, value in defaults.items():
            if not isinstance(value, (str, ContextVar)):
                raise TypeError(f"default for {feature} must be a str or a ContextVar, got {value!r}")
        for feature, value in defaults.items():
            if isinstance(value, str):
                self.const[feature] = value
            else:
                self.variables[feature] = value
        self.version += 1

    def track(self, values: Mapping[str, str | Collection[str]], features: Sequence[str]) -> None:
        """Track more values (see ``track_contexts``); a feature not among *features* with a warning.

        Raises:
            RuntimeError: mixing :data:`TRACK_ALL` and specific values for one feature.
            TypeError: a value that is not a string or a collection of strings.
        """
        unknown = values.keys() - set(features)
        if unknown:
            logger.warning("context features are not specified in server", extra={"redundant_keys": unknown})
        for feature, given in values.items():
            existing = self.tracked.get(feature)
            if given == TRACK_ALL:
                if existing is not None and existing != TRACK_ALL:
                    raise RuntimeError("cannot set TRACK_ALL to a feature that's already been used to track")
                self.tracked[feature] = TRACK_ALL
                continue
            new = {given} if isinstance(given, str) else set(given)
            if not all(isinstance(v, str) for v in new):
                raise TypeError(f"tracked values of {feature} must be strings, got {given!r}")
            if existing == TRACK_ALL:
                raise RuntimeError("cannot track a specific value after the feature's been set to TRACK_ALL")
            if existing is None:
                self.tracked[feature] = new
            else:
                assert isinstance(existing, set)
                existing.update(new)
        self._warned.clear()

    def tracked_lists(self) -> dict[str, str | list[str]]:
        """The tracked values as registrations and snapshot filters spell them (sorted lists)."""
        return {f: (v if v == TRACK_ALL else sorted(v)) for f, v in self.tracked.items()}

    def view(self) -> _ContextView:
        """What a setting's new state resolves contexts with (a ``heksher_shm.setting._ContextView``)."""
        if not self._tracking:
            return _ContextView(self.const, tuple(self.variables.items()), None, _no_warning)
        return _ContextView(self.const, tuple(self.variables.items()), self.tracked, self._warn_untracked)

    def _warn_untracked(self, feature: str, value: str) -> None:
        warned = self._warned
        if (feature, value) in warned or len(warned) > _UNTRACKED_WARNINGS:
            return
        warned.add((feature, value))
        if len(warned) > _UNTRACKED_WARNINGS:
            logger.warning("too many untracked context values; no more warnings about them")
            return
        logger.warning(
            "context feature value is not tracked by client",
            extra={"context_feature": feature, "context_feature_value": value},
        )


def _no_warning(feature: str, value: str) -> None:
    """Stubs track everything: nothing to warn about."""
