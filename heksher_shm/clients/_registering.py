"""Registering: how a process tells whoever leads what it needs (declarations, tracked contexts,
requests), and keeps its registration and doorbell in place.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from heksher_shm._engine.host import Wish
from heksher_shm._engine.shared import SharedHost
from heksher_shm._model.contexts import TRACK_ALL
from heksher_shm._model.protocol import DeclarationBody
from heksher_shm._shm.identity import current_identity
from heksher_shm._shm.registration import Registration
from heksher_shm._shm.segment import Segment
from heksher_shm.clients._core import ClientCore, request_numbers
from heksher_shm.exceptions import SegmentError
from heksher_shm.setting import Setting

__all__ = ["Registering"]

logger = logging.getLogger("heksher_shm.client")


class Registering(ClientCore):
    """Writes this process's registration and rings the leader."""

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
        self._reload_seq = request_numbers.next()
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
            self._local_host.touch()
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

    def _housekeep(self) -> bool:
        """The background loop's chores at a wake (:class:`~heksher_shm._engine.effects.Housekeep`);
        whether the segment file was replaced."""
        self._flush_wish()
        return self._ensure_registered()

    def _ensure_registered(self) -> bool:
        """Write this process's registration again if it vanished (a leader that wrongly judged this
        process dead may have pruned it; someone may have cleaned the folder). Returns whether the
        segment file was replaced (and reopened)."""
        parts = self._parts
        if parts is None or not self._main or self._closed:
            return False
        replaced = parts.segment.is_replaced()
        if replaced:
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
        return replaced

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
        if isinstance(self._host, SharedHost):
            self._host.replace_parts(parts)
        self._reinstall_all()  # states watch the new file's generation word

    def _leave_shared(self) -> None:
        """On close: take this process's registration and doorbell away (the segment stays for the others)."""
        parts, neighbours = self._parts, self._neighbours
        if parts is not None and self._main:  # a replaced main client's registration is the new one's
            try:
                parts.registry.remove()
                parts.segment.bump_registry_seq()
            except (OSError, SegmentError):
                logger.warning("could not remove this process's registration", exc_info=True)
        if neighbours is not None:
            neighbours.close()

    def _segment_damaged(self) -> None:
        """A snapshot failed its checks: have whoever leads check the segment (it publishes again)."""
        neighbours = self._neighbours
        if neighbours is None:
            return
        if self._engine.leading:
            self._wake()
        else:
            neighbours.ring_leader()
