"""The room janitor against Daily (emulated, its rate limits on) and a real store: rooms go in
few batch calls paced under Daily's delete limit, rooms submitted during a call go in the next,
a failed batch is recorded on each of its sessions and stops nothing, a room past its `exp` is
marked deleted without a call, and closing drops what is queued. The checks are on what the
emulator and the store recorded, never on how long anything took."""

from __future__ import annotations

import asyncio
import time

import pytest

from dispatcher.config import Secret
from dispatcher.janitor import EXPIRED_MARGIN_S, ROOM_DELETE_BATCH, RoomJanitor, session_room_exp
from dispatcher.lifecycle import State
from dispatcher.pacing import Pace, Pacer
from dispatcher.rooms.daily import ROOM_EXP_MARGIN_S, DailyRooms
from dispatcher.rooms.daily_api import DailyAPI
from dispatcher.store import Session, Store
from testkit.fakes.daily import DailyEmulator, RecordedRequest
from testkit.waits import eventually
from tests.conftest import DAILY_RETRIES as RETRIES
from tests.conftest import DAILY_TEST_KEY as KEY


class GatedRooms(DailyRooms):
    """Daily rooms whose batch deletes wait for `gate` before they are sent (a call held in
    flight, deterministically); `calls` holds the names of each batch as it was asked."""

    def __init__(self, api: DailyAPI) -> None:
        super().__init__(api, Secret(KEY), RETRIES)
        self.gate = asyncio.Event()
        self.calls: list[list[str]] = []

    async def delete_many(self, names: list[str], *, pace: Pace | None = None) -> None:
        self.calls.append(names)
        await self.gate.wait()
        await super().delete_many(names, pace=pace)


async def ended_session(store: Store, sid: str, *, exp_in_s: float = 3600) -> Session:
    """An ended daily session whose room's `exp` is `exp_in_s` from now."""
    now = time.time()
    session = Session(
        id=sid,
        user_id="u1",
        state=State.ENDED,
        transport="daily",
        dispatcher="test",
        created_at=now - 60,
        updated_at=now,
        expires_at=now + exp_in_s - ROOM_EXP_MARGIN_S,
        room_name=sid,
        ended_at=now,
    )
    await store.create_session(session, max_sessions=1000)
    return session


async def ended_with_rooms(
    store: Store, rooms: DailyRooms, prefix: str, count: int
) -> list[Session]:
    """`count` ended sessions whose rooms Daily has."""
    sessions = [await ended_session(store, f"s-{prefix}{i}") for i in range(count)]
    await rooms.make_ahead([s.id for s in sessions], int(time.time()) + 3600)
    return sessions


def batch_deletes(emu: DailyEmulator) -> list[RecordedRequest]:
    """The room deletes Daily received (batch or not)."""
    return [r for r in emu.requests if r.method == "DELETE"]


async def deleted(store: Store, sessions: list[Session]) -> list[bool]:
    """Whether each session's room is marked deleted."""
    stored = await store.get_many(s.id for s in sessions)
    return [stored[s.id].room_deleted_at is not None for s in sessions]


@pytest.mark.slow
async def test_a_burst_of_rooms_goes_in_a_few_paced_batch_calls(
    daily_rooms: tuple[DailyEmulator, DailyRooms], store: Store
) -> None:
    """250 rooms submitted at once go in three calls of at most ROOM_DELETE_BATCH rooms, with
    no 429 from Daily; each is queued once, and every session is marked deleted."""
    emu, rooms = daily_rooms
    sessions = await ended_with_rooms(store, rooms, "burst", 250)
    janitor = RoomJanitor(store, {"daily": rooms})
    try:
        assert all(janitor.submit(s) for s in sessions)
        assert not janitor.submit(sessions[0])
        assert janitor.queued == 250
        await janitor.join()
    finally:
        await janitor.aclose()
    calls = batch_deletes(emu)
    assert [c.path for c in calls] == ["/batch/rooms"] * 3  # ROOM_DELETE_BATCH is 100
    sizes = [min(ROOM_DELETE_BATCH, 250 - i) for i in range(0, 250, ROOM_DELETE_BATCH)]
    assert [len(c.body["rooms"]) for c in calls] == sizes
    assert emu.limiter.refused == {}
    assert not emu.rooms
    assert all(await deleted(store, sessions))
    assert janitor.queued == 0


async def test_rooms_submitted_during_a_call_go_in_the_next(
    daily_served: tuple[DailyEmulator, DailyRooms, DailyAPI], store: Store
) -> None:
    """A room submitted while a call is in flight waits for the next call, with the others
    submitted meanwhile; a room already in the call is not queued again."""
    emu, rooms, api = daily_served
    first, *later = await ended_with_rooms(store, rooms, "flight", 4)
    gated = GatedRooms(api)
    await gated.open()
    janitor = RoomJanitor(store, {"daily": gated})
    try:
        assert janitor.submit(first)
        await eventually(lambda: gated.calls, what="the first call in flight")
        assert not janitor.submit(first)
        assert all(janitor.submit(s) for s in later)
        assert janitor.queued == 4
        gated.gate.set()
        await janitor.join()
    finally:
        await janitor.aclose()
    assert gated.calls == [[first.id], [s.id for s in later]]
    assert [c.body["rooms"] for c in batch_deletes(emu)] == gated.calls
    assert emu.limiter.refused == {}
    assert all(await deleted(store, [first, *later]))


