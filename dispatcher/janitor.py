"""Deleting the rooms of ended sessions, paced under Daily's delete limit, recorded in the store."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from dispatcher.aio import cancel_and_wait
from dispatcher.logs import session_context
from dispatcher.pacing import Pacer
from dispatcher.rooms import RoomBackend
from dispatcher.store import Session, Store

log = logging.getLogger(__name__)

# Daily allows about 2 room deletes a second (reference/daily.md §2): stay just under it.
ROOM_DELETE_RATE = 1.8
ROOM_DELETE_BURST = 2


class RoomJanitor:
    """Every room delete goes through here: queued, paced, marked done on the session.

    `submit` never waits: a session's end, a failed start and the reconciler hand rooms over and
    go on, so a backlog of deletes (sessions end faster than Daily lets rooms go) slows nothing
    else. A delete that fails is recorded in the session's log and left for the reconciler,
    which submits every terminal session whose room is not marked deleted. Deletes still queued
    when the dispatcher stops are left to the reconciler the same way.
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
        self._pending: dict[str, asyncio.Task[bool]] = {}

    @property
    def queued(self) -> int:
        """Deletes submitted and not done."""
        return len(self._pending)

    def submit(self, session: Session) -> bool:
        """Queue the delete of the session's room (once: a room already queued is not queued
        again); whether a delete was queued."""
        if not session.room_name or session.id in self._pending:
            return False
        task = asyncio.create_task(self.delete(session), name=f"delete room {session.room_name}")
        self._pending[session.id] = task
        task.add_done_callback(lambda _: self._pending.pop(session.id, None))
        return True

    async def join(self) -> None:
        """Wait until every queued delete is done (tests, benchmarks)."""
        while self._pending:
            await asyncio.gather(*self._pending.values(), return_exceptions=True)

    async def aclose(self) -> None:
        """Drop what is still queued: the reconciler deletes those rooms later."""
        await cancel_and_wait(*self._pending.values())

    async def delete(self, session: Session) -> bool:
        """Delete the session's room now, in its turn; whether it is gone."""
        with session_context(session.id, traceparent=session.traceparent):
            return await self._delete(session)

    async def _delete(self, session: Session) -> bool:
        rooms = self._rooms.get(session.transport)
        if not session.room_name or rooms is None:
            return True
        try:
            await rooms.delete(session.room_name, pace=self._pacer.acquire)
        except Exception as exc:
            log.warning("room delete failed: %s", exc)
            await self._store.record(
                session.id, "cleanup_failed", {"what": "room_delete", "error": str(exc)}
            )
            # To the back of the reconciler's queue, so rooms that keep failing starve no other.
            await self._store.update(session.id)
            return False
        await self._store.update(session.id, room_deleted_at=time.time())
        return True
