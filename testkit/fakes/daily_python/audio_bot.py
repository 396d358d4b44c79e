"""A small Pipecat audio bot on DailyTransport that prints what happens to it as JSON lines.

`python audio_bot.py ROOM_URL [--token T] [--speaker]` joins the room, greets the first
participant with about half a second of tone, and ends (leaving the room) when that participant
leaves, when the call ends underneath it, or on SIGTERM; a failed join cancels it. `--speaker`
reads the room's audio from a virtual speaker instead of per-participant tracks. Run with the
daily-python stand-in on PYTHONPATH, it is what tests/test_fake_daily_python.py drives.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import threading
from array import array
from typing import Any

import daily
from pipecat.frames.frames import EndFrame, Frame, InputAudioRawFrame, OutputAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.daily.transport import DailyParams, DailyTransport
from pipecat.workers.runner import WorkerRunner

SAMPLE_RATE = 16000
GREETING_S = 0.48  # whole 40 ms chunks: the output transport holds back a partial one


def emit(event: str, **fields: Any) -> None:
    """Print one event as a JSON line."""
    print(json.dumps({"event": event, **fields}), flush=True)


def tone(seconds: float, hz: float = 440.0) -> bytes:
    """A quiet sine tone as 16-bit mono PCM."""
    count = int(SAMPLE_RATE * seconds)
    return array(
        "h", (int(3000 * math.sin(2 * math.pi * hz * i / SAMPLE_RATE)) for i in range(count))
    ).tobytes()


class HeardTap(FrameProcessor):
    """Passes frames on; reports the first audio heard from the room."""

    def __init__(self) -> None:
        super().__init__()
        self.heard = False

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame) and not self.heard:
            self.heard = True
            emit("heard", sample_rate=frame.sample_rate, bytes=len(frame.audio))
        await self.push_frame(frame, direction)


class SpokeTap(FrameProcessor):
    """Placed after the output transport, which passes on only the audio it wrote: counts it."""

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.expected, self.written = expected, 0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, OutputAudioRawFrame):
            before, self.written = self.written, self.written + len(frame.audio)
            if before < self.expected <= self.written:
                emit("spoke", bytes=self.written)
        await self.push_frame(frame, direction)


class Bot:
    """The bot's session: what it does on the transport's events, and how it ends."""

    def __init__(self, transport: DailyTransport, worker: PipelineWorker) -> None:
        self.transport, self.worker = transport, worker
        self.joined = self.ending = False
        self.tasks: set[asyncio.Task[None]] = set()
        for event in (
            "on_joined", "on_error", "on_call_state_updated", "on_first_participant_joined",
            "on_client_connected", "on_participant_left", "on_client_disconnected", "on_left",
        ):  # fmt: skip
            transport.add_event_handler(event, getattr(self, event))

    async def on_joined(self, transport: DailyTransport, data: dict[str, Any]) -> None:
        self.joined = True
        emit("joined", id=data["participants"]["local"]["id"], data=data)

    async def on_error(self, transport: DailyTransport, error: str) -> None:
        emit("error", error=error)
        if not self.joined:
            await self.worker.cancel()

    async def on_call_state_updated(self, transport: DailyTransport, state: str) -> None:
        emit("call_state", state=state)
        if state == "left" and self.joined:
            await self.end()

    async def on_first_participant_joined(
        self, transport: DailyTransport, participant: dict[str, Any]
    ) -> None:
        emit("first_participant_joined", id=participant["id"], participant=participant)
        await self.worker.queue_frame(OutputAudioRawFrame(tone(GREETING_S), SAMPLE_RATE, 1))

    async def on_client_connected(
        self, transport: DailyTransport, participant: dict[str, Any]
    ) -> None:
        emit("client_connected", id=participant["id"])

    async def on_participant_left(
        self, transport: DailyTransport, participant: dict[str, Any], reason: str
    ) -> None:
        emit("participant_left", id=participant["id"], reason=reason)
        await self.end()

    async def on_client_disconnected(
        self, transport: DailyTransport, participant: dict[str, Any]
    ) -> None:
        emit("client_disconnected", id=participant["id"])

    async def on_left(self, transport: DailyTransport) -> None:
        emit("left")

    async def end(self) -> None:
        if not self.ending:
            self.ending = True
            await self.worker.queue_frame(EndFrame())

    def on_sigterm(self) -> None:
        emit("sigterm")
        task = asyncio.ensure_future(self.end())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


async def run(room_url: str, token: str | None, speaker: bool) -> None:
    """Build the bot and run its pipeline until it ends."""
    emit("started", daily=daily.__file__)
    params = DailyParams(
        audio_in_enabled=True, audio_out_enabled=True, audio_in_user_tracks=not speaker
    )
    transport = DailyTransport(room_url, token, "Audio bot", params)
    pipeline = Pipeline(
        [transport.input(), HeardTap(), transport.output(), SpokeTap(len(tone(GREETING_S)))]
    )
    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(audio_in_sample_rate=SAMPLE_RATE, audio_out_sample_rate=SAMPLE_RATE),
        idle_timeout_secs=None,
    )
    bot = Bot(transport, worker)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, bot.on_sigterm)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()


def main() -> None:
    """Run the bot, then report the threads still alive that would outlive it."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("room_url")
    parser.add_argument("--token")
    parser.add_argument("--speaker", action="store_true")
    args = parser.parse_args()
    asyncio.run(run(args.room_url, args.token, args.speaker))
    lingering = [
        t.name
        for t in threading.enumerate()
        if t is not threading.main_thread() and (not t.daemon or t.name.startswith("daily-call"))
    ]
    emit("exited", threads=lingering)


if __name__ == "__main__":
    main()
