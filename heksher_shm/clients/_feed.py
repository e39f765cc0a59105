"""The settings of a process, fed from published snapshots: :class:`SettingsFeed`.

One feed per client owns the state of the settings that client serves and
the generation of the snapshot applied to them. It is what a
:class:`~heksher_shm.Setting` talks to (the protocol ``_Feed`` of
:mod:`heksher_shm.setting`): a setting's state watches :attr:`SettingsFeed.published`,
and ``get()`` calls :meth:`SettingsFeed.refresh` when a newer snapshot is out.

Applying a snapshot copies only the blobs that changed; each setting's
rules are decoded, converted, validated and compiled at its next ``get()``
(:class:`_PendingRules`, with :mod:`heksher_shm.clients._conversion`). A
state carries the generation it is current for: a snapshot that leaves a
setting's rules as they are moves that number on, and ``None`` makes the
next ``get()`` refresh the setting.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import msgspec

from heksher_shm._engine.host import HeadCopy
from heksher_shm._model.snapshot import Head, SettingEntry, decode_blob, decode_head
from heksher_shm._process import main as _main
from heksher_shm._process.gc import paused_gc
from heksher_shm._shm.layout import WORD_GENERATION
from heksher_shm.clients._contexts import Contexts
from heksher_shm.clients._conversion import compile_blob, convert_default
from heksher_shm.exceptions import SegmentError, SnapshotFencedError
from heksher_shm.setting import Setting, _ContextView, _State

__all__ = ["Blob", "Gate", "SettingsFeed", "Snapshots", "settings_of"]

logger = logging.getLogger("heksher_shm.client")


class Blob(Protocol):
    """A blob taken from a snapshot to be decoded later (``copy_blobs``)."""

    def verified(self) -> bytes | memoryview:
        """Its bytes, checked; raises :class:`~heksher_shm.exceptions.SegmentCorruptedError` if damaged."""
        ...


class Snapshots(Protocol):
    """Where a feed reads snapshots: the shared segment, or the in-process host."""

    @property
    def words(self) -> Any:
        """The header as 8-byte words; item ``WORD_GENERATION`` is the published generation."""
        ...

    def generation(self) -> int: ...

    def read_head(self) -> HeadCopy | None: ...

    def copy_blobs(self, generation: int, indices: Sequence[int]) -> Sequence[Blob] | None: ...


class Gate(Protocol):
    """What a feed needs of its client's runner (the thread or the asyncio one)."""

    def try_enter(self) -> bool:
        """Take ``modification_lock`` if that takes no waiting (``get()`` never waits for it)."""
        ...

    def leave(self) -> None:
        """Give back what :meth:`try_enter` took."""
        ...

    def notify_applied(self) -> None:
        """A snapshot was applied: wake whoever waits for an answer (``set_as_main``, ``reload``)."""
        ...


def settings_of(objects: Iterable[object]) -> list[Setting[Any]]:
    """The settings among what :mod:`heksher_shm._process.main` hands back (it holds them by protocol)."""
    return [s for s in objects if isinstance(s, Setting)]


