"""What the Fly and Daily clients share: error translation and one retry policy."""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from dispatcher.errors import UpstreamError, UpstreamTimeout

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How upstream calls are retried: attempts, backoff, and the cap on a honoured Retry-After."""

    attempts: int = 5
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 4.0
    max_retry_after_s: float = 10.0
    deadline_s: float = 30.0
    # Told of each retry (the failed call's api and operation): the app's metrics.
    on_retry: Callable[[str, str], None] | None = field(default=None, compare=False)

    def retrying(self) -> AsyncRetrying:
        """A tenacity loop that retries retryable UpstreamErrors under this policy."""
        backoff = wait_exponential_jitter(
            multiplier=self.initial_backoff_s, jitter=self.initial_backoff_s, max=self.max_backoff_s
        )

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, UpstreamError) and exc.retry_after is not None:
                return min(exc.retry_after, self.max_retry_after_s)
            return float(backoff(state))

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if self.on_retry is not None and isinstance(exc, UpstreamError):
                self.on_retry(exc.api, exc.operation)

        return AsyncRetrying(
            retry=retry_if_exception(is_retryable),
            wait=wait,
            stop=stop_after_attempt(self.attempts) | stop_after_delay(self.deadline_s),
            before_sleep=before_sleep,
            reraise=True,
        )

    def backoff(self, failures: int) -> float:
        """The pause after `failures` failed tries in a row, jittered and capped as between
        attempts: for loops that outlast the policy's attempts (a follower in an outage)."""
        delay = self.initial_backoff_s * 2.0 ** min(max(0, failures - 1), 30)
        return min(self.max_backoff_s, delay + random.uniform(0, self.initial_backoff_s))


def is_retryable(exc: BaseException) -> bool:
    """The one predicate that decides retries: a retryable UpstreamError."""
    return isinstance(exc, UpstreamError) and exc.retryable


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def transport_error(
    exc: httpx.TransportError, *, api: str, operation: str, mutating: bool
) -> UpstreamError:
    """An UpstreamError for a request that got no HTTP answer.

    A connect failure never reached the upstream; any later failure of a mutating call may
    have taken effect, so it is ambiguous.
    """
    never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    cls = UpstreamTimeout if isinstance(exc, httpx.TimeoutException) else UpstreamError
    what = "timed out" if cls is UpstreamTimeout else f"failed ({type(exc).__name__})"
    return cls(
        f"{api} {operation} {what}",
        api=api,
        operation=operation,
        retryable=True,
        ambiguous=mutating and not never_sent,
    )


def status_error(
    response: httpx.Response,
    *,
    api: str,
    operation: str,
    mutating: bool,
    request_id_header: str,
    upstream_code: str | None,
    message: str | None,
) -> UpstreamError:
    """An UpstreamError for an HTTP error answer."""
    status = response.status_code
    text = f"{api} {operation} answered {status}"
    if upstream_code:
        text += f" ({upstream_code})"
    cls = UpstreamTimeout if status in (408, 504) else UpstreamError
    return cls(
        text,
        api=api,
        operation=operation,
        status=status,
        request_id=response.headers.get(request_id_header),
        retryable=status in RETRYABLE_STATUSES,
        ambiguous=mutating and (status >= 500 or status == 408),
        retry_after=parse_retry_after(response.headers.get("retry-after")),
        upstream_code=upstream_code,
        upstream_message=message,
    )


def json_or_none(response: httpx.Response) -> Any:
    """The response's JSON body, or None when it has none or it is not JSON."""
    try:
        return response.json()
    except ValueError:
        return None
