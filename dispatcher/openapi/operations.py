"""The OpenAPI document's operations: each public route's parameters, body and answers."""

from __future__ import annotations

from typing import Any

from dispatcher.config import Settings
from dispatcher.errors import ErrorCode as C
from dispatcher.http.proxy import MAX_PROXY_BODY_BYTES
from dispatcher.openapi.enums import named, session_state
from dispatcher.openapi.parts import JSON, error_answers, json_answer, ref
from dispatcher.rooms.daily import GEO_REGIONS
from dispatcher.start import MAX_BODY_BYTES
from dispatcher.webhooks import MAX_WEBHOOK_BYTES, TOLERANCE_S

Security = list[dict[str, list[str]]]
# A proxied path's segment (see proxy.check_path), never `.` or `..`.
_SEGMENT = r"[A-Za-z0-9_~-][A-Za-z0-9_.~-]*"


def session_operations(session_id: dict[str, Any], secured: Security) -> dict[str, Any]:
    """`GET` and `DELETE /sessions/{session_id}`."""
    return {
        "get": {
            "operationId": "getSession",
            "summary": "A session (the caller's own; an admin: any session)",
            "security": secured,
            "parameters": [session_id],
            "responses": {
                "200": json_answer("The session.", ref("Session")),
                **error_answers(
                    401,
                    (404, [(C.SESSION_NOT_FOUND, "also another user's session")]),
                    503,
                ),
            },
        },
        "delete": {
            "operationId": "endSession",
            "summary": "End a session (the caller's own; an admin: any session); idempotent",
            "description": (
                "The bot gets SIGTERM and its grace period (`BOT_STOP_TIMEOUT_S`); the room "
                "is deleted once the machine is gone. An ended session answers as it is."
            ),
            "security": secured,
            "parameters": [session_id],
            "responses": {
                "202": json_answer("The session, now `ending` (or as it was).", ref("Session")),
                **error_answers(
                    401,
                    (404, [C.SESSION_NOT_FOUND]),
                    (502, [(C.UPSTREAM_ERROR, "stopping the machine failed")]),
                    503,
                    (504, [C.UPSTREAM_TIMEOUT]),
                ),
            },
        },
    }


def start_operation(settings: Settings, secured: Security, max_key: int) -> dict[str, Any]:
    return {
        "operationId": "start",
        "summary": "Start a session: a room (daily) and a bot machine",
        "description": (
            "Answers as soon as the machine is created; the client joins while it boots. "
            f"`geo` values: {', '.join(GEO_REGIONS)}."
        ),
        "security": secured,
        "parameters": [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": (
                    "A retry with the same key (per user) and the same body gets the first "
                    "answer again, for 24 hours; never a second VM."
                ),
                "schema": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": max_key,
                    "pattern": f"^[!-~]([ -~]{{0,{max_key - 2}}}[!-~])?$",
                },
            }
        ],
        "requestBody": {
            "required": False,
            "content": {JSON: {"schema": ref("StartRequest")}},
        },
        "responses": {
            "200": json_answer(
                "The session: a daily room to join, or a webrtc session to offer to.",
                {"oneOf": [ref("DailyStart"), ref("WebRTCStart")]},
            ),
            **error_answers(
                (
                    400,
                    [
                        C.INVALID_IDEMPOTENCY_KEY,
                        C.INVALID_JSON,
                        C.JSON_TOO_DEEP,
                        C.INVALID_TYPE,
                        C.UNKNOWN_TRANSPORT,
                        C.ROOM_REQUIRED,
                        C.PROPERTY_NOT_ALLOWED,
                        C.INVALID_PROPERTY,
                        C.REGION_NOT_ALLOWED,
                        C.BODY_TOO_LARGE,
                        C.TRANSPORT_UNAVAILABLE,
                    ],
                ),
                401,
                (
                    409,
                    [
                        (C.IDEMPOTENCY_KEY_IN_PROGRESS, "with Retry-After"),
                        (C.SESSION_ENDED, "a DELETE won the race with the start"),
                    ],
                ),
                (413, [(C.PAYLOAD_TOO_LARGE, f"over {MAX_BODY_BYTES} bytes")]),
                (422, [(C.IDEMPOTENCY_KEY_REUSED, "the same key with another body")]),
                429,
                (502, [(C.UPSTREAM_ERROR, "Fly or Daily failed: the detail names which")]),
                (
                    503,
                    [
                        (C.DRAINING, "with Retry-After"),
                        (C.JWKS_UNAVAILABLE, "with Retry-After"),
                        C.START_INTERRUPTED,
                    ],
                ),
                (504, [C.UPSTREAM_TIMEOUT]),
            ),
        },
    }