class SettingsFeed:
    """Applies published snapshots to the settings one client serves, and knows which one it applied.

    Args:
        contexts: the client's defaults and tracked values.
        transport: where snapshots are read (the in-process stand-in until
            the client joins its host's segment; see :meth:`move_to`).
        gate: the client's runner.
        is_main: whether the client is the process's main client (only it
            tells :mod:`heksher_shm._process.main` which settings are declared).
        damaged: a snapshot failed its checks (whoever leads should check the segment).
        update_failed: a validator or ``on_coerce`` raised; for ``on_update_error``.
        applied: a full apply ended (under the feed's lock, after the
            snapshot): whoever reads the leader's answers takes the latest.
    """

    def __init__(
        self,
        contexts: Contexts,
        transport: Snapshots,
        gate: Gate,
        *,
        is_main: Callable[[], bool],
        damaged: Callable[[], None],
        update_failed: Callable[[Exception], None],
        applied: Callable[[], None],
    ) -> None:
        self._contexts = contexts
        self._gate = gate
        self._is_main = is_main
        self._damaged = damaged
        self._update_failed = update_failed
        self._applied = applied
        self.settings: weakref.WeakSet[Setting[Any]] = weakref.WeakSet()
        self.applied: int | None = None
        """The generation of the snapshot applied to every setting (None: none yet, or every setting is
        to be visited again at the next apply)."""
        self.head: Head | None = None
        """The head of the snapshot applied last."""
        self.accepted: int | None = None
        """The generation of :attr:`head`: the snapshot applied last (unlike :attr:`applied`, never one
        refused, damaged or older: those are settled on, not applied)."""
        self._queried = 0.0
        self._reapply = False
        """Every setting is to be rebuilt from the next snapshot, whatever its blob digest."""
        self._peeked: tuple[int, Head, dict[str, SettingEntry]] | None = None
        """The head get() decoded to apply one setting (see _apply_one), until the full apply."""
        self._released_failures: dict[str, str] = {}
        """Declaration digest -> setting name, of settings released after their declaration failed."""
        self._failed_conversions: weakref.WeakKeyDictionary[Setting[Any], int | None] = (
            weakref.WeakKeyDictionary()
        )
        """Settings whose new rules a validator or on_coerce failed on, and the generation they came in."""
        # Reentrant: validators run while it is held, and may call get() on other settings.
        self.lock = threading.RLock()
        self._transport = transport
        self.published = _generation_word(transport)

    # -- what a Setting sees (heksher_shm.setting._Feed) -----------------------------------------------------

    def context_view(self) -> _ContextView:
        return self._contexts.view()

    def refresh(self, setting: Setting[Any]) -> None:
        """From ``get()``: a new snapshot is out. Apply it to *setting* now, unless that would block
        (then the old rules answer); the background loop applies it to the others shortly."""
        if not self._gate.try_enter():
            return
        try:
            if self.lock.acquire(blocking=False):
                try:
                    self._apply_one(setting)
                finally:
                    self.lock.release()
        finally:
            self._gate.leave()

    # -- what the client does with it ------------------------------------------------------------------------

    def move_to(self, transport: Snapshots) -> None:
        """Read snapshots from *transport* from now on (the client joined its host's segment, or the
        segment file was replaced). Settings' states watch the old one until they are rebuilt."""
        with self.lock:
            self._transport = transport
            self.published = _generation_word(transport)
            self.applied = None
            self._peeked = None

    def adopt(self, settings: Iterable[Setting[Any]]) -> None:
        """Serve these settings from now on (they were created, or this client became main).

        Under the lock: an apply running meanwhile must not mark them current for a snapshot it did not
        apply to them.
        """
        with self.lock:
            for setting in settings:
                self.settings.add(setting)
                setting._install_state(self, None)
            self.applied = None

    def apply_latest(self, blocking: bool = True, notify: bool = True) -> None:
        """Apply the newest snapshot to the settings.

        Call with ``modification_lock`` held. Only settings whose blob changed
        are copied, and they are decoded and converted at their next ``get()``.
        *notify*: wake the waiters of ``set_as_main``/``reload`` (the background
        loop does that itself, after the callbacks).
        """
        if self.lock.acquire(blocking=blocking):
            # The head and a new state per changed setting are thousands of small objects, made in
            # one go (often by a get() that waits for them): no collection needs to run in between.
            try:
                with paused_gc():
                    self._apply_from(self._transport)
                # After the snapshot: a request counts as answered once an apply saw both (so a
                # reload() made while holding modification_lock waits, as documented).
                self._applied()
            finally:
                self.lock.release()
        if notify:
            self._gate.notify_applied()

    def reapply_all(self) -> None:
        """Rebuild every setting from the next snapshot (tracked values changed): each is made stale."""
        with self.lock:
            self._reapply = True
            self._make_stale()

    def make_stale(self) -> None:
        """Have the next ``get()`` of every setting refresh it (as after ``fork()``, where the async
        client restarts its task from there)."""
        with self.lock:
            self._make_stale()

    def reinstall_all(self) -> None:
        """Rebuild every setting's state (defaults changed, or a new segment file): caches must not
        outlive them."""
        with self.lock:
            self._reapply = True
            self.applied = None
        # Not under the lock: compiling waiting rules may call on_update_error, which may do anything.
        for setting in self._served():
            pending = setting._state.pending
            if pending is not None:
                pending()  # compile the rules it has before rebuilding around them
            setting._install_state(self, setting._state.rules)

    def take_released_failures(self) -> dict[str, str]:
        """Declaration digest -> name of settings released once their declaration failed for good (nobody
        kept them), since the last call."""
        with self.lock:
            released, self._released_failures = self._released_failures, {}
        return released

    def renew_lock(self) -> None:
        """A new lock (see :meth:`heksher_shm.clients._background.Background.renew_locks`)."""
        self.lock = threading.RLock()

    # -- applying --------------------------------------------------------------------------------------------

    def _served(self) -> list[Setting[Any]]:
        """The settings this feed serves now (another client may have taken some since)."""
        return [s for s in self.settings if s._state.feed is self]

    def _make_stale(self) -> None:
        self.applied = None
        for setting in self._served():
            setting._mark_current(None)

    def _settle(self, generation: int) -> None:
        """Keep every setting's rules, as current for *generation* (a snapshot not to apply)."""
        for setting in self._served():
            setting._mark_current(generation)
        self.applied = generation

    def _apply_one(self, setting: Setting[Any]) -> None:
        """Apply the newest snapshot to *setting* alone (see "What a follower does on get()").

        The setting's state then shows the snapshot's generation, so that its
        ``get()`` stops seeing a new snapshot; the next full apply visits it
        again. Anything out of the ordinary (no such setting in the snapshot,
        an older snapshot, a damaged segment) is left to the full apply, which
        handles it for all.
        """
        transport = self._transport
        generation = transport.generation()
        state = setting._state
        if generation == self.applied:
            if state.feed is self:
                setting._mark_current(generation)
            return
        peeked = self._peeked
        if peeked is None or peeked[0] != generation:
            try:
                read = transport.read_head()
                if read is None or read.generation != generation:
                    return  # nothing published, or published again meanwhile: the next get() tries
                head = decode_head(read.head)
            except (SegmentError, ValueError, msgspec.DecodeError):
                self.apply_latest(blocking=False)  # it logs, and marks the generation seen
                return
            peeked = self._peeked = (generation, head, {entry.name: entry for entry in head.settings})
        _, head, entries = peeked
        entry = entries.get(setting.name)
        if entry is None or head.queried < self._queried or state.feed is not self:
            self.apply_latest(blocking=False)
            return
        # Never back: a full apply refuses rules older than what any setting of this process has.
        self._queried = head.queried
        if state.digest == entry.digest and not self._reapply:
            setting._mark_current(generation)
            return
        try:
            blobs = transport.copy_blobs(generation, [entry.blob])
        except SegmentError:
            self.apply_latest(blocking=False)
            return
        if blobs is not None:  # else published again meanwhile: the next get() tries
            self._defer_install(setting, blobs[0], entry.digest, head.context_features, generation)

    def _apply_from(self, transport: Snapshots) -> None:
        for _ in range(100):
            generation = transport.generation()
            if generation == self.applied:
                return
            try:
                read = transport.read_head()
                if read is None or read.generation == self.applied:
                    return
                head = decode_head(read.head)
            except SnapshotFencedError as e:
                # A leader that was replaced published late: never read it (the leader in charge
                # republishes once rung). Settled on, so that get() does not retry it on every call.
                logger.warning("ignoring a snapshot of a replaced leader; keeping the previous rules: %s", e)
                self._settle(generation)
                self._damaged()
                return
            except (SegmentError, ValueError, msgspec.DecodeError):
                # Keep serving what we have; settle on this generation so that
                # get() does not retry it on every call. The leader repairs
                # the segment with its next publish (a new generation).
                logger.exception("the shared segment is unreadable; keeping the previous rules")
                self._settle(generation)
                self._damaged()
                return
            if head.queried < self._queried:
                # Older than what this process applied (a leader resuming after
                # a stop, with a result fetched before it): never go backwards.
                logger.info(
                    "skipping a snapshot older than the applied one", extra={"generation": read.generation}
                )
                self._settle(read.generation)
                return
            entries = {entry.name: entry for entry in head.settings}
            settings = self._served()
            reapply = self._reapply
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
                blobs = _copy_checked(transport, read.generation, indices)
            except SegmentError:
                logger.exception("the shared segment is unreadable; keeping the previous rules")
                self._settle(generation)
                self._damaged()
                return
            if blobs is None:
                continue  # the leader published again while we read: start over
            by_index = dict(zip(indices, blobs, strict=True))
            for setting, entry in todo:
                self._defer_install(
                    setting, by_index[entry.blob], entry.digest, head.context_features, read.generation
                )
            changed = {setting for setting, _ in todo}
            for setting in settings:  # the rest keep their rules, current for this snapshot too
                if setting not in changed:
                    setting._mark_current(read.generation)
            self._reapply = False
            self._peeked = None
            for setting in settings:
                if setting.name not in entries:
                    self._apply_outdated_default(setting, head, read.generation)
            self.head, self.accepted = head, read.generation
            self._queried = head.queried
            self._release_declared(head)
            self.applied = read.generation
            return
        logger.warning("the snapshot kept changing while being read; keeping the previous one")

    def _defer_install(
        self, setting: Setting[Any], blob: Blob, digest: bytes, service_order: Sequence[str], generation: int
    ) -> None:
        """Keep a setting's new rules (copied now, under modification_lock) for its next get()."""
        previous = setting._state
        earlier = previous.pending
        # What to keep if the new rules turn out unusable: the rules in use, not other waiting ones.
        restore = earlier.restore if isinstance(earlier, _PendingRules) else previous
        pending = _PendingRules(self, setting, blob, digest, service_order, restore)
        setting._defer(self, pending, digest, generation)

    def _release_declared(self, head: Head) -> None:
        """Tell :mod:`heksher_shm._process.main` which settings it holds strongly *head* shows declared.

        A setting is declared once the leader's outcome for its declaration
        is settled (see ``Outcome.settled``). Costs nothing once every
        setting is declared.
        """
        if not self._is_main():
            return
        settled: list[Setting[Any]] = []
        for setting in settings_of(_main.undeclared()):
            digest = setting._digest
            outcome = head.outcomes.get(digest)
            if outcome is not None and outcome.settled:
                settled.append(setting)
                if outcome.error is not None:  # for set_as_main()/reload() to raise, as heksher 0.2.2 does
                    self._released_failures[digest] = setting.name
        _main.declared(settled)

    def _apply_outdated_default(self, setting: Setting[Any], head: Head, generation: int) -> None:
        outcome = head.outcomes.get(setting._digest)
        if outcome is None or outcome.default is None:
            return
        try:
            converted = convert_default(setting, outcome.default)
        except Exception as e:  # raised by a validator or on_coerce: the previous default stays
            self._conversion_failed(setting, e)
            return
        if converted:
            setting._install_state(self, setting._state.rules, None, generation)

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
            self._update_failed(error)
        except Exception:
            logger.exception("update callback raised", extra={"setting_name": setting.name})


