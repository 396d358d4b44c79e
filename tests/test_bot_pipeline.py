"""The real bot: its pipeline builds offline, its session ends for the right reason, its CLI."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sys
import time
import warnings
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from bot.logs import MASK, JsonLogSink
from tests.fakes.recorder import CALLBACK_TOKEN, DAILY_TOKEN, CallbackRecorder, contract_env

with warnings.catch_warnings():
    # pipecat.audio.utils imports audioop, deprecated in Python 3.11 (audioop-lts from 3.13).
    warnings.filterwarnings("ignore", "'audioop' is deprecated", DeprecationWarning)
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.frames.frames import EndFrame, Frame, OutputAudioRawFrame, TTSSpeakFrame
    from pipecat.processors.audio.vad_processor import VADProcessor
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.processors.frameworks.rtvi import RTVIProcessor
    from pipecat.runner.types import DailyRunnerArguments, SmallWebRTCRunnerArguments
    from pipecat.transports.base_transport import BaseTransport
    from pipecat.transports.daily.transport import DailyInputTransport, DailyOutputTransport
    from pipecat.transports.smallwebrtc.transport import (
        SmallWebRTCInputTransport,
        SmallWebRTCOutputTransport,
    )

    from bot.bot import build_transport
    from bot.echo import EchoProcessor
    from bot.outcome import SessionOutcome
    from bot.pipeline import build_pipeline
    from bot.services import CONVERSATION, Services
    from bot.session import DAILY, WEBRTC, BotSession, SessionOptions
    from bot.webrtc import new_connection

ROOT = Path(__file__).parent.parent
# Nothing listens there, so the Daily join stalls in retries until it gives up (~20 s).
UNREACHABLE_ROOM = "http://127.0.0.1:9/s-test1"


class Passthrough(FrameProcessor):
    """Passes every frame on, keeping those going downstream: the fake transport's ends."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[Frame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.frames.append(frame)
        await self.push_frame(frame, direction)


class FakeTransport(BaseTransport):
    """A transport with the session events of DailyTransport (which has SmallWebRTC's two
    client events too, as aliases), fired by the test, and no network."""

    EVENTS = (
        "on_joined",
        "on_error",
        "on_first_participant_joined",
        "on_participant_left",
        "on_call_state_updated",
        "on_client_connected",
        "on_client_disconnected",
    )

    def __init__(self) -> None:
        super().__init__()
        self._input = Passthrough()
        self._output = Passthrough()
        for event in self.EVENTS:
            self._register_event_handler(event)

    def input(self) -> FrameProcessor:
        return self._input

    def output(self) -> Passthrough:
        return self._output

    async def emit(self, event: str, *args: Any) -> None:
        """Fire `event` as DailyTransport would."""
        await self._call_event_handler(event, *args)


class Session:
    """A `BotSession` on a fake transport, running in the background."""

    def __init__(
        self, idle_timeout_secs: float | None = None, kind: str = DAILY, **options: Any
    ) -> None:
        self.ready_calls = 0
        self.ready = asyncio.Event()
        self.transport = FakeTransport()
        self.kind = kind
        self.built = build_pipeline(
            self.transport, session_id="s-test1", idle_timeout_secs=idle_timeout_secs
        )
        self.started = asyncio.Event()
        self.built.worker.add_event_handler("on_pipeline_started", self.on_started)
        self.session = BotSession(
            self.transport,
            self.built.worker,
            SessionOptions(on_ready=self.on_ready, **options),
            kind=kind,
            greeting=self.built.greeting,
            goodbye=self.built.goodbye,
        )
        self.task: asyncio.Task[SessionOutcome] | None = None

    async def on_started(self, *_: object) -> None:
        self.started.set()

    async def on_ready(self) -> bool:
        self.ready_calls += 1
        self.ready.set()
        return True

    def start(self, **run: bool) -> None:
        self.task = asyncio.create_task(self.session.run(**run))

    async def joined(self) -> None:
        """Once the pipeline has started, fire the transport's connected event and wait for
        the ready hook (Daily: the bot joined; webrtc: the peer connected)."""
        await asyncio.wait_for(self.started.wait(), 5)
        if self.kind == WEBRTC:
            await self.transport.emit("on_client_connected", PeerConnection("pc-1"))
        else:
            await self.transport.emit("on_joined", {"participants": {"local": {"id": "bot"}}})
        await asyncio.wait_for(self.ready.wait(), 5)

    async def outcome(self, timeout_s: float = 10.0) -> SessionOutcome:
        assert self.task is not None
        return await asyncio.wait_for(self.task, timeout_s)