def pipecat_cloud_start(start: dict[str, Any]) -> dict[str, Any]:
    """The start at the path Pipecat Cloud's SDK posts to (`PIPECAT_API_HOST` + it)."""
    agent = {
        "name": "agent",
        "in": "path",
        "required": True,
        "description": (
            "The agent's name, as the client knows it from Pipecat Cloud: any name starts this "
            "dispatcher's bot."
        ),
        "schema": {"type": "string", "minLength": 1},
    }
    return {
        **start,
        "operationId": "startPipecatCloud",
        "summary": "Start a session, at Pipecat Cloud's path: the same as `POST /start`",
        "parameters": [agent, *start["parameters"]],
    }


def list_operation(secured: Security, max_limit: int) -> dict[str, Any]:
    return {
        "operationId": "listSessions",
        "summary": "Sessions, newest first (admin only)",
        "description": "The active sessions, or those in `state`; filtered by `user`.",
        "security": secured,
        "parameters": [
            {
                "name": "state",
                "in": "query",
                "required": False,
                "schema": session_state(),
            },
            {
                "name": "user",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "maxLength": 256},
            },
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": max_limit, "default": 100},
            },
        ],
        "responses": {
            "200": json_answer("The sessions.", ref("SessionList")),
            **error_answers(
                (400, [C.INVALID_STATE, C.INVALID_LIMIT, C.INVALID_USER]),
                401,
                (403, [(C.ADMIN_REQUIRED, "the token lacks the admin role")]),
                503,
            ),
        },
    }


def proxy_operation(method: str, session_id: dict[str, Any], secured: Security) -> dict[str, Any]:
    return {
        "operationId": f"proxy{method.capitalize()}",
        "summary": "Pass a request on to the session's bot (webrtc sessions: `api/offer`)",
        "description": (
            "The owner's live session only. Only the body, its `Content-Type` and `Accept` "
            f"reach the bot, with `X-Session-Id`; bodies are limited to {MAX_PROXY_BODY_BYTES} "
            "bytes each way. The bot's answer is passed on as it is (a non-JSON error answer "
            "becomes a JSON error)."
        ),
        "security": secured,
        "parameters": [
            session_id,
            {
                "name": "path",
                "in": "path",
                "required": True,
                "description": "The bot's path, e.g. `api/offer`: plain segments only.",
                "schema": {
                    "type": "string",
                    "pattern": f"^{_SEGMENT}(/{_SEGMENT})*$",
                    "maxLength": 256,
                },
            },
        ],
        **(
            {"requestBody": {"required": False, "content": {"*/*": {"schema": {}}}}}
            if method in ("POST", "PUT", "PATCH")
            else {}
        ),
        "responses": {
            **_or_the_bots(
                error_answers(
                    (400, [C.INVALID_PATH]),
                    401,
                    (404, [C.SESSION_NOT_FOUND, (C.NO_BOT_ROUTES, "a daily session")]),
                    (409, [C.SESSION_STARTING]),
                    410,
                    (413, [(C.PAYLOAD_TOO_LARGE, f"over {MAX_PROXY_BODY_BYTES} bytes")]),
                    (502, [C.BOT_UNREACHABLE]),
                    503,
                    (504, [C.BOT_TIMEOUT]),
                )
            ),
            "default": {
                "description": (
                    "The bot's answer, as it is (an error answer that is not JSON becomes "
                    f"{named(C.BOT_ERROR)} at the bot's status)."
                ),
                "content": {"*/*": {"schema": {}}},
            },
        },
    }


