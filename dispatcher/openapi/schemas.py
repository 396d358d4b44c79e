"""The OpenAPI document's component schemas: errors, the start request and its answers,
sessions, health."""

from __future__ import annotations

from typing import Any

from dispatcher.callbacks import MAX_ERROR_CHARS
from dispatcher.config import Settings
from dispatcher.errors import ErrorCode as C
from dispatcher.http.input import MAX_JSON_DEPTH
from dispatcher.openapi.enums import end_reason, error_code, named, session_state
from dispatcher.openapi.parts import ref
from dispatcher.rooms.daily import ROOM_PROPERTIES, TOKEN_PROPERTIES
from dispatcher.rooms.daily_properties import Property
from dispatcher.start import MAX_BODY_BYTES, MAX_SESSION_BODY_BYTES, TRANSPORTS


def schemas(settings: Settings) -> dict[str, Any]:
    """The document's component schemas."""
    nullable_string = {"type": ["string", "null"]}
    timestamp = {"type": "string", "format": "date-time"}
    return {
        "Error": {
            "type": "object",
            "description": "Every error answer.",
            "properties": {
                "detail": {"type": "string", "description": "Human text."},
                "code": error_code(),
                "error": {
                    "type": "string",
                    "description": (
                        "The same text as `detail`: what Pipecat Cloud's SDK (`pipecatcloud`) "
                        "reads."
                    ),
                },
            },
            "required": ["detail", "code", "error"],
            "additionalProperties": False,
        },
        "StartRequest": _start_request(settings),
        "DailyStart": {
            "type": "object",
            "description": "A daily session: join `dailyRoom` with `dailyToken`.",
            "properties": {
                "dailyRoom": {"type": "string", "format": "uri"},
                "dailyToken": {"type": "string", "description": "The user's meeting token."},
                "sessionId": {"type": "string"},
            },
            "required": ["dailyRoom", "dailyToken", "sessionId"],
            "additionalProperties": False,
        },
        "WebRTCStart": {
            "type": "object",
            "description": (
                "A webrtc session: post the SDP offer to `/sessions/{sessionId}/api/offer`."
            ),
            "properties": {
                "sessionId": {"type": "string"},
                "iceConfig": {
                    "type": "object",
                    "properties": {
                        "iceServers": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "urls": {"type": "array", "items": {"type": "string"}}
                                },
                                "required": ["urls"],
                            },
                        }
                    },
                    "required": ["iceServers"],
                },
            },
            "required": ["sessionId", "iceConfig"],
            "additionalProperties": False,
        },
        "Session": {
            "type": "object",
            "description": "A session as the dispatcher follows it.",
            "properties": {
                "sessionId": {"type": "string"},
                "state": session_state(),
                "user": {"type": "string", "description": "The owner (the JWT's `sub`)."},
                "transport": {"type": "string", "enum": list(TRANSPORTS)},
                "region": nullable_string,
                "machineId": nullable_string,
                "roomUrl": nullable_string,
                "endReason": end_reason(),
                "exitCode": {
                    "type": ["integer", "null"],
                    "description": (
                        "The bot's exit code: its machine's, except that the bot's own report "
                        "wins over the stop signal the dispatcher sent it."
                    ),
                },
                "error": {
                    "type": ["string", "null"],
                    "maxLength": MAX_ERROR_CHARS,
                    "description": (
                        "Why the bot failed, as its `ended` report said (e.g. its exception's "
                        f"type and message), cut to {MAX_ERROR_CHARS} characters; null when it "
                        "reported none."
                    ),
                },
                "createdAt": timestamp,
                "readyAt": {**timestamp, "type": ["string", "null"]},
                "endedAt": {**timestamp, "type": ["string", "null"]},
                "expiresAt": timestamp,
            },
            "required": [
                "sessionId",
                "state",
                "user",
                "transport",
                "region",
                "machineId",
                "roomUrl",
                "endReason",
                "exitCode",
                "error",
                "createdAt",
                "readyAt",
                "endedAt",
                "expiresAt",
            ],
            "additionalProperties": False,
        },
        "SessionList": {
            "type": "object",
            "properties": {"sessions": {"type": "array", "items": ref("Session")}},
            "required": ["sessions"],
            "additionalProperties": False,
        },
        "Health": {
            "type": "object",
            "properties": {
                "status": {"const": "ok"},
                "instance": {"type": "string"},
                "draining": {"type": "boolean"},
                "reconciler": {"enum": ["leader", "standby"]},
            },
            "required": ["status", "instance", "draining", "reconciler"],
            "additionalProperties": False,
        },
        "Checks": {
            "type": "object",
            "description": "`ok` or the error of each backend (`store`, `machines`, `rooms`).",
            "additionalProperties": {"type": "string"},
        },
    }


