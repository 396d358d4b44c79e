"""Tests of the Daily REST API emulator, over HTTP on loopback."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from testkit.fakes.common import Fault
from testkit.fakes.daily import (
    DEFAULT_API_KEY,
    DEFAULT_DOMAIN_ID,
    RATE_LIMITS,
    DailyEmulator,
    JoinRefused,
)
from testkit.net import serve

ROOT = Path(__file__).resolve().parents[1]
OTHER_KEY = "f" * 64


class Clock:
    """A settable wall clock for the emulator's expiry checks."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def emu(clock: Clock) -> DailyEmulator:
    return DailyEmulator(clock=clock)


@pytest.fixture
async def base_url(emu: DailyEmulator) -> AsyncIterator[str]:
    async with serve(emu.app) as url:
        yield url


@pytest.fixture
async def api(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers) as client:
        yield client


def self_signed(clock: Clock, key: str = DEFAULT_API_KEY, **claims: Any) -> str:
    """A self-signed Daily token, built the way the dispatcher builds one."""
    now = int(clock())
    payload = {"d": DEFAULT_DOMAIN_ID, "iat": now, "exp": now + 600, "o": False, **claims}
    return jwt.encode(payload, key, algorithm="HS256")


async def create_room(api: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await api.post("/rooms", json=body)
    assert response.status_code == 200, response.text
    return response.json()


async def test_domain_config(api: httpx.AsyncClient) -> None:
    """GET / answers the domain's name, id and config."""
    response = await api.get("/")
    assert response.status_code == 200
    body = response.json()
    assert body["domain_name"] == "pipecat-test"
    assert body["domain_id"] == DEFAULT_DOMAIN_ID
    assert isinstance(body["config"], dict)


async def test_create_private_room_echoes_non_default_config(
    api: httpx.AsyncClient, clock: Clock
) -> None:
    """A created room is a room object whose config lists only non-default properties."""
    exp = int(clock()) + 3600
    props = {"exp": exp, "eject_at_room_exp": True, "max_participants": 2, "enable_chat": False}
    room = await create_room(
        api, name="s-0123abcd", privacy="private", properties={**props, "geo": "eu-central-1"}
    )
    assert room["name"] == "s-0123abcd"
    assert room["privacy"] == "private"
    assert room["api_created"] is True
    assert room["url"] == "https://pipecat-test.daily.co/s-0123abcd"
    assert room["created_at"].endswith("Z")
    assert room["config"] == {
        "exp": exp,
        "eject_at_room_exp": True,
        "max_participants": 2,
        "geo": "eu-central-1",
    }


async def test_create_room_defaults(api: httpx.AsyncClient) -> None:
    """An empty create gives a public room with a random valid name and an empty config."""
    room = await create_room(api)
    assert room["privacy"] == "public"
    assert room["config"] == {}
    assert room["name"] and room["url"].endswith("/" + room["name"])


async def test_room_times_accept_floats_and_nbf_holds_joins(
    api: httpx.AsyncClient, emu: DailyEmulator, clock: Clock
) -> None:
    """exp/nbf given as floats (as pipecat sends them) are kept as whole seconds; nbf bars joins."""
    now = clock()
    room = await create_room(api, name="later", properties={"nbf": now + 10.7, "exp": now + 99.5})
    assert room["config"] == {"nbf": int(now + 10.7), "exp": int(now + 99.5)}
    with pytest.raises(JoinRefused, match="room-not-yet-open"):
        emu.join("later")
    clock.advance(11)
    emu.join("later")


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"name": "has space"}, "name"),
        ({"name": "x" * 129}, "name"),
        ({"privacy": "secret"}, "privacy"),
        ({"properties": {"no_such_thing": True}}, "no_such_thing"),
        ({"properties": {"max_participants": "2"}}, "max_participants"),
        ({"properties": {"max_participants": 201}}, "max_participants"),
        ({"properties": {"eject_at_room_exp": 1}}, "eject_at_room_exp"),
        ({"properties": {"exp": "tomorrow"}}, "exp"),
        ({"properties": {"geo": "mars-1"}}, "geo"),
        ({"colour": "red"}, "colour"),
    ],
)
async def test_invalid_room_is_refused(
    api: httpx.AsyncClient, emu: DailyEmulator, body: dict[str, Any], named: str
) -> None:
    """A bad name, privacy, unknown property or mistyped property is a 400 naming it."""
    response = await api.post("/rooms", json=body)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid-request-error"
    assert named in response.json()["info"]
    assert emu.rooms == {}


