"""The OpenAPI 3.1 document of the public HTTP API, served at `/openapi.json`.

Written as data, from the code's own constants (property allowlists, transports, limits, states)
so that it cannot drift from what the handlers check; `tests/test_openapi.py` compares it with
the app's routes and its answers, `tests/test_schemathesis.py` fuzzes the app with it. The bot
callbacks (`/internal/...`) are private and the local mode's page is not an API: neither is
described.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from dispatcher.callbacks import MAX_ERROR_CHARS
from dispatcher.config import JWT_ALGORITHMS, Settings
from dispatcher.http_input import MAX_JSON_DEPTH
from dispatcher.proxy import MAX_PROXY_BODY_BYTES, METHODS
from dispatcher.rooms.daily import GEO_REGIONS, ROOM_PROPERTIES, TOKEN_PROPERTIES
from dispatcher.rooms.daily_properties import Property
from dispatcher.start import MAX_BODY_BYTES, MAX_SESSION_BODY_BYTES, TRANSPORTS
from dispatcher.store import ACTIVE_STATES, TERMINAL_STATES
from dispatcher.webhooks import MAX_WEBHOOK_BYTES, TOLERANCE_S

OPENAPI_VERSION = "3.1.0"
JSON = "application/json"
_REF = "#/components/schemas/"
# A proxied path's segment (see proxy.check_path), never `.` or `..`.
_SEGMENT = r"[A-Za-z0-9_~-][A-Za-z0-9_.~-]*"


def openapi_document(settings: Settings) -> dict[str, Any]:
    """The OpenAPI document of this dispatcher as configured (its regions, its auth)."""
    # app.py imports this module: its constants are read once it is loaded.
    from dispatcher.app import MAX_IDEMPOTENCY_KEY, MAX_LIST_LIMIT

    secured: list[dict[str, list[str]]] = [{"bearerAuth": []}] if settings.auth == "jwt" else []
    open_: list[dict[str, list[str]]] = []
    session_id = {
        "name": "session_id",
        "in": "path",
        "required": True,
        "description": "The session's id (`sessionId` of the start's answer).",
        "schema": {"type": "string", "minLength": 1, "maxLength": 64},
    }
    paths: dict[str, Any] = {
        "/start": {"post": _start_operation(settings, secured, MAX_IDEMPOTENCY_KEY)},
        "/v1/public/{agent}/start": {
            "post": _pipecat_cloud_start(_start_operation(settings, secured, MAX_IDEMPOTENCY_KEY))
        },
        "/sessions": {"get": _list_operation(secured, MAX_LIST_LIMIT)},
        "/sessions/{session_id}": {
            "get": {
                "operationId": "getSession",
                "summary": "A session (the caller's own; an admin: any session)",
                "security": secured,
                "parameters": [session_id],
                "responses": {
                    "200": _json("The session.", _ref("Session")),
                    **_errors(
                        401,
                        (404, "`session-not-found` (also another user's session)"),
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
                    "202": _json("The session, now `ending` (or as it was).", _ref("Session")),
                    **_errors(
                        401,
                        (404, "`session-not-found`"),
                        (502, "`upstream-error`: stopping the machine failed"),
                        503,
                        (504, "`upstream-timeout`"),
                    ),
                },
            },
        },
        "/sessions/{session_id}/{path}": {
            method.lower(): _proxy_operation(method, session_id, secured) for method in METHODS
        },
        "/healthz": {"get": _healthz_operation(open_)},
        "/readyz": {"get": _readyz_operation(open_)},
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "security": open_,
                "responses": {"200": _json("The OpenAPI document.", {"type": "object"})},
            }
        },
    }
    if settings.daily_webhook_secret is not None:
        # Served only when webhooks are configured.
        paths["/webhooks/daily"] = {"post": _webhook_operation(open_)}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "pipecat-fly-dispatcher",
            "version": _version(),
            "description": (
                "A VM-per-session dispatcher for Pipecat voice bots on Fly.io Machines. Every "
                'answer is JSON, errors included: `{"detail": "<human text>", "code": '
                '"<stable-code>", "error": "<the same text>"}`.'
            ),
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": (
                        f"`Authorization: Bearer <JWT>`, signed {'/'.join(JWT_ALGORITHMS)} "
                        "(HS256 with `JWT_SECRET`, RS256/ES256 with a key of `JWT_JWKS_URL`; "
                        "the token's `alg` must be in `JWT_ALGORITHMS`). `exp` and `sub` are "
                        "required (`sub` is the user), `aud`/`iss` checked when configured. "
                        f"A token whose `role` is `{settings.jwt_admin_role}` (or whose `roles` "
                        "list holds it) is an admin's."
                    ),
                }
            },
            "schemas": _schemas(settings),
        },
    }


def _version() -> str:
    try:
        return importlib.metadata.version("pipecat-fly-dispatcher")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _json(description: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}, **extra}


# The codes each status can carry, for the operations that do not say more.
_DEFAULT_CODES = {
    400: "a bad request",
    401: "`missing-credentials`, `invalid-token`, `token-expired`",
    403: "`admin-required`",
    404: "`not-found`",
    409: "a conflict",
    410: "`session-ended`, `bot-gone`",
    413: "`payload-too-large`",
    422: "`idempotency-key-reused`",
    429: "`rate-limited`, `at-capacity`, `user-at-capacity`, `queue-full`",
    502: "`upstream-error`",
    503: "`jwks-unavailable` (the identity provider's keys are unreachable)",
    504: "`upstream-timeout`",
}
# Statuses whose answers always carry Retry-After, and those whose answers may.
_RETRY_AFTER_ALWAYS = {429}
_RETRY_AFTER_SOMETIMES = {409, 503}


def _errors(*statuses: int | tuple[int, str]) -> dict[str, Any]:
    """Error answers: a status alone (its default codes) or (status, description)."""
    answers: dict[str, Any] = {}
    for entry in statuses:
        status, codes = entry if isinstance(entry, tuple) else (entry, _DEFAULT_CODES[entry])
        answer = _json(f"Error: {codes}.", _ref("Error"))
        if status in _RETRY_AFTER_ALWAYS or status in _RETRY_AFTER_SOMETIMES:
            answer["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before trying again.",
                    "required": status in _RETRY_AFTER_ALWAYS,
                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                }
            }
        answers[str(status)] = answer
    return answers


def _schemas(settings: Settings) -> dict[str, Any]:
    nullable_string = {"type": ["string", "null"]}
    timestamp = {"type": "string", "format": "date-time"}
    return {
        "Error": {
            "type": "object",
            "description": "Every error answer.",
            "properties": {
                "detail": {"type": "string", "description": "Human text."},
                "code": {"type": "string", "description": "A stable kebab-case code."},
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
                "state": {"type": "string", "enum": [*ACTIVE_STATES, *TERMINAL_STATES]},
                "user": {"type": "string", "description": "The owner (the JWT's `sub`)."},
                "transport": {"type": "string", "enum": list(TRANSPORTS)},
                "region": nullable_string,
                "machineId": nullable_string,
                "roomUrl": nullable_string,
                "endReason": {
                    "type": ["string", "null"],
                    "description": (
                        "`deleted`, `max_duration`, `ready_timeout`, `start_interrupted`, "
                        "`dispatcher_stopped` (a local bot's dispatcher stopped), the bot's own "
                        "reason (`participant_left`, ...), `oom_killed`, `dispatcher_lost` (a "
                        "local bot died with its dispatcher), `completed`, `crashed` or "
                        "`exited_before_ready`."
                    ),
                },
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
            "properties": {"sessions": {"type": "array", "items": _ref("Session")}},
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
        else "`FLY_REGION` is not set: any region is 400 `region-not-allowed`."
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
                    "`transport: daily` it is 400 `room-required`."
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
                    f"400 `transport-unavailable`); default `{settings.default_transport}`."
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


def _start_operation(
    settings: Settings, secured: list[dict[str, list[str]]], max_key: int
) -> dict[str, Any]:
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
            "content": {JSON: {"schema": _ref("StartRequest")}},
        },
        "responses": {
            "200": _json(
                "The session: a daily room to join, or a webrtc session to offer to.",
                {"oneOf": [_ref("DailyStart"), _ref("WebRTCStart")]},
            ),
            **_errors(
                (
                    400,
                    "`invalid-idempotency-key`, `invalid-json`, `json-too-deep`, "
                    "`invalid-type`, `unknown-transport`, `room-required`, "
                    "`property-not-allowed`, `invalid-property`, `region-not-allowed`, "
                    "`body-too-large`, `transport-unavailable`",
                ),
                401,
                (
                    409,
                    "`idempotency-key-in-progress` (with Retry-After), `session-ended` (a "
                    "DELETE won the race with the start)",
                ),
                (413, f"`payload-too-large` (over {MAX_BODY_BYTES} bytes)"),
                (422, "`idempotency-key-reused` (the same key with another body)"),
                429,
                (502, "`upstream-error`: Fly or Daily failed (the detail names which)"),
                (
                    503,
                    "`draining` (with Retry-After), `jwks-unavailable` (with Retry-After), "
                    "`start-interrupted`",
                ),
                (504, "`upstream-timeout`"),
            ),
        },
    }


def _pipecat_cloud_start(start: dict[str, Any]) -> dict[str, Any]:
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


def _list_operation(secured: list[dict[str, list[str]]], max_limit: int) -> dict[str, Any]:
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
                "schema": {"type": "string", "enum": [*ACTIVE_STATES, *TERMINAL_STATES]},
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
            "200": _json("The sessions.", _ref("SessionList")),
            **_errors(
                (400, "`invalid-state`, `invalid-limit`, `invalid-user`"),
                401,
                (403, "`admin-required`: the token lacks the admin role"),
                503,
            ),
        },
    }


def _proxy_operation(
    method: str, session_id: dict[str, Any], secured: list[dict[str, list[str]]]
) -> dict[str, Any]:
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
            **_errors(
                (400, "`invalid-path`, or the bot's own"),
                401,
                (
                    404,
                    "`session-not-found`, `no-bot-routes` (a daily session), or the bot's own",
                ),
                (409, "`session-starting`, or the bot's own"),
                410,
                (413, f"`payload-too-large` (over {MAX_PROXY_BODY_BYTES} bytes), or the bot's"),
                (502, "`bot-unreachable`"),
                503,
                (504, "`bot-timeout`"),
            ),
            "default": {
                "description": "The bot's answer, as it is.",
                "content": {"*/*": {"schema": {}}},
            },
        },
    }


def _webhook_operation(open_: list[dict[str, list[str]]]) -> dict[str, Any]:
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
            "200": _json(
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
            **_errors(
                (400, "`invalid-json`, `json-too-deep`"),
                (401, "`invalid-signature`, `stale-webhook`"),
                (413, f"`payload-too-large` (over {MAX_WEBHOOK_BYTES} bytes)"),
            ),
        },
    }


def _healthz_operation(open_: list[dict[str, list[str]]]) -> dict[str, Any]:
    return {
        "operationId": "healthz",
        "summary": "Liveness: 200 while the process runs",
        "security": open_,
        "responses": {"200": _json("The instance.", _ref("Health"))},
    }


def _readyz_operation(open_: list[dict[str, list[str]]]) -> dict[str, Any]:
    return {
        "operationId": "readyz",
        "summary": "Readiness: the store, the machine backend and Daily answer",
        "security": open_,
        "responses": {
            "200": _json(
                "Every backend answers.",
                {
                    "type": "object",
                    "properties": {"status": {"const": "ready"}, "checks": _ref("Checks")},
                    "required": ["status", "checks"],
                    "additionalProperties": False,
                },
            ),
            "503": _json(
                "`backend-unavailable` (with each backend's check) or `draining`.",
                {
                    "type": "object",
                    "properties": {
                        "detail": {"type": "string"},
                        "code": {"enum": ["backend-unavailable", "draining"]},
                        "error": {"type": "string"},
                        "checks": _ref("Checks"),
                    },
                    "required": ["detail", "code", "error", "checks"],
                    "additionalProperties": False,
                },
            ),
        },
    }
