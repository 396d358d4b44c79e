"""Pacing calls to rate-limited upstream endpoints: a token bucket whose debt is a bounded queue."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

from dispatcher.errors import ErrorCode, RetryLater

# Awaited before a rate-limited call is sent: a pacer's turn (e.g. `Pacer.acquire`).
Pace = Callable[[], Awaitable[None]]


class Pacer:
    """A token bucket of `rate` tokens a second, `burst` saved up, that lets callers queue.

    A call that finds no token reserves the next one and waits for it, so a burst is spread
    at `rate` in arrival order. The queue is bounded by time: a reservation that would wait
    longer than `max_wait_s` is refused at once with RetryLater (a 429), never a silent
    slowdown.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_wait_s: float = math.inf,
        what: str = "calls",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self.max_wait_s = max_wait_s
        self._what = what
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def reserve(self, *, bounded: bool = True) -> float:
        """Take the next token: the seconds to wait for it, or RetryLater if that is longer
        than `max_wait_s` (unless not `bounded`: a retry of a call already under way waits)."""
        self._refill()
        wait = max(0.0, (1.0 - self._tokens) / self.rate)
        if bounded and wait > self.max_wait_s:
            raise RetryLater(
                f"too many {self._what} queued: try again shortly",
                retry_after=max(1.0, wait - self.max_wait_s),
                code=ErrorCode.QUEUE_FULL,
            )
        self._tokens -= 1.0
        return wait

    def take_now(self) -> bool:
        """Take a token only if one is free now (nobody queued, none to wait for): for work
        that must never delay anyone."""
        self._refill()
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def cancel(self) -> None:
        """Give back a reserved token that will not be used."""
        self._refill()
        self._tokens = min(float(self.burst), self._tokens + 1.0)

    async def acquire(self, *, bounded: bool = True) -> None:
        """Reserve a token and wait for it."""
        wait = self.reserve(bounded=bounded)
        if wait > 0:
            await asyncio.sleep(wait)

    @property
    def queued(self) -> int:
        """How many reservations are waiting for their token now."""
        self._refill()
        return max(0, math.ceil(-self._tokens)) if self._tokens < 0 else 0