async def test_duplicate_name_is_refused(api: httpx.AsyncClient) -> None:
    """Creating a room with the name of a live room is a 400 invalid-request-error."""
    await create_room(api, name="dup")
    response = await api.post("/rooms", json={"name": "dup"})
    assert response.status_code == 400
    assert response.json()["error"] == "invalid-request-error"


async def names_of_page(api: httpx.AsyncClient, **params: Any) -> list[str]:
    response = await api.get("/rooms", params=params)
    assert response.status_code == 200, response.text
    return [r["name"] for r in response.json()["data"]]


async def test_room_list_is_newest_first_and_cursors_go_by_creation(
    api: httpx.AsyncClient,
) -> None:
    """As Daily documents the list: newest first; `starting_after=<id>` gives the rooms created
    after that room, `ending_before=<id>` those created before it, each the `limit` rooms next
    to it, newest first."""
    ids = {r["name"]: r["id"] for r in [await create_room(api, name=f"r{i}") for i in range(6)]}
    assert await names_of_page(api) == ["r5", "r4", "r3", "r2", "r1", "r0"]
    assert await names_of_page(api, limit=2) == ["r5", "r4"]
    assert await names_of_page(api, limit=2, ending_before=ids["r4"]) == ["r3", "r2"]
    assert await names_of_page(api, limit=2, ending_before=ids["r2"]) == ["r1", "r0"]
    assert await names_of_page(api, limit=2, ending_before=ids["r0"]) == []
    assert await names_of_page(api, limit=2, starting_after=ids["r1"]) == ["r3", "r2"]
    assert await names_of_page(api, limit=10, starting_after=ids["r3"]) == ["r5", "r4"]
    assert await names_of_page(api, limit=2, starting_after=ids["r5"]) == []
    assert await names_of_page(api, limit=2, ending_before="OLDEST") == ["r1", "r0"]


@pytest.mark.parametrize(
    ("paging", "first", "after_r3", "before_r3"),
    [
        ("stripe", ["r5", "r4"], ["r2", "r1"], ["r5", "r4"]),
        ("oldest_first", ["r0", "r1"], ["r4", "r5"], ["r1", "r2"]),
    ],
)
async def test_room_list_other_pagings(
    paging: str, first: list[str], after_r3: list[str], before_r3: list[str]
) -> None:
    """`rooms_paging` plays other readings of the list: cursors by list position (`stripe`:
    `starting_after` gives older rooms), or the list oldest first (`oldest_first`)."""
    emu = DailyEmulator(rooms_paging=paging)
    headers = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}
    async with serve(emu.app) as url, httpx.AsyncClient(base_url=url, headers=headers) as api:
        ids = {r["name"]: r["id"] for r in [await create_room(api, name=f"r{i}") for i in range(6)]}
        assert await names_of_page(api, limit=2) == first
        assert await names_of_page(api, limit=2, starting_after=ids["r3"]) == after_r3
        assert await names_of_page(api, limit=2, ending_before=ids["r3"]) == before_r3


