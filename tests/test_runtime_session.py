"""`BotSession`: a team's `bot(runner_args)` run with real Pipecat workers, and how it ends.

The bots here build a `PipelineWorker` over a pass-through pipeline and run it with a
`WorkerRunner`, as a bot file does; there is no transport, so a test stands in for one by
pushing the `BotConnectedFrame` a Daily transport pushes when it joins. Stop signals are
delivered through `StopSignals`' handler, as the process's signal would.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import types
import warnings
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

with warnings.catch_warnings():
    # pipecat.audio.utils imports audioop, deprecated in Python 3.11 (audioop-lts from 3.13).
    warnings.simplefilter("ignore", DeprecationWarning)
    from pipecat.frames.frames import BotConnectedFrame, Frame, TextFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineWorker
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.runner.types import RunnerArguments
    from pipecat.workers.runner import WorkerRunner

from bot_runtime.entrypoint import EntryPoint
from bot_runtime.outcome import SessionOutcome
from bot_runtime.session import BotSession, SessionLimits
from bot_runtime.signals import StopSignals
from testkit.waits import eventually

Bot = Callable[[Any], Coroutine[Any, Any, Any]]
QUICK = SessionLimits(end_grace_s=5.0, cancel_grace_s=0.2)


class Passthrough(FrameProcessor):
    """Passes every frame on, remembering the text frames it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Pass the frame on."""
        await super().process_frame(frame, direction)
        if isinstance(frame, TextFrame):
            self.texts.append(frame.text)
        await self.push_frame(frame, direction)


def pipeline_bot(*, joins: bool = False, idle_timeout_s: float | None = None) -> Bot:
    """A bot running one worker until it ends; `joins` pushes the frame of a joined room."""

    async def bot(runner_args: RunnerArguments) -> None:
        worker = PipelineWorker(
            Pipeline([Passthrough()]),
            idle_timeout_secs=idle_timeout_s,
            cancel_on_idle_timeout=True,
        )
        if joins:

            @worker.event_handler("on_pipeline_started")
            async def joined(worker: PipelineWorker, _frame: Frame) -> None:
                await worker.queue_frame(BotConnectedFrame())

        runner = WorkerRunner(handle_sigint=runner_args.handle_sigint)
        await runner.add_workers(worker)
        await runner.run()

    return bot


def entry(function: Bot, stop_hook: Any = None) -> EntryPoint:
    return EntryPoint("test:bot", types.ModuleType("test"), function, stop_hook)


class Ready:
    """A ready callback that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.called = asyncio.Event()

    async def __call__(self) -> None:
        self.calls += 1
        self.called.set()


async def run(
    session: BotSession, *, during: Callable[[], Coroutine[Any, Any, Any]] | None = None
) -> SessionOutcome:
    """Run the session (bounded), with `during` run beside it."""
    async with asyncio.timeout(60):
        task = asyncio.ensure_future(session.run())
        if during is not None:
            await during()
        return await task


def session_of(bot: Bot, **kwargs: Any) -> BotSession:
    hook = kwargs.pop("stop_hook", None)
    return BotSession(entry(bot, hook), RunnerArguments(session_id="s-1"), **kwargs)


async def test_a_clean_return_completes_with_exit_0() -> None:
    """`bot()` returning on its own is `completed`, exit code 0."""

    async def bot(_args: RunnerArguments) -> None:
        return None

    outcome = await run(session_of(bot))
    assert (outcome.reason, outcome.exit_code, outcome.error) == ("completed", 0, None)


async def test_an_exception_is_exit_1_with_its_line_secrets_masked() -> None:
    """`bot()` raising is `error`, exit code 1, with the exception's type and message on one
    line, every known secret masked."""

    async def bot(_args: RunnerArguments) -> None:
        raise ValueError("bad voice\nfor key sk-secret-123")

    session = session_of(bot, mask=lambda text: text.replace("sk-secret-123", "[redacted]"))
    outcome = await run(session)
    assert (outcome.reason, outcome.exit_code) == ("error", 1)
    assert outcome.error == "ValueError: bad voice for key [redacted]"


async def test_a_stop_before_joining_cancels_at_once() -> None:
    """SIGTERM before the bot joined: no goodbye, the bot's runner is cancelled and `bot()`
    returns: `sigterm`, exit code 0, and no ready."""
    hook_calls: list[str] = []

    async def hook(_worker: PipelineWorker, reason: str) -> None:
        hook_calls.append(reason)

    signals, ready = StopSignals(), Ready()
    session = session_of(pipeline_bot(), signals=signals, on_ready=ready, stop_hook=hook)

    async def sigterm_once_running() -> None:
        await eventually(lambda: bool(session.watch.runners), what="the bot's runner")
        signals._handle(signal.SIGTERM, None)

    outcome = await run(session, during=sigterm_once_running)
    assert (outcome.reason, outcome.exit_code, outcome.abandoned) == ("sigterm", 0, False)
    assert hook_calls == [] and ready.calls == 0


