"""Deleting the rooms of ended sessions, paced under Daily's delete limit, recorded in the store.

The pace is shared by every instance on the database when the pacer's bucket is in the store
(dispatcher/app.py). A room whose `exp` passes before its turn needs no delete: no one can join
it, and Daily treats a room past its `exp` as implicitly deleted and garbage-collects it later
(docs/reference/daily.md §3), so it is marked deleted at its `exp` without a call, which keeps
a backlog of deletes from growing without bound when sessions end faster than Daily lets rooms
go.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping

from dispatcher.aio import cancel_and_wait
from dispatcher.cleanup import record_failure
from dispatcher.logs import session_context
from dispatcher.pacing import Pace, Pacer
from dispatcher.rooms import RoomBackend
from dispatcher.rooms.daily import room_exp
from dispatcher.store import Session, Store

log = logging.getLogger(__name__)

# Daily allows about 2 room deletes a second, or 50 per 30 s (reference/daily.md §2): 1.6 a
# second keeps to both (48 per 30 s), and a burst of 1 leaves one of Daily's burst of 2 as a
# margin for deletes that travel unevenly (one sent late, the next on time).
ROOM_DELETE_RATE = 1.6
ROOM_DELETE_BURST = 1
# A room is taken as gone this long after its `exp`: a margin for clocks that disagree.
EXPIRED_MARGIN_S = 60.0


class RoomJanitor:
    """Every room delete goes through here: queued, paced, marked done on the session.

    `submit` never waits: a session's end, a failed start and the reconciler hand rooms over and
    go on, so a backlog of deletes (sessions end faster than Daily lets rooms go) slows nothing
    else. A delete that fails is recorded in the session's log and left for the reconciler,
    which submits every terminal session whose room is not marked deleted. Deletes still queued
    when the dispatcher stops are left to the reconciler the same way. `pacer` paces the
    deletes (this instance's own bucket when not given).
    """

    def __init__(
        self,
        store: Store,
        rooms: Mapping[str, RoomBackend],
        *,
        pacer: Pacer | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._rooms = rooms
        self.pacer = pacer or Pacer(ROOM_DELETE_RATE, ROOM_DELETE_BURST, what="room deletes")
        self._clock = clock
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
        gone_at = room_exp(session.expires_at) + EXPIRED_MARGIN_S
        if session.transport != "daily":
            gone_at = math.inf
        if self._clock() >= gone_at:
            await self._expired(session)
            return True
        try:
            await rooms.open()
            wait = await self.pacer.reserve(bounded=False)
            if self._clock() + wait >= gone_at:
                # Its turn would come after Daily has let the room go: the turn goes back to
                # the rooms behind it, and the room is marked deleted once it has expired.
                await self.pacer.cancel()
                await asyncio.sleep(max(0.0, gone_at - self._clock()))
                await self._expired(session)
                return True
            if wait > 0:
                await asyncio.sleep(wait)
            await rooms.delete(session.room_name, pace=self._retries())
        except Exception as exc:
            log.warning("room delete failed: %s", exc)
            await record_failure(self._store, session.id, "room_delete", exc)
            # To the back of the reconciler's queue, so rooms that keep failing starve no other.
            await self._store.update(session.id)
            return False
        await self._store.update(session.id, room_deleted_at=self._clock())
        return True

    def _retries(self) -> Pace:
        """The pace of a delete whose first turn was waited for: its retries wait for theirs."""
        first = True

        async def pace() -> None:
            nonlocal first
            if first:
                first = False
                return
            await self.pacer.acquire(bounded=False)

        return pace

    async def _expired(self, session: Session) -> None:
        """Mark the room deleted as of its `exp` without calling Daily: Daily treats a room past
        its `exp` as implicitly deleted (no one can join it) and garbage-collects it later."""
        if session.room_deleted_at is not None:
            return
        exp = room_exp(session.expires_at)
        log.info("room %s expired: no delete needed", session.room_name)
        await self._store.record(
            session.id, "room_expired", {"room": session.room_name, "exp": exp}
        )
        await self._store.update(session.id, room_deleted_at=float(exp))