async def test_get_list_and_delete(api: httpx.AsyncClient, emu: DailyEmulator) -> None:
    """Rooms are listed newest first with cursors; a deleted room is 404 and leaves the list."""
    rooms = [await create_room(api, name=f"r{i}") for i in range(3)]
    listing = (await api.get("/rooms")).json()
    assert listing["total_count"] == 3
    assert [r["name"] for r in listing["data"]] == ["r2", "r1", "r0"]
    page = (await api.get("/rooms", params={"limit": 1, "ending_before": rooms[2]["id"]})).json()
    assert [r["name"] for r in page["data"]] == ["r1"]
    page = (await api.get("/rooms", params={"limit": 1, "ending_before": "OLDEST"})).json()
    assert [r["name"] for r in page["data"]] == ["r0"]
    assert (await api.get("/rooms/r1")).json() == rooms[1]

    response = await api.delete("/rooms/r1")
    assert response.status_code == 200
    assert response.json() == {"deleted": True, "name": "r1"}
    missing = await api.get("/rooms/r1")
    assert missing.status_code == 404
    assert missing.json() == {"error": "not-found", "info": "room r1 not found"}
    assert (await api.delete("/rooms/r1")).status_code == 404
    assert [r.name for r in emu.deleted] == ["r1"]
    assert (await api.get("/rooms")).json()["total_count"] == 2


async def test_update_room(api: httpx.AsyncClient) -> None:
    """POST /rooms/:name changes privacy and properties, validated, and null unsets one."""
    await create_room(api, name="upd", properties={"max_participants": 2, "enable_chat": True})
    response = await api.post(
        "/rooms/upd",
        json={"privacy": "private", "properties": {"enable_chat": None, "start_video_off": True}},
    )
    assert response.status_code == 200
    assert response.json()["privacy"] == "private"
    assert response.json()["config"] == {"max_participants": 2, "start_video_off": True}
    bad = await api.post("/rooms/upd", json={"properties": {"start_video_off": "yes"}})
    assert bad.status_code == 400
    assert (await api.post("/rooms/nope", json={})).status_code == 404


async def test_expired_room_counts_as_deleted(
    api: httpx.AsyncClient, emu: DailyEmulator, clock: Clock
) -> None:
    """A room past its exp is 404, unlisted, unjoinable, and its name can be reused."""
    await create_room(api, name="old", properties={"exp": int(clock()) + 60})
    clock.advance(61)
    assert (await api.get("/rooms/old")).status_code == 404
    assert (await api.get("/rooms")).json()["total_count"] == 0
    with pytest.raises(JoinRefused, match="room-expired"):
        emu.join("old")
    await create_room(api, name="old")
    assert [r.name for r in emu.deleted] == ["old"]


async def test_delete_of_expired_room_is_404_with_deleted_flag(
    api: httpx.AsyncClient, clock: Clock
) -> None:
    """Deleting a room past its exp answers 404 with "deleted": true."""
    await create_room(api, name="gone", properties={"exp": int(clock()) + 1})
    clock.advance(2)
    response = await api.delete("/rooms/gone")
    assert response.status_code == 404
    assert response.json()["deleted"] is True


async def test_rest_meeting_token_round_trip(api: httpx.AsyncClient, clock: Clock) -> None:
    """A REST-minted token is an HS256 JWT with abbreviated claims that GET validates back."""
    props = {
        "room_name": "s-1",
        "exp": int(clock()) + 300,
        "is_owner": False,
        "user_name": "Guest",
        "user_id": "user-1",
        "eject_at_token_exp": True,
        "start_video_off": True,
        "lang": "en",
    }
    response = await api.post("/meeting-tokens", json={"properties": props})
    assert response.status_code == 200
    token = response.json()["token"]
    claims = jwt.decode(token, DEFAULT_API_KEY, algorithms=["HS256"])
    assert claims["r"] == "s-1"
    assert claims["ud"] == "user-1"
    assert claims["ejt"] is True
    assert claims["vo"] is True
    assert claims["uil"] == "en"
    assert claims["d"] == DEFAULT_DOMAIN_ID
    assert "iat" in claims
    validated = await api.get(f"/meeting-tokens/{token}")
    assert validated.status_code == 200
    assert validated.json() == props


