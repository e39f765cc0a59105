"""Applying snapshots to a process's settings: copy what changed, and convert, validate and compile
each setting's rules at its next ``get()``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import msgspec

from heksher_shm._model.contexts import TRACK_ALL
from heksher_shm._model.resolve import compile_rules
from heksher_shm._model.snapshot import Head, SettingBlob, decode_blob, decode_head
from heksher_shm._process import main as _main
from heksher_shm._process.gc import paused_gc
from heksher_shm.clients._core import ClientCore
from heksher_shm.exceptions import SegmentError, SnapshotFencedError
from heksher_shm.setting import QueriedRule, Setting, _State

__all__ = ["Applying"]

logger = logging.getLogger("heksher_shm.client")

_json_decoder = msgspec.json.Decoder()


class Blob(Protocol):
    """A blob taken from a snapshot to be decoded later (``copy_blobs``)."""

    def verified(self) -> bytes | memoryview:
        """Its bytes, checked; raises :class:`~heksher_shm.exceptions.SegmentCorruptedError` if damaged."""
        ...


class _PendingRules:
    """A setting's new rules, copied from a snapshot, decoded and installed at its next ``get()``."""

    __slots__ = ("blob", "client", "digest", "restore", "service_order", "setting")

    def __init__(
        self,
        client: Applying,
        setting: Setting[Any],
        blob: Blob,
        digest: bytes,
        service_order: Sequence[str],
        restore: _State,
    ) -> None:
        self.client, self.setting, self.blob, self.digest = client, setting, blob, digest
        self.service_order = service_order
        self.restore = restore
        """The state to go back to if these rules are unusable: the last one that was not waiting."""

    def __call__(self) -> None:
        client, setting = self.client, self.setting
        failure: Exception | None = None
        with client._apply_lock:
            state = setting._state
            if state.pending is not self:
                return  # installed meanwhile, or replaced by newer rules
            try:
                with paused_gc():
                    blob = decode_blob(self.blob.verified())
            except (SegmentError, ValueError, msgspec.DecodeError):  # damaged, or not a rule set
                logger.exception(
                    "unusable rules in the snapshot; keeping the previous ones",
                    extra={"setting_name": setting.name},
                )
                client._segment_damaged()
                # digest None: rebuild it from the next snapshot, whatever that holds for it
                setting._set_state(self.restore.reboxed(state.applied, None))
                return
            try:
                with paused_gc():
                    client._install(setting, blob, self.service_order, self.digest, state.applied)
            except Exception as e:  # raised by a validator or on_coerce (a TypeError only rejects a value)
                failure = e
                # The previous rules stay, under this blob's digest so that applying this snapshot
                # again leaves them be; the next snapshot tries again (see _apply_from).
                setting._set_state(self.restore.reboxed(state.applied, self.digest))
                client._failed_conversions[setting] = state.applied[0]
            else:
                client._failed_conversions.pop(setting, None)
        if failure is not None:
            # Outside the lock: the callback may do anything, even wait for an update.
            client._conversion_failed(setting, failure)


