"""The dispatcher's errors, the registry of the codes they answer with, and the one table that
maps them to HTTP answers."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    """Every code an error answer can carry, with the statuses it comes with and what it means.

    The codes are public API (clients branch on them): a value never changes. `statuses` is
    empty for a code whose status is someone else's (the bot's, Starlette's).
    """

    statuses: tuple[int, ...]
    meaning: str

    def __new__(cls, value: str, statuses: tuple[int, ...], meaning: str) -> ErrorCode:
        member = str.__new__(cls, value)
        member._value_ = value
        member.statuses = statuses
        member.meaning = meaning
        return member

    # Any route.
    INTERNAL_ERROR = "internal-error", (500,), "An unexpected failure (logged)."
    NOT_FOUND = (
        "not-found",
        (404,),
        "No such route (also a bot callback off the internal listener, and the assignment "
        "route without a warm pool).",
    )
    METHOD_NOT_ALLOWED = "method-not-allowed", (405,), "The route does not take this method."
    HTTP_ERROR = (
        "http-error",
        (),
        "Another refusal of Starlette's own, at its status (a web-page asset the process may "
        "not read: 401).",
    )
    INVALID_JSON = "invalid-json", (400,), "The body is not JSON, or not a JSON object."
    JSON_TOO_DEEP = "json-too-deep", (400,), "The JSON body nests too deeply."
    PAYLOAD_TOO_LARGE = "payload-too-large", (413,), "The body is over the route's limit."
    # Authentication (client JWTs) and CORS.
    MISSING_CREDENTIALS = "missing-credentials", (401,), "No bearer token."
    INVALID_TOKEN = "invalid-token", (401,), "The token does not verify."
    TOKEN_EXPIRED = "token-expired", (401,), "The token's `exp` has passed."
    JWKS_UNAVAILABLE = (
        "jwks-unavailable",
        (503,),
        "The identity provider's keys are unreachable and none are cached.",
    )
    ADMIN_REQUIRED = "admin-required", (403,), "The route needs the admin role."
    ORIGIN_NOT_ALLOWED = (
        "origin-not-allowed",
        (403,),
        "A CORS preflight from an origin not in `CORS_ORIGINS`.",
    )
    # Starting a session.
    INVALID_IDEMPOTENCY_KEY = (
        "invalid-idempotency-key",
        (400,),
        "The Idempotency-Key is not 1-255 printable ASCII characters.",
    )
    INVALID_TYPE = "invalid-type", (400,), "A start field has the wrong type."
    UNKNOWN_TRANSPORT = "unknown-transport", (400,), "`transport` is no transport at all."
    TRANSPORT_UNAVAILABLE = (
        "transport-unavailable",
        (400,),
        "The transport is not offered by this dispatcher.",
    )
    ROOM_REQUIRED = "room-required", (400,), "`transport: daily` with `createDailyRoom: false`."
    PROPERTY_NOT_ALLOWED = (
        "property-not-allowed",
        (400,),
        "A room or token property off the allowlist.",
    )
    INVALID_PROPERTY = (
        "invalid-property",
        (400,),
        "A room or token property of the wrong type or outside Daily's values.",
    )
    REGION_NOT_ALLOWED = "region-not-allowed", (400,), "`region` is not one of `FLY_REGION`."
    BODY_TOO_LARGE = "body-too-large", (400,), "The start's `body` is over its limit."
    IDEMPOTENCY_KEY_REUSED = (
        "idempotency-key-reused",
        (422,),
        "The same Idempotency-Key with another body.",
    )
    IDEMPOTENCY_KEY_IN_PROGRESS = (
        "idempotency-key-in-progress",
        (409,),
        "A start with the same Idempotency-Key is running (with Retry-After).",
    )
    RATE_LIMITED = "rate-limited", (429,), "The user's or address's start rate is spent."
    AT_CAPACITY = "at-capacity", (429,), "`MAX_SESSIONS` live sessions."
    USER_AT_CAPACITY = "user-at-capacity", (429,), "The user has `MAX_SESSIONS_PER_USER`."
    QUEUE_FULL = "queue-full", (429,), "Too many starts wait for the machine-create pace."
    DRAINING = "draining", (503,), "This dispatcher is shutting down (with Retry-After)."
    START_INTERRUPTED = "start-interrupted", (503,), "The start outlived `START_TIMEOUT_S`."
    UPSTREAM_ERROR = "upstream-error", (502,), "Fly or Daily failed (the detail names which)."
    UPSTREAM_TIMEOUT = "upstream-timeout", (504,), "Fly or Daily did not answer in time."
    # Sessions.
    INVALID_STATE = "invalid-state", (400,), "`state` is not a session state."
    INVALID_LIMIT = "invalid-limit", (400,), "`limit` is not a whole number in range."
    INVALID_USER = "invalid-user", (400,), "`user` is over 256 characters."
    SESSION_NOT_FOUND = "session-not-found", (404,), ("No such session (or another user's).")
    SESSION_ENDED = (
        "session-ended",
        (409, 410),
        "409: a callback after the end, or a DELETE that won the race with the start; 410: "
        "proxying to a session that is over.",
    )
    # The proxy to a session's bot.
    INVALID_PATH = "invalid-path", (400,), "The proxied path is not plain segments."
    NO_BOT_ROUTES = "no-bot-routes", (404,), "The session's transport has no bot routes."
    SESSION_STARTING = "session-starting", (409,), "The session's machine is not made yet."
    BOT_GONE = "bot-gone", (410,), "The session's bot has exited."
    BOT_UNREACHABLE = (
        "bot-unreachable",
        (502,),
        "The bot did not listen in time, failed, or answered over the limit.",
    )
    BOT_TIMEOUT = "bot-timeout", (504,), "The bot did not answer in time."
    BOT_ERROR = "bot-error", (), "The bot's error answer was not JSON (at the bot's status)."
    # Readiness.
    BACKEND_UNAVAILABLE = (
        "backend-unavailable",
        (503,),
        "The store, the machine backend or Daily does not answer.",
    )
    # Daily's webhooks.
    INVALID_SIGNATURE = (
        "invalid-signature",
        (401,),
        "The webhook's signature headers are missing or do not verify.",
    )
    STALE_WEBHOOK = "stale-webhook", (401,), "The webhook's timestamp is too far from now."
    # Bot callbacks and the pool's assignment route (/internal/...).
    INVALID_CALLBACK_TOKEN = (
        "invalid-callback-token",
        (401,),
        "The bot's callback token is not its session's.",
    )
    INVALID_REASON = "invalid-reason", (400,), "The `ended` reason is not `[a-z0-9_]{1,64}`."
    INVALID_EXIT_CODE = "invalid-exit-code", (400,), "The `ended` exit code is not 0..255."
    INVALID_ERROR = "invalid-error", (400,), "The `ended` error is not a string or null."
    INVALID_POOL_TOKEN = "invalid-pool-token", (401,), "The pool machine's token is wrong."
    INVALID_WAIT = "invalid-wait", (400,), "`wait` is not a whole number of seconds in range."
    POOL_MACHINE_RETIRED = (
        "pool-machine-retired",
        (410,),
        "The pool machine is retired, or its session is over.",
    )


class DispatcherError(Exception):
    """Base of the errors the dispatcher raises on purpose; `code` is stable, `detail` human.

    A class with a code of its own answers with it unless the raise names another; the others
    take their code at every raise (their `code` is required)."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, detail: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        """Extra response headers for this error."""
        return {}


class ConfigError(DispatcherError):
    """A setting is missing or malformed; raised at start-up, naming the variable (never an
    HTTP answer)."""


class BadRequest(DispatcherError):
    """The request is malformed or asks for something not allowed."""

    def __init__(self, detail: str, *, code: ErrorCode) -> None:
        super().__init__(detail, code=code)


class Unauthorized(DispatcherError):
    """No credentials, or credentials that do not verify."""

    def __init__(self, detail: str, *, code: ErrorCode) -> None:
        super().__init__(detail, code=code)


class Forbidden(DispatcherError):
    """Authenticated, but not allowed (an admin route without the admin role)."""

    def __init__(self, detail: str, *, code: ErrorCode) -> None:
        super().__init__(detail, code=code)


class NotFound(DispatcherError):
    """The resource does not exist, or the caller may not see it."""

    def __init__(self, detail: str, *, code: ErrorCode) -> None:
        super().__init__(detail, code=code)


class Conflict(DispatcherError):
    """The resource is in a state that does not allow the operation."""

    def __init__(self, detail: str, *, code: ErrorCode) -> None:
        super().__init__(detail, code=code)


class RetryAfter(DispatcherError):
    """An error that tells the client when to try again: `Retry-After` when `retry_after` is
    set (whole seconds, at least 1)."""

    retry_after: float | None = None

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class InProgress(RetryAfter, Conflict):
    """The same request is being handled right now; retry after `retry_after` seconds."""

    def __init__(self, detail: str, *, code: ErrorCode, retry_after: float = 1) -> None:
        super().__init__(detail, code=code)
        self.retry_after = retry_after


class Gone(DispatcherError):
    """The resource existed and is over (an ended session, a bot that has exited)."""

    def __init__(self, detail: str, *, code: ErrorCode) -> None:
        super().__init__(detail, code=code)


class BotUnreachable(DispatcherError):
    """A session's bot did not answer a proxied request."""

    code = ErrorCode.BOT_UNREACHABLE


