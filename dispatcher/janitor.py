"""Deleting the rooms of ended sessions, paced under Daily's delete limit, recorded in the store."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from dispatcher.pacing import Pacer
from dispatcher.rooms import RoomBackend
from dispatcher.store import Session, Store

log = logging.getLogger(__name__)

# Daily allows about 2 room deletes a second (reference/daily.md §2): stay just under it.
ROOM_DELETE_RATE = 1.8
ROOM_DELETE_BURST = 2


class RoomJanitor:
    """Every room delete goes through here: paced, and marked done on the session when it is.

    A delete that fails is recorded in the session's log and left for the reconciler, which
    retries every terminal session whose room is not marked deleted.
    """

    def __init__(
        self,
        store: Store,
        rooms: Mapping[str, RoomBackend],
        *,
        rate: float = ROOM_DELETE_RATE,
        burst: int = ROOM_DELETE_BURST,
    ) -> None:
        self._store = store
        self._rooms = rooms
        self._pacer = Pacer(rate, burst, what="room deletes")

    @property
    def queued(self) -> int:
        """Deletes waiting for their turn."""
        return self._pacer.queued

    async def delete(self, session: Session) -> bool:
        """Delete the session's room (if it has one); whether it is gone now."""
        rooms = self._rooms.get(session.transport)
        if not session.room_name or rooms is None:
            return True
        await self._pacer.acquire()
        try:
            await rooms.delete(session.room_name)
        except Exception as exc:
            log.warning("room delete failed: %s", exc, extra={"session_id": session.id})
            await self._store.record(
                session.id, "cleanup_failed", {"what": "room_delete", "error": str(exc)}
            )
            # To the back of the reconciler's queue, so rooms that keep failing starve no other.
            await self._store.update(session.id)
            return False
        await self._store.update(session.id, room_deleted_at=time.time())
        return True
