"""What a request (``set_as_main``, ``reload``) comes to: acknowledged, failed, timed out, or
already served by the current snapshot.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from heksher_shm._model.contexts import covers
from heksher_shm._model.snapshot import Ack
from heksher_shm.clients._core import ClientCore
from heksher_shm.exceptions import LeaderUpdateError

__all__ = ["Answering"]

logger = logging.getLogger("heksher_shm.client")


class Answering(ClientCore):
    """Reads the leader's answers to this process's requests."""

    def _latest_ack(self) -> Ack | None:
        """The leader's latest answer to this process (written where only this process reads it)."""
        return self._host.read_ack()

    def _take_ack(self) -> None:
        """From an apply (under ``modification_lock``): take the leader's latest answer."""
        ack = self._latest_ack()
        if ack is not None and (self._ack is None or ack.seq >= self._ack.seq):
            self._ack = ack

    def _acked(self, seq: int) -> bool:
        """Whether request *seq* is answered: with an error, or by a snapshot this process applied.

        A successful answer names the snapshot (term, generation) that serves
        the request; it counts once this process applied that snapshot or a
        later one of the same term. An answer from an earlier term does not
        count (its leader was replaced: the new one answers again).
        """
        ack = self._ack
        if ack is None or ack.seq < seq:
            return False
        if ack.error is not None:
            return True
        head = self._head
        return head is not None and head.term == ack.term and self._applied_generation >= ack.generation

    def _progress(self, seq: int) -> float:
        """What counts as progress towards request *seq* (waits time out on lack of it): the leader's
        progress, until a published snapshot answers the request. From then on only this process's
        own apply is awaited, and it cannot come while the caller holds ``modification_lock``: that
        wait then times out after ``startup_timeout``, whatever the leader does meanwhile."""
        ack = self._latest_ack()
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
        ack = self._ack
        if ack is not None and ack.error is not None and ack.seq >= seq:
            problems.append(f"the update failed: {ack.error}")
            original = original or self._errors.get(ack.error_id)
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
