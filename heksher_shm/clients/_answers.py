"""What a request (``set_as_main``, ``reload``) came to: :class:`RequestAnswers`.

The leader answers a process's requests with an acknowledgement (an
:class:`~heksher_shm._model.snapshot.Ack`: the latest request number it
served, and the error if that failed). Every read of acknowledgements is
here, behind :meth:`RequestAnswers.latest_ack` and
:meth:`RequestAnswers.progress`: today they come in the snapshot's head, and
a request counts as answered once the snapshot that acknowledges it was
applied to this process's settings.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import msgspec

from heksher_shm._model.contexts import covers
from heksher_shm._model.snapshot import Ack, Head, decode_head
from heksher_shm.clients._contexts import Contexts
from heksher_shm.clients._feed import SettingsFeed
from heksher_shm.clients._link import HostLink
from heksher_shm.exceptions import LeaderUpdateError, SegmentError

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
        errors: dict[str, BaseException],
        startup_timeout: float,
    ) -> None:
        self._feed = feed
        self._contexts = contexts
        self._link = link
        self._errors = errors
        self._startup_timeout = startup_timeout
        self._ack: Ack | None = None

    # -- reading acknowledgements -----------------------------------------------------------------------

    def note(self, head: Head) -> None:
        """The feed applied (or skipped as older) the snapshot with *head*: take this process's
        acknowledgement from it (acknowledgements only move forward)."""
        ack = head.acks.get(self._link.key)
        if ack is not None and (self._ack is None or ack.seq >= self._ack.seq):
            self._ack = ack

    def latest_ack(self) -> Ack | None:
        """The latest acknowledgement of this process's requests in an applied snapshot, if any."""
        return self._ack

    def acked(self, seq: int) -> bool:
        """Whether request *seq* was answered (in a snapshot this process applied)."""
        ack = self.latest_ack()
        return ack is not None and ack.seq >= seq

    def progress(self, seq: int) -> float:
        """What counts as progress towards request *seq* (waits time out on lack of it): the leader's
        progress, until a published snapshot answers the request. From then on only this process's
        own apply is awaited, and it cannot come while the caller holds ``modification_lock``: that
        wait then times out after ``startup_timeout``, whatever the leader does meanwhile."""
        transport = self._link.transport
        try:
            read = transport.read_head()
            head = decode_head(read.head) if read is not None else None
        except (SegmentError, ValueError, msgspec.DecodeError):
            head = None
        ack = head.acks.get(self._link.key) if head is not None else None
        if ack is not None and ack.seq >= seq:
            return -1.0
        return transport.liveness()[0]

    # -- what an answer means ---------------------------------------------------------------------------

    def timed_out(self, what: str) -> str:
        """The message of a request *what* that saw no progress for ``startup_timeout``."""
        return (
            f"{what}: no progress towards an update for {self._startup_timeout:g} s "
            "(startup_timeout); the leader neither answered nor worked on the request"
        )

    def error(self, seq: int, starting: bool) -> BaseException | None:
        """The error to raise for request *seq*, or None when it went well.

        When *starting* (``set_as_main``) and the service cannot be reached but
        a snapshot from an earlier leader covers this process's settings, that
        snapshot serves: a warning is logged instead.
        """
        head = self._feed.head
        problems: list[str] = []
        original: BaseException | None = None
        # Settings released once their declaration failed for good (nobody kept them): reported once, here.
        released = self._feed.take_released_failures()
        if head is not None:
            names = dict(released)
            names.update({s._digest: s.name for s in list(self._feed.settings)})
            for digest, name in names.items():
                outcome = head.outcomes.get(digest)
                if outcome is not None and outcome.error is not None:
                    problems.append(f"declaring {name} failed: {outcome.error}")
                    original = original or self._errors.get(outcome.error_id)
        ack = self.latest_ack()
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
