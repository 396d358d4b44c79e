"""Deleting the rooms of ended sessions in batches, paced under Daily's delete limit, recorded in
the store.

One worker deletes the queued rooms up to ROOM_DELETE_BATCH at a time, in one call (Daily's
`DELETE /batch/rooms`), one call per turn of the delete pacer: when sessions end faster than
Daily lets rooms go one by one, the rooms that queue while a call is under way go together in
the next. Daily gives no rate for the batch delete (docs/reference/daily.md §2), so a call is
paced as one room delete, which is defensive. The pace is shared by every instance on the
database when the pacer's bucket is in the store (dispatcher/app.py). A room whose `exp` has
passed when its batch is formed needs no delete: no one can join it, and Daily treats a room
past its `exp` as implicitly deleted and garbage-collects it later (docs/reference/daily.md §3),
so it is marked deleted as of its `exp` without a call (rooms the reconciler hands over long
after their session ended, say).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
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
# margin for deletes that travel unevenly (one sent late, the next on time). A batch call
# counts as one delete.
ROOM_DELETE_RATE = 1.6
ROOM_DELETE_BURST = 1
# Rooms a call deletes at most (Daily takes up to 1,000): 160 a second at ROOM_DELETE_RATE,
# past any rate of session ends, in calls small enough to fail or retry without much at stake.
ROOM_DELETE_BATCH = 100
# A room is taken as gone this long after its `exp`: a margin for clocks that disagree.
EXPIRED_MARGIN_S = 60.0


def session_room_exp(session: Session) -> int:
    """The `exp` of the session's room (unix seconds): the one it was made with (a room made
    ahead has its own, later one), else the session's hard end plus the margin."""
    if session.room_expires_at is not None:
        return int(session.room_expires_at)
    return room_exp(session.expires_at)


def _gone_at(session: Session) -> float:
    """When the session's room may be taken as gone without a delete (never, but on Daily)."""
    if session.transport != "daily":
        return math.inf
    return session_room_exp(session) + EXPIRED_MARGIN_S


class RoomJanitor:
    """Every room delete goes through here: queued, deleted in paced batches, marked done on
    the sessions.

    `submit` never waits: a session's end, a failed start and the reconciler hand rooms over and
    go on, so a backlog of deletes slows nothing else. A batch that fails is recorded in each of
    its sessions' logs and left for the reconciler, which submits every terminal session whose
    room is not marked deleted. Deletes still queued when the dispatcher stops are left to the
    reconciler the same way. `pacer` paces the calls (this instance's own bucket when not
    given).
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
        # Sessions whose room waits for a call, in the order submitted; then those of the call
        # under way.
        self._waiting: dict[str, Session] = {}
        self._batch: dict[str, Session] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        """Deletes submitted and not done."""
        return len(self._waiting) + len(self._batch)

    def submit(self, session: Session) -> bool:
        """Queue the delete of the session's room (once: a room already queued is not queued
        again); whether a delete was queued."""
        if not session.room_name or session.transport not in self._rooms:
            return False
        if session.id in self._waiting or session.id in self._batch:
            return False
        self._waiting[session.id] = session
        self._idle.clear()
        self._wake.set()
        if self._worker is None or self._worker.done():
            # A context of its own: not the submitter's session and trace, for every batch.
            self._worker = asyncio.create_task(
                self._work(), name="room janitor", context=contextvars.Context()
            )
        return True

    async def join(self) -> None:
        """Wait until every queued delete is done (tests, benchmarks)."""
        await self._idle.wait()

    async def aclose(self) -> None:
        """Drop what is still queued (the call under way too): the reconciler deletes those
        rooms later."""
        if self._worker is not None:
            await cancel_and_wait(self._worker)
        self._waiting.clear()
        self._idle.set()

    async def _work(self) -> None:
        """Delete the queued rooms a batch at a time; when none is left, wait for a submit."""
        while True:
            if not self._waiting:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            self._take()
            try:
                await self._delete(list(self._batch.values()))
            except Exception:
                # The store failed us: the reconciler submits these rooms again.
                log.exception("room deletes failed")
            finally:
                self._batch.clear()

    def _take(self) -> None:
        """Move the oldest waiting rooms of one transport, up to ROOM_DELETE_BATCH, to the
        batch (one call deletes them)."""
        transport = next(iter(self._waiting.values())).transport
        same = (s for s in self._waiting.values() if s.transport == transport)
        for session in list(itertools.islice(same, ROOM_DELETE_BATCH)):
            self._batch[session.id] = self._waiting.pop(session.id)

    async def _delete(self, batch: list[Session]) -> None:
        """Mark the rooms past their `exp` deleted, and delete the others in one call, in its
        turn (one session's call runs in that session's context: its records carry it)."""
        due: list[Session] = []
        for session in batch:
            if self._clock() >= _gone_at(session):
                await self._expired(session)
            else:
                due.append(session)
        if len(due) == 1:
            with session_context(due[0].id, traceparent=due[0].traceparent):
                await self._call(due)
        elif due:
            await self._call(due)

    async def _call(self, due: list[Session]) -> None:
        """Delete the rooms in one call after the pacer's turn; mark them deleted, or record
        the failure on each session."""
        rooms = self._rooms[due[0].transport]
        try:
            await rooms.open()
            await self.pacer.acquire(bounded=False)
            await rooms.delete_many([s.room_name for s in due if s.room_name], pace=self._retries())
        except Exception as exc:
            await self._failed(due, exc)
            return
        await self._store.update_many([s.id for s in due], room_deleted_at=self._clock())

    async def _failed(self, due: list[Session], exc: Exception) -> None:
        """Record a failed call on each of its sessions, and send each to the back of the
        reconciler's queue, so rooms that keep failing starve no other."""
        log.warning("room delete failed (%d rooms): %s", len(due), exc)
        for session in due:
            await record_failure(self._store, session.id, "room_delete", exc)
            await self._store.update(session.id)

    def _retries(self) -> Pace:
        """The pace of a call whose first turn was waited for: its retries wait for theirs."""
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
        exp = session_room_exp(session)
        with session_context(session.id, traceparent=session.traceparent):
            log.info("room %s expired: no delete needed", session.room_name)
        await self._store.record(
            session.id, "room_expired", {"room": session.room_name, "exp": exp}
        )
        await self._store.update(session.id, room_deleted_at=float(exp))