async def test_a_stop_once_joined_says_goodbye_then_ends() -> None:
    """Once the bot joined (ready, once), SIGTERM calls `on_session_stop` with the session's
    worker and the reason, then ends the pipeline: `sigterm`, exit code 0."""
    goodbyes: list[tuple[PipelineWorker, str]] = []

    async def hook(worker: PipelineWorker, reason: str) -> None:
        goodbyes.append((worker, reason))
        await worker.queue_frame(TextFrame("goodbye"))

    signals, ready = StopSignals(), Ready()
    session = session_of(pipeline_bot(joins=True), signals=signals, on_ready=ready, stop_hook=hook)

    async def sigterm_once_ready() -> None:
        await ready.called.wait()
        signals._handle(signal.SIGTERM, None)

    outcome = await run(session, during=sigterm_once_ready)
    assert (outcome.reason, outcome.exit_code) == ("sigterm", 0)
    assert ready.calls == 1
    [(worker, reason)] = goodbyes
    assert reason == "sigterm" and worker in session.watch.workers


async def test_the_time_limit_ends_the_session() -> None:
    """Past `max_duration_s` the session ends `max_duration`, exit code 0."""
    limits = SessionLimits(max_duration_s=0.3, end_grace_s=5.0, cancel_grace_s=0.2)
    outcome = await run(session_of(pipeline_bot(joins=True), limits=limits))
    assert (outcome.reason, outcome.exit_code) == ("max_duration", 0)


async def test_the_workers_idle_timeout_ends_the_session() -> None:
    """The worker's idle timeout (the bot's `idle_timeout_secs`) ends it `idle_timeout`."""
    outcome = await run(session_of(pipeline_bot(idle_timeout_s=0.3)))
    assert (outcome.reason, outcome.exit_code) == ("idle_timeout", 0)


async def test_a_bot_that_ignores_its_cancel_is_abandoned() -> None:
    """A `bot()` that swallows its cancel is abandoned: the session still ends, `sigterm`."""
    signals = StopSignals()
    started, released = asyncio.Event(), asyncio.Event()

    async def stubborn(_args: RunnerArguments) -> None:
        started.set()
        while not released.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await released.wait()

    session = session_of(stubborn, signals=signals, limits=QUICK)

    async def sigterm() -> None:
        await started.wait()
        signals._handle(signal.SIGTERM, None)

    outcome = await run(session, during=sigterm)
    released.set()  # Leave nothing behind: the test's loop closes next.
    assert (outcome.reason, outcome.exit_code, outcome.abandoned) == ("sigterm", 0, True)


async def test_a_second_signal_while_ending_cancels_at_once() -> None:
    """A goodbye that would take long is cut by a second SIGTERM: the runner is cancelled."""
    signals, ready = StopSignals(), Ready()
    hook_started = asyncio.Event()

    async def slow_goodbye(_worker: PipelineWorker, _reason: str) -> None:
        hook_started.set()
        await asyncio.sleep(3600)

    limits = SessionLimits(end_grace_s=3600.0, cancel_grace_s=0.2)
    session = session_of(
        pipeline_bot(joins=True),
        signals=signals,
        on_ready=ready,
        stop_hook=slow_goodbye,
        limits=limits,
    )

    async def twice() -> None:
        await ready.called.wait()
        signals._handle(signal.SIGTERM, None)
        await hook_started.wait()
        signals._handle(signal.SIGTERM, None)

    outcome = await run(session, during=twice)
    assert (outcome.reason, outcome.exit_code, outcome.abandoned) == ("sigterm", 0, False)


async def test_a_signal_before_the_session_ends_it_at_once() -> None:
    """A stop signal received while the bot was booting ends the session as soon as it runs."""
    signals = StopSignals()
    signals._handle(signal.SIGINT, None)
    outcome = await run(session_of(pipeline_bot(joins=True), signals=signals))
    assert (outcome.reason, outcome.exit_code) == ("sigint", 0)


async def test_the_first_reason_wins_and_ends_send_no_ready() -> None:
    """A reason recorded first (the user left) wins over a later stop; once ending, joining
    sends no ready."""
    signals, ready = StopSignals(), Ready()
    session = session_of(pipeline_bot(), signals=signals, on_ready=ready)

    async def user_leaves_then_sigterm() -> None:
        await eventually(lambda: bool(session.watch.runners), what="the bot's runner")
        session.record("participant_left")
        session.joined()
        signals._handle(signal.SIGTERM, None)

    outcome = await run(session, during=user_leaves_then_sigterm)
    assert (outcome.reason, outcome.exit_code) == ("participant_left", 0)
    assert ready.calls == 0


@pytest.mark.parametrize("reason", ["join_failed"])
async def test_a_failed_join_is_exit_1(reason: str) -> None:
    """The runtime's own failure ends (the bot could not join) are exit code 1."""
    session = session_of(pipeline_bot())

    async def fail() -> None:
        await eventually(lambda: bool(session.watch.runners), what="the bot's runner")
        session.stop(reason)

    outcome = await run(session, during=fail)
    assert (outcome.reason, outcome.exit_code) == (reason, 1)