class _PendingRules:
    """A setting's new rules, copied from a snapshot, decoded and installed at its next ``get()``."""

    __slots__ = ("blob", "digest", "feed", "restore", "service_order", "setting")

    def __init__(
        self,
        feed: SettingsFeed,
        setting: Setting[Any],
        blob: Blob,
        digest: bytes,
        service_order: Sequence[str],
        restore: _State,
    ) -> None:
        self.feed, self.setting, self.blob, self.digest = feed, setting, blob, digest
        self.service_order = service_order
        self.restore = restore
        """The state to go back to if these rules are unusable: the last one that was not waiting."""

    def __call__(self) -> None:
        feed, setting = self.feed, self.setting
        failure: Exception | None = None
        with feed.lock:
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
                feed._damaged()
                # digest None: rebuild it from the next snapshot, whatever that holds for it
                setting._restore(self.restore, None, state.generation)
                return
            try:
                with paused_gc():
                    rules = compile_blob(setting, blob, self.service_order, feed._contexts.tracked)
                    setting._install_state(feed, rules, self.digest, state.generation)
            except Exception as e:  # raised by a validator or on_coerce (a TypeError only rejects a value)
                failure = e
                # The previous rules stay, under this blob's digest so that applying this snapshot
                # again leaves them be; the next snapshot tries again (see _apply_from).
                setting._restore(self.restore, self.digest, state.generation)
                feed._failed_conversions[setting] = state.generation
            else:
                feed._failed_conversions.pop(setting, None)
        if failure is not None:
            # Outside the lock: the callback may do anything, even wait for an update.
            feed._conversion_failed(setting, failure)


def _copy_checked(transport: Snapshots, generation: int, indices: Sequence[int]) -> Sequence[Blob] | None:
    """The blobs at *indices* of snapshot *generation*, their checksums checked now (raises
    :class:`~heksher_shm.exceptions.SegmentCorruptedError`), for a full apply: a snapshot damaged since
    it was published is not applied, so that a request it answers waits for the leader's repair rather
    than returning with the previous rules (its settings' next ``get()`` would keep them)."""
    blobs = transport.copy_blobs(generation, indices) if indices else []
    for blob in blobs or ():
        blob.verified()
    return blobs


def _generation_word(transport: Snapshots) -> memoryview:
    """A live one-word view of *transport*'s published generation (item ``WORD_GENERATION`` of the
    header words the shared segment and the in-process stand-in both keep), for ``get()`` to read."""
    return memoryview(transport.words)[WORD_GENERATION : WORD_GENERATION + 1]
