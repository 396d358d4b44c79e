"""One session: the team's `bot(runner_args)` run as a task, and the contract's ends around it.

The first end reason wins: a stop signal, the session's time limit, the worker's idle timeout,
the user leaving, a failed join (see `bot_runtime.watch`), or none (`bot()` returned on its own:
`completed`). How `bot()` finished gives the exit code: a return (or the cancel the runtime
asked for) is 0, an exception 1 with its error line, a failed join 1.

A stop the runtime decides (SIGTERM, SIGINT, the time limit, a failed join, the room gone) is
graceful once the bot has joined: the module's `on_session_stop(worker, reason)` hook if it has
one, then an `EndFrame` queued on each root worker. Before the bot has joined there is nothing
to say goodbye to, so it is a cancel straight away. A cancel escalates, `cancel_grace_s` apart
for as long as `bot()` still runs: Pipecat's own cancel of the bot's `WorkerRunner`s (their
`run()` then returns cleanly), a cancel of `bot()`'s task (before its runner runs, or if the
runner did not stop), then the task is abandoned (a Daily join blocks until it times out), so
that a stop always ends the session within seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from loguru import logger

from bot_runtime.entrypoint import EntryPoint
from bot_runtime.outcome import (
    COMPLETED,
    MAX_DURATION,
    SIGINT,
    SIGTERM,
    SessionOutcome,
    error_line,
)
from bot_runtime.signals import StopSignals
from bot_runtime.watch import SessionWatch, install

# With the `ended` callback's bound (4 s) the worst case after SIGTERM is
# 3 + 0.75 + 0.75 + 0.5 + 4 = 9 s, within the dispatcher's default stop timeout
# (BOT_STOP_TIMEOUT_S=10). A graceful end usually takes under 3 s on Daily (a 0.4 s chime,
# DailyParams.audio_out_end_silence_secs=2, then the leave) and under a second on SmallWebRTC;
# a spoken goodbye longer than the grace is cut by the cancel.
END_GRACE_S = 3.0
CANCEL_GRACE_S = 0.75
ABANDON_WAIT_S = 0.5

# The stops a user is still there to hear a goodbye for (the stop hook's reasons).
GOODBYE_REASONS = frozenset({SIGTERM, SIGINT, MAX_DURATION})


@dataclass(frozen=True)
class SessionLimits:
    """The session's time limit and how long each step of a stop may take."""

    max_duration_s: float | None = None
    end_grace_s: float = END_GRACE_S
    cancel_grace_s: float = CANCEL_GRACE_S


class BotSession:
    """Runs `bot(runner_args)` once, and ends it as the contract asks (see the module)."""

    def __init__(
        self,
        entry: EntryPoint,
        runner_args: Any,
        *,
        on_ready: Callable[[], Awaitable[object]] | None = None,
        signals: StopSignals | None = None,
        limits: SessionLimits = SessionLimits(),
        mask: Callable[[str], str] = str,
    ) -> None:
        self._entry = entry
        self._runner_args = runner_args
        self._on_ready = on_ready
        self._signals = signals
        self._limits = limits
        self._mask = mask
        self.watch = SessionWatch(self)
        self._reason: str | None = None
        self._ready_sent = False
        self._task: asyncio.Task[Any] | None = None
        self._cancels = 0
        self._abandoned = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def reason(self) -> str | None:
        """Why the session is ending, once it is."""
        return self._reason

    async def run(self) -> SessionOutcome:
        """Run `bot()` to its end; how it ended."""
        loop = asyncio.get_running_loop()
        install(self.watch)
        self._task = loop.create_task(self._entry.function(self._runner_args))
        if self._signals is not None:
            self._signals.listen(loop, self._on_signal)
            if self._signals.reason is not None:
                self._on_signal(self._signals.reason)
        if self._limits.max_duration_s is not None:
            self._spawn(self._stop_after(self._limits.max_duration_s))
        try:
            abandoned = self._spawn(self._abandoned.wait())
            await asyncio.wait({self._task, abandoned}, return_when=asyncio.FIRST_COMPLETED)
            if not self._task.done():
                logger.error("bot() did not stop after its cancel: abandoning it")
                await asyncio.wait({self._task}, timeout=ABANDON_WAIT_S)
        finally:
            if self._signals is not None:
                self._signals.listen(loop, None)
            install(None)
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        outcome = self._outcome(self._task)
        logger.info(f"Session ended: reason={outcome.reason} exit_code={outcome.exit_code}")
        return outcome

    # -- what the watch and the transport report (SessionControl) --------------------------

    def joined(self) -> None:
        """The user can be heard: send `ready`, once, unless the session is already ending."""
        if self._reason is not None or self._ready_sent:
            return
        self._ready_sent = True
        logger.info("Ready: the user can be heard")
        if self._on_ready is not None:
            self._spawn(self._on_ready())

    def record(self, reason: str) -> None:
        """Remember `reason` as the end's, unless one is already known."""
        if self._reason is None:
            self._reason = reason
            logger.info(f"Session ending: {reason}")

    def stop(self, reason: str) -> None:
        """End the session for `reason`, unless it is already ending."""
        self._spawn(self._stop(reason))

    # -- stopping ----------------------------------------------------------------------------

    def _on_signal(self, reason: str) -> None:
        if self._reason is None:
            self.stop(reason)
        else:
            logger.warning(f"Stop signal ({reason}) while ending: cancelling now")
            self._escalate()

    async def _stop(self, reason: str) -> None:
        if self._reason is not None:
            return
        self.record(reason)
        if not (self.watch.has_joined and self.watch.workers):
            self._escalate()
            return
        if reason in GOODBYE_REASONS:
            await self._goodbye(reason)
        await self.watch.end()
        self._spawn(self._escalate_after(self._limits.end_grace_s, "its EndFrame"))

    async def _goodbye(self, reason: str) -> None:
        hook = self._entry.stop_hook
        if hook is None:
            return
        worker = next((w for w in self.watch.workers if w.parent is None), None)
        try:
            async with asyncio.timeout(self._limits.end_grace_s):
                await hook(worker, reason)
        except Exception as exc:
            logger.warning(f"on_session_stop failed: {self._mask(error_line(exc))}")

    async def _stop_after(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        await self._stop(MAX_DURATION)

    def _escalate(self) -> None:
        """One step further towards the end, each `cancel_grace_s` after the last: cancel the
        bot's runners (Pipecat's own cancel), then cancel `bot()`'s task, then abandon it."""
        if self._task is None or self._task.done():
            return
        self._cancels += 1
        if self._cancels == 1 and self.watch.runners:
            self._spawn(self.watch.cancel(self._reason))
        elif self._cancels <= 2:
            self._cancels = 2
            self._task.cancel()
        else:
            self._abandoned.set()
            return
        self._spawn(self._escalate_after(self._limits.cancel_grace_s, "its cancel"))

    async def _escalate_after(self, delay_s: float, what: str) -> None:
        await asyncio.sleep(delay_s)
        if self._task is not None and not self._task.done():
            logger.warning(f"bot() still running {delay_s:.1f} s after {what}: cancelling")
            self._escalate()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _outcome(self, task: asyncio.Task[Any]) -> SessionOutcome:
        abandoned = self._abandoned.is_set() and not task.done()
        if task.done() and not task.cancelled():
            exc = task.exception()
            if exc is not None:
                logger.opt(exception=exc).error("bot() raised")
                return SessionOutcome.raised(self._mask(error_line(exc)))
        return SessionOutcome.of(self._reason or COMPLETED, abandoned=abandoned)
