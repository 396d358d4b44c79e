"""Pacing calls to rate-limited upstream endpoints: a token bucket whose debt is a bounded queue.

The bucket is kept as one number, the time at which it is full again (`full_at`, GCRA): a
token taken moves it `1/rate` later, from now if it was already past. A caller whose token
comes before `full_at - burst/rate` waits for it, so a burst is spread at `rate` in arrival
order. Where that number lives is the bucket: in memory (`MemoryBucket`, one process) or in a
row of the store (`dispatcher/store/buckets.py`, shared by every dispatcher instance on the
database, with the database's clock), so that any number of instances together keep to one
upstream limit.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from dispatcher.errors import ErrorCode, RetryLater

# Awaited before a rate-limited call is sent: a pacer's turn (e.g. `Pacer.acquire`).
Pace = Callable[[], Awaitable[None]]
# Float rounding: a reservation this close to a whole turn counts as that turn.
_EPSILON = 1e-9


class Bucket(Protocol):
    """Where a pacer's `full_at` is kept; every method is one atomic step on it."""

    async def take(self, interval_s: float, limit_s: float | None) -> tuple[bool, float]:
        """Move `full_at` to `max(full_at, now) + interval_s` unless that would put it more
        than `limit_s` past now (None: no limit). (taken, how far past now `full_at` is, or
        would have been, after the take)."""
        ...

    async def give_back(self, interval_s: float) -> None:
        """Move `full_at` `interval_s` earlier, never before now."""
        ...

    async def ahead(self) -> float:
        """How far past now `full_at` is (0 when the bucket is full)."""
        ...


class MemoryBucket:
    """A bucket in this process, on a monotonic clock (one instance; tests)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._full_at = clock()

    async def take(self, interval_s: float, limit_s: float | None) -> tuple[bool, float]:
        now = self._clock()
        after = max(self._full_at, now) + interval_s
        if limit_s is not None and after > now + limit_s + _EPSILON:
            return False, after - now
        self._full_at = after
        return True, after - now

    async def give_back(self, interval_s: float) -> None:
        self._full_at = max(self._clock(), self._full_at - interval_s)

    async def ahead(self) -> float:
        return max(0.0, self._full_at - self._clock())


class Pacer:
    """A token bucket of `rate` tokens a second, `burst` saved up, that lets callers queue.

    A call that finds no token reserves the next one and waits for it. The queue is bounded
    by time: a reservation that would wait longer than `max_wait_s` is refused at once with
    RetryLater (a 429), never a silent slowdown, and takes nothing.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_wait_s: float = math.inf,
        what: str = "calls",
        bucket: Bucket | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self.max_wait_s = max_wait_s
        self.what = what
        self._interval = 1.0 / rate
        self._clock = clock
        self._bucket: Bucket = bucket if bucket is not None else MemoryBucket(clock)
        # When each of this instance's reservations has its turn (its own queue, for metrics).
        self._turns: list[float] = []

    async def reserve(self, *, bounded: bool = True) -> float:
        """Take the next token: the seconds to wait for it, or RetryLater if that is longer
        than `max_wait_s` (unless not `bounded`: a retry of a call already under way waits)."""
        slack = self.burst * self._interval
        limit = slack + self.max_wait_s if bounded and math.isfinite(self.max_wait_s) else None
        taken, ahead = await self._bucket.take(self._interval, limit)
        wait = max(0.0, ahead - slack)
        if not taken:
            raise RetryLater(
                f"too many {self.what} queued: try again shortly",
                retry_after=max(1.0, wait - self.max_wait_s),
                code=ErrorCode.QUEUE_FULL,
            )
        if wait > 0:
            self._turns.append(self._clock() + wait)
        return wait

    async def take_now(self) -> bool:
        """Take a token only if one is free now (nobody queued, none to wait for): for work
        that must never delay anyone."""
        taken, _ = await self._bucket.take(self._interval, self.burst * self._interval)
        return taken

    async def cancel(self) -> None:
        """Give back a reserved token that will not be used."""
        if self._turns:
            self._turns.remove(max(self._turns))
        await self._bucket.give_back(self._interval)

    async def acquire(self, *, bounded: bool = True) -> None:
        """Reserve a token and wait for it."""
        wait = await self.reserve(bounded=bounded)
        if wait > 0:
            await asyncio.sleep(wait)

    @property
    def waiting(self) -> int:
        """How many of this instance's reservations are waiting for their turn now."""
        now = self._clock()
        self._turns = [t for t in self._turns if t > now]
        return len(self._turns)

    async def queued(self) -> int:
        """How many reservations are waiting for their turn now, in the whole bucket (every
        instance's, for a bucket in the store)."""
        ahead = await self._bucket.ahead()
        return max(0, math.ceil(ahead / self._interval - self.burst - _EPSILON))
