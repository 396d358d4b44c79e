"""The Daily room stock (DAILY_ROOM_STOCK): private rooms made ahead of their sessions.

Every Daily session needs a room, and one `POST /rooms` a start would spend Daily's whole
budget (20 requests a second an account) at 20 starts a second. The stock makes rooms in
batches instead (`POST /batch/rooms`, up to a thousand rooms a call, all or none), so a start
that finds a room there makes no Daily call at all.

- Each room is named as the id of the session that will claim it (`s-<16 hex>`): the webhooks
  and the reconciler's room sweep find a room's session by its name, as for any room. A room
  not claimed yet has no session, and the sweep leaves such rooms alone.
- A room is private, with the limits every session room has (`eject_at_room_exp`,
  `max_participants`), and an `exp` of when it was made + STOCK_TTL_S + SESSION_MAX_DURATION_S
  + the margin; it is claimed only while that `exp` still covers a whole session from now.
  The session's meeting tokens keep the session's own `exp` (dispatcher/rooms/daily.py).
- A claim deletes the room's row (dispatcher/store/room_stock.py): the room is then recorded in
  its session's row, and deleted with it when the session ends. A start refused before its
  session was stored puts the room back.
- The reconciler's leader keeps the stock full: a batch of what is missing every
  STOCK_INTERVAL_S, each call a turn of the shared room-create pacing; and deletes rooms no claim
  will take any more (`DELETE /batch/rooms`, a turn of the room-delete pacing).
- Rooms made by a batch whose rows were never written (the process died between the two) are
  left to their `exp`: private, and no one holds a token for them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from dispatcher.aio import every
from dispatcher.errors import DispatcherError
from dispatcher.ids import new_session_id
from dispatcher.metrics import Metrics
from dispatcher.pacing import Pacer
from dispatcher.rooms.daily import ROOM_EXP_MARGIN_S, DailyRooms
from dispatcher.rooms.daily_api import MAX_BATCH
from dispatcher.store import Store
from dispatcher.store.room_stock import RoomStockRows, StockRoom

log = logging.getLogger(__name__)

# How long a room waits in the stock before it is deleted unclaimed (its `exp` allows this
# much more than a session needs).
STOCK_TTL_S = 600.0
# A claimed room's `exp` covers the session's whole `exp` and this much more (the start).
CLAIM_MARGIN_S = 30.0
STOCK_INTERVAL_S = 0.5
# An instance that does not lead looks this often whether it does now.
LEADER_POLL_S = 1.0
# The pause after a pass that Daily failed (starts make their own rooms meanwhile).
OUTAGE_PAUSE_S = 5.0
# Rooms one delete call takes (Daily allows a thousand; a smaller call fails less at once).
DELETE_BATCH = 100


class RoomStock:
    """Claims rooms for starts; on the leader, keeps `size` rooms made ahead."""

    def __init__(
        self,
        store: Store,
        dispatcher: str,
        daily: DailyRooms,
        *,
        size: int,
        session_max_s: float,
        create_pacer: Pacer | None = None,
        delete_pacer: Pacer | None = None,
        metrics: Metrics | None = None,
        ttl_s: float = STOCK_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.size = size
        self._rows = RoomStockRows(store, dispatcher)
        self._daily = daily
        self._session_max_s = session_max_s
        self._create_pacer = create_pacer
        self._delete_pacer = delete_pacer
        self._ttl_s = ttl_s
        self._clock = clock
        self._metrics = metrics
        # Whether rows of another Daily domain were looked for (once: the key is set at start).
        self._other_domains_forgotten = False

    def _min_exp(self) -> float:
        """The least `exp` a room needs for a session claimed now."""
        return self._clock() + self._session_max_s + ROOM_EXP_MARGIN_S + CLAIM_MARGIN_S

    async def claim(self) -> StockRoom | None:
        """A room made ahead for a session starting now, or None (the stock is empty, or
        Daily's domain is not known yet)."""
        try:
            domain = self._daily.domain.name
        except RuntimeError:
            return None
        room = await self._rows.claim(domain, self._min_exp())
        if room is None and self._metrics is not None:
            self._metrics.room_stock_misses.inc()
        return room

    async def put_back(self, room: StockRoom) -> None:
        """Return a claimed room no session took."""
        await self._rows.put_back(self._daily.domain.name, room)

    async def available(self) -> int:
        """Rooms a claim could take now."""
        return await self._rows.count(self._daily.domain.name, self._min_exp())

    async def run(self, leader: Callable[[], bool]) -> None:
        """Keep the stock while this instance leads, until cancelled."""

        async def step() -> float | None:
            if not leader():
                return LEADER_POLL_S
            try:
                await self._daily.open()
                await self.refill()  # first: a clear may wait for its turn behind deletes
                await self.clear()
            except DispatcherError as exc:  # Daily failing: one line, and a longer pause
                log.warning("room stock pass failed: %s", exc)
                return OUTAGE_PAUSE_S
            return None

        await every(STOCK_INTERVAL_S, step, log=log, what="room stock pass")

    async def refill(self) -> int:
        """Make, in one batch, the rooms the stock lacks; how many were made. What is lacking
        is counted again once the call's turn has come: a turn that came late (behind the
        creates of starts that found the stock empty) makes all that went meanwhile."""
        domain = self._daily.domain.name
        if await self._rows.count(domain, self._min_exp()) >= self.size:
            return 0
        if self._create_pacer is not None:
            await self._create_pacer.acquire(bounded=False)
        missing = min(self.size - await self._rows.count(domain, self._min_exp()), MAX_BATCH)
        if missing <= 0:
            if self._create_pacer is not None:
                await self._create_pacer.cancel()
            return 0
        names = [new_session_id() for _ in range(missing)]
        exp = int(self._clock() + self._ttl_s + self._session_max_s + ROOM_EXP_MARGIN_S)
        if not await self._daily.make_ahead(names, exp):
            return 0
        await self._rows.add(domain, names, exp)
        log.debug("room stock: %d rooms made", len(names))
        return len(names)

    async def clear(self) -> int:
        """Delete, in one batch, rooms no claim will take (too near their `exp`); drop the
        rows of another domain's rooms; how many rooms went."""
        domain = self._daily.domain.name
        if not self._other_domains_forgotten:
            dropped = await self._rows.forget_other_domains(domain)
            self._other_domains_forgotten = True
            if dropped:
                log.info("room stock: %d rooms of another Daily domain forgotten", dropped)
        stale = await self._rows.stale(domain, self._min_exp(), DELETE_BATCH)
        if not stale:
            return 0
        pacer = self._delete_pacer

        async def pace() -> None:
            if pacer is not None:
                await pacer.acquire(bounded=False)

        await self._daily.delete_many(stale, pace=pace)
        await self._rows.forget(stale)
        log.info("room stock: %d unclaimed rooms deleted", len(stale))
        return len(stale)
