"""The dispatcher's errors, and the one table that maps them to HTTP answers."""

from __future__ import annotations

from typing import Any


class DispatcherError(Exception):
    """Base of the errors the dispatcher raises on purpose; `code` is stable, `detail` human."""

    code = "internal-error"

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        """Extra response headers for this error."""
        return {}


class ConfigError(DispatcherError):
    """A setting is missing or malformed; raised at start-up, naming the variable."""

    code = "config-error"


class BadRequest(DispatcherError):
    """The request is malformed or asks for something not allowed."""

    code = "bad-request"


class Unauthorized(DispatcherError):
    """No credentials, or credentials that do not verify."""

    code = "unauthorized"


class Forbidden(DispatcherError):
    """Authenticated, but not allowed (an admin route without the admin role)."""

    code = "forbidden"


class NotFound(DispatcherError):
    """The resource does not exist, or the caller may not see it."""

    code = "not-found"


class Conflict(DispatcherError):
    """The resource is in a state that does not allow the operation."""

    code = "conflict"


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

    code = "in-progress"

    def __init__(self, detail: str, *, code: str | None = None, retry_after: float = 1) -> None:
        super().__init__(detail, code=code)
        self.retry_after = retry_after


class Gone(DispatcherError):
    """The resource existed and is over (an ended session, a bot that has exited)."""

    code = "gone"


class BotUnreachable(DispatcherError):
    """A session's bot did not answer a proxied request."""

    code = "bot-unreachable"


class BotTimeout(BotUnreachable):
    """A session's bot took too long to answer a proxied request."""

    code = "bot-timeout"


class PayloadTooLarge(DispatcherError):
    """The request body is over the size limit."""

    code = "payload-too-large"


class RetryLater(RetryAfter):
    """A limit was hit; the caller should retry after `retry_after` seconds."""

    code = "at-capacity"

    def __init__(self, detail: str, *, retry_after: float, code: str | None = None) -> None:
        super().__init__(detail, code=code)
        self.retry_after = retry_after


class Unavailable(RetryAfter):
    """The dispatcher cannot take the request now (draining, or a backend is down)."""

    code = "unavailable"

    def __init__(
        self, detail: str, *, code: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(detail, code=code)
        self.retry_after = retry_after


class Unprocessable(DispatcherError):
    """The request is well-formed but cannot be honoured (an Idempotency-Key reused)."""

    code = "unprocessable"


class UpstreamError(DispatcherError):
    """An upstream API (Fly or Daily) failed.

    `status` is the upstream HTTP status (None for a network error), `request_id` the upstream's
    request id when it sent one, `retryable` whether the same call may succeed if repeated,
    `ambiguous` whether the call may have taken effect although it failed, `retry_after` the
    delay the upstream asked for, `upstream_code` the upstream's own error code and
    `upstream_message` its text (for logs, never for clients).
    """

    code = "upstream-error"

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
        code: str | None = None,
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

    code = "upstream-timeout"


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
