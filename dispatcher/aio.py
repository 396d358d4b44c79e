"""Small asyncio helpers: cancelling background tasks, and a step run periodically."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn


async def cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    """Cancel the tasks and wait until each has finished, whatever it raised."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def every(
    interval_s: float,
    step: Callable[[], Awaitable[float | None]],
    *,
    log: logging.Logger,
    what: str,
) -> NoReturn:
    """Run `step` again and again until cancelled, pausing `interval_s` after each run, or the
    pause the step returns. A step that raises is logged (`<what> failed`, on `log`) and the
    next runs after the interval."""
    while True:
        try:
            pause = await step()
        except Exception:
            log.exception("%s failed", what)
            pause = None
        await asyncio.sleep(interval_s if pause is None else pause)
