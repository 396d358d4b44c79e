"""Parsing of the POST /start body: compatibility, allowlists, types and limits."""

from __future__ import annotations

import json

import pytest

from dispatcher.errors import BadRequest
from dispatcher.start import MAX_JSON_DEPTH, MAX_SESSION_BODY_BYTES, StartRequest, parse_start


def parse(
    data: object,
    *,
    default: str = "daily",
    regions: tuple[str, ...] = ("iad", "ord"),
    **options: str,
) -> StartRequest:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return parse_start(raw, default_transport=default, regions=regions, **options)


def test_empty_body_is_a_default_session() -> None:
    """An empty body asks for a session on the default transport."""
    req = parse(b"")
    assert req.transport == "daily" and req.body == {} and req.region is None


def test_pipecat_cloud_request_is_accepted() -> None:
    """The request shape of Pipecat Cloud and the Pipecat runner parses, unknown keys ignored."""
    req = parse(
        {
            "createDailyRoom": True,
            "dailyRoomProperties": {"start_video_off": True, "geo": "eu-central-1"},
            "dailyMeetingTokenProperties": {"user_name": "Ada"},
            "body": {"persona": "pirate"},
            "enableDefaultIceServers": True,
            "region": "ord",
        },
        default="webrtc",
    )
    assert req.transport == "daily"
    assert req.room_properties == {"start_video_off": True, "geo": "eu-central-1"}
    assert req.token_properties == {"user_name": "Ada"}
    assert req.body_json == '{"persona":"pirate"}'
    assert req.region == "ord"
    assert req.default_ice_servers is True


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"{not json", "invalid-json"),
        (b"[1, 2]", "invalid-json"),
        ({"createDailyRoom": "yes"}, "invalid-type"),
        ({"enableDefaultIceServers": "yes"}, "invalid-type"),
        ({"transport": "carrier-pigeon"}, "unknown-transport"),
        ({"transport": "daily", "createDailyRoom": False}, "room-required"),
        ({"dailyRoomProperties": []}, "invalid-type"),
        ({"dailyRoomProperties": {"exp": 9999999999}}, "property-not-allowed"),
        ({"dailyRoomProperties": {"privacy": "public"}}, "property-not-allowed"),
        ({"dailyRoomProperties": {"max_participants": 200}}, "property-not-allowed"),
        ({"dailyRoomProperties": {"enable_recording": "cloud"}}, "property-not-allowed"),
        ({"dailyRoomProperties": {"eject_at_room_exp": False}}, "property-not-allowed"),
        ({"dailyRoomProperties": {"start_video_off": "yes"}}, "invalid-property"),
        ({"dailyRoomProperties": {"geo": "mars-1"}}, "invalid-property"),
        ({"dailyMeetingTokenProperties": {"is_owner": True}}, "property-not-allowed"),
        ({"dailyMeetingTokenProperties": {"exp": 1}}, "property-not-allowed"),
        ({"dailyMeetingTokenProperties": {"user_id": "admin"}}, "property-not-allowed"),
        ({"dailyMeetingTokenProperties": {"enable_recording": "cloud"}}, "property-not-allowed"),
        ({"dailyMeetingTokenProperties": {"user_name": 7}}, "invalid-property"),
        ({"region": "Chicago"}, "invalid-type"),
        ({"region": "syd"}, "region-not-allowed"),
        ({"body": "x" * (MAX_SESSION_BODY_BYTES + 1)}, "body-too-large"),
    ],
)
def test_bad_requests_are_400_with_a_code(data: object, code: str) -> None:
    """Malformed JSON, wrong types and disallowed properties are refused with stable codes."""
    with pytest.raises(BadRequest) as info:
        parse(data)
    assert info.value.code == code


def test_deep_json_is_refused() -> None:
    """JSON nested past the limit is refused before anything else looks at it."""
    deep: object = {}
    for _ in range(MAX_JSON_DEPTH + 1):
        deep = {"a": deep}
    with pytest.raises(BadRequest) as info:
        parse({"body": deep})
    assert info.value.code == "json-too-deep"
    with pytest.raises(BadRequest):
        parse(b"[" * 100_000 + b"]" * 100_000)


def test_region_refused_when_no_regions_are_configured() -> None:
    """Without FLY_REGION no client may pick a region (closed by default)."""
    with pytest.raises(BadRequest) as info:
        parse({"region": "iad"}, regions=())
    assert info.value.code == "region-not-allowed"


def test_create_daily_room_false_without_a_transport_is_the_roomless_transport() -> None:
    """`createDailyRoom: false` with no `transport` is webrtc where it is offered, else the
    default (Daily, with its own room); an explicit `transport: daily` with it is refused."""
    assert parse({"createDailyRoom": False}).transport == "daily"
    assert parse({"createDailyRoom": False}, roomless_transport="webrtc").transport == "webrtc"
    assert parse({}, roomless_transport="webrtc").transport == "daily"
    with pytest.raises(BadRequest) as info:
        parse({"createDailyRoom": False, "transport": "daily"}, roomless_transport="webrtc")
    assert info.value.code == "room-required"


def test_default_ice_servers_are_asked_for_with_a_boolean() -> None:
    """`enableDefaultIceServers` is off unless it is `true`."""
    assert parse({"transport": "webrtc"}).default_ice_servers is False
    assert parse({"enableDefaultIceServers": False}).default_ice_servers is False
    assert parse({"enableDefaultIceServers": True}).default_ice_servers is True
