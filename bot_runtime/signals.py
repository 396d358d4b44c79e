"""SIGTERM and SIGINT, handled for the process's whole life.

Installed first thing, before any import of Pipecat or of the team's module, and never
removed: a stop signal that arrives while the bot boots is remembered (the session then ends
at once), one that arrives during the session is passed to it, and one that arrives while the
bot is already ending, or after its `ended` callback, cannot kill it with exit code 143.
Python-level handlers rather than the event loop's: those are removed when the loop closes,
which restores the default action.
"""

from __future__ import annotations

import asyncio
import contextvars
import signal
from collections.abc import Callable
from types import FrameType

from bot_runtime.outcome import SIGINT, SIGTERM

_REASONS = {signal.SIGTERM: SIGTERM, signal.SIGINT: SIGINT}
Listener = tuple[asyncio.AbstractEventLoop, Callable[[str], object], contextvars.Context]


class StopSignals:
    """The stop signals received: the first one's reason, and a listener told of each."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.received = 0
        self._listener: Listener | None = None

    def install(self) -> None:
        """Handle SIGTERM and SIGINT from now on."""
        for signum in _REASONS:
            signal.signal(signum, self._handle)

    def listen(
        self, loop: asyncio.AbstractEventLoop, callback: Callable[[str], object] | None
    ) -> None:
        """Call `callback(reason)` on `loop`, in the caller's context (its current span), for
        each later signal (None: stop calling)."""
        self._listener = (loop, callback, contextvars.copy_context()) if callback else None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        reason = _REASONS.get(signal.Signals(signum), SIGTERM)
        self.reason = self.reason or reason
        self.received += 1
        if self._listener is not None:
            loop, callback, context = self._listener
            if not loop.is_closed():
                loop.call_soon_threadsafe(callback, reason, context=context)