@dataclass
class PeerConnection:
    """What SmallWebRTCTransport passes to its client events."""

    pc_id: str


@pytest.fixture
async def session() -> AsyncIterator[Session]:
    """A session on a fake transport; cancelled if a test leaves it running."""
    s = Session(end_grace_s=1.0, cancel_grace_s=1.0)
    yield s
    if s.task is not None and not s.task.done():
        s.task.cancel()
        await asyncio.gather(s.task, return_exceptions=True)


async def test_real_pipeline_builds_offline() -> None:
    """The Daily transport and the Silero VAD (loaded from the wheel) build without joining."""
    args = DailyRunnerArguments(
        room_url="https://example.daily.co/s-test1", token=DAILY_TOKEN, session_id="s-test1"
    )
    transport, kind = build_transport(args)
    built = build_pipeline(transport, session_id="s-test1", idle_timeout_secs=300)
    assert kind == DAILY
    kinds = [type(p) for p in built.pipeline.processors]
    assert DailyInputTransport in kinds
    assert DailyOutputTransport in kinds
    vad = next(p for p in built.pipeline.processors if isinstance(p, VADProcessor))
    assert isinstance(vad._vad_controller._vad_analyzer, SileroVADAnalyzer)
    assert built.worker.has_finished() is False


async def test_real_webrtc_echo_pipeline_builds_offline() -> None:
    """SmallWebRTC's transport on a peer connection still waiting for its offer, the VAD and
    the echo build without a peer; the worker adds RTVI and runs the echo at 16 kHz both ways."""
    args = SmallWebRTCRunnerArguments(webrtc_connection=new_connection(), session_id="s-test1")
    transport, kind = build_transport(args)
    built = build_pipeline(transport, session_id="s-test1", idle_timeout_secs=300)
    assert kind == WEBRTC
    assert [type(p) for p in built.pipeline.processors[1:-1]] == [
        SmallWebRTCInputTransport,
        VADProcessor,
        EchoProcessor,
        SmallWebRTCOutputTransport,
    ]
    assert isinstance(built.worker.rtvi, RTVIProcessor)
    assert built.mode == "echo"
    assert built.sample_rate_out == 16000
    assert built.greeting() == []
    [chime] = built.goodbye()
    assert isinstance(chime, OutputAudioRawFrame) and chime.sample_rate == 16000


async def test_conversation_pipeline_order() -> None:
    """With services the pipeline is input, STT, user aggregator, LLM, TTS, output, assistant
    aggregator; it greets through the LLM and says goodbye with TTS."""
    stt, llm, tts = Passthrough(), Passthrough(), Passthrough()
    transport = FakeTransport()
    built = build_pipeline(
        transport, session_id="s-test1", idle_timeout_secs=300, services=Services(stt, llm, tts)
    )
    processors = built.pipeline.processors[1:-1]  # Less the pipeline's source and sink.
    assert built.mode == CONVERSATION
    assert processors[:2] == [transport.input(), stt]
    assert processors[3:6] == [llm, tts, transport.output()]
    assert type(processors[2]).__name__ == "LLMUserAggregator"
    assert type(processors[6]).__name__ == "LLMAssistantAggregator"
    assert [type(f).__name__ for f in built.greeting()] == ["LLMMessagesAppendFrame"]
    [goodbye] = built.goodbye()
    assert isinstance(goodbye, TTSSpeakFrame) and goodbye.text


