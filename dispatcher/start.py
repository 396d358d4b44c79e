"""The `POST /start` request: parsed, typed and checked before anything reaches Fly or Daily."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from dispatcher.errors import BadRequest
from dispatcher.rooms.daily import check_room_properties, check_token_properties

MAX_BODY_BYTES = 1024 * 1024
MAX_SESSION_BODY_BYTES = 16 * 1024
MAX_JSON_DEPTH = 32
TRANSPORTS = ("daily", "webrtc")
_REGION = re.compile(r"^[a-z]{3}$")


@dataclass(frozen=True)
class StartRequest:
    """What a client asked for: transport, client-settable properties, the bot's body, region."""

    transport: str
    room_properties: dict[str, Any] = field(default_factory=dict)
    token_properties: dict[str, Any] = field(default_factory=dict)
    body: Any = field(default_factory=dict)
    region: str | None = None

    @property
    def body_json(self) -> str:
        """The `body` as the bot gets it in SESSION_BODY."""
        return json.dumps(self.body, separators=(",", ":"))


def parse_start(raw: bytes, *, default_transport: str, regions: tuple[str, ...]) -> StartRequest:
    """Parse a `/start` body; unknown top-level keys are ignored, bad values are BadRequest."""
    data = _json_object(raw)
    create_room = data.get("createDailyRoom")
    if create_room is not None and not isinstance(create_room, bool):
        raise BadRequest("createDailyRoom must be a boolean", code="invalid-type")
    transport = data.get("transport")
    if transport is None:
        transport = "daily" if create_room else default_transport
    if transport not in TRANSPORTS:
        raise BadRequest(
            f"transport must be one of {', '.join(TRANSPORTS)}", code="unknown-transport"
        )
    if transport == "daily" and create_room is False:
        raise BadRequest(
            "createDailyRoom=false is not supported: every daily session gets its own room",
            code="room-required",
        )
    body = data.get("body", {})
    if len(json.dumps(body, separators=(",", ":"))) > MAX_SESSION_BODY_BYTES:
        raise BadRequest(
            f"body is over {MAX_SESSION_BODY_BYTES} bytes as JSON", code="body-too-large"
        )
    return StartRequest(
        transport=transport,
        room_properties=check_room_properties(_object(data, "dailyRoomProperties")),
        token_properties=check_token_properties(_object(data, "dailyMeetingTokenProperties")),
        body=body,
        region=_region(data.get("region"), regions),
    )


def _json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest("request body is not valid JSON", code="invalid-json") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", code="invalid-json")
    if _depth(data) > MAX_JSON_DEPTH:
        raise BadRequest(
            f"request body is nested deeper than {MAX_JSON_DEPTH} levels", code="json-too-deep"
        )
    return data


def _depth(value: Any) -> int:
    """The nesting depth of a JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _object(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{key} must be an object", code="invalid-type")
    return value


def _region(value: Any, allowed: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _REGION.match(value):
        raise BadRequest("region must be a Fly region code such as 'iad'", code="invalid-type")
    if value not in allowed:
        choices = ", ".join(allowed) or "none: FLY_REGION is not set"
        raise BadRequest(
            f"region {value!r} is not allowed (allowed: {choices})", code="region-not-allowed"
        )
    return value
