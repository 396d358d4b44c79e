"""What the Fly and Daily clients share: the call, its retries, error translation and spans."""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

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
from dispatcher.pacing import Pace
from dispatcher.telemetry import Telemetry

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
USER_AGENT = "pipecat-fly-dispatcher"
CONNECT_TIMEOUT_S = 5.0
# httpx's own default.
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


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


def http_client(
    base_url: str,
    authorization: str,
    *,
    timeout_s: float,
    limits: httpx.Limits = DEFAULT_LIMITS,
) -> httpx.AsyncClient:
    """An httpx client for one upstream API: its base URL, auth header and timeouts."""
    return httpx.AsyncClient(
        base_url=base_url,
        headers={"Authorization": authorization, "User-Agent": USER_AGENT},
        timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S),
        limits=limits,
    )


class UpstreamClient:
    """The base of an upstream API client: one call, retried under the RetryPolicy (honouring
    Retry-After), traced as a span per attempt, its failures translated into UpstreamError.

    A subclass names its API and request-id header, and reads the error code and message out of
    its API's error bodies (`error_detail`).
    """

    api: ClassVar[str]
    request_id_header: ClassVar[str]
    # The statuses that count as an answer (None: any 2xx).
    ok_statuses: ClassVar[frozenset[int] | None] = None

    def __init__(
        self,
        http: httpx.AsyncClient,
        retry: RetryPolicy,
        telemetry: Telemetry | None = None,
        *,
        prefix: str = "",
    ) -> None:
        self._http = http
        self._retry = retry
        self._telemetry = telemetry or Telemetry()
        self._prefix = prefix

    def error_detail(self, body: dict[str, Any]) -> tuple[str | None, str | None]:
        """The upstream's error code and message in an error answer's JSON body."""
        raise NotImplementedError

    async def _call(
        self,
        operation: str,
        method: str,
        path: str,
        *,
        mutating: bool = False,
        deadline_s: float | None = None,
        attempt: int = 1,
        **kwargs: Any,
    ) -> httpx.Response:
        """One request (the `attempt`-th of a retried call); an answer that is not ok raises
        UpstreamError, as does a request that got no answer."""
        if deadline_s is not None:
            kwargs["timeout"] = httpx.Timeout(deadline_s, connect=CONNECT_TIMEOUT_S)
        api = self.api
        with self._telemetry.upstream(api, operation, method, attempt=attempt) as call:
            try:
                response = await self._http.request(method, self._prefix + path, **kwargs)
            except httpx.TransportError as exc:
                call.no_answer(exc)
                raise transport_error(exc, api=api, operation=operation, mutating=mutating) from exc
            call.answered(response.status_code, response.headers.get(self.request_id_header))
        if self._ok(response):
            return response
        body = json_or_none(response)
        code, message = self.error_detail(body if isinstance(body, dict) else {})
        raise status_error(
            response,
            api=api,
            operation=operation,
            mutating=mutating,
            request_id_header=self.request_id_header,
            upstream_code=code,
            message=message,
        )

    async def _retried(
        self,
        operation: str,
        method: str,
        path: str,
        *,
        pace: Pace | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """The call, retried under the policy; `pace` is awaited before each attempt (a rate
        limiter's turn, retries included)."""
        async for attempt in self._retry.retrying():
            with attempt:
                if pace is not None:
                    await pace()
                number = attempt.retry_state.attempt_number
                return await self._call(operation, method, path, attempt=number, **kwargs)
        raise AssertionError("unreachable")  # pragma: no cover

    def _ok(self, response: httpx.Response) -> bool:
        if self.ok_statuses is None:
            return response.is_success
        return response.status_code in self.ok_statuses
