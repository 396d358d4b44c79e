"""Waiting for a condition by polling it: the one way tests and benches wait."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

Check = Callable[[], Any] | Callable[[], Awaitable[Any]]


async def first_truthy(check: Check, within_s: float, tick_s: float = 0.05) -> Any:
    """The first truthy result of `check()` (plain or async), polled every `tick_s` seconds;
    None when `within_s` seconds pass without one."""
    deadline = time.monotonic() + within_s
    while True:
        result = check()
        value = await result if inspect.isawaitable(result) else result
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(tick_s)


async def wait_until(check: Check, within_s: float, tick_s: float = 0.05) -> bool:
    """Whether `check()` became true within `within_s` seconds."""
    return await first_truthy(check, within_s, tick_s) is not None


async def eventually(
    check: Check, timeout: float = 10.0, what: str = "condition", *, interval: float = 0.05
) -> Any:
    """The first truthy result of `check()` within `timeout` seconds; an AssertionError naming
    `what` after that."""
    result = await first_truthy(check, timeout, interval)
    if result is None:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")
    return result