@pytest.mark.parametrize(
    "properties",
    [{"user_id": "u" * 37}, {"is_owner": "yes"}, {"exp": "soon"}, {"room": "typo"}],
)
async def test_invalid_token_properties_are_refused(
    api: httpx.AsyncClient, properties: dict[str, Any]
) -> None:
    """A long user_id, a mistyped or an unknown token property is a 400."""
    response = await api.post("/meeting-tokens", json={"properties": properties})
    assert response.status_code == 400
    assert response.json()["error"] == "invalid-request-error"


async def test_get_meeting_token_validates(api: httpx.AsyncClient, clock: Clock) -> None:
    """GET /meeting-tokens accepts self-signed tokens and refuses expired, foreign or early ones."""
    good = self_signed(clock, r="s-1", ud="bot-1", o=True)
    response = await api.get(f"/meeting-tokens/{good}")
    assert response.status_code == 200
    assert response.json()["room_name"] == "s-1"
    assert response.json()["is_owner"] is True
    assert response.json()["user_id"] == "bot-1"
    now = int(clock())
    bad = [
        self_signed(clock, r="s-1", exp=now - 1),
        self_signed(clock, key=OTHER_KEY, r="s-1"),
        self_signed(clock, r="s-1", d="another-domain"),
        "not-a-jwt",
    ]
    for token in bad:
        response = await api.get(f"/meeting-tokens/{token}")
        assert response.status_code == 400
        assert response.json().keys() == {"error", "info"}
        assert response.json()["error"] == "invalid-request-error"
    early = self_signed(clock, r="s-1", nbf=now + 60)
    assert (await api.get(f"/meeting-tokens/{early}")).status_code == 400
    ignoring = await api.get(f"/meeting-tokens/{early}", params={"ignoreNbf": "true"})
    assert ignoring.status_code == 200


async def test_self_signed_token_joins_private_room(
    api: httpx.AsyncClient, emu: DailyEmulator, clock: Clock
) -> None:
    """A self-signed token (r, d, iat, exp, o, ud) lets its holder into the private room."""
    await create_room(api, name="priv", privacy="private")
    token = self_signed(clock, r="priv", o=True, ud="bot-s1", u="Bot")
    participant = emu.join("priv", token)
    assert participant["userId"] == "bot-s1"
    assert participant["userName"] == "Bot"
    assert participant["owner"] is True
    assert list(emu.rooms["priv"].participants) == [participant["id"]]


async def test_rest_token_joins_private_room(api: httpx.AsyncClient, emu: DailyEmulator) -> None:
    """A REST-minted token for the room also joins it, without owner rights by default."""
    await create_room(api, name="priv", privacy="private")
    response = await api.post("/meeting-tokens", json={"properties": {"room_name": "priv"}})
    participant = emu.join("priv", response.json()["token"])
    assert participant["owner"] is False


@pytest.mark.parametrize(
    ("claims", "key", "reason"),
    [
        ({"r": "elsewhere"}, DEFAULT_API_KEY, "token-wrong-room"),
        ({"r": "priv", "exp": 1}, DEFAULT_API_KEY, "token-expired"),
        ({"r": "priv", "nbf": 4_000_000_000}, DEFAULT_API_KEY, "token-not-yet-valid"),
        ({"r": "priv"}, OTHER_KEY, "token-invalid"),
        ({"r": "priv", "d": "another-domain"}, DEFAULT_API_KEY, "token-wrong-domain"),
        ({"r": "priv", "ud": "u" * 37}, DEFAULT_API_KEY, "token-invalid"),
        (None, DEFAULT_API_KEY, "token-required"),
    ],
)
async def test_bad_join_is_refused(
    api: httpx.AsyncClient,
    emu: DailyEmulator,
    clock: Clock,
    claims: dict[str, Any] | None,
    key: str,
    reason: str,
) -> None:
    """A wrong-room, expired, early, wrongly signed, foreign or missing token cannot join."""
    await create_room(api, name="priv", privacy="private")
    token = None if claims is None else self_signed(clock, key=key, **claims)
    with pytest.raises(JoinRefused) as refused:
        emu.join("priv", token)
    assert refused.value.reason == reason
    assert emu.rooms["priv"].participants == {}