async def test_ready_then_user_leaves(session: Session) -> None:
    """Joining calls ready once; the first user leaving ends it "participant_left", exit 0."""
    session.start()
    await session.joined()
    await session.transport.emit("on_first_participant_joined", {"id": "user-1"})
    await session.transport.emit("on_participant_left", {"id": "observer"}, "leftCall")
    await asyncio.sleep(0.05)
    assert session.session.reason is None
    await session.transport.emit("on_participant_left", {"id": "user-1"}, "leftCall")
    assert await session.outcome() == SessionOutcome("participant_left", 0)
    assert session.ready_calls == 1


async def test_join_error_fails_the_session(session: Session) -> None:
    """An error before joining ends the session "join_failed" with exit code 1, without ready."""
    session.start()
    await asyncio.sleep(0.05)
    await session.transport.emit("on_error", "Error joining https://example.daily.co/s-test1")
    assert await session.outcome() == SessionOutcome("join_failed", 1)
    assert session.ready_calls == 0


async def test_max_duration_ends_the_session() -> None:
    """The session ends itself "max_duration" once its time limit passes."""
    s = Session(max_duration_s=0.3)
    s.start()
    await s.joined()
    assert await s.outcome() == SessionOutcome("max_duration", 0)


async def test_idle_timeout_ends_the_session() -> None:
    """A session nobody speaks in is cancelled at the idle timeout, reason "idle_timeout"."""
    s = Session(idle_timeout_secs=0.3)
    s.start()
    await s.joined()
    assert await s.outcome() == SessionOutcome("idle_timeout", 0)


async def test_sigterm_ends_the_session_gracefully(session: Session) -> None:
    """SIGTERM (handled by the session) ends it "sigterm", exit 0, without abandoning anything,
    and the goodbye (the echo's chime) goes out before the EndFrame."""
    session.start(handle_sigterm=True)
    await session.joined()
    os.kill(os.getpid(), signal.SIGTERM)
    assert await session.outcome() == SessionOutcome("sigterm", 0)
    frames = session.transport.output().frames
    chimes = [i for i, f in enumerate(frames) if isinstance(f, OutputAudioRawFrame)]
    ends = [i for i, f in enumerate(frames) if isinstance(f, EndFrame)]
    assert len(chimes) == 1 and len(ends) == 1
    assert chimes[0] < ends[0]


async def test_webrtc_peer_connects_then_leaves() -> None:
    """On webrtc a peer connecting is ready (once, even when it connects again); the peer
    going away ends the session "participant_left", exit 0, with no goodbye to nobody."""
    s = Session(kind=WEBRTC, end_grace_s=1.0, cancel_grace_s=1.0)
    s.start()
    await s.joined()
    await s.transport.emit("on_client_connected", PeerConnection("pc-1"))
    await s.transport.emit("on_client_disconnected", PeerConnection("pc-1"))
    assert await s.outcome() == SessionOutcome("participant_left", 0)
    assert s.ready_calls == 1
    assert not any(isinstance(f, OutputAudioRawFrame) for f in s.transport.output().frames)


async def test_webrtc_peer_lost_before_connecting_fails() -> None:
    """A peer connection that closes before it ever connected (ICE failed or timed out) ends
    the session "join_failed", exit 1, without ready."""
    s = Session(kind=WEBRTC, end_grace_s=1.0, cancel_grace_s=1.0)
    s.start()
    await asyncio.wait_for(s.started.wait(), 5)
    await s.transport.emit("on_client_disconnected", PeerConnection("pc-1"))
    assert await s.outcome() == SessionOutcome("join_failed", 1)
    assert s.ready_calls == 0


async def test_webrtc_max_duration_says_goodbye() -> None:
    """A connected webrtc session ends itself "max_duration" with a goodbye first."""
    s = Session(kind=WEBRTC, max_duration_s=0.3)
    s.start()
    await s.joined()
    assert await s.outcome() == SessionOutcome("max_duration", 0)
    assert any(isinstance(f, OutputAudioRawFrame) for f in s.transport.output().frames)


