"""Daily rooms: the planned room, self-signed tokens that Daily (emulated) accepts, retries."""

from __future__ import annotations

import time

import httpx
import pytest

from dispatcher.config import Secret
from dispatcher.errors import UpstreamError
from dispatcher.rooms.daily import MAX_USER_ID, DailyRooms, daily_user_id
from dispatcher.rooms.daily_api import DailyAPI
from testkit.fakes.daily import ROOM_PAGING, DailyEmulator, JoinRefused
from testkit.net import serve
from tests.conftest import DAILY_RETRIES as FAST
from tests.conftest import DAILY_TEST_KEY as KEY


async def test_planned_room_and_tokens_work_on_daily(
    daily_rooms: tuple[DailyEmulator, DailyRooms],
) -> None:
    """The room is private with our limits; the user token joins as non-owner, the bot as owner."""
    emu, rooms = daily_rooms
    plan = rooms.plan(
        "s-abc", "user-7", time.time() + 600, {"start_video_off": True}, {"user_name": "Ada"}
    )
    await rooms.create(plan)
    room = emu.rooms["s-abc"]
    assert room.privacy == "private"
    assert room.properties["max_participants"] == 2
    assert room.properties["start_video_off"] is True
    assert room.properties["exp"] == int(plan.expires_at)
    user = emu.join("s-abc", plan.user_token)
    assert (user["owner"], user["userId"], user["userName"]) == (False, "user-7", "Ada")
    bot = emu.join("s-abc", plan.bot_token)
    assert bot["owner"] is True and bot["userId"] == "bot-s-abc"
    with pytest.raises(JoinRefused):
        emu.join("s-abc", None)
    assert "user_token" not in repr(plan) and plan.user_token not in repr(plan)


async def test_token_for_one_room_does_not_open_another(
    daily_rooms: tuple[DailyEmulator, DailyRooms],
) -> None:
    """A session's token is refused in another session's room."""
    emu, rooms = daily_rooms
    first = rooms.plan("s-one", "u", time.time() + 600, {}, {})
    second = rooms.plan("s-two", "u", time.time() + 600, {}, {})
    await rooms.create(first)
    await rooms.create(second)
    with pytest.raises(JoinRefused, match="room"):
        emu.join("s-two", first.user_token)


async def test_delete_is_idempotent(daily_rooms: tuple[DailyEmulator, DailyRooms]) -> None:
    """Deleting a room twice is fine: 404 counts as deleted."""
    emu, rooms = daily_rooms
    plan = rooms.plan("s-del", "u", time.time() + 600, {}, {})
    await rooms.create(plan)
    await rooms.delete("s-del")
    await rooms.delete("s-del")
    assert "s-del" not in emu.rooms


async def test_create_retries_then_gives_up(daily_rooms: tuple[DailyEmulator, DailyRooms]) -> None:
    """A 503 is retried; a failure that persists raises UpstreamError with Daily's code."""
    emu, rooms = daily_rooms
    emu.faults.add("create_room", status=503)
    await rooms.create(rooms.plan("s-r1", "u", time.time() + 600, {}, {}))
    assert "s-r1" in emu.rooms
    emu.faults.add("create_room", status=500, times=10)
    with pytest.raises(UpstreamError) as info:
        await rooms.create(rooms.plan("s-r2", "u", time.time() + 600, {}, {}))
    assert info.value.status == 500 and info.value.upstream_code == "server-error"


def test_long_user_ids_are_hashed_to_fit() -> None:
    """User ids longer than Daily's 36 characters are hashed, stably."""
    assert daily_user_id("short") == "short"
    long = "auth0|" + "x" * 60
    assert len(daily_user_id(long)) == MAX_USER_ID
    assert daily_user_id(long) == daily_user_id(long) != daily_user_id(long + "y")


async def test_presence_lists_who_is_in_the_room(
    daily_served: tuple[DailyEmulator, DailyRooms, DailyAPI],
) -> None:
    """Presence shows the bot by its user id once it has joined (the watchdog signal)."""
    emu, rooms, api = daily_served
    plan = rooms.plan("s-pres", "u", time.time() + 600, {}, {})
    await rooms.create(plan)
    assert await api.presence("s-pres") == []
    emu.join("s-pres", plan.bot_token)
    assert [p["userId"] for p in await api.presence("s-pres")] == ["bot-s-pres"]
    assert await api.get_room("s-pres") is not None
    await rooms.delete("s-pres")
    assert await api.get_room("s-pres") is None