class BotTimeout(BotUnreachable):
    """A session's bot took too long to answer a proxied request."""

    code = ErrorCode.BOT_TIMEOUT


class PayloadTooLarge(DispatcherError):
    """The request body is over the size limit."""

    code = ErrorCode.PAYLOAD_TOO_LARGE


class RetryLater(RetryAfter):
    """A limit was hit; the caller should retry after `retry_after` seconds."""

    code = ErrorCode.AT_CAPACITY

    def __init__(self, detail: str, *, retry_after: float, code: ErrorCode | None = None) -> None:
        super().__init__(detail, code=code)
        self.retry_after = retry_after


class Unavailable(RetryAfter):
    """The dispatcher cannot take the request now (draining, or a backend is down)."""

    def __init__(self, detail: str, *, code: ErrorCode, retry_after: float | None = None) -> None:
        super().__init__(detail, code=code)
        self.retry_after = retry_after


class Unprocessable(DispatcherError):
    """The request is well-formed but cannot be honoured (an Idempotency-Key reused)."""

    def __init__(self, detail: str, *, code: ErrorCode) -> None:
        super().__init__(detail, code=code)


class UpstreamError(DispatcherError):
    """An upstream API (Fly or Daily) failed.

    `status` is the upstream HTTP status (None for a network error), `request_id` the upstream's
    request id when it sent one, `retryable` whether the same call may succeed if repeated,
    `ambiguous` whether the call may have taken effect although it failed, `retry_after` the
    delay the upstream asked for, `upstream_code` the upstream's own error code and
    `upstream_message` its text (for logs, never for clients).
    """

    code = ErrorCode.UPSTREAM_ERROR

    def __init__(
        self,
        detail: str,
        *,
        api: str,
        operation: str,
        status: int | None = None,
        request_id: str | None = None,
        retryable: bool = False,
        ambiguous: bool = False,
        retry_after: float | None = None,
        upstream_code: str | None = None,
        upstream_message: str | None = None,
        code: ErrorCode | None = None,
    ) -> None:
        super().__init__(detail, code=code)
        self.api = api
        self.operation = operation
        self.status = status
        self.request_id = request_id
        self.retryable = retryable
        self.ambiguous = ambiguous
        self.retry_after = retry_after
        self.upstream_code = upstream_code
        self.upstream_message = upstream_message

    def details(self) -> dict[str, Any]:
        """What the event log records about this failure."""
        return {
            "api": self.api,
            "operation": self.operation,
            "status": self.status,
            "request_id": self.request_id,
            "upstream_code": self.upstream_code,
        }


class UpstreamTimeout(UpstreamError):
    """An upstream API did not answer in time."""

    code = ErrorCode.UPSTREAM_TIMEOUT


_STATUS: dict[type[DispatcherError], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    Gone: 410,
    PayloadTooLarge: 413,
    Unprocessable: 422,
    RetryLater: 429,
    UpstreamTimeout: 504,
    UpstreamError: 502,
    BotTimeout: 504,
    BotUnreachable: 502,
    Unavailable: 503,
    ConfigError: 500,
    DispatcherError: 500,
}


def http_status(exc: DispatcherError) -> int:
    """The HTTP status for an error: the entry of its nearest class in the table."""
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 500


def error_body(exc: DispatcherError) -> dict[str, str]:
    """The JSON body of every error answer: `detail` (Pipecat's JS client reads it), `code`,
    and `error`, the same text, which Pipecat Cloud's SDK reads."""
    return {"detail": exc.detail, "code": exc.code, "error": exc.detail}
