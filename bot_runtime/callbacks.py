"""The bot's callbacks to the dispatcher: `ready` once the user can be heard, `ended` as it leaves.

Pure httpx + tenacity (no pipecat), so it imports wherever the dispatcher's dependencies do.
"""

from __future__ import annotations

import asyncio
import logging
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

# Statuses that mean "this callback will never be accepted": retrying cannot help.
FINAL_STATUSES = frozenset({401, 403, 404, 409, 410})


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

    async def ended(self, reason: str, exit_code: int, error: str | None = None) -> bool:
        """Tell the dispatcher the bot is leaving, why, with which exit code, and (when it
        failed) the error in a line: the exception's type and message, secrets masked."""
        payload: dict[str, Any] = {"reason": reason, "exit_code": exit_code}
        if error:
            payload["error"] = error
        return await self._call("ended", payload)

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