async def test_public_room_needs_no_token(api: httpx.AsyncClient, emu: DailyEmulator) -> None:
    """Anyone may join a public room without a token; unknown rooms refuse."""
    await create_room(api, name="pub")
    participant = emu.join("pub")
    assert participant["userId"] == participant["id"]
    with pytest.raises(JoinRefused, match="room-not-found"):
        emu.join("nope")


async def test_max_participants(api: httpx.AsyncClient, emu: DailyEmulator, clock: Clock) -> None:
    """A room holds at most max_participants at once; a leave frees a seat."""
    await create_room(api, name="two", privacy="private", properties={"max_participants": 2})
    first = emu.join("two", self_signed(clock, r="two", ud="user"))
    emu.join("two", self_signed(clock, r="two", ud="bot"))
    with pytest.raises(JoinRefused, match="room-full"):
        emu.join("two", self_signed(clock, r="two", ud="third"))
    emu.leave("two", first["id"])
    emu.join("two", self_signed(clock, r="two", ud="user"))
    assert emu.departures[0].left_reason == "left"


async def test_presence_after_join(api: httpx.AsyncClient, clock: Clock) -> None:
    """A participant joined through the control API shows in both presence endpoints."""
    await create_room(api, name="pres", privacy="private")
    token = self_signed(clock, r="pres", ud="bot-7", u="Bot")
    joined = await api.post("/_emulator/rooms/pres/join", json={"token": token})
    assert joined.status_code == 200
    clock.advance(5)
    room = (await api.get("/rooms/pres/presence", params={"userId": "bot-7"})).json()
    assert room["total_count"] == 1
    entry = room["data"][0]
    assert entry["userId"] == "bot-7"
    assert entry["userName"] == "Bot"
    assert entry["room"] == "pres"
    assert entry["duration"] == 5
    assert entry["id"] == joined.json()["id"]
    assert {"mtgSessionId", "joinTime"} <= entry.keys()
    other = (await api.get("/rooms/pres/presence", params={"userId": "nobody"})).json()
    assert other == {"total_count": 0, "data": []}
    everywhere = (await api.get("/presence")).json()
    assert [e["userId"] for e in everywhere["pres"]] == ["bot-7"]


async def test_control_join_refusal_and_leave(api: httpx.AsyncClient, clock: Clock) -> None:
    """The control join answers 403 with the reason; leave removes the participant."""
    await create_room(api, name="ctl", privacy="private")
    refused = await api.post("/_emulator/rooms/ctl/join", json={"token": None})
    assert refused.status_code == 403
    assert refused.json() == {"error": "token-required"}
    token = self_signed(clock, r="ctl")
    joined = (await api.post("/_emulator/rooms/ctl/join", json={"token": token})).json()
    left = await api.post("/_emulator/rooms/ctl/leave", json={"id": joined["id"]})
    assert left.status_code == 200
    assert (await api.get("/rooms/ctl/presence")).json()["total_count"] == 0
    again = await api.post("/_emulator/rooms/ctl/leave", json={"id": joined["id"]})
    assert again.status_code == 404


async def test_delete_ejects_participants(
    api: httpx.AsyncClient, emu: DailyEmulator, clock: Clock
) -> None:
    """Deleting a live room ejects everyone in it."""
    await create_room(api, name="del", privacy="private")
    emu.join("del", self_signed(clock, r="del", ud="user"))
    emu.join("del", self_signed(clock, r="del", ud="bot"))
    assert (await api.delete("/rooms/del")).status_code == 200
    assert {p.user_id for p in emu.departures} == {"user", "bot"}
    assert {p.left_reason for p in emu.departures} == {"room-deleted"}
    assert (await api.get("/presence")).json() == {}


