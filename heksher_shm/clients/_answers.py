"""What a request (``set_as_main``, ``reload``) came to: :class:`RequestAnswers`.

The leader answers a process's requests with an acknowledgement (an
:class:`~heksher_shm._model.snapshot.Ack`: the latest request number it
served, the snapshot that serves it, and the error if that failed), written
where only this process reads it (the host's ``read_ack``). Every read of
acknowledgements is here, behind :meth:`RequestAnswers.latest_ack`; a
request counts as answered once an apply of this process saw both the
acknowledgement and the snapshot it names.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from heksher_shm._engine.context import ErrorBook
from heksher_shm._model.contexts import covers
from heksher_shm._model.snapshot import Ack
from heksher_shm.clients._contexts import Contexts
from heksher_shm.clients._feed import SettingsFeed
from heksher_shm.clients._link import HostLink
from heksher_shm.exceptions import LeaderUpdateError

__all__ = ["RequestAnswers"]

logger = logging.getLogger("heksher_shm.client")


class RequestAnswers:
    """Reads the leader's answers to this process's requests, and what they mean for the caller.

    Args:
        feed: the applied snapshot (its head holds the declarations' outcomes).
        contexts: the tracked values a snapshot must cover to serve this process.
        link: where the leader's answers are published.
        errors: the exceptions this process's engine met while leading, by
            id (the leader's own process raises the very exception).
        startup_timeout: seconds a request waits without progress.
    """

    def __init__(
        self,
        feed: SettingsFeed,
        contexts: Contexts,
        link: HostLink,
        errors: ErrorBook,
        startup_timeout: float,
    ) -> None:
        self._feed = feed
        self._contexts = contexts
        self._link = link
        self._errors = errors
        self._startup_timeout = startup_timeout
        self._ack: Ack | None = None
        """The leader's latest answer, as of the last apply."""

    # -- reading acknowledgements -----------------------------------------------------------------------

    def latest_ack(self) -> Ack | None:
        """The leader's latest answer to this process (written where only this process reads it)."""
        return self._link.host.read_ack()

    def take(self) -> None:
        """From an apply (under the feed's lock, after the snapshot): take the leader's latest answer
        (answers only move forward)."""
        ack = self.latest_ack()
        if ack is not None and (self._ack is None or ack.seq >= self._ack.seq):
            self._ack = ack

    def acked(self, seq: int) -> bool:
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
        # The snapshot this process applied, not one it settled on without applying (refused, damaged).
        head, accepted = self._feed.head, self._feed.accepted
        return (
            head is not None and head.term == ack.term and accepted is not None and accepted >= ack.generation
        )

    def progress(self, seq: int) -> float:
        """What counts as progress towards request *seq* (waits time out on lack of it): the leader's
        progress, until it answered the request. From then on only this process's own apply is
        awaited, and it cannot come while the caller holds ``modification_lock``: that wait then times
        out after ``startup_timeout``, whatever the leader does meanwhile."""
        ack = self.latest_ack()
        if ack is not None and ack.seq >= seq:
            return -1.0
        return self._link.transport.liveness()[0]

    # -- what an answer means ---------------------------------------------------------------------------

    def timed_out(self, what: str) -> str:
        """The message of a request *what* that saw no progress for ``startup_timeout``."""
        return (
            f"{what}: no progress towards an update for {self._startup_timeout:g} s "
            "(startup_timeout); the leader neither answered nor worked on the request"
        )

    def error(self, seq: int, starting: bool) -> BaseException | None:
        """The error to raise for request *seq*, or None when it went well.

        A setting whose declaration succeeded but that the applied snapshot
        holds no rules for did not go well: the query that followed failed
        (the answer named an earlier snapshot, where the declaration had
        failed, and this process applied a later one before reading it).
        When *starting* (``set_as_main``) and the service cannot be reached but
        a snapshot from an earlier leader covers this process's settings, that
        snapshot serves: a warning is logged instead.
        """
        head = self._feed.head
        problems: list[str] = []
        original: BaseException | None = None
        # Settings released once their declaration failed for good (nobody kept them): reported once, here.
        released = self._feed.take_released_failures()
        unserved: list[str] = []
        if head is not None:
            names = dict(released)
            names.update({s._digest: s.name for s in list(self._feed.settings)})
            held = {entry.name for entry in head.settings}
            for digest, name in names.items():
                outcome = head.outcomes.get(digest)
                if outcome is not None and outcome.error is not None:
                    problems.append(f"declaring {name} failed: {outcome.error}")
                    original = original or self._errors.get(outcome.error_id)
                elif outcome is not None and name not in held and digest not in released:
                    unserved.append(name)
        ack = self._ack
        if ack is not None and ack.error is not None and ack.seq >= seq:
            problems.append(f"the update failed: {ack.error}")
            original = original or self._errors.get(ack.error_id)
        elif head is not None and unserved:
            # Declared, but without rules in this snapshot: no query with them has succeeded. The
            # answer named an earlier snapshot, where their declarations had failed; this later one
            # has their success, and the failure of the query that followed.
            problems.append(
                f"the update failed: {head.error}"
                if head.error
                else f"no rules published for {', '.join(sorted(unserved))}"
            )
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

    def already_served(self) -> bool:
        """Whether the applied snapshot already answers this process, so set_as_main need not wait.

        True when, in this leader's term, every declaration of this process was
        made successfully, every setting is in the snapshot, the query behind
        it succeeded and admitted every value this process tracks. (Its
        registration is written anyway, so the leader keeps serving it.)
        """
        head = self._feed.head
        if head is None or not self._link.joined or not head.ok or head.filters is None:
            return False
        names = {entry.name for entry in head.settings}
        for setting in list(self._feed.settings):
            outcome = head.outcomes.get(setting._digest)
            if outcome is None or outcome.error is not None or setting.name not in names:
                return False
        return covers(head.filters, self._contexts.tracked_lists())

    def _covered_by_snapshot(self, released: Iterable[str] = ()) -> bool:
        """Whether a published snapshot (from an earlier leader) covers all this process's settings
        (and the *released* names: settings nobody kept, whose declaration failed)."""
        head = self._feed.head
        if head is None or not self._link.joined:
            return False
        names = {entry.name for entry in head.settings}
        return all(name in names for name in released) and all(
            setting.name in names for setting in list(self._feed.settings)
        )
