"""One session's lifecycle around its pipeline worker: ready, the end reasons, the goodbye.

The dispatcher's additions to Pipecat's runner arguments (the ready callback, the session's
time limit, a hook once the session runs) come in `SessionOptions`; how the session ended
comes back as a `SessionOutcome` for the `ended` callback.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from loguru import logger
from pipecat.frames.frames import CancelFrame, EndFrame, Frame
from pipecat.pipeline.worker import PipelineWorker
from pipecat.transports.base_transport import BaseTransport
from pipecat.workers.runner import WorkerRunner

from bot.outcome import (
    COMPLETED,
    IDLE_TIMEOUT,
    JOIN_FAILED,
    MAX_DURATION,
    PARTICIPANT_LEFT,
    PIPELINE_CANCELLED,
    ROOM_LEFT,
    SIGINT,
    SIGTERM,
    SessionOutcome,
)

DAILY = "daily"
WEBRTC = "webrtc"

# How long a graceful end (a goodbye, then an EndFrame) may take before the pipeline is
# cancelled, how long a cancel may take before the pipeline is abandoned, and how long to
# wait for it after that. With the `ended` callback's bound (4 s) the worst case after
# SIGTERM is 3.5 + 1 + 0.5 + 4 = 9 s, within the dispatcher's default stop timeout
# (BOT_STOP_TIMEOUT_S=10). A graceful end usually takes ~3 s on Daily (the 0.4 s chime,
# DailyParams.audio_out_end_silence_secs=2, then the leave) and under a second on
# SmallWebRTC; a spoken goodbye (TTS) longer than the grace is cut by the cancel.
END_GRACE_S = 3.5
CANCEL_GRACE_S = 1.0
ABANDON_WAIT_S = 0.5

# The reasons that get a goodbye before the end: the user is still there to hear it.
GOODBYE_REASONS = frozenset({SIGTERM, SIGINT, MAX_DURATION})

Frames = Callable[[], Sequence[Frame]]


@dataclass(frozen=True)
class SessionOptions:
    """What a dispatched session adds to Pipecat's runner arguments.

    `on_started` runs once the stop signals are handled and the pipeline is about to start
    (the webrtc bot starts listening for offers there); `on_ready` once the user can be
    heard (Daily: the bot joined its room; webrtc: the peer connected). `stop_requested`
    names a stop signal that arrived before the session handled them (it ends at once).
    """

    on_ready: Callable[[], Awaitable[object]] | None = None
    on_started: Callable[[], Awaitable[object]] | None = None
    stop_requested: Callable[[], str | None] | None = None
    max_duration_s: float | None = None
    end_grace_s: float = END_GRACE_S
    cancel_grace_s: float = CANCEL_GRACE_S


class BotSession:
    """One session's lifecycle around its pipeline worker; the first end reason wins.

    Once connected (`joined`), an end is graceful: a goodbye for the reasons that deserve
    one, an `EndFrame`, then a cancel after `end_grace_s`. Before that there is nothing to
    say goodbye to, so it is a cancel straight away. A pipeline still running
    `cancel_grace_s` after its cancel (a Daily join blocks until it times out) is abandoned,
    so that a stop signal always ends the session within seconds.

    `kind` names the transport's events: Daily's (`on_joined`, `on_participant_left`, ...)
    or SmallWebRTC's (`on_client_connected`, `on_client_disconnected`).
    """

    def __init__(
        self,
        transport: BaseTransport,
        worker: PipelineWorker,
        options: SessionOptions | None = None,
        *,
        kind: str = DAILY,
        greeting: Frames | None = None,
        goodbye: Frames | None = None,
    ) -> None:
        self._transport = transport
        self._worker = worker
        self._options = options or SessionOptions()
        self._greeting = greeting
        self._goodbye = goodbye
        self._reason: str | None = None
        self._joined = False
        self._ready_sent = False
        self._user_id: str | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._abandoned = asyncio.Event()
        self._wire(kind)

    @property
    def reason(self) -> str | None:
        """Why the session is ending, once it is."""
        return self._reason

    async def run(
        self, *, handle_sigterm: bool = False, handle_sigint: bool = False
    ) -> SessionOutcome:
        """Run the pipeline until it finishes; the stop signals asked for end it gracefully."""
        runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
        await runner.add_workers(self._worker)
        signals = {SIGTERM: signal.SIGTERM} if handle_sigterm else {}
        if handle_sigint:
            signals[SIGINT] = signal.SIGINT
        loop = asyncio.get_running_loop()
        for reason, signum in signals.items():
            loop.add_signal_handler(signum, self._on_signal, reason)
        early = self._options.stop_requested() if self._options.stop_requested else None
        if early is not None:
            self._on_signal(early)
        if self._options.max_duration_s is not None:
            self._spawn(self._end_after(self._options.max_duration_s))
        running: asyncio.Future[Any] | None = None
        try:
            if self._options.on_started is not None:
                await self._options.on_started()
            running = asyncio.ensure_future(runner.run())
            await asyncio.wait(
                {running, self._spawn(self._abandoned.wait())}, return_when=asyncio.FIRST_COMPLETED
            )
            if not running.done():
                logger.error("Pipeline did not stop after cancelling it: abandoning it")
                running.cancel()
                await asyncio.wait({running}, timeout=ABANDON_WAIT_S)
            else:
                running.result()
        finally:
            for signum in signals.values():
                loop.remove_signal_handler(signum)
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        outcome = SessionOutcome.of(self._reason or COMPLETED, abandoned=self._abandoned.is_set())
        logger.info(f"Session ended: reason={outcome.reason} exit_code={outcome.exit_code}")
        return outcome

    async def end(self, reason: str) -> None:
        """End the session gracefully for `reason`, unless it is already ending."""
        if not self._record(reason):
            return
        if self._joined:
            if self._goodbye is not None and reason in GOODBYE_REASONS:
                await self._worker.queue_frames(list(self._goodbye()))
            await self._worker.queue_frame(EndFrame(reason=reason))
            self._spawn(self._cancel_after(self._options.end_grace_s))
        else:
            await self._cancel(reason)

    def _record(self, reason: str) -> bool:
        if self._reason is not None:
            return False
        self._reason = reason
        logger.info(f"Ending session: {reason}")
        return True

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _on_signal(self, reason: str) -> None:
        if self._reason is None:
            self._spawn(self.end(reason))
        else:
            logger.warning(f"Second stop signal ({reason}) while ending: cancelling")
            self._spawn(self._cancel(reason))

    async def _end_after(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        await self.end(MAX_DURATION)

    async def _cancel_after(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        logger.warning(f"Pipeline still running {delay_s:.1f} s after EndFrame: cancelling")
        await self._cancel(self._reason)

    async def _cancel(self, reason: str | None) -> None:
        await self._worker.cancel(reason=reason)
        self._spawn(self._abandon_after(self._options.cancel_grace_s))

    async def _abandon_after(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self._abandoned.set()

    def _wire(self, kind: str) -> None:
        events: dict[str, Callable[..., Awaitable[None]]]
        if kind == WEBRTC:
            events = {
                "on_client_connected": self._on_client_connected,
                "on_client_disconnected": self._on_client_disconnected,
            }
        else:
            events = {
                "on_joined": self._on_joined,
                "on_error": self._on_error,
                "on_first_participant_joined": self._on_first_participant_joined,
                "on_participant_left": self._on_participant_left,
                "on_call_state_updated": self._on_call_state_updated,
            }
        for event, handler in events.items():
            self._transport.add_event_handler(event, handler)
        self._worker.add_event_handler("on_idle_timeout", self._on_idle_timeout)
        self._worker.add_event_handler("on_pipeline_finished", self._on_pipeline_finished)

    async def _connected(self) -> None:
        self._joined = True
        if self._reason is not None or self._ready_sent:
            return
        self._ready_sent = True
        if self._options.on_ready is not None:
            await self._options.on_ready()

    async def _greet(self) -> None:
        if self._greeting is not None and self._reason is None:
            await self._worker.queue_frames(list(self._greeting()))

    async def _on_joined(self, _transport: BaseTransport, _data: dict[str, Any]) -> None:
        await self._connected()

    async def _on_error(self, _transport: BaseTransport, _error: str) -> None:
        if not self._joined:
            await self.end(JOIN_FAILED)

    async def _on_first_participant_joined(
        self, _transport: BaseTransport, participant: dict[str, Any]
    ) -> None:
        self._user_id = participant.get("id")
        logger.info(f"User joined: {self._user_id}")
        await self._greet()

    async def _on_participant_left(
        self, _transport: BaseTransport, participant: dict[str, Any], _reason: str
    ) -> None:
        if self._user_id is not None and participant.get("id") == self._user_id:
            await self.end(PARTICIPANT_LEFT)

    async def _on_call_state_updated(self, _transport: BaseTransport, state: str) -> None:
        if state == "left" and self._joined:
            await self.end(ROOM_LEFT)

    async def _on_client_connected(self, _transport: BaseTransport, client: Any) -> None:
        first = not self._joined
        logger.info(f"Peer connected: {getattr(client, 'pc_id', client)}")
        await self._connected()
        if first:
            await self._greet()

    async def _on_client_disconnected(self, _transport: BaseTransport, client: Any) -> None:
        logger.info(f"Peer disconnected: {getattr(client, 'pc_id', client)}")
        await self.end(PARTICIPANT_LEFT if self._joined else JOIN_FAILED)

    async def _on_idle_timeout(self, _worker: PipelineWorker) -> None:
        self._record(IDLE_TIMEOUT)

    async def _on_pipeline_finished(self, _worker: PipelineWorker, frame: Frame) -> None:
        self._record(PIPELINE_CANCELLED if isinstance(frame, CancelFrame) else COMPLETED)