async def test_eject_deadlines(api: httpx.AsyncClient, emu: DailyEmulator, clock: Clock) -> None:
    """eject_at_room_exp ejects at exp; a token's ejt overrides the room and ejects at its exp."""
    now = int(clock())
    await create_room(api, name="ej", properties={"exp": now + 100, "eject_at_room_exp": True})
    emu.join("ej", self_signed(clock, r="ej", ud="room-bound"))
    emu.join("ej", self_signed(clock, r="ej", ud="token-bound", ejt=True, exp=now + 50))
    emu.join("ej", self_signed(clock, r="ej", ud="stays", ejt=True, exp=now + 500))
    clock.advance(60)
    await api.get("/")
    assert [p.user_id for p in emu.departures] == ["token-bound"]
    clock.advance(50)
    await api.get("/")
    assert [p.user_id for p in emu.departures] == ["token-bound", "room-bound"]
    assert [p.user_id for p in emu.rooms["ej"].participants.values()] == ["stays"]


async def test_hidden_and_unique_participants(
    api: httpx.AsyncClient, emu: DailyEmulator, clock: Clock
) -> None:
    """Hidden non-owners are left out of presence; a duplicate user_id ejects the older one."""
    props = {"enable_hidden_participants": True, "enforce_unique_user_ids": True}
    await create_room(api, name="hid", properties=props)
    emu.join("hid", self_signed(clock, r="hid", ud="guest"))
    emu.join("hid", self_signed(clock, r="hid", ud="boss", o=True))
    emu.join("hid", self_signed(clock, r="hid", ud="boss", o=True))
    presence = (await api.get("/rooms/hid/presence")).json()
    assert [e["userId"] for e in presence["data"]] == ["boss"]
    assert [p.left_reason for p in emu.departures] == ["duplicate-user-id"]


@pytest.mark.parametrize(
    ("headers", "status", "error"),
    [
        ({}, 400, "authorization-header-error"),
        ({"Authorization": f"Basic {DEFAULT_API_KEY}"}, 400, "authorization-header-error"),
        ({"Authorization": "Bearer"}, 400, "authorization-header-error"),
        ({"Authorization": f"Bearer {OTHER_KEY}"}, 401, "authentication-error"),
    ],
)
async def test_auth_errors(
    base_url: str, emu: DailyEmulator, headers: dict[str, str], status: int, error: str
) -> None:
    """A missing or malformed Authorization header is 400; a wrong key is 401."""
    async with httpx.AsyncClient(base_url=base_url, headers=headers) as client:
        response = await client.post("/rooms", json={"name": "nope"})
    assert response.status_code == status
    assert response.json()["error"] == error
    assert emu.rooms == {}


