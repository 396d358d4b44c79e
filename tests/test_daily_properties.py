"""Client room and token properties against Daily's documented types and values: the dispatcher
refuses a bad one (400, before anything is made), and the Daily emulator refuses it as Daily
does (its own 400), from the same facts."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dispatcher.config import Secret
from dispatcher.errors import BadRequest, UpstreamError
from dispatcher.rooms.daily import DailyRooms
from dispatcher.rooms.daily_api import DailyAPI
from dispatcher.start import StartRequest, parse_start
from dispatcher.upstream import RetryPolicy
from testkit.fakes.daily import DailyEmulator
from testkit.harness import Stack, dispatcher_stack
from testkit.net import serve

KEY = "k" * 64
FAST = RetryPolicy(attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
ROOM = "dailyRoomProperties"
TOKEN = "dailyMeetingTokenProperties"

# Every client-settable property with a value of the wrong type or outside Daily's documented
# values, and what the error must say it must be.
BAD = [
    (ROOM, "lang", "klingon", "one of da, de, en,"),
    (ROOM, "lang", "EN", "one of da, de, en,"),
    (ROOM, "lang", 7, "one of da, de, en,"),
    (ROOM, "geo", "mars-1", "one of af-south-1,"),
    (ROOM, "geo", None, "one of af-south-1,"),
    (ROOM, "enable_prejoin_ui", "yes", "a boolean"),
    (ROOM, "enable_chat", 1, "a boolean"),
    (ROOM, "enable_knocking", None, "a boolean"),
    (ROOM, "enable_people_ui", "true", "a boolean"),
    (ROOM, "enable_screenshare", 0, "a boolean"),
    (ROOM, "start_video_off", [], "a boolean"),
    (ROOM, "start_audio_off", {}, "a boolean"),
    (TOKEN, "lang", "klingon", "one of da, de, en,"),
    (TOKEN, "lang", True, "one of da, de, en,"),
    (TOKEN, "user_name", 7, "a string of at most 64 characters"),
    (TOKEN, "user_name", "x" * 65, "a string of at most 64 characters"),
    (TOKEN, "start_video_off", "false", "a boolean"),
    (TOKEN, "start_audio_off", 1.0, "a boolean"),
    (TOKEN, "enable_screenshare", None, "a boolean"),
]


def parse(data: dict[str, Any]) -> StartRequest:
    return parse_start(json.dumps(data).encode(), default_transport="daily", regions=("iad",))


@pytest.mark.parametrize(
    ("field", "name", "value", "expected"),
    BAD,
    ids=[f"{'room' if f == ROOM else 'token'}-{n}-{v!r}"[:40] for f, n, v, _ in BAD],
)
def test_a_wrong_type_or_value_is_400_naming_the_property(
    field: str, name: str, value: Any, expected: str
) -> None:
    """A client property of the wrong type or outside Daily's values is 400 `invalid-property`,
    naming the property and what it must be."""
    with pytest.raises(BadRequest) as caught:
        parse({field: {name: value}})
    assert caught.value.code == "invalid-property"
    assert caught.value.detail.startswith(f"{field}.{name} must be {expected}")


def test_daily_s_documented_values_are_taken() -> None:
    """Every value Daily documents for a client property is accepted as it is."""
    room = {
        "lang": "pt-BR",
        "geo": "af-south-1",
        "enable_prejoin_ui": True,
        "enable_chat": False,
        "enable_knocking": True,
        "enable_people_ui": False,
        "enable_screenshare": True,
        "start_video_off": True,
        "start_audio_off": False,
    }
    token = {
        "lang": "user",
        "user_name": "Ada " + "x" * 60,
        "start_video_off": True,
        "start_audio_off": False,
        "enable_screenshare": False,
    }
    request = parse({ROOM: room, TOKEN: token})
    assert request.room_properties == room and request.token_properties == token
    for lang in ("da", "de", "en", "es", "fi", "fr", "it", "jp", "ka", "nl", "no", "pt", "pl"):
        assert parse({ROOM: {"lang": lang}, TOKEN: {"lang": lang}}).room_properties["lang"] == lang


def upstream_untouched(stack: Stack) -> bool:
    """Whether no API call beyond start-up reached Fly or Daily."""
    assert stack.fly is not None and stack.daily is not None
    daily_calls = [r for r in stack.daily.requests if r.path != "/"]
    fly_calls = [r for r in stack.fly.requests if r.method != "GET"]
    return not daily_calls and not fly_calls and not stack.fly.machines


@pytest.mark.parametrize("field", [ROOM, TOKEN])
async def test_a_start_with_an_undocumented_language_is_400_and_makes_nothing(
    tmp_path: Path, field: str
) -> None:
    """`lang: "klingon"` (Daily takes only its documented codes) is answered 400
    `invalid-property` naming the property, and neither Fly nor Daily is called."""
    async with dispatcher_stack(tmp_path) as stack:
        response = await stack.http.post(
            "/start",
            json={"createDailyRoom": True, field: {"lang": "klingon"}},
            headers=stack.headers(),
        )
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["code"] == "invalid-property"
        assert body["detail"].startswith(f"{field}.lang must be one of ")
        assert upstream_untouched(stack)


@pytest.fixture
async def daily() -> AsyncIterator[tuple[DailyEmulator, DailyRooms, str]]:
    emu = DailyEmulator(api_key=KEY)
    async with serve(emu.app) as url, DailyAPI.client(url, KEY) as http:
        rooms = DailyRooms(DailyAPI(http, FAST), Secret(KEY), FAST)
        await rooms.open()
        yield emu, rooms, url


async def test_daily_refuses_the_room_the_dispatcher_used_to_ask_for(
    daily: tuple[DailyEmulator, DailyRooms, str],
) -> None:
    """The create a start with `lang: "klingon"` made before the check (the plan itself does
    not check) is refused by the emulator as Daily refuses it: 400 `invalid-request-error`
    naming `lang`, and no room."""
    emu, rooms, url = daily
    plan = rooms.plan("s-klingon", "user-1", time.time() + 600, {"lang": "klingon"}, {})
    with pytest.raises(UpstreamError) as caught:
        await rooms.create(plan)
    assert caught.value.status == 400
    assert caught.value.upstream_code == "invalid-request-error"
    assert emu.rooms == {}
    (sent,) = [r for r in emu.requests if r.method == "POST" and r.path == "/rooms"]
    assert sent.body["properties"]["lang"] == "klingon"
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as api:
        again = await api.post("/rooms", json=sent.body)
    assert again.status_code == 400
    assert set(again.json()) == {"error", "info"}
    assert again.json()["error"] == "invalid-request-error" and "lang" in again.json()["info"]


@pytest.mark.parametrize(
    "properties",
    [{"lang": "klingon"}, {"lang": 7}, {"enable_recording": "tape"}, {"user_id": "u" * 37}],
)
async def test_daily_refuses_undocumented_token_values(
    daily: tuple[DailyEmulator, DailyRooms, str], properties: dict[str, Any]
) -> None:
    """`POST /meeting-tokens` with a property outside Daily's documented values is Daily's 400
    `invalid-request-error` naming the property."""
    _, _, url = daily
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as api:
        response = await api.post(
            "/meeting-tokens", json={"properties": {"room_name": "s-1", **properties}}
        )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid-request-error"
    assert next(iter(properties)) in response.json()["info"]


async def test_daily_takes_documented_and_unverified_values(
    daily: tuple[DailyEmulator, DailyRooms, str],
) -> None:
    """The emulator creates rooms and tokens with documented values, and with what the reference
    leaves open: `geo: "NULL"` (the default's spelling) and a long `user_name`."""
    emu, _, url = daily
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as api:
        room = await api.post(
            "/rooms",
            json={"name": "r-1", "properties": {"lang": "pt-BR", "geo": "NULL"}},
        )
        assert room.status_code == 200, room.text
        token = await api.post(
            "/meeting-tokens",
            json={"properties": {"room_name": "r-1", "lang": "user", "user_name": "x" * 500}},
        )
        assert token.status_code == 200, token.text
    assert emu.rooms["r-1"].properties["lang"] == "pt-BR"