class Applying(ClientCore):
    """Applies published snapshots to this process's settings."""

    def _refresh(self, setting: Setting[Any]) -> None:
        """From ``get()``: a new snapshot is out. Apply it to *setting* now, unless that would block
        (then the old rules answer); the background loop applies it to the others shortly."""
        if not self._try_modification_lock():
            return
        try:
            if self._apply_lock.acquire(blocking=False):
                try:
                    self._apply_one(setting)
                finally:
                    self._apply_lock.release()
        finally:
            self._release_modification_lock()

    def _force_reapply(self) -> None:
        with self._apply_lock:
            self._reapply_all = True
            self._applied_generation = -1

    def _defaults_changed(self) -> None:
        self._reinstall_all()

    def _reinstall_all(self) -> None:
        """Rebuild every setting's state (defaults changed): caches must not outlive them."""
        self._force_reapply()
        for setting in list(self._settings):
            if setting._state.client is self:
                pending = setting._state.pending
                if pending is not None:
                    pending()  # compile the rules it has before rebuilding around them
                setting._install_state(self, setting._state.rules)

    def _apply_latest(self, blocking: bool = True, notify: bool = True) -> None:
        """Apply the newest snapshot to this process's settings.

        Call with ``modification_lock`` held. Only settings whose blob changed
        are copied, and they are decoded and converted at their next ``get()``.
        *notify*: wake the waiters of ``set_as_main``/``reload`` (the background
        loop does that itself, after the callbacks).

        The leader's latest answer to this process's requests is taken here,
        after the snapshot: a request is answered once an apply saw both (so a
        ``reload()`` made while holding ``modification_lock`` waits, as
        documented).
        """
        if self._apply_lock.acquire(blocking=blocking):
            # The head and a new state per changed setting are thousands of small objects, made in
            # one go (often by a get() that waits for them): no collection needs to run in between.
            try:
                with paused_gc():
                    self._apply_from(self._transport)
                self._take_ack()
            finally:
                self._apply_lock.release()
        if notify:
            self._notify_applied()

    def _apply_one(self, setting: Setting[Any]) -> None:
        """Apply the newest snapshot to *setting* alone (see "What a follower does on get()").

        The setting's new state gets an applied box of its own, holding the
        snapshot's generation, so that its ``get()`` stops seeing a new
        snapshot; the next full apply puts it back on the client's box. Anything
        out of the ordinary (no such setting in the snapshot, an older snapshot,
        a damaged segment) is left to the full apply, which handles it for all.
        """
        transport = self._transport
        generation = transport.generation()
        state = setting._state
        if generation == self._applied_generation:
            if state.applied is not self._applied_box and state.client is self:
                setting._set_state(state.reboxed(self._applied_box, state.digest))
            return
        peeked = self._peeked
        if peeked is None or peeked[0] != generation:
            try:
                read = transport.read_head()
                if read is None or read.generation != generation:
                    return  # nothing published, or published again meanwhile: the next get() tries
                head = decode_head(read.head)
            except (SegmentError, ValueError, msgspec.DecodeError):
                self._apply_latest(blocking=False)  # it logs, and marks the generation seen
                return
            peeked = self._peeked = (generation, head, {entry.name: entry for entry in head.settings})
        _, head, entries = peeked
        entry = entries.get(setting.name)
        if entry is None or head.queried < self._queried or state.client is not self:
            self._apply_latest(blocking=False)
            return
        # Never back: a full apply refuses rules older than what any setting of this process has.
        self._queried = head.queried
        box = [generation]
        if state.digest == entry.digest and not self._reapply_all:
            setting._set_state(state.reboxed(box, state.digest))
            return
        try:
            blobs = transport.copy_blobs(generation, [entry.blob])
        except SegmentError:
            self._apply_latest(blocking=False)
            return
        if blobs is not None:  # else published again meanwhile: the next get() tries
            self._defer_install(setting, blobs[0], entry.digest, head.context_features, box)

    def _apply_from(self, transport: Any) -> None:
        def seen(generation: int) -> bool:
            return generation == self._applied_generation

        def mark(generation: int) -> None:
            self._applied_generation = generation

        for _ in range(100):
            generation = transport.generation()
            if seen(generation):
                return
            try:
                read = transport.read_head()
                if read is None or seen(read.generation):
                    return
                head = decode_head(read.head)
            except SnapshotFencedError as e:
                # A leader that was replaced published late: never read it (the leader in charge
                # republishes once rung). Remembered, so that get() does not retry it on every call.
                logger.warning("ignoring a snapshot of a replaced leader; keeping the previous rules: %s", e)
                mark(generation)
                self._segment_damaged()
                return
            except (SegmentError, ValueError, msgspec.DecodeError):
                # Keep serving what we have; remember this generation so that
                # get() does not retry it on every call. The leader repairs
                # the segment with its next publish (a new generation).
                logger.exception("the shared segment is unreadable; keeping the previous rules")
                mark(generation)
                self._segment_damaged()
                return
            if head.queried < self._queried:
                # Older than what this process applied (a leader resuming after
                # a stop, with a result fetched before it): never go backwards.
                logger.info(
                    "skipping a snapshot older than the applied one", extra={"generation": read.generation}
                )
                mark(read.generation)
                return
            entries = {entry.name: entry for entry in head.settings}
            settings = [s for s in self._settings if s._state.client is self]
            reapply = self._reapply_all
            # A setting's state carries the digest of the blob it was built from.
            failed = self._failed_conversions
            todo = [
                (s, entry)
                for s in settings
                if (entry := entries.get(s.name)) is not None
                and (
                    reapply
                    or s._state.digest != entry.digest
                    or failed.get(s, read.generation) != read.generation  # failed on an earlier snapshot
                )
            ]
            indices = sorted({entry.blob for _, entry in todo})
            try:
                blobs = transport.copy_blobs(read.generation, indices) if indices else []
            except SegmentError:
                logger.exception("the shared segment is unreadable; keeping the previous rules")
                mark(generation)
                self._segment_damaged()
                return
            if blobs is None:
                continue  # the leader published again while we read: start over
            by_index = dict(zip(indices, blobs, strict=True))
            box = self._applied_box
            for setting, entry in todo:
                self._defer_install(setting, by_index[entry.blob], entry.digest, head.context_features, box)
            for setting in settings:  # back on the client's box, those get() applied on their own
                state = setting._state
                if state.applied is not box:
                    setting._set_state(state.reboxed(box, state.digest))
            self._reapply_all = False
            self._peeked = None
            for setting in settings:
                if setting.name not in entries:
                    self._apply_outdated_default(setting, head)
            self._head = head
            self._queried = head.queried
            self._release_declared(head)
            mark(read.generation)
            return
        logger.warning("the snapshot kept changing while being read; keeping the previous one")

    def _defer_install(
        self,
        setting: Setting[Any],
        blob: Blob,
        digest: bytes,
        service_order: Sequence[str],
        applied: list[int],
    ) -> None:
        """Keep a setting's new rules (copied now, under modification_lock) for its next get()."""
        previous = setting._state
        earlier = previous.pending
        # What to keep if the new rules turn out unusable: the rules in use, not other waiting ones.
        restore = earlier.restore if isinstance(earlier, _PendingRules) else previous
        pending = _PendingRules(self, setting, blob, digest, service_order, restore)
        setting._defer(self, pending, digest, applied)

    def _release_declared(self, head: Head) -> None:
        """Tell :mod:`heksher_shm._process.main` which settings it holds strongly *head* shows declared.

        A setting is declared once the leader's outcome for its declaration
        is settled (see ``Outcome.settled``). Costs nothing once every
        setting is declared.
        """
        if _main.current() is not self:
            return
        settled: list[Setting[Any]] = []
        for setting in _main.undeclared():
            digest = setting._digest
            outcome = head.outcomes.get(digest)
            if outcome is not None and outcome.settled:
                settled.append(setting)
                if outcome.error is not None:  # for set_as_main()/reload() to raise, as heksher 0.2.2 does
                    self._released_failures[digest] = setting.name
        _main.declared(settled)

    def _apply_outdated_default(self, setting: Setting[Any], head: Head) -> None:
        outcome = head.outcomes.get(setting._digest)
        if outcome is None or outcome.default is None:
            return
        try:
            converted = self._convert_default(setting, outcome.default)
        except Exception as e:  # raised by a validator or on_coerce: the previous default stays
            self._conversion_failed(setting, e)
            return
        if converted:
            setting._install_state(self, setting._state.rules)

    def _conversion_failed(self, setting: Setting[Any], error: Exception) -> None:
        """A validator or ``on_coerce`` raised *error* (not a TypeError) on *setting*'s new values.

        The previous rules and default stay in use until the next snapshot;
        the error is logged and handed to ``on_update_error``, whose own
        errors are logged: nothing of this reaches the ``get()`` that ran it.
        """
        logger.warning(
            "converting new values of setting %s failed: %r; its previous ones stay until the next update",
            setting.name,
            error,
            extra={"setting_name": setting.name, "error": repr(error)},
        )
        logger.debug("the conversion error of setting %s", setting.name, exc_info=error)
        try:
            self.on_update_error(error)
        except Exception:
            logger.exception("update callback raised", extra={"setting_name": setting.name})

    def _convert_default(self, setting: Setting[Any], raw_json: bytes) -> bool:
        raw = _json_decoder.decode(raw_json)
        try:
            converted = setting._convert(raw, None)
        except TypeError:
            logger.warning(
                "setting default value discarded due to conversion error",
                exc_info=True,
                extra={"setting_name": setting.name, "new_default": raw},
            )
            return False
        if converted.coercions:
            logger.warning(
                "setting default value coerced to local value",
                extra={"setting_name": setting.name, "new_default": raw, "coercions": converted.coercions},
            )
        setting.server_default_value = converted.value
        return True

    def _install(
        self,
        setting: Setting[Any],
        blob: SettingBlob,
        service_order: Sequence[str],
        digest: bytes,
        applied: list[int],
    ) -> None:
        """Convert one setting's raw rules with its own type and validators, filter, compile, swap in."""
        position = {f: i for i, f in enumerate(service_order)}
        features = sorted(
            setting.configurable_features,
            key=lambda f: (position.get(f, len(position)), setting.configurable_features.index(f)),
        )
        feature_set = frozenset(features)
        tracked = self._tracked
        rules: list[tuple[Sequence[tuple[str, str]], Any]] = []
        rejected: list[tuple[int, str]] = []
        coerced: list[tuple[int, Sequence[str]]] = []
        for record in blob.rules:
            conditions = record.conditions
            unknown = {f for f, _ in conditions} - feature_set
            if unknown:
                rejected.append((record.rule_id, f"rule refers to unrecognized features {sorted(unknown)}"))
                continue
            if not all(tracked.get(f) == TRACK_ALL or v in tracked.get(f, ()) for f, v in conditions):
                continue  # another process tracks these contexts; this one does not
            # Lists of [feature, value] lists, the service's JSON as heksher 0.2.2 hands it to validators.
            rule = QueriedRule(record.rule_id, [list(pair) for pair in conditions])
            try:
                raw = _json_decoder.decode(record.value)
            except msgspec.DecodeError as e:
                rejected.append((record.rule_id, f"rule value rejected: {e!r}"))
                continue
            # Only a TypeError rejects one value; anything else a validator or on_coerce raises
            # fails the whole update of this setting (see _PendingRules), as in heksher 0.2.2.
            try:
                converted = setting._convert(raw, rule)
            except TypeError as e:
                rejected.append((record.rule_id, f"rule value could not be converted: {e!r}"))
                continue
            if converted.coercions:
                coerced.append((record.rule_id, converted.coercions))
            rules.append((conditions, converted.value))
        if rejected:
            logger.warning(
                "setting update rejected rules",
                extra={"setting_name": setting.name, "rejected_rules": rejected},
            )
        if coerced:
            logger.info(
                "setting update coerced values", extra={"setting_name": setting.name, "coercions": coerced}
            )
        self._convert_default(setting, blob.default)
        setting._install_state(self, compile_rules(features, rules), digest, applied)