async def test_unparseable_json(api: httpx.AsyncClient) -> None:
    """A body that is not JSON is a 400 json-parsing-error."""
    response = await api.post(
        "/rooms", content=b"{name:", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"] == "json-parsing-error"


async def test_requests_are_recorded(api: httpx.AsyncClient, emu: DailyEmulator) -> None:
    """Every API request is recorded with method, path, query and body, refused ones too."""
    await create_room(api, name="rec", properties={"max_participants": 2})
    await api.get("/rooms", params={"limit": "5"})
    await api.post("/rooms", content=b"oops")
    assert emu.requests[0] == (
        "POST",
        "/rooms",
        {},
        {"name": "rec", "properties": {"max_participants": 2}},
    )
    assert emu.requests[1].query == {"limit": "5"}
    assert emu.requests[2].body == "oops"


async def test_default_rate_limits() -> None:
    """The limits follow the reference: 20/s for most endpoints, 2/s for room deletes."""
    assert RATE_LIMITS == {"api": (20.0, 20), "delete_room": (2.0, 2)}
    assert DailyEmulator().limiter.limits == RATE_LIMITS
    assert DailyEmulator(rate_limits=False).limiter.enabled is False


async def test_21st_request_in_a_burst_is_429(api: httpx.AsyncClient, emu: DailyEmulator) -> None:
    """With the 20-request burst spent, the 21st request is a 429 rate-limit-error."""
    emu.limiter.limits["api"] = (0.01, 20)  # the default burst, refilled too slowly to race
    statuses = [(await api.get("/")).status_code for _ in range(20)]
    assert statuses == [200] * 20
    refused = await api.get("/")
    assert refused.status_code == 429
    assert refused.json()["error"] == "rate-limit-error"
    assert "retry-after" not in refused.headers


async def test_third_quick_delete_is_429(api: httpx.AsyncClient, emu: DailyEmulator) -> None:
    """Deletes have their own 2-request burst: a third quick delete is a 429."""
    emu.limiter.limits["delete_room"] = (0.01, 2)
    for name in ("a", "b", "c"):
        await create_room(api, name=name)
    assert (await api.delete("/rooms/a")).status_code == 200
    assert (await api.delete("/rooms/b")).status_code == 200
    refused = await api.delete("/rooms/c")
    assert refused.status_code == 429
    assert refused.json()["error"] == "rate-limit-error"
    assert "c" in emu.rooms
    assert (await api.get("/rooms/c")).status_code == 200


async def test_retry_after_header_when_enabled() -> None:
    """With retry_after_header=True a 429 carries a Retry-After in whole seconds."""
    emu = DailyEmulator(retry_after_header=True)
    emu.limiter.limits["api"] = (0.5, 1)
    headers = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}
    async with serve(emu.app) as url, httpx.AsyncClient(base_url=url, headers=headers) as api:
        await api.get("/")
        refused = await api.get("/")
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "2"


async def test_injected_500(api: httpx.AsyncClient, emu: DailyEmulator) -> None:
    """A queued fault answers its status and server-error body without creating the room."""
    emu.faults.add("create_room", status=500)
    response = await api.post("/rooms", json={"name": "f"})
    assert response.status_code == 500
    assert response.json() == {"error": "server-error", "info": "injected"}
    assert "f" not in emu.rooms
    await create_room(api, name="f")
    assert emu.faults.fired == [("create_room", 500)]


async def test_apply_first_fault(api: httpx.AsyncClient, emu: DailyEmulator) -> None:
    """An apply_first fault creates the room and still answers the error."""
    emu.faults.add("create_room", status=502, apply_first=True)
    response = await api.post("/rooms", json={"name": "half"})
    assert response.status_code == 502
    assert "half" in emu.rooms
    assert (await api.post("/rooms", json={"name": "half"})).status_code == 400


async def test_fault_through_control_api(api: httpx.AsyncClient, emu: DailyEmulator) -> None:
    """Faults queued with POST /_emulator/faults apply to their operation, with their body."""
    await create_room(api, name="ctl")
    body = {"error": "server-error", "info": "maintenance"}
    queued = await api.post(
        "/_emulator/faults", json={"op": "delete_room", "status": 503, "body": body}
    )
    assert queued.json() == {"pending": {"delete_room": 1}}
    response = await api.delete("/rooms/ctl")
    assert response.status_code == 503
    assert response.json() == body
    assert (await api.get("/_emulator/state")).json()["rooms"]["ctl"]["name"] == "ctl"


async def test_dropped_connection(api: httpx.AsyncClient, emu: DailyEmulator) -> None:
    """A status-0 fault closes the connection without any HTTP answer."""
    await create_room(api, name="drop")
    emu.faults.add("get_room", status=0)
    with pytest.raises(httpx.RemoteProtocolError):
        await api.get("/rooms/drop")
    assert (await api.get("/rooms/drop")).status_code == 200


