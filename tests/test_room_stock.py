"""DAILY_ROOM_STOCK: Daily rooms made ahead in batches, each claimed by one start, which makes
no Daily call then; rooms a start did not take go back; rooms unclaimed too long are deleted."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from dispatcher.config import Secret, Settings
from dispatcher.env import ConfigError
from dispatcher.ids import SESSION_ID
from dispatcher.rooms.daily import ROOM_EXP_MARGIN_S, DailyRooms
from dispatcher.rooms.daily_api import DailyAPI
from dispatcher.rooms.stock import CLAIM_MARGIN_S, RoomStock
from dispatcher.store import Store
from dispatcher.store.room_stock import RoomStockRows
from dispatcher.upstream import RetryPolicy
from testkit.fakes.daily import DailyEmulator
from testkit.harness import DAILY_KEY, Stack, daily_emulator, dispatcher_stack, fly_emulator
from testkit.net import serve
from testkit.waits import eventually
from tests.test_instances import several_instances

STOCK_ENV = {"DAILY_ROOM_STOCK": "4"}
FAST = RetryPolicy(attempts=2, initial_backoff_s=0.01, max_backoff_s=0.02)


def posts(daily: DailyEmulator, path: str) -> int:
    """How many POSTs Daily got at `path`."""
    return sum(1 for r in daily.requests if r.method == "POST" and r.path == path)


async def in_stock(store: Store) -> list[str]:
    """The names of the rooms in the stock's rows."""
    async with store.read() as conn:
        return [r[0] for r in await conn.exec_driver_sql("SELECT name FROM room_stock")]


async def stocked(stack: Stack, rows: int) -> list[str]:
    """Wait until the stock's rows hold `rows` rooms; their names."""
    store = await Store.open(stack.settings.database_url)
    try:
        names: list[str] = []

        async def full() -> bool:
            nonlocal names
            names = await in_stock(store)
            return len(names) == rows

        await eventually(full, timeout=15, what=f"{rows} rooms in stock")
        return names
    finally:
        await store.close()


async def test_a_start_takes_a_room_made_ahead_and_makes_no_daily_call(tmp_path: Path) -> None:
    """With a stock of 4, the rooms are made in one batch call; a start's session is named
    after one of them and makes no room; the user's token joins it; the stock is refilled; the
    room is deleted when the session ends."""
    async with dispatcher_stack(tmp_path, env=STOCK_ENV) as stack:
        daily = stack.daily
        assert daily is not None
        made = await stocked(stack, 4)
        assert all(SESSION_ID.match(n) for n in made)
        assert posts(daily, "/batch/rooms") == 1 and posts(daily, "/rooms") == 0
        room = daily.rooms[made[0]]
        assert room.privacy == "private" and room.properties["max_participants"] == 2
        answer = await stack.start()
        assert answer.status_code == 200, answer.text
        sid = answer.json()["sessionId"]
        assert sid in made and answer.json()["dailyRoom"].endswith(f"/{sid}")
        assert posts(daily, "/rooms") == 0
        assert daily.join(sid, answer.json()["dailyToken"])["owner"] is False
        metrics = (await stack.http.get("/metrics")).text
        assert "dispatcher_room_stock_misses_total 0.0" in metrics
        assert re.search(r"^dispatcher_room_stock [34]\.0$", metrics, re.M)
        await stack.wait_state(sid, "ready")
        assert sid not in await stocked(stack, 4)  # refilled by a second batch
        assert posts(daily, "/batch/rooms") == 2
        await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())
        await stack.wait_state(sid, "ended")
        await eventually(lambda: sid not in daily.rooms, timeout=15, what="room deleted")


async def test_a_start_with_its_own_room_properties_makes_its_room(tmp_path: Path) -> None:
    """`dailyRoomProperties` need a room of their own: that start makes it, the stock stays."""
    async with dispatcher_stack(tmp_path, env=STOCK_ENV) as stack:
        assert stack.daily is not None
        made = await stocked(stack, 4)
        answer = await stack.start(dailyRoomProperties={"enable_chat": True})
        assert answer.status_code == 200, answer.text
        sid = answer.json()["sessionId"]
        assert sid not in made and posts(stack.daily, "/rooms") == 1
        assert stack.daily.rooms[sid].properties["enable_chat"] is True
        assert sorted(await stocked(stack, 4)) == sorted(made)


async def test_a_room_the_start_did_not_take_goes_back(tmp_path: Path) -> None:
    """A replayed Idempotency-Key answers the first start and the room its replay claimed goes
    back; so does the room of a start refused at capacity. No room is lost or made for them.
    (The leader may refill while a claimed room is out, so the stock may hold one more then:
    the check is that every room it held is still there.)"""
    env = STOCK_ENV | {"MAX_SESSIONS": "1"}
    async with dispatcher_stack(tmp_path, env=env) as stack:
        assert stack.daily is not None
        await stocked(stack, 4)
        headers = {**stack.headers(), "Idempotency-Key": "k-1"}
        body = {"createDailyRoom": True}
        first = await stack.http.post("/start", json=body, headers=headers)
        assert first.status_code == 200, first.text
        sid = first.json()["sessionId"]
        left = await stocked(stack, 4)
        replay = await stack.http.post("/start", json=body, headers=headers)
        assert replay.json()["sessionId"] == sid
        refused = await stack.start()
        assert refused.status_code == 429 and refused.json()["code"] == "at-capacity"
        store = await Store.open(stack.settings.database_url)
        try:
            assert set(left) <= set(await in_stock(store))
            assert await store.get_many(left) == {}
        finally:
            await store.close()
        assert posts(stack.daily, "/rooms") == 0