def test_each_transport_wires_its_own_events() -> None:
    """Daily's session listens to Daily's events only (its client events are aliases of a
    participant joining or leaving), webrtc's to the two client events only."""
    for kind, expected in (
        (DAILY, {"on_joined", "on_error", "on_first_participant_joined", "on_participant_left"}),
        (WEBRTC, {"on_client_connected", "on_client_disconnected"}),
    ):
        s = Session(kind=kind)
        handlers = s.transport._event_handlers
        wired = {name for name, event in handlers.items() if event.handlers}
        assert expected <= wired
        assert not wired & ({"on_joined", "on_client_connected"} - expected)


def bot_env(contract: Mapping[str, str] | None = None) -> dict[str, str]:
    """A process environment for `python -m bot` with the given contract variables."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(contract or {})}


async def run_bot(env: dict[str, str], *argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        *argv,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_cli_without_environment_exits_2() -> None:
    """`python -m bot` with no contract environment exits 2, naming the missing variable."""
    proc = await run_bot(bot_env(), "--room-url", UNREACHABLE_ROOM)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert "missing environment variable SESSION_ID" in err.decode()


async def test_cli_missing_callback_token_makes_no_callback(recorder: CallbackRecorder) -> None:
    """A missing BOT_CALLBACK_TOKEN exits 2 naming it, and calls nothing back."""
    env = contract_env(recorder.url, DAILY_ROOM_URL=UNREACHABLE_ROOM, BOT_CALLBACK_TOKEN=None)
    proc = await run_bot(bot_env(env), "--room-url", UNREACHABLE_ROOM)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert "BOT_CALLBACK_TOKEN" in err.decode()
    assert recorder.calls == []


async def test_cli_sigterm_during_join_ends_within_seconds(recorder: CallbackRecorder) -> None:
    """SIGTERM while the Daily join hangs still sends ended "sigterm" and exits 0 in seconds."""
    env = contract_env(recorder.url, DAILY_ROOM_URL=UNREACHABLE_ROOM)
    proc = await run_bot(bot_env(env), "--room-url", UNREACHABLE_ROOM)
    assert proc.stderr is not None
    lines: list[str] = []
    async with asyncio.timeout(30):
        while not any("Joining" in line for line in lines):
            lines.append((await proc.stderr.readline()).decode())
            assert lines[-1], f"bot exited early: {lines}"
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    out, rest = await asyncio.wait_for(proc.communicate(), 10)
    assert time.monotonic() - started < 5
    assert proc.returncode == 0
    assert [c.body for c in recorder.of("ended")] == [{"reason": "sigterm", "exit_code": 0}]
    assert recorder.of("ended")[0].authorization == f"Bearer {CALLBACK_TOKEN}"
    logs = "".join(lines) + rest.decode() + out.decode()
    assert CALLBACK_TOKEN not in logs
    assert DAILY_TOKEN not in logs
    ours = [json.loads(line) for line in logs.splitlines() if line.startswith('{"ts"')]
    assert ours
    assert all(line["session_id"] == "s-test1" for line in ours)


def test_log_lines_are_json_with_secrets_masked() -> None:
    """Each log record is one JSON line with the session's fields, every secret masked."""
    stream = io.StringIO()
    sink = JsonLogSink(stream, [DAILY_TOKEN, CALLBACK_TOKEN, None], {"session_id": "s-test1"})
    handler = logger.add(sink, level="INFO")
    try:
        logger.info(f"joining with {DAILY_TOKEN}")
        try:
            raise RuntimeError(f"callback {CALLBACK_TOKEN} refused")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.remove(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["msg"] for line in lines] == [f"joining with {MASK}", "failed"]
    assert all(line["session_id"] == "s-test1" for line in lines)
    assert f"callback {MASK} refused" in lines[1]["exc"]
    assert DAILY_TOKEN not in stream.getvalue()
    assert CALLBACK_TOKEN not in stream.getvalue()