@pytest.mark.parametrize("paging", ROOM_PAGING)
async def test_inventory_finds_every_room_past_one_page(paging: str) -> None:
    """The room inventory lists every room of a domain with more rooms than one page, whether
    the API pages as Daily documents it, by list position, or oldest first."""
    emu = DailyEmulator(api_key=KEY, rate_limits=False, rooms_paging=paging)
    async with serve(emu.app) as url, DailyAPI.client(url, KEY) as http:
        api = DailyAPI(http, FAST)
        for i in range(250):
            assert (await http.post("rooms", json={"name": f"s-{i:04d}"})).status_code == 200
        assert sorted(await DailyRooms(api, Secret(KEY), FAST).inventory()) == sorted(emu.rooms)
        assert len([r for r in emu.requests if r.path == "/rooms" and r.method == "GET"]) <= 5


async def test_inventory_stops_on_a_repeated_page() -> None:
    """An API that answers the same full page whatever the cursor: the sweep keeps its rooms and
    stops once neither cursor brings a new one, instead of asking page after page."""
    page = [{"id": f"id-{i}", "name": f"s-{i:04d}"} for i in range(100)]
    asked: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request)
        return httpx.Response(200, json={"total_count": 500, "data": page})

    transport = httpx.MockTransport(answer)
    async with httpx.AsyncClient(
        base_url="https://api.daily.test/v1/", transport=transport
    ) as http:
        names = await DailyAPI(http, FAST).list_rooms()
    assert sorted(names) == [r["name"] for r in page]
    assert len(asked) == 3
    assert {k for r in asked[1:] for k in r.url.params} == {
        "limit", "ending_before", "starting_after"
    }  # fmt: skip


async def test_rooms_made_ahead_take_one_call_and_admit_planned_tokens(
    daily_served: tuple[DailyEmulator, DailyRooms, DailyAPI],
) -> None:
    """`make_ahead` makes private rooms with our limits in one call; a plan for one of them
    gives tokens that join it."""
    emu, rooms, _ = daily_served
    exp = int(time.time()) + 900
    assert await rooms.make_ahead(["s-a1", "s-a2"], exp)
    assert [r.path for r in emu.requests if r.method == "POST"] == ["/batch/rooms"]
    room = emu.rooms["s-a2"]
    assert room.privacy == "private" and room.properties["max_participants"] == 2
    assert room.properties["exp"] == exp and room.properties["eject_at_room_exp"] is True
    plan = rooms.plan("s-a2", "u", time.time() + 600, {}, {})
    assert emu.join("s-a2", plan.user_token)["owner"] is False


@pytest.mark.parametrize("made", [True, False])
async def test_an_ambiguous_batch_create_is_settled_by_one_lookup(
    daily_served: tuple[DailyEmulator, DailyRooms, DailyAPI], made: bool
) -> None:
    """A batch create that answered 500 may have made its rooms: one lookup says whether."""
    emu, rooms, _ = daily_served
    emu.faults.add("create_rooms", status=500, apply_first=made)
    assert await rooms.make_ahead(["s-b1", "s-b2"], int(time.time()) + 900) is made
    assert ("s-b2" in emu.rooms) is made
    assert [r.path for r in emu.requests if r.method == "GET"][1:] == ["/rooms/s-b1"]
    emu.faults.add("create_rooms", status=400)
    with pytest.raises(UpstreamError):
        await rooms.make_ahead(["s-b3"], int(time.time()) + 900)


async def test_delete_many_is_one_call_or_one_a_room_when_refused(
    daily_served: tuple[DailyEmulator, DailyRooms, DailyAPI],
) -> None:
    """Rooms are deleted in one batch call; a batch Daily refuses with a 400 (say, for a name
    it does not know: undocumented) is deleted one room at a time; a 5xx is raised."""
    emu, rooms, _ = daily_served
    emu.limiter.enabled = False  # the fallback's deletes are unpaced here
    names = [f"s-d{i}" for i in range(4)]
    await rooms.make_ahead(names, int(time.time()) + 900)
    await rooms.delete_many(names[:2])
    assert [r.path for r in emu.requests if r.method == "DELETE"] == ["/batch/rooms"]
    emu.faults.add("delete_rooms", status=404)
    await rooms.delete_many([*names[2:], "s-gone"])
    deletes = [r.path for r in emu.requests if r.method == "DELETE"]
    assert deletes[1:] == ["/batch/rooms", "/rooms/s-d2", "/rooms/s-d3", "/rooms/s-gone"]
    assert not emu.rooms
    emu.faults.add("delete_rooms", status=500, times=10)
    with pytest.raises(UpstreamError):
        await rooms.delete_many(["s-x", "s-y"])