def test_the_stock_needs_daily() -> None:
    """DAILY_ROOM_STOCK without Daily is a configuration error; 0 (the default) is no stock."""
    with pytest.raises(ConfigError, match="DAILY_ROOM_STOCK"):
        Settings.from_env({"DAILY_ROOM_STOCK": "10"})
    assert Settings.from_env({}).daily_room_stock == 0


class Clock:
    """A wall clock the test moves."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_rooms_left_unclaimed_past_their_ttl_are_deleted_in_one_call(store: Store) -> None:
    """The stock's rooms are claimable while their `exp` covers a whole session; past that they
    are deleted in one batch call and forgotten, and a refill makes fresh ones. Two claims never
    take the same room; rows of another Daily domain are forgotten (this key cannot delete
    them)."""
    clock = Clock()
    emu = daily_emulator(clock=clock)
    async with serve(emu.app) as url, DailyAPI.client(url, DAILY_KEY) as http:
        daily = DailyRooms(DailyAPI(http, FAST), Secret(DAILY_KEY), FAST)
        await daily.open()
        stock = RoomStock(store, "d1", daily, size=3, session_max_s=300, ttl_s=60, clock=clock)
        assert await stock.refill() == 3 and await stock.refill() == 0
        assert await stock.available() == 3
        first = await stock.claim()
        second = await stock.claim()
        assert first and second and first.name != second.name
        assert first.exp >= clock.now + 300 + ROOM_EXP_MARGIN_S + CLAIM_MARGIN_S
        await stock.put_back(second)
        assert await stock.available() == 2
        await RoomStockRows(store, "d1").add("other-domain", ["s-00000000000000aa"], 1e12)
        clock.now += 60 - CLAIM_MARGIN_S + 1
        assert await stock.available() == 0 and await stock.claim() is None
        assert await stock.clear() == 2
        deletes = [r for r in emu.requests if r.method == "DELETE"]
        assert [r.path for r in deletes] == ["/batch/rooms"]
        assert set(emu.rooms) == {first.name}
        assert await RoomStockRows(store, "d1").stale("other-domain", 1e13, 10) == []
        assert await stock.refill() == 3 and await stock.clear() == 0


@pytest.mark.slow
async def test_four_instances_take_distinct_rooms_from_one_stock(
    tmp_path: Path, pg_database_url: str
) -> None:
    """Four instances on one PostgreSQL database share one stock, kept by the leader alone:
    twelve starts at once, three on each, each take a different room made ahead (none makes
    its own), and the stock is refilled to its size, not past it."""
    fly = fly_emulator(limits={"create": (1000.0, 1000)})
    async with several_instances(tmp_path, pg_database_url, 4, fly, DAILY_ROOM_STOCK="16") as group:
        # Batches slow enough that refills by several instances would overlap and overfill.
        group.daily.latency.per_op["create_rooms"] = 0.5
        made: list[str] = []

        def batched() -> list[str]:
            return [
                room["name"]
                for r in group.daily.requests
                if r.method == "POST" and r.path == "/batch/rooms"
                for room in r.body["rooms"]
            ]

        async def full() -> bool:
            nonlocal made
            made = batched()
            return len(await in_stock(group.store)) == 16

        await eventually(full, timeout=30, what="16 rooms in stock")
        answers = await asyncio.gather(*(group.all[n % 4].start(f"user-{n}") for n in range(12)))
        assert [a.status_code for a in answers] == [200] * 12, [a.text for a in answers]
        sids = {a.json()["sessionId"] for a in answers}
        assert len(sids) == 12 and sids <= set(made)
        assert not [r for r in group.daily.requests if r.method == "POST" and r.path == "/rooms"]
        await eventually(full, timeout=30, what="the stock refilled")
        assert len(made) == 16 + 12


async def test_while_daily_refuses_batches_starts_make_their_own_rooms(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch create Daily refuses is one warning line (no traceback) and a pause; starts
    meanwhile make their own rooms (counted as stock misses); the stock fills afterwards."""
    daily = daily_emulator()
    daily.faults.add("create_rooms", status=400, times=1)
    async with dispatcher_stack(tmp_path, env=STOCK_ENV, daily=daily) as stack:
        await eventually(
            lambda: daily.faults.fired == [("create_rooms", 400)], timeout=15, what="refused"
        )
        answer = await stack.start()
        assert answer.status_code == 200, answer.text
        assert posts(daily, "/rooms") == 1 and answer.json()["sessionId"] in daily.rooms
        assert "dispatcher_room_stock_misses_total 1.0" in (await stack.http.get("/metrics")).text
        await stocked(stack, 4)
    (failed,) = [r for r in caplog.records if "room stock pass failed" in r.getMessage()]
    assert failed.levelname == "WARNING" and failed.exc_info is None
