"""The bot contract's environment: what the dispatcher gives each bot, read once at start-up.

Standard library only, so that a malformed environment fails before any of Pipecat's imports.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

SESSION_ID = "SESSION_ID"
DAILY_ROOM_URL = "DAILY_ROOM_URL"
DAILY_TOKEN = "DAILY_TOKEN"  # noqa: S105 (a variable name, not a secret)
DISPATCHER_URL = "DISPATCHER_URL"
BOT_CALLBACK_TOKEN = "BOT_CALLBACK_TOKEN"  # noqa: S105
SESSION_BODY = "SESSION_BODY"
SESSION_MAX_DURATION_S = "SESSION_MAX_DURATION_S"
TRACEPARENT = "TRACEPARENT"
BOT_TRANSPORT = "BOT_TRANSPORT"
BOT_HOST = "BOT_HOST"
BOT_PORT = "BOT_PORT"
ICE_SERVERS = "ICE_SERVERS"

DAILY = "daily"
WEBRTC = "webrtc"
TRANSPORTS = (DAILY, WEBRTC)
DEFAULT_BOT_HOST = "127.0.0.1"
_ICE_SERVER_KEYS = frozenset({"urls", "username", "credential"})

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


@dataclass(frozen=True, kw_only=True)
class BotEnv:
    """The bot contract's environment, read once at start-up; secrets stay out of `repr`.

    `transport` says which of the transport's fields are set: `room_url` and `daily_token`
    for daily, `host`, `port` and `ice_servers` (RTCIceServer dicts) for webrtc.
    """

    session_id: str
    transport: str = DAILY
    room_url: str | None = None
    daily_token: str | None = field(default=None, repr=False)
    host: str = DEFAULT_BOT_HOST
    port: int | None = None
    ice_servers: tuple[dict[str, Any], ...] = field(default=(), repr=False)
    dispatcher_url: str
    callback_token: str = field(repr=False)
    max_duration_s: int
    body: Any = field(default_factory=dict)
    traceparent: str | None = None

    @classmethod
    def from_environ(
        cls,
        environ: Mapping[str, str],
        argv_room_url: str | None = None,
        argv_transport: str | None = None,
    ) -> BotEnv:
        """Build it from `environ`; a missing or malformed variable raises ValueError naming it.

        The command line mirrors two variables: `argv_transport` (`--transport`) BOT_TRANSPORT
        and `argv_room_url` (`--room-url`) DAILY_ROOM_URL; when they differ the command line
        wins, with a warning. Without either, the transport is daily.
        """
        transport = _mirrored(environ, BOT_TRANSPORT, "--transport", argv_transport) or DAILY
        if transport not in TRANSPORTS:
            raise ValueError(f"{BOT_TRANSPORT} must be one of {', '.join(TRANSPORTS)}")
        common: dict[str, Any] = {
            "session_id": _required(environ, SESSION_ID),
            "transport": transport,
            "dispatcher_url": _required(environ, DISPATCHER_URL).rstrip("/"),
            "callback_token": _required(environ, BOT_CALLBACK_TOKEN),
            "max_duration_s": _positive_int(environ, SESSION_MAX_DURATION_S),
            "body": _json_body(environ),
            "traceparent": _traceparent(environ),
        }
        if transport == WEBRTC:
            return cls(
                host=environ.get(BOT_HOST, "").strip() or DEFAULT_BOT_HOST,
                port=_port(environ),
                ice_servers=ice_servers(environ.get(ICE_SERVERS, "")),
                **common,
            )
        room_url = _mirrored(environ, DAILY_ROOM_URL, "--room-url", argv_room_url)
        if not room_url:
            raise ValueError(f"missing environment variable {DAILY_ROOM_URL} (or --room-url)")
        return cls(room_url=room_url, daily_token=_required(environ, DAILY_TOKEN), **common)


def _mirrored(
    environ: Mapping[str, str], name: str, option: str, argv_value: str | None
) -> str | None:
    env_value = environ.get(name, "").strip() or None
    if argv_value and env_value and argv_value != env_value:
        logger.warning(
            "%s %s differs from %s %s; using %s", option, argv_value, name, env_value, option
        )
    return argv_value or env_value


def ice_servers(raw: str) -> tuple[dict[str, Any], ...]:
    """ICE_SERVERS: a JSON list of RTCIceServer dicts (`urls`, `username`, `credential`)."""
    if not raw.strip():
        return ()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ICE_SERVERS} is not valid JSON: {exc.msg}") from None
    if not isinstance(value, list):
        raise ValueError(f"{ICE_SERVERS} must be a JSON list of ICE servers")
    servers = []
    for server in value:
        if not isinstance(server, dict) or not set(server) <= _ICE_SERVER_KEYS:
            raise ValueError(
                f"{ICE_SERVERS} entries must be objects with {', '.join(sorted(_ICE_SERVER_KEYS))}"
            )
        urls = server.get("urls")
        if isinstance(urls, str):
            urls = [urls]
        if not urls or not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ValueError(f"{ICE_SERVERS} entries need `urls`: a string or a list of strings")
        extra = {k: server[k] for k in ("username", "credential") if server.get(k) is not None}
        if not all(isinstance(v, str) for v in extra.values()):
            raise ValueError(f"{ICE_SERVERS} `username` and `credential` must be strings")
        servers.append({"urls": urls, **extra})
    return tuple(servers)


def _required(environ: Mapping[str, str], name: str) -> str:
    value = environ.get(name, "").strip()
    if not value:
        raise ValueError(f"missing environment variable {name}")
    return value


def _positive_int(environ: Mapping[str, str], name: str) -> int:
    raw = _required(environ, name)
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _port(environ: Mapping[str, str]) -> int:
    raw = _required(environ, BOT_PORT)
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{BOT_PORT} must be a TCP port number, got {raw!r}") from None
    if not 0 < value < 65536:
        raise ValueError(f"{BOT_PORT} must be between 1 and 65535, got {value}")
    return value


def _json_body(environ: Mapping[str, str]) -> Any:
    raw = environ.get(SESSION_BODY, "").strip()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{SESSION_BODY} is not valid JSON: {exc.msg}") from None
    return {} if body is None else body


def _traceparent(environ: Mapping[str, str]) -> str | None:
    value = environ.get(TRACEPARENT, "").strip().lower()
    if not value:
        return None
    if not _TRACEPARENT.match(value):
        logger.warning("ignoring malformed %s %r", TRACEPARENT, value)
        return None
    return value