@pytest.mark.slow
async def test_a_failed_batch_is_recorded_on_each_session_and_the_next_goes(
    daily_rooms: tuple[DailyEmulator, DailyRooms], store: Store
) -> None:
    """A batch Daily fails throughout (500 on every attempt) records a room_delete failure on
    each of its sessions and leaves them unmarked, for the reconciler; the worker goes on, and
    the rooms submitted next (the failed ones again too) are deleted."""
    emu, rooms = daily_rooms
    failing = await ended_with_rooms(store, rooms, "fail", 3)
    emu.faults.add("delete_rooms", status=500, times=RETRIES.attempts)
    janitor = RoomJanitor(store, {"daily": rooms})
    try:
        for session in failing:
            janitor.submit(session)
        await janitor.join()
        assert emu.faults.pending() == {}
        assert not any(await deleted(store, failing))
        for session in failing:
            failures = [e for e in await store.events(session.id) if e.kind == "cleanup_failed"]
            assert [f.details["what"] for f in failures] == ["room_delete"]

        after = await ended_with_rooms(store, rooms, "after", 2)
        for session in [*after, *failing]:
            assert janitor.submit(session)
        await janitor.join()
    finally:
        await janitor.aclose()
    assert all(await deleted(store, [*failing, *after]))
    assert not emu.rooms
    assert emu.limiter.refused == {}


async def test_a_room_past_its_exp_is_marked_deleted_without_a_call(
    daily_rooms: tuple[DailyEmulator, DailyRooms], store: Store
) -> None:
    """Daily treats a room past its `exp` as deleted: the janitor marks it deleted as of its
    `exp` (and says so in the session's log) without calling Daily or taking a turn; in a
    batch with live rooms, only those are in the call."""
    emu, rooms = daily_rooms
    janitor = RoomJanitor(store, {"daily": rooms})
    try:
        expired = await ended_session(store, "s-expired", exp_in_s=-(EXPIRED_MARGIN_S + 1))
        assert await store.count_rooms_to_delete() == 1
        assert janitor.submit(expired)
        await janitor.join()
        assert batch_deletes(emu) == []
        stored = await store.get(expired.id)
        assert stored is not None and stored.room_deleted_at == session_room_exp(expired)
        assert [e.kind for e in await store.events(expired.id)][-1] == "room_expired"
        assert await store.count_rooms_to_delete() == 0
        assert await janitor.pacer.take_now()  # no turn was used

        gone = await ended_session(store, "s-gone", exp_in_s=-(EXPIRED_MARGIN_S + 1))
        (live,) = await ended_with_rooms(store, rooms, "live", 1)
        assert janitor.submit(gone) and janitor.submit(live)
        await janitor.join()
    finally:
        await janitor.aclose()
    assert [c.body["rooms"] for c in batch_deletes(emu)] == [[live.id]]
    assert all(await deleted(store, [gone, live]))
    assert [e.kind for e in await store.events(gone.id)][-1] == "room_expired"


async def test_a_room_made_ahead_lives_to_its_own_exp(
    daily_rooms: tuple[DailyEmulator, DailyRooms], store: Store
) -> None:
    """A room made ahead (the room stock) has an `exp` later than its session's: past the
    session's but not the room's, the room is deleted with a call, not taken as expired."""
    emu, rooms = daily_rooms
    janitor = RoomJanitor(store, {"daily": rooms})
    try:
        session = await ended_session(store, "s-stocked", exp_in_s=-(EXPIRED_MARGIN_S + 1))
        room_exp = int(time.time()) + 3600
        await store.update(session.id, room_expires_at=float(room_exp))
        await rooms.make_ahead([session.id], room_exp)
        stored = await store.get(session.id)
        assert stored is not None and session_room_exp(stored) == room_exp
        assert janitor.submit(stored)
        await janitor.join()
    finally:
        await janitor.aclose()
    assert [c.body["rooms"] for c in batch_deletes(emu)] == [[session.id]]
    assert session.id not in emu.rooms
    assert "room_expired" not in [e.kind for e in await store.events(session.id)]


async def test_closing_drops_the_queued_deletes(
    daily_rooms: tuple[DailyEmulator, DailyRooms], store: Store
) -> None:
    """`aclose()` with rooms waiting for a turn (the next one an hour away) returns without
    waiting for it: the queue is empty, the rooms are left for the reconciler (unmarked)."""
    emu, rooms = daily_rooms
    first, *waiting = await ended_with_rooms(store, rooms, "close", 3)
    janitor = RoomJanitor(store, {"daily": rooms}, pacer=Pacer(1 / 3600, 1))
    assert janitor.submit(first)
    await janitor.join()
    assert all(janitor.submit(s) for s in waiting)
    await eventually(lambda: janitor.pacer.waiting == 1, what="the next call waiting its turn")
    await janitor.aclose()
    assert janitor.queued == 0
    await janitor.join()
    assert len(batch_deletes(emu)) == 1
    assert await deleted(store, [first, *waiting]) == [True, False, False]
