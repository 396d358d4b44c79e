"""The `POST /start` request: parsed, typed and checked before anything reaches Fly or Daily."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from dispatcher.errors import BadRequest, ErrorCode
from dispatcher.http.input import MAX_JSON_DEPTH, json_object
from dispatcher.rooms.daily import check_room_properties, check_token_properties

MAX_BODY_BYTES = 1024 * 1024
MAX_SESSION_BODY_BYTES = 16 * 1024
TRANSPORTS = ("daily", "webrtc")
_REGION = re.compile(r"^[a-z]{3}$")


@dataclass(frozen=True)
class StartRequest:
    """What a client asked for: transport, client-settable properties, the bot's body, region,
    and whether a webrtc session gets the default ICE servers too (`enableDefaultIceServers`)."""

    transport: str
    room_properties: dict[str, Any] = field(default_factory=dict)
    token_properties: dict[str, Any] = field(default_factory=dict)
    body: Any = field(default_factory=dict)
    region: str | None = None
    default_ice_servers: bool = False

    @property
    def body_json(self) -> str:
        """The `body` as the bot gets it in SESSION_BODY."""
        return json.dumps(self.body, separators=(",", ":"))


def parse_start(
    raw: bytes,
    *,
    default_transport: str,
    regions: tuple[str, ...],
    roomless_transport: str | None = None,
) -> StartRequest:
    """Parse a `/start` body; unknown top-level keys are ignored, bad values are BadRequest.

    The transport: `transport` if given, else `daily` for `createDailyRoom: true`, else
    `roomless_transport` (default: `default_transport`) for `createDailyRoom: false`, else
    `default_transport`. A daily session always gets its own room: `transport: daily` with
    `createDailyRoom: false` is refused.
    """
    data = json_object(raw, max_depth=MAX_JSON_DEPTH)
    create_room = _boolean(data, "createDailyRoom")
    transport = data.get("transport")
    if transport is None:
        if create_room is None:
            transport = default_transport
        else:
            transport = "daily" if create_room else (roomless_transport or default_transport)
    elif transport == "daily" and create_room is False:
        raise BadRequest(
            "transport daily with createDailyRoom false is not supported: every daily session "
            "gets its own room (send createDailyRoom true, or leave it out)",
            code=ErrorCode.ROOM_REQUIRED,
        )
    if transport not in TRANSPORTS:
        raise BadRequest(
            f"transport must be one of {', '.join(TRANSPORTS)}", code=ErrorCode.UNKNOWN_TRANSPORT
        )
    body = data.get("body", {})
    if len(json.dumps(body, separators=(",", ":"))) > MAX_SESSION_BODY_BYTES:
        raise BadRequest(
            f"body is over {MAX_SESSION_BODY_BYTES} bytes as JSON", code=ErrorCode.BODY_TOO_LARGE
        )
    return StartRequest(
        transport=transport,
        room_properties=check_room_properties(_object(data, "dailyRoomProperties")),
        token_properties=check_token_properties(_object(data, "dailyMeetingTokenProperties")),
        body=body,
        region=_region(data.get("region"), regions),
        default_ice_servers=bool(_boolean(data, "enableDefaultIceServers")),
    )


def _boolean(data: dict[str, Any], key: str) -> bool | None:
    value = data.get(key)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{key} must be a boolean", code=ErrorCode.INVALID_TYPE)
    return value


def _object(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{key} must be an object", code=ErrorCode.INVALID_TYPE)
    return value


def _region(value: Any, allowed: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _REGION.match(value):
        raise BadRequest(
            "region must be a Fly region code such as 'iad'", code=ErrorCode.INVALID_TYPE
        )
    if value not in allowed:
        choices = ", ".join(allowed) or "none: FLY_REGION is not set"
        raise BadRequest(
            f"region {value!r} is not allowed (allowed: {choices})",
            code=ErrorCode.REGION_NOT_ALLOWED,
        )
    return value
