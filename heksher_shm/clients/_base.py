"""What the async and thread clients share: everything but how they wait and do HTTP.

A client here is the *front end* of one process: it holds the context
defaults and tracked contexts, registers the process's wishes (declarations,
tracked contexts, reload requests) where the leader reads them, and applies
published snapshots to the process's settings. The background work itself is
:class:`heksher_shm._engine.Engine`, driven by each client in its own way.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
import weakref
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Literal

import msgspec

from heksher_shm._engine.engine import Engine
from heksher_shm._engine.local import LocalLock, LocalSource, LocalTransport
from heksher_shm._engine.ports import Blob, Wish
from heksher_shm._engine.shared import (
    SEGMENT_NAME,
    Neighbours,
    RegistrySource,
    SharedParts,
    open_shared,
    wish_key,
)
from heksher_shm._model.contexts import TRACK_ALL, covers
from heksher_shm._model.protocol import DeclarationBody
from heksher_shm._model.resolve import compile_rules
from heksher_shm._model.snapshot import Ack, Head, SettingBlob, SettingEntry, decode_blob, decode_head
from heksher_shm._process import main as _main
from heksher_shm._process.gc import paused_gc
from heksher_shm._process.servers import check_background_threads
from heksher_shm._shm.identity import current_identity
from heksher_shm._shm.registry import Registration
from heksher_shm._shm.segment import Segment
from heksher_shm.clients._defaults import ContextDefaults
from heksher_shm.exceptions import LeaderUpdateError, SegmentError
from heksher_shm.setting import QueriedRule, Setting, _ContextView, _State
from heksher_shm.status import SegmentStatus, segment_status

__all__ = ["BaseHeksherClient"]

logger = logging.getLogger("heksher_shm.client")

_UNTRACKED_WARNINGS = 1024


class _PendingRules:
    """A setting's new rules, copied from a snapshot, decoded and installed at its next ``get()``."""

    __slots__ = ("blob", "client", "digest", "restore", "service_order", "setting")

    def __init__(
        self,
        client: BaseHeksherClient,
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


"""Distinct untracked context values warned about (once each) before falling silent."""

_json_decoder = msgspec.json.Decoder()

_bell_numbers = itertools.count(1)
"""Numbers this process's doorbells (one per client that joins a segment)."""


class BaseHeksherClient(ContextDefaults):
    """State and logic shared by :class:`AsyncHeksherClient` and :class:`ThreadHeksherClient`."""

    _is_stub = False
    _kind: Literal["async", "thread"]

    def __init__(
        self,
        service_url: str,
        update_interval: float,
        context_features: Sequence[str],
        *,
        http_client_args: Mapping[str, Any] | None = None,
        shared: bool = True,
        shm_dir: str | os.PathLike[str] | None = None,
        segment_name: str | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        _check_arguments(
            service_url, update_interval, context_features, http_client_args, startup_timeout, segment_name
        )
        super().__init__()
        self._service_url = service_url
        self._update_interval = float(update_interval)
        self._context_features = tuple(context_features)
        self._http_client_args = dict(http_client_args or {})
        self._shared = bool(shared)
        self._shm_dir = None if shm_dir is None else os.fspath(shm_dir)
        self._segment_name = segment_name
        self._startup_timeout = float(startup_timeout)

        self._tracked: dict[str, str | set[str]] = {}
        self._warned_untracked: set[tuple[str, str]] = set()

        self._settings: weakref.WeakSet[Setting[Any]] = weakref.WeakSet()
        self._reapply_all = False
        """Set when every setting must be rebuilt from the next snapshot, whatever its blob digest."""
        self._peeked: tuple[int, Head, dict[str, SettingEntry]] | None = None
        """The head get() decoded to apply one setting (see _apply_one), until the full apply."""
        self._released_failures: dict[str, str] = {}
        """Declaration digest -> setting name, of settings released after their declaration failed."""
        self._failed_conversions: weakref.WeakKeyDictionary[Setting[Any], int] = weakref.WeakKeyDictionary()
        """Settings whose new rules a validator or on_coerce failed on, and the generation they came in."""
        # Reentrant: validators run while it is held, and may call get() on other settings.
        self._apply_lock = threading.RLock()
        # A list, not an int: settings' states share it, so get() compares the
        # segment's generation word with it without calling into the client.
        self._applied_box = [-1]
        self._queried = 0.0
        self._head: Head | None = None
        self._ack = Ack(0)
        self._reload_seq = 0
        self._query_seq = 0
        self._wish_dirty = False
        """A setting was added since the registration was written: the background loop writes it."""
        self._errors: dict[str, BaseException] = {}
        self._main = False
        self._closed = False
        self._parts: SharedParts | None = None
        self._neighbours: Neighbours | None = None
        self._registered = b""
        """What this process last wrote as its registration (empty until set_as_main writes it)."""
        # Held while the registration is computed and written, from set_as_main/reload/track_contexts
        # and from the background loop's housekeeping: the last write carries the latest wish.
        self._register_lock = threading.Lock()
        self._transport: LocalTransport | Segment = LocalTransport()
        self._local_source = LocalSource(self._wish)
        self._key = f"local-{id(self):x}"
        self._engine = self._make_engine()
        self._init_driver()
        _live_clients.add(self)

    def _make_engine(self) -> Engine:
        parts, neighbours = self._parts, self._neighbours
        if parts is None or neighbours is None:
            engine = Engine(
                transport=self._transport,
                lock=LocalLock(),
                source=self._local_source,
                update_interval=self._update_interval,
                context_features=self._context_features,
                identity=(os.getpid(), 0.0, 0),
                errors=self._errors,
                housekeeping=self._flush_wish,
                service_url=self._service_url,
            )
        else:
            identity = current_identity()
            engine = Engine(
                transport=parts.segment,
                lock=parts.lock,
                source=RegistrySource(parts.registry, parts.segment),
                update_interval=self._update_interval,
                context_features=self._context_features,
                identity=(identity.pid, identity.create_time, identity.pidns),
                errors=self._errors,
                key=self._key,
                host=neighbours,
                bell=neighbours.bell_number,
                housekeeping=self._housekeep,
                service_url=self._service_url,
            )
        engine.applied_generation = lambda: self._applied_generation
        return engine

    def _join_shared(self) -> None:
        """Open the host's segment (once): from now on this client leads or follows there."""
        if not self._shared or self._parts is not None:
            return
        parts = open_shared(
            self._service_url, self._context_features, shm_dir=self._shm_dir, segment_name=self._segment_name
        )
        self._key = wish_key(current_identity())
        self._neighbours = Neighbours(parts, self._key, next(_bell_numbers))
        self._parts = parts
        self._transport = parts.segment
        self._applied_generation = -1
        self._engine = self._make_engine()

    @property
    def segment_path(self) -> str | None:
        """The shared segment's file, once this client joined one (``None`` with ``shared=False``)."""
        return None if self._parts is None else str(self._parts.segment.path)

    @property
    def leading(self) -> bool:
        """Whether this client is currently its host's leader (always, alone with ``shared=False``)."""
        return self._engine.leading

    def shared_status(self) -> SegmentStatus:
        """The status of this client's shared segment: leader, generation, freshness, processes, counts.

        Raises:
            heksher_shm.exceptions.SegmentError: not joined to a segment (``shared=False``, or before
                ``set_as_main``).
        """
        return segment_status(self.segment_path)

    # -- documented API shared by both clients ----------------------------------------------------------

    def track_contexts(self, **context_values: str | Collection[str]) -> None:
        """Track context feature values: a string, a collection of strings, or :data:`TRACK_ALL`.

        Only rules whose every condition is on tracked values are used.

        Raises:
            RuntimeError: mixing :data:`TRACK_ALL` and specific values for one feature.
            TypeError: a value that is not a string or a collection of strings.
        """
        unknown = context_values.keys() - set(self._context_features)
        if unknown:
            logger.warning("context features are not specified in server", extra={"redundant_keys": unknown})
        for feature, values in context_values.items():
            existing = self._tracked.get(feature)
            if values == TRACK_ALL:
                if existing is not None and existing != TRACK_ALL:
                    raise RuntimeError("cannot set TRACK_ALL to a feature that's already been used to track")
                self._tracked[feature] = TRACK_ALL
                continue
            new = {values} if isinstance(values, str) else set(values)
            if not all(isinstance(v, str) for v in new):
                raise TypeError(f"tracked values of {feature} must be strings, got {values!r}")
            if existing == TRACK_ALL:
                raise RuntimeError("cannot track a specific value after the feature's been set to TRACK_ALL")
            if existing is None:
                self._tracked[feature] = new
            else:
                assert isinstance(existing, set)
                existing.update(new)
        self._warned_untracked.clear()
        if self._main:
            self._force_reapply()
            self._wish_changed()

    def on_update_error(self, exc: Exception) -> None:
        """Called when a rule update fails. Override to handle errors."""

    def on_update_ok(self) -> None:
        """Called after a successful rule update (including when nothing changed). Override to add one."""

    # -- what settings call (see heksher_shm.setting._Client) ------------------------------------------

    def _context_view(self) -> _ContextView:
        return _ContextView(
            self._const_defaults, tuple(self._var_defaults.items()), self._tracked, self._warn_untracked
        )

    def _warn_untracked(self, feature: str, value: str) -> None:
        warned = self._warned_untracked
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

    def _after_fork_in_child(self) -> None:
        """In a forked child: forget the parent's threads, loop and HTTP client, and join as a follower.

        Nothing here unlocks or unlinks anything of the parent's: the election
        lock's descriptor is closed (not unlocked) by its own fork hook, and the
        parent's doorbell and leader watch are closed, never removed.
        """
        self._apply_lock = threading.RLock()
        self._register_lock = threading.Lock()
        self._close_driver_in_child()
        if self._neighbours is not None:
            self._neighbours.forget_inherited()
            self._neighbours = None
        if self._parts is not None:
            self._key = wish_key(current_identity())
            if not self._closed:
                try:
                    self._neighbours = Neighbours(self._parts, self._key, next(_bell_numbers))
                except SegmentError:
                    logger.exception("cannot listen for the leader after fork; rules still come on get()")
        self._engine = self._make_engine()
        self._init_driver()
        if self._main and not self._closed:
            self._wish_changed()
            self._restart_after_fork()

    def _init_driver(self) -> None:
        """Create what the driver owns: ``modification_lock``, the HTTP client, events.

        Called at construction and again in a forked child, where it replaces
        whatever the parent's threads may have held at fork time.
        """
        raise NotImplementedError

    def _restart_after_fork(self) -> None:
        """Resume background work in the child."""
        raise NotImplementedError

    def _close_driver_in_child(self) -> None:
        """In a forked child, before ``_init_driver``: close descriptors the parent's driver owned."""

    @property
    def _applied_generation(self) -> int:
        """The generation of the shared snapshot applied to this process's settings."""
        return self._applied_box[0]

    @_applied_generation.setter
    def _applied_generation(self, generation: int) -> None:
        self._applied_box[0] = generation

    def _watch(self) -> tuple[Any, list[int]]:
        """What get() compares: the transport's words (item 2 is the generation) and the applied box."""
        return self._transport.words, self._applied_box

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

    def _try_modification_lock(self) -> bool:
        raise NotImplementedError

    def _release_modification_lock(self) -> None:
        raise NotImplementedError

    def _notify_applied(self) -> None:
        """Wake whoever waits for an acknowledgement (set_as_main, reload)."""

    # -- main client -----------------------------------------------------------------------------------

    def _become_main(self) -> None:
        """Become the process's main client. ``set_as_main`` then registers what it needs, asking the
        leader for a query only if the current snapshot does not serve it already (see
        :meth:`_register_as_main`)."""
        if self._closed:
            raise RuntimeError("this client is closed")
        check_background_threads()
        self._join_shared()
        settings = _main.set_main(self)
        self._main = True
        for setting in settings:
            self._settings.add(setting)
            setting._install_state(self, None)
        self._applied_generation = -1

    def _register_as_main(self) -> int | None:
        """Write this process's registration, once the current snapshot is applied.

        Returns the request number to wait for, or None when the snapshot
        already serves this process (then nobody queries on its behalf, so a
        new preforked worker costs the service nothing).
        """
        if self._already_served():
            self._wish_changed()
            return None
        return self._request_reload(query=False)

    def _setting_added(self, setting: Setting[Any]) -> None:
        self._settings.add(setting)
        setting._install_state(self, None)
        self._applied_generation = -1
        # Written by the background loop at its next wake: a thousand settings made one by one
        # after set_as_main cost one registration write, not a thousand growing ones.
        self._wish_dirty = True
        self._wake()

    def _request_reload(self, query: bool = True) -> int:
        """A new request to the leader: a fresh query (``reload``), or only declarations and a covering
        snapshot (``set_as_main``, ``track_contexts``). Returns its number, to wait for."""
        self._reload_seq += 1
        if query:
            self._query_seq = self._reload_seq
        self._wish_changed()
        return self._reload_seq

    def _wish(self) -> Wish:
        declarations: dict[str, DeclarationBody] = {}
        for setting in list(self._settings):
            declarations.setdefault(setting._digest, setting._declaration_body())
        tracked = {f: (v if v == TRACK_ALL else sorted(v)) for f, v in self._tracked.items()}
        return Wish(self._key, declarations, tracked, self._reload_seq, self._query_seq)

    def _wish_changed(self) -> None:
        """Tell whoever leads what this process wants now: write the registration, then ring."""
        parts, neighbours = self._parts, self._neighbours
        if parts is None:
            self._wish_dirty = False
            self._local_source.touch()
        elif not self._closed:
            with self._register_lock:
                self._wish_dirty = False
                identity = current_identity()
                declarations = {s._digest: s._declaration_json for s in list(self._settings)}
                tracked = {f: (v if v == TRACK_ALL else sorted(v)) for f, v in self._tracked.items()}
                self._registered = parts.registry.write(
                    Registration(
                        pid=identity.pid,
                        create_time=identity.create_time,
                        pidns=identity.pidns,
                        kind=self._kind,
                        declarations=list(declarations.values()),
                        tracked=tracked,
                        reload_seq=self._reload_seq,
                        query_seq=self._query_seq,
                    )
                )
            # The file first, then the counter, then the bell: a leader that sees either sees the file.
            parts.segment.bump_registry_seq()
            if neighbours is not None and not self._engine.leading:
                neighbours.ring_leader()
        self._wake()

    def _flush_wish(self) -> None:
        """From the background loop: write the registration if settings were added since."""
        if self._wish_dirty and self._main:
            self._wish_changed()

    def _housekeep(self) -> None:
        self._flush_wish()
        self._ensure_registered()

    def _ensure_registered(self) -> None:
        """Write this process's registration again if it vanished (a leader that wrongly judged this
        process dead may have pruned it; someone may have cleaned the folder)."""
        parts = self._parts
        if parts is None or not self._main or self._closed:
            return
        if parts.segment.is_replaced():
            self._reopen_segment()
        if self._neighbours is not None:
            self._neighbours.ensure_bell()
        # Not before set_as_main has registered (it does so once the current snapshot is applied).
        # Judged under the registration lock: a write by another thread must not look like damage.
        with self._register_lock:
            intact = not self._registered or parts.registry.holds(current_identity(), self._registered)
        if not intact:
            logger.warning("this process's registration was missing or damaged; registering again")
            self._wish_changed()

    def _reopen_segment(self) -> None:
        """The segment file was removed or replaced: move to the file now at its path.

        Runs in the background loop (housekeeping), between its steps. The old
        mapping stays valid for readers still holding it; new snapshots go to,
        and come from, the new file.
        """
        parts = self._parts
        assert parts is not None
        logger.warning(
            "the segment file was removed or replaced; reopening it", extra={"path": str(parts.segment.path)}
        )
        segment = Segment.open(parts.segment.path)
        self._parts = parts = dataclasses.replace(parts, segment=segment)
        self._transport = segment
        self._engine.replace_transport(segment)
        source = self._engine.source
        if isinstance(source, RegistrySource):
            source.replace_segment(segment)
        if self._neighbours is not None:
            self._neighbours.replace_parts(parts)
        self._reinstall_all()  # states watch the new file's generation word

    def _leave_shared(self) -> None:
        """On close: take this process's registration and doorbell away (the segment stays for the others)."""
        parts, neighbours = self._parts, self._neighbours
        if parts is not None:
            try:
                parts.registry.remove()
                parts.segment.bump_registry_seq()
            except (OSError, SegmentError):
                logger.warning("could not remove this process's registration", exc_info=True)
        if neighbours is not None:
            neighbours.close()

    def _wake(self) -> None:
        raise NotImplementedError

    def _segment_damaged(self) -> None:
        """A snapshot failed its checks: have whoever leads check the segment (it publishes again)."""
        neighbours = self._neighbours
        if neighbours is None:
            return
        if self._engine.leading:
            self._wake()
        else:
            neighbours.ring_leader()

    def _acked(self, seq: int) -> bool:
        return self._ack.seq >= seq

    def _progress(self, seq: int) -> float:
        """What counts as progress towards request *seq* (waits time out on lack of it): the leader's
        progress, until a published snapshot answers the request. From then on only this process's
        own apply is awaited, and it cannot come while the caller holds ``modification_lock``: that
        wait then times out after ``startup_timeout``, whatever the leader does meanwhile."""
        try:
            read = self._transport.read_head()
            head = decode_head(read.head) if read is not None else None
        except (SegmentError, ValueError, msgspec.DecodeError):
            head = None
        ack = head.acks.get(self._key) if head is not None else None
        if ack is not None and ack.seq >= seq:
            return -1.0
        return self._transport.liveness()[0]

    def _timed_out(self, what: str) -> str:
        return (
            f"{what}: no progress towards an update for {self._startup_timeout:g} s "
            "(startup_timeout); the leader neither answered nor worked on the request"
        )

    def _ack_error(self, seq: int, starting: bool) -> BaseException | None:
        """The error to raise for request *seq*, or None when it went well.

        When *starting* (``set_as_main``) and the service cannot be reached but
        a snapshot from an earlier leader covers this process's settings, that
        snapshot serves: a warning is logged instead.
        """
        head = self._head
        problems: list[str] = []
        original: BaseException | None = None
        # Settings released once their declaration failed for good (nobody kept them): reported once, here.
        with self._apply_lock:
            released, self._released_failures = self._released_failures, {}
        if head is not None:
            names = dict(released)
            names.update({s._digest: s.name for s in list(self._settings)})
            for digest, name in names.items():
                outcome = head.outcomes.get(digest)
                if outcome is not None and outcome.error is not None:
                    problems.append(f"declaring {name} failed: {outcome.error}")
                    original = original or self._errors.get(outcome.error_id)
        if self._ack.error is not None and self._ack.seq >= seq:
            problems.append(f"the update failed: {self._ack.error}")
            original = original or self._errors.get(self._ack.error_id)
        if not problems:
            return None
        if starting and self._covered_by_snapshot(released.values()):
            logger.warning(
                "the service could not be reached; serving the last published snapshot",
                extra={"problems": problems, "published": head.published if head else None},
            )
            return None
        if len(problems) > 1:
            logger.error("several failures", extra={"problems": problems})
        # The leader's own process raises the very exception it met; other
        # processes only have its description.
        return original if original is not None else LeaderUpdateError("; ".join(problems))

    def _already_served(self) -> bool:
        """Whether the applied snapshot already answers this process, so set_as_main need not wait.

        True when, in this leader's term, every declaration of this process was
        made successfully, every setting is in the snapshot, the query behind
        it succeeded and admitted every value this process tracks. (Its
        registration is written anyway, so the leader keeps serving it.)
        """
        head = self._head
        if head is None or self._parts is None or not head.ok or head.filters is None:
            return False
        names = {entry.name for entry in head.settings}
        for setting in list(self._settings):
            outcome = head.outcomes.get(setting._digest)
            if outcome is None or outcome.error is not None or setting.name not in names:
                return False
        return covers(
            head.filters, {f: v if isinstance(v, str) else sorted(v) for f, v in self._tracked.items()}
        )

    def _covered_by_snapshot(self, released: Iterable[str] = ()) -> bool:
        """Whether a published snapshot (from an earlier leader) covers all this process's settings
        (and the *released* names: settings nobody kept, whose declaration failed)."""
        head = self._head
        if head is None or self._parts is None:
            return False
        names = {entry.name for entry in head.settings}
        return all(name in names for name in released) and all(
            setting.name in names for setting in list(self._settings)
        )

    # -- applying snapshots ----------------------------------------------------------------------------

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
        """
        if self._apply_lock.acquire(blocking=blocking):
            # The head and a new state per changed setting are thousands of small objects, made in
            # one go (often by a get() that waits for them): no collection needs to run in between.
            try:
                with paused_gc():
                    self._apply_from(self._transport)
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
                self._take_ack(head)
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
            self._take_ack(head)
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

    def _take_ack(self, head: Head) -> None:
        ack = head.acks.get(self._key)
        if ack is not None and ack.seq >= self._ack.seq:
            self._ack = ack

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
            rule = QueriedRule(record.rule_id, conditions)
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


def _check_arguments(
    service_url: object,
    update_interval: object,
    context_features: object,
    http_client_args: object,
    startup_timeout: object,
    segment_name: object,
) -> None:
    """Refuse a wrong constructor argument at once, naming it (not later, in the background)."""
    if not isinstance(service_url, str) or not service_url:
        raise TypeError(f"service_url must be a non-empty string, got {service_url!r}")
    _check_seconds("update_interval", update_interval)
    if (
        isinstance(context_features, str)
        or not isinstance(context_features, Sequence)
        or not all(isinstance(f, str) for f in context_features)
    ):
        raise TypeError(f"context_features must be a sequence of names, got {context_features!r}")
    if http_client_args is not None and not isinstance(http_client_args, Mapping):
        raise TypeError(f"http_client_args must be a mapping, got {http_client_args!r}")
    _check_seconds("startup_timeout", startup_timeout)
    if segment_name is not None and not (
        isinstance(segment_name, str) and SEGMENT_NAME.fullmatch(segment_name)
    ):
        raise ValueError(f"segment_name must match {SEGMENT_NAME.pattern}, got {segment_name!r}")


def _check_seconds(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


_live_clients: weakref.WeakSet[BaseHeksherClient] = weakref.WeakSet()


def _reset_after_fork() -> None:
    """In a forked child (called by :mod:`heksher_shm._process.fork`, last): every live client resumes."""
    for client in list(_live_clients):
        try:
            client._after_fork_in_child()
        except Exception:
            logger.exception("heksher client could not resume after fork")
