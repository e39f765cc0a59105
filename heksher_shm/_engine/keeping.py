"""The hosts' side of the last-known-good file (:mod:`heksher_shm._shm.lastgood`): write it, read it,
say why not."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from heksher_shm._engine.host import Restored
from heksher_shm._shm.lastgood import KeptFile, KeptFileError

__all__ = ["Keeper"]

logger = logging.getLogger("heksher_shm.engine")


class Keeper:
    """A host's last-known-good file (or none: every operation is then a no-op)."""

    def __init__(self, file: KeptFile | None) -> None:
        self.file = file
        self._failing = False

    def keep(self, head: bytes, blobs: Sequence[bytes]) -> None:
        """Write the snapshot just published; a failure is logged when it begins and when it ends."""
        if self.file is None:
            return
        try:
            self.file.write(head, list(blobs), time.time())
        except KeptFileError as error:
            if not self._failing:
                self._failing = True
                logger.warning("cannot keep the last-known-good snapshot: %s", error)
            return
        if self._failing:
            self._failing = False
            logger.warning("the last-known-good snapshot is kept again", extra={"path": str(self.file.path)})

    def restore(self) -> Restored | None:
        """The file's snapshot if it may be served; a refused file is logged, saying why, and not served."""
        if self.file is None:
            return None
        try:
            kept = self.file.read()
        except KeptFileError as error:
            logger.warning("not serving the last-known-good file: %s", error)
            return None
        return None if kept is None else Restored(kept.head, kept.blobs, str(self.file.path))
