"""The bot's side of the bot contract: its environment, and its callbacks to the dispatcher.

Pure httpx + tenacity (no pipecat), so it imports wherever the dispatcher's dependencies do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

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

# Statuses that mean "this callback will never be accepted": retrying cannot help.
FINAL_STATUSES = frozenset({401, 403, 404, 409, 410})

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


class CallbackTarget(Protocol):
    """Where and as whom the bot calls back: what `DispatcherClient` needs of a `BotEnv`."""

    @property
    def session_id(self) -> str: ...
    @property
    def dispatcher_url(self) -> str: ...
    @property
    def callback_token(self) -> str: ...
    @property
    def traceparent(self) -> str | None: ...


class CallbackError(Exception):
    """A callback the dispatcher did not accept; `retryable` says whether trying again may help.

    The message carries the operation and status only, never the request's headers.
    """

    def __init__(
        self,
        operation: str,
        status: int | None,
        *,
        retryable: bool,
        cause: str = "",
        retry_after_s: float | None = None,
    ) -> None:
        self.operation = operation
        self.status = status
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        what = f"status {status}" if status is not None else (cause or "no response")
        super().__init__(f"{operation} callback failed: {what}")


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, CallbackError) and exc.retryable


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header in its delta-seconds form (dates are ignored)."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class DispatcherClient:
    """Calls the dispatcher's `/internal/sessions/{id}/ready|ended` endpoints.

    Retries 5xx, 429 and network errors with jittered exponential backoff; a final status
    (4xx) is not retried. Every call is bounded by `total_timeout_s`, so it never holds the
    bot for long; each method returns whether the dispatcher accepted the callback.
    """

    def __init__(
        self,
        target: CallbackTarget,
        http: httpx.AsyncClient,
        *,
        max_attempts: int = 4,
        attempt_timeout_s: float = 2.0,
        total_timeout_s: float = 4.0,
        backoff_initial_s: float = 0.25,
        backoff_max_s: float = 2.0,
    ) -> None:
        self._target = target
        self._http = http
        self._max_attempts = max_attempts
        self._attempt_timeout_s = attempt_timeout_s
        self._total_timeout_s = total_timeout_s
        self._backoff = wait_random_exponential(multiplier=backoff_initial_s, max=backoff_max_s)
        self._backoff_max_s = backoff_max_s

    def url(self, operation: str) -> str:
        """The callback URL of `operation` ("ready" or "ended") for this session."""
        session = quote(self._target.session_id, safe="")
        return f"{self._target.dispatcher_url}/internal/sessions/{session}/{operation}"

    async def ready(self) -> bool:
        """Tell the dispatcher the bot has joined the room."""
        return await self._call("ready", {})

    async def ended(self, reason: str, exit_code: int) -> bool:
        """Tell the dispatcher the bot is leaving, why, and with which exit code."""
        return await self._call("ended", {"reason": reason, "exit_code": exit_code})

    async def _call(self, operation: str, payload: dict[str, Any]) -> bool:
        retrying = AsyncRetrying(
            retry=retry_if_exception(_is_retryable),
            stop=stop_after_attempt(self._max_attempts),
            wait=self._wait,
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async with asyncio.timeout(self._total_timeout_s):
                async for attempt in retrying:
                    with attempt:
                        await self._post(operation, payload)
        except CallbackError as exc:
            logger.warning("%s", exc)
            return False
        except TimeoutError:
            logger.warning(
                "%s callback gave up after %.1f s without an answer",
                operation,
                self._total_timeout_s,
            )
            return False
        logger.info("%s callback accepted", operation)
        return True

    async def _post(self, operation: str, payload: dict[str, Any]) -> None:
        headers = {"Authorization": f"Bearer {self._target.callback_token}"}
        if self._target.traceparent:
            headers["traceparent"] = self._target.traceparent
        try:
            response = await self._http.post(
                self.url(operation), json=payload, headers=headers, timeout=self._attempt_timeout_s
            )
        except httpx.TransportError as exc:
            raise CallbackError(operation, None, retryable=True, cause=type(exc).__name__) from exc
        if response.is_success:
            return
        status = response.status_code
        retryable = status not in FINAL_STATUSES and (status == 429 or status >= 500)
        raise CallbackError(
            operation,
            status,
            retryable=retryable,
            retry_after_s=_retry_after(response.headers.get("Retry-After")),
        )

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, CallbackError) and exc.retry_after_s is not None:
            return min(exc.retry_after_s, self._backoff_max_s)
        return self._backoff(state)

    @staticmethod
    def _log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        logger.info("%s; retrying (attempt %d)", exc, state.attempt_number + 1)
