"""Readiness: whether every backend answers, checked at most every few seconds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from dispatcher.errors import DispatcherError

READINESS_TTL_S = 5.0
READINESS_TIMEOUT_S = 5.0


class Readiness:
    """Whether every backend answers, checked at most every few seconds."""

    def __init__(self, checks: dict[str, Callable[[], Awaitable[None]]]) -> None:
        self._checks = checks
        self._at = 0.0
        self._result: dict[str, str] = {}
        self._lock = asyncio.Lock()

    async def status(self) -> dict[str, str]:
        """`ok` or the error of each backend."""
        async with self._lock:
            if time.monotonic() - self._at > READINESS_TTL_S:
                names = list(self._checks)
                results = await asyncio.gather(
                    *(asyncio.wait_for(self._checks[n](), READINESS_TIMEOUT_S) for n in names),
                    return_exceptions=True,
                )
                self._result = {
                    name: "ok" if not isinstance(r, BaseException) else _describe(r)
                    for name, r in zip(names, results, strict=True)
                }
                self._at = time.monotonic()
            return dict(self._result)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, DispatcherError):
        return exc.detail
    return type(exc).__name__
