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
    from pipecat.frames.frames import Frame
    from pipecat.processors.audio.vad_processor import VADProcessor
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.runner.types import DailyRunnerArguments
    from pipecat.transports.base_transport import BaseTransport
    from pipecat.transports.daily.transport import DailyInputTransport, DailyOutputTransport

    from bot.bot import BotSession, SessionOptions, build_pipeline, build_transport
    from bot.outcome import SessionOutcome

ROOT = Path(__file__).parent.parent
# Nothing listens there, so the Daily join stalls in retries until it gives up (~20 s).
UNREACHABLE_ROOM = "http://127.0.0.1:9/s-test1"


class Passthrough(FrameProcessor):
    """Passes every frame on: the fake transport's input and output."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)


class FakeTransport(BaseTransport):
    """A transport with DailyTransport's session events, fired by the test, and no network."""

    EVENTS = (
        "on_joined",
        "on_error",
        "on_first_participant_joined",
        "on_participant_left",
        "on_call_state_updated",
    )

    def __init__(self) -> None:
        super().__init__()
        self._input = Passthrough()
        self._output = Passthrough()
        for event in self.EVENTS:
            self._register_event_handler(event)

    def input(self) -> FrameProcessor:
        return self._input

    def output(self) -> FrameProcessor:
        return self._output

    async def emit(self, event: str, *args: Any) -> None:
        """Fire `event` as DailyTransport would."""
        await self._call_event_handler(event, *args)


class Session:
    """A `BotSession` on a fake transport, running in the background."""

    def __init__(self, idle_timeout_secs: float | None = None, **options: Any) -> None:
        self.ready_calls = 0
        self.ready = asyncio.Event()
        self.transport = FakeTransport()
        _, worker = build_pipeline(
            self.transport, session_id="s-test1", idle_timeout_secs=idle_timeout_secs
        )
        self.started = asyncio.Event()
        worker.add_event_handler("on_pipeline_started", self.on_started)
        self.session = BotSession(
            self.transport, worker, SessionOptions(on_ready=self.on_ready, **options)
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
        """Once the pipeline has started, fire on_joined and wait for the ready hook."""
        await asyncio.wait_for(self.started.wait(), 5)
        await self.transport.emit("on_joined", {"participants": {"local": {"id": "bot"}}})
        await asyncio.wait_for(self.ready.wait(), 5)

    async def outcome(self, timeout_s: float = 10.0) -> SessionOutcome:
        assert self.task is not None
        return await asyncio.wait_for(self.task, timeout_s)


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
    transport = build_transport(args)
    pipeline, worker = build_pipeline(transport, session_id="s-test1", idle_timeout_secs=300)
    kinds = [type(p) for p in pipeline.processors]
    assert DailyInputTransport in kinds
    assert DailyOutputTransport in kinds
    vad = next(p for p in pipeline.processors if isinstance(p, VADProcessor))
    assert isinstance(vad._vad_controller._vad_analyzer, SileroVADAnalyzer)
    assert worker.has_finished() is False


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
    """SIGTERM (handled by the session) ends it "sigterm", exit 0, without abandoning anything."""
    session.start(handle_sigterm=True)
    await session.joined()
    os.kill(os.getpid(), signal.SIGTERM)
    assert await session.outcome() == SessionOutcome("sigterm", 0)


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