def _properties(rules: dict[str, Property]) -> dict[str, Any]:
    """JSON schemas of allowlisted properties: their type, values and length."""
    return {key: rule.schema() for key, rule in rules.items()}


def _start_request(settings: Settings) -> dict[str, Any]:
    regions = settings.fly_regions
    region: dict[str, Any] = (
        {"type": "string", "enum": list(regions)}
        if regions
        else {"type": "string", "pattern": "^[a-z]{3}$"}
    )
    region["description"] = (
        "A Fly region of `FLY_REGION`, tried first."
        if regions
        else f"`FLY_REGION` is not set: any region is 400 {named(C.REGION_NOT_ALLOWED)}."
    )
    return {
        "type": "object",
        "description": (
            "The request of Pipecat Cloud and the Pipecat runner. Every field is optional; "
            "unknown top-level fields are ignored. The dispatcher alone sets the room's "
            "`privacy`, `exp`, `eject_at_room_exp`, `max_participants` and the tokens' "
            "`is_owner`, `user_id` and `exp`. At most "
            f"{MAX_BODY_BYTES} bytes, nested at most {MAX_JSON_DEPTH} levels."
        ),
        "properties": {
            "createDailyRoom": {
                "type": "boolean",
                "description": (
                    "`true`: a daily session (its own room). `false` without `transport`: "
                    f"`{settings.roomless_transport}` here (webrtc where it is offered, else "
                    "a daily session with its own room, which the bot needs); with "
                    f"`transport: daily` it is 400 {named(C.ROOM_REQUIRED)}."
                ),
            },
            "enableDefaultIceServers": {
                "type": "boolean",
                "description": (
                    "webrtc sessions: `true` adds `DEFAULT_ICE_SERVERS` (here: "
                    f"{', '.join(settings.default_ice_servers) or 'none'}) after "
                    "`ICE_SERVERS`, for the client (`iceConfig`) and the bot; ignored for "
                    "daily sessions."
                ),
            },
            "transport": {
                "type": "string",
                "enum": list(TRANSPORTS),
                "description": (
                    f"Available here: {', '.join(settings.transports) or 'none'} (others are "
                    f"400 {named(C.TRANSPORT_UNAVAILABLE)}); default "
                    f"`{settings.default_transport}`."
                ),
            },
            "dailyRoomProperties": {
                "type": "object",
                "description": "Client-settable room properties (daily sessions only).",
                "properties": _properties(ROOM_PROPERTIES),
                "additionalProperties": False,
            },
            "dailyMeetingTokenProperties": {
                "type": "object",
                "description": "Client-settable meeting-token properties (daily sessions only).",
                "properties": _properties(TOKEN_PROPERTIES),
                "additionalProperties": False,
            },
            "body": {
                "description": (
                    f"Any JSON up to {MAX_SESSION_BODY_BYTES} bytes, handed to the bot as "
                    "`SESSION_BODY`."
                ),
            },
            "region": region,
        },
        "additionalProperties": True,
    }