async def test_fault_delay_and_latency(api: httpx.AsyncClient, emu: DailyEmulator) -> None:
    """A fault's delay_s and the per-operation latency both hold the answer back."""
    emu.latency.per_op["domain"] = 0.05
    emu.faults.add("domain", Fault(status=500, delay_s=0.05))
    started = time.monotonic()
    assert (await api.get("/")).status_code == 500
    assert time.monotonic() - started >= 0.1


async def test_standalone_process_answers() -> None:
    """`python -m testkit.fakes.daily` prints its URL and answers GET / with the given key."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "testkit.fakes.daily",
        "--port",
        "0",
        "--api-key",
        OTHER_KEY,
        "--domain",
        "standalone-test",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=30)).decode().strip()
        assert line.startswith("daily emulator on http://127.0.0.1:")
        url = line.removeprefix("daily emulator on ")
        headers = {"Authorization": f"Bearer {OTHER_KEY}"}
        async with httpx.AsyncClient(base_url=url, headers=headers) as client:
            response = await client.get("/")
        assert response.status_code == 200
        assert response.json()["domain_name"] == "standalone-test"
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), timeout=30)


async def test_batch_create_makes_every_room_or_none(
    api: httpx.AsyncClient, emu: DailyEmulator, clock: Clock
) -> None:
    """`POST /batch/rooms` makes each room as `POST /rooms` would and answers them; one bad
    room (or a name taken, in the batch or before it) fails the call and nothing is made."""
    exp = int(clock.now) + 600
    rooms = [
        {"name": f"s-{i}", "privacy": "private", "properties": {"exp": exp, "max_participants": 2}}
        for i in range(3)
    ]
    made = await api.post("/batch/rooms", json={"rooms": rooms})
    assert made.status_code == 200
    assert [r["name"] for r in made.json()] == ["s-0", "s-1", "s-2"]
    assert emu.rooms["s-2"].privacy == "private" and emu.rooms["s-2"].properties["exp"] == exp
    for bad in (
        [{"name": "s-3"}, {"name": "s-bad!"}],
        [{"name": "s-3"}, {"name": "s-3"}],
        [{"name": "s-3"}, {"name": "s-0"}],
        [{"name": "s-3", "properties": {"no_such_property": 1}}],
    ):
        refused = await api.post("/batch/rooms", json={"rooms": bad})
        assert refused.status_code == 400, bad
        assert refused.json()["error"] == "invalid-request-error"
        assert "s-3" not in emu.rooms
    for body in ({"rooms": []}, {"rooms": [{}] * 1001}, {"rooms": ["s-4"]}, {"other": 1}):
        assert (await api.post("/batch/rooms", json=body)).status_code == 400


async def test_batch_delete_counts_the_live_rooms_it_deleted(
    api: httpx.AsyncClient, emu: DailyEmulator, clock: Clock
) -> None:
    """`DELETE /batch/rooms` deletes the named rooms it has, ejecting who is in them, and
    answers how many live rooms went; an unknown name is no error; it is a room delete for the
    rate limit."""
    await create_room(api, name="a")
    await create_room(api, name="b", properties={"exp": int(clock.now) + 10})
    emu.join("a")
    clock.advance(20)
    gone = await api.request("DELETE", "/batch/rooms", json={"rooms": ["a", "b", "nope"]})
    assert gone.status_code == 200 and gone.json() == {"deleted_count": 1}
    assert not emu.rooms and {r.name for r in emu.deleted} == {"a", "b"}
    assert [p.left_reason for p in emu.departures] == ["room-deleted"]
    assert (await api.request("DELETE", "/batch/rooms", json={"rooms": [1]})).status_code == 400
    emu.limiter.limits["delete_room"] = (0.01, 1)
    assert (await api.request("DELETE", "/batch/rooms", json={"rooms": ["x"]})).status_code == 200
    assert (await api.request("DELETE", "/batch/rooms", json={"rooms": ["x"]})).status_code == 429