def webhook_operation(open_: Security) -> dict[str, Any]:
    return {
        "operationId": "dailyWebhook",
        "summary": "Daily's webhook receiver (not for clients)",
        "description": (
            "Daily's events, verified by HMAC: `X-Webhook-Signature` is the base64 "
            "HMAC-SHA256, keyed with the base64-decoded `DAILY_WEBHOOK_SECRET`, of "
            "`<X-Webhook-Timestamp>.<raw body>`; the timestamp (unix seconds or milliseconds, "
            f"or ISO 8601) must be within {TOLERANCE_S:.0f} s of the dispatcher's clock. Events "
            "are deduplicated by `id`. `meeting.ended` and `participant.left` of a session's "
            "room end that session; other events are ignored. Daily's verification request "
            "(an empty body, or a JSON object without `type`) is answered 200 unsigned, with "
            f"no effect. At most {MAX_WEBHOOK_BYTES} bytes."
        ),
        "security": open_,
        "parameters": [
            {
                "name": "X-Webhook-Signature",
                "in": "header",
                "required": False,
                "description": "Required for events (not for the verification request).",
                "schema": {"type": "string"},
            },
            {
                "name": "X-Webhook-Timestamp",
                "in": "header",
                "required": False,
                "description": "Required for events (not for the verification request).",
                "schema": {"type": "string"},
            },
        ],
        "requestBody": {
            "required": False,
            "content": {
                JSON: {
                    "schema": {
                        "type": "object",
                        "description": "A Daily event (or the verification request).",
                        "properties": {
                            "version": {"type": "string"},
                            "type": {"type": "string"},
                            "id": {"type": "string"},
                            "payload": {"type": "object"},
                            "event_ts": {"type": "number"},
                        },
                    }
                }
            },
        },
        "responses": {
            "200": json_answer(
                "Taken: the verification request (`test`), an event ignored (`ignored`: "
                "`event` or `room`), a replay (`duplicate`), or a session's event (`ending`: "
                "whether this event ended it).",
                {
                    "type": "object",
                    "properties": {
                        "ok": {"const": True},
                        "test": {"const": True},
                        "ignored": {"enum": ["event", "room"]},
                        "duplicate": {"const": True},
                        "sessionId": {"type": "string"},
                        "ending": {"type": "boolean"},
                    },
                    "required": ["ok"],
                    "additionalProperties": False,
                },
            ),
            **error_answers(
                (400, [C.INVALID_JSON, C.JSON_TOO_DEEP]),
                (401, [C.INVALID_SIGNATURE, C.STALE_WEBHOOK]),
                (413, [(C.PAYLOAD_TOO_LARGE, f"over {MAX_WEBHOOK_BYTES} bytes")]),
            ),
        },
    }


def healthz_operation(open_: Security) -> dict[str, Any]:
    return {
        "operationId": "healthz",
        "summary": "Liveness: 200 while the process runs",
        "security": open_,
        "responses": {"200": json_answer("The instance.", ref("Health"))},
    }


def readyz_operation(open_: Security) -> dict[str, Any]:
    return {
        "operationId": "readyz",
        "summary": "Readiness: the store, the machine backend and Daily answer",
        "security": open_,
        "responses": {
            "200": json_answer(
                "Every backend answers.",
                {
                    "type": "object",
                    "properties": {"status": {"const": "ready"}, "checks": ref("Checks")},
                    "required": ["status", "checks"],
                    "additionalProperties": False,
                },
            ),
            "503": json_answer(
                f"{named(C.BACKEND_UNAVAILABLE)} (with each backend's check) or "
                f"{named(C.DRAINING)}.",
                {
                    "type": "object",
                    "properties": {
                        "detail": {"type": "string"},
                        "code": {"enum": [C.BACKEND_UNAVAILABLE.value, C.DRAINING.value]},
                        "error": {"type": "string"},
                        "checks": ref("Checks"),
                    },
                    "required": ["detail", "code", "error", "checks"],
                    "additionalProperties": False,
                },
            ),
        },
    }


def _or_the_bots(answers: dict[str, Any]) -> dict[str, Any]:
    """The proxy's error answers: the dispatcher's own, or the bot's JSON answer as it is."""
    for answer in answers.values():
        answer["description"] = answer["description"].removesuffix(".") + ", or the bot's own."
        content = answer["content"][JSON]
        content["schema"] = {"anyOf": [content["schema"], {"description": "The bot's answer."}]}
    return answers
