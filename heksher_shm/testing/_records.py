"""The records of the in-memory service: what a declaration says, what the store keeps, what tests see.

:class:`Declaration` is a validated declaration body; ``StoredSetting`` and ``StoredRule`` are the
store's own mutable records (a rule points at its setting, so a rename touches no rule);
:class:`SettingInfo` and :class:`RuleInfo` are the frozen copies handed to tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from heksher_shm.testing._types import SETTING_NAME_RE, VERSION_RE, JSONValue, ServiceType

__all__ = ["Declaration", "RuleInfo", "SettingInfo", "StoredRule", "StoredSetting"]


@dataclass(frozen=True)
class Declaration:
    """A validated ``POST /api/v1/settings/declare`` body."""

    name: str
    configurable_features: tuple[str, ...]
    type: ServiceType
    default_value: JSONValue
    metadata: Mapping[str, JSONValue] = field(default_factory=dict)
    alias: str | None = None
    version: str = "1.0"

    def __post_init__(self) -> None:
        # the HTTP layer reports these as 422s first; this guards the Python helpers
        if not SETTING_NAME_RE.fullmatch(self.name):
            raise ValueError(f"invalid setting name {self.name!r}")
        if self.alias is not None and (not SETTING_NAME_RE.fullmatch(self.alias) or self.alias == self.name):
            raise ValueError(f"invalid alias {self.alias!r} for setting {self.name!r}")
        if not VERSION_RE.fullmatch(self.version):
            raise ValueError(f"invalid version {self.version!r}")
        if not self.configurable_features or len(set(self.configurable_features)) != len(
            self.configurable_features
        ):
            raise ValueError("configurable_features must be a non-empty list without repeats")
        if not self.type.validate(self.default_value):
            raise ValueError(f"type ({self.type}) and default value ({self.default_value!r}) must match")


# ---------------------------------------------------------------------------------------------------------
# Snapshots handed to tests


@dataclass(frozen=True)
class SettingInfo:
    """A copy of one stored setting, as :attr:`HeksherService.settings` shows it."""

    name: str
    type: str
    default_value: JSONValue
    configurable_features: tuple[str, ...]
    metadata: Mapping[str, JSONValue]
    aliases: tuple[str, ...]
    version: str


@dataclass(frozen=True)
class RuleInfo:
    """A copy of one stored rule; ``feature_values`` follows the context-feature order."""

    rule_id: int
    setting: str
    feature_values: tuple[tuple[str, str], ...]
    value: JSONValue
    metadata: Mapping[str, JSONValue]


# ---------------------------------------------------------------------------------------------------------
# The store's own records


@dataclass
class StoredSetting:
    """A setting as the store keeps it (mutable; never handed out)."""

    name: str
    type: ServiceType
    default_value: JSONValue
    configurable_features: list[str]
    metadata: dict[str, JSONValue]
    aliases: list[str]
    version: str
    # Not compared nor shown: the rules point back at their setting.
    rules: dict[int, StoredRule] = field(default_factory=dict, compare=False, repr=False)
    """This setting's rules by id, in id order: a query or a declaration reads only these."""
    rule_by_conditions: dict[frozenset[tuple[str, str]], StoredRule] = field(
        default_factory=dict, compare=False, repr=False
    )
    """The same rules by their conditions, which are unique per setting (a duplicate is a 409)."""
    json_cache: dict[tuple[int, bool, frozenset[Any] | None], bytes] = field(
        default_factory=dict, compare=False, repr=False
    )
    """This setting's entry in query answers, as JSON (see ``_query.py``)."""

    def ordered_features(self, order: Sequence[str]) -> list[str]:
        """The configurable features in context-feature ``order``, as the real server reports them."""
        return sorted(
            self.configurable_features,
            key=lambda f: order.index(f) if f in order else len(order),
        )


@dataclass
class StoredRule:
    """A rule as the store keeps it (mutable; never handed out)."""

    rule_id: int
    setting: StoredSetting  # by reference, so that a rename needs no rule updates
    feature_values: dict[str, str]
    value: JSONValue
    metadata: dict[str, JSONValue]

    @property
    def conditions_key(self) -> frozenset[tuple[str, str]]:
        """The conditions as a key of :attr:`StoredSetting.rule_by_conditions`."""
        return frozenset(self.feature_values.items())
