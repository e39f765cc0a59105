"""How a declaration of an existing setting is judged: the outcome, and the differences it lists.

Pure functions over the store's records; :class:`~heksher_shm.testing._store.HeksherState` calls
:func:`judge` under its lock and applies an upgrade when told to.

How a declaration differs from the stored setting
--------------------------------------------------
Each difference has a level.  When a declaration upgrades a setting (its
version is higher), the differences are classified like this:

=========================  ============================================  ========  ===============
attribute                  change                                        level     reported as
=========================  ============================================  ========  ===============
``configurable_features``  only removals, no rule uses a removed one     minor     message
``configurable_features``  any addition (with or without removals)       major     stored value
``configurable_features``  a removed feature is used by some rule        mismatch  message
``type``                   narrowed to a subtype, every rule fits        minor     stored value
``type``                   widened or unrelated, every rule fits         major     stored value
``type``                   some rule's value does not fit the new type   mismatch  message
``name``                   renamed (the old name is kept as an alias)    minor     stored value
``default_value``          changed                                       minor     stored value
``metadata``               changed                                       minor     stored value
=========================  ============================================  ========  ===============

"stored value" means ``{"level", "attribute", "latest_value"}`` with the stored
setting's value, "message" means ``{"level", "message"}``.  Differences are
listed minor first, then major, then mismatch.

A minor version bump is refused (``rejected``) on any major difference, a
major bump only on a mismatch.  A declaration at the same version with any
difference is a ``mismatch``.  A declaration at a lower version is
``outdated`` and its differences describe the stored (newer) declaration:
the classification above is applied as if upgrading *from* the declaration
*to* the stored setting, without looking at rules.

Two deliberate departures from the real server: the rules are checked for
every type change (the real server skips the check when the type is
narrowed, which can leave rules whose values no longer fit), and JSON values
are compared the JSON way (``true`` differs from ``1``; Python's ``==`` would
call them equal).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from heksher_shm.testing._errors import ServiceError, set_text
from heksher_shm.testing._records import Declaration, StoredRule, StoredSetting
from heksher_shm.testing._types import JSONValue, json_equal

__all__ = ["Level", "differences", "judge"]

Level = Literal["minor", "major", "mismatch"]
"""How far a declaration is from the stored setting, per difference."""
_LEVELS: tuple[Level, ...] = ("minor", "major", "mismatch")


def judge(
    existing: StoredSetting,
    declaration: Declaration,
    rules: Sequence[StoredRule],
    features: Sequence[str],
) -> tuple[int, dict[str, Any], bool]:
    """Answer a declaration of ``existing``: the HTTP status, the outcome body, and whether to upgrade.

    ``rules`` are the rules of ``existing``; ``features`` the context features, in order.
    """
    new_version = _version_tuple(declaration.version)
    old_version = _version_tuple(existing.version)
    if new_version == old_version:
        found = differences(existing, declaration, rules, features, outdated=False)
        if any(found.values()):
            return 409, {"outcome": "mismatch", "differences": _flatten(found)}, False
        return 200, {"outcome": "uptodate"}, False
    if new_version < old_version:
        found = differences(existing, declaration, rules, features, outdated=True)
        outcome = {"outcome": "outdated", "latest_version": existing.version, "differences": _flatten(found)}
        return 200, outcome, False

    found = differences(existing, declaration, rules, features, outdated=False)
    if found["mismatch"]:
        accepted = False
    elif new_version[0] > old_version[0]:
        accepted = True
    else:
        accepted = not found["major"]
    if not accepted:
        outcome = {
            "outcome": "rejected",
            "previous_version": existing.version,
            "differences": _flatten(found),
        }
        return 409, outcome, False
    outcome = {"outcome": "upgraded", "previous_version": existing.version, "differences": _flatten(found)}
    return 200, outcome, True


def differences(
    existing: StoredSetting,
    declaration: Declaration,
    rules: Sequence[StoredRule],
    features: Sequence[str],
    *,
    outdated: bool,
) -> dict[Level, list[dict[str, Any]]]:
    """Classify how ``declaration`` differs from ``existing`` (see the module docstring).

    ``outdated`` flips the direction: the change considered is from the declaration to the stored
    setting, and rules are not consulted.
    """
    found: dict[Level, list[dict[str, Any]]] = {level: [] for level in _LEVELS}

    def attribute(level: Level, name: str, latest_value: JSONValue) -> None:
        found[level].append({"level": level, "attribute": name, "latest_value": copy.deepcopy(latest_value)})

    def message(level: Level, text: str) -> None:
        found[level].append({"level": level, "message": text})

    stored_cfs = set(existing.configurable_features)
    declared_cfs = set(declaration.configurable_features)
    if stored_cfs != declared_cfs:
        before, after = (declared_cfs, stored_cfs) if outdated else (stored_cfs, declared_cfs)
        removed = before - after
        users = [] if outdated else [rule.rule_id for rule in rules if removed & rule.feature_values.keys()]
        if users:
            message("mismatch", f"configurable features {sorted(removed)} are still in use by rules {users}")
        elif before > after:
            message("minor", f"removal of configurable features {sorted(removed)}")
        else:
            if not outdated:
                unknown = after - set(features)
                if unknown:
                    # this path answers with FastAPI's HTTPException, not plain text like creation does
                    raise ServiceError.detail(404, f"{set_text(unknown)} are not acceptable context features")
            attribute("major", "configurable_features", existing.ordered_features(features))

    if existing.type != declaration.type:
        old_type, new_type = (
            (declaration.type, existing.type) if outdated else (existing.type, declaration.type)
        )
        misfits = [] if outdated else [rule.rule_id for rule in rules if not new_type.validate(rule.value)]
        if misfits:
            message("mismatch", f"setting type incompatible with values for rules: {misfits}")
        elif new_type.is_subtype_of(old_type):
            attribute("minor", "type", str(existing.type))
        else:
            attribute("major", "type", str(existing.type))

    if declaration.name != existing.name:
        attribute("minor", "name", existing.name)
    if not json_equal(declaration.default_value, existing.default_value):
        attribute("minor", "default_value", existing.default_value)
    if not json_equal(dict(declaration.metadata), existing.metadata):
        attribute("minor", "metadata", existing.metadata)
    return found


def _version_tuple(version: str) -> tuple[int, int]:
    major, _, minor = version.partition(".")
    return int(major), int(minor)


def _flatten(found: Mapping[Level, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The differences listed minor first, then major, then mismatch."""
    return [difference for level in _LEVELS for difference in found[level]]
