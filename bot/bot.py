"""The Pipecat bot run once per session: join the Daily room, report readiness, end cleanly.

`bot(runner_args)` follows Pipecat's runner convention; the dispatcher's additions (the ready
callback, the session's time limit) come in `SessionOptions`, and the way the session ended
comes back as a `SessionOutcome` for the `ended` callback.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from loguru import logger
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import CancelFrame, EndFrame, Frame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.runner.types import DailyRunnerArguments
from pipecat.transports.base_transport import BaseTransport
from pipecat.transports.daily.transport import DailyParams, DailyTransport
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

BOT_NAME = "Pipecat Bot"

# How long a graceful end (EndFrame) may take before the pipeline is cancelled, how long a
# cancel may take before the pipeline is abandoned, and how long to wait for it after that.
# With the `ended` callback's bound (4 s) the worst case after SIGTERM is 9 s, within the
# dispatcher's default stop timeout (BOT_STOP_TIMEOUT_S=10); an end usually takes ~2.5 s
# (DailyParams.audio_out_end_silence_secs=2, then the leave).
END_GRACE_S = 3.0
CANCEL_GRACE_S = 1.5
ABANDON_WAIT_S = 0.5


@dataclass(frozen=True)
class SessionOptions:
    """What a dispatched session adds to Pipecat's runner arguments."""

    on_ready: Callable[[], Awaitable[object]] | None = None
    max_duration_s: float | None = None
    end_grace_s: float = END_GRACE_S
    cancel_grace_s: float = CANCEL_GRACE_S


def build_transport(runner_args: DailyRunnerArguments) -> DailyTransport:
    """The Daily transport of the session (it joins the room when the pipeline starts)."""
    params = DailyParams(audio_in_enabled=True, audio_out_enabled=True)
    return DailyTransport(runner_args.room_url, runner_args.token, BOT_NAME, params)


def build_pipeline(
    transport: BaseTransport,
    *,
    session_id: str | None,
    idle_timeout_secs: float | None,
) -> tuple[Pipeline, PipelineWorker]:
    """The session's pipeline and its worker, built without joining anything.

    Pipecat 1.14 has no VAD on the transport: Silero runs in a `VADProcessor` here, and in
    the user aggregator (`LLMUserAggregatorParams.vad_analyzer`) once an LLM is added.
    """
    pipeline = Pipeline(
        [
            transport.input(),
            VADProcessor(vad_analyzer=SileroVADAnalyzer()),
            transport.output(),
        ]
    )
    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(enable_metrics=True, enable_usage_metrics=True),
        conversation_id=session_id,
        idle_timeout_secs=idle_timeout_secs,
        cancel_on_idle_timeout=True,
    )
    return pipeline, worker


class BotSession:
    """One session's lifecycle around its pipeline worker; the first end reason wins.

    Once joined, an end is graceful: an `EndFrame`, then a cancel after `end_grace_s`.
    Before that there is nothing to say goodbye to, so it is a cancel straight away. A
    pipeline still running `cancel_grace_s` after its cancel (a Daily join blocks until it
    times out) is abandoned, so that a stop signal always ends the session within seconds.
    """

    def __init__(
        self,
        transport: BaseTransport,
        worker: PipelineWorker,
        options: SessionOptions | None = None,
    ) -> None:
        self._transport = transport
        self._worker = worker
        self._options = options or SessionOptions()
        self._reason: str | None = None
        self._joined = False
        self._user_id: str | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._abandoned = asyncio.Event()
        self._wire()

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
        if self._options.max_duration_s is not None:
            self._spawn(self._end_after(self._options.max_duration_s))
        running = asyncio.ensure_future(runner.run())
        try:
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

    def _wire(self) -> None:
        for event, handler in (
            ("on_joined", self._on_joined),
            ("on_error", self._on_error),
            ("on_first_participant_joined", self._on_first_participant_joined),
            ("on_participant_left", self._on_participant_left),
            ("on_call_state_updated", self._on_call_state_updated),
        ):
            self._transport.add_event_handler(event, handler)
        self._worker.add_event_handler("on_idle_timeout", self._on_idle_timeout)
        self._worker.add_event_handler("on_pipeline_finished", self._on_pipeline_finished)

    async def _on_joined(self, _transport: BaseTransport, _data: dict[str, Any]) -> None:
        self._joined = True
        if self._options.on_ready is not None and self._reason is None:
            await self._options.on_ready()

    async def _on_error(self, _transport: BaseTransport, _error: str) -> None:
        if not self._joined:
            await self.end(JOIN_FAILED)

    async def _on_first_participant_joined(
        self, _transport: BaseTransport, participant: dict[str, Any]
    ) -> None:
        self._user_id = participant.get("id")
        logger.info(f"User joined: {self._user_id}")

    async def _on_participant_left(
        self, _transport: BaseTransport, participant: dict[str, Any], _reason: str
    ) -> None:
        if self._user_id is not None and participant.get("id") == self._user_id:
            await self.end(PARTICIPANT_LEFT)

    async def _on_call_state_updated(self, _transport: BaseTransport, state: str) -> None:
        if state == "left" and self._joined:
            await self.end(ROOM_LEFT)

    async def _on_idle_timeout(self, _worker: PipelineWorker) -> None:
        self._record(IDLE_TIMEOUT)

    async def _on_pipeline_finished(self, _worker: PipelineWorker, frame: Frame) -> None:
        self._record(PIPELINE_CANCELLED if isinstance(frame, CancelFrame) else COMPLETED)


async def bot(
    runner_args: DailyRunnerArguments, options: SessionOptions | None = None
) -> SessionOutcome:
    """Pipecat's bot entry point: run one session in the Daily room of `runner_args`."""
    transport = build_transport(runner_args)
    _, worker = build_pipeline(
        transport,
        session_id=runner_args.session_id,
        idle_timeout_secs=runner_args.pipeline_idle_timeout_secs,
    )
    session = BotSession(transport, worker, options)
    return await session.run(
        handle_sigterm=runner_args.handle_sigterm, handle_sigint=runner_args.handle_sigint
    )
