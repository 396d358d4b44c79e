"""What the runtime sees of the team's pipeline, through Pipecat's own setup hooks.

Pipecat runs `setup_worker_runner(runner)` and `setup_pipeline_worker(worker)` from every file
listed in PIPECAT_SETUP_FILES (`pipecat.utils.startup`). The runtime adds its own file
(`bot_runtime/pipecat_hooks.py`), which hands each runner and worker the bot creates to the
session's `SessionWatch`. From them the runtime learns, with no help from the bot file:

- when the bot joined its Daily room (the `BotConnectedFrame` the transport pushes, seen by
  an observer): the session is ready; and when the pipeline starts to end (an `EndFrame` or
  `CancelFrame` goes through it), so that a connection closed after that is not the user's;
- the worker's idle timeout (its `on_idle_timeout` event);
- the user leaving, a failed join, the bot ejected from its room (the transport's events;
  the transport is found through the pipeline's input and output processors);
- which workers to end gracefully (an `EndFrame`) when the session has to stop.

A process runs one session, so the watch in use is the process's `current()` one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from loguru import logger

from bot_runtime.outcome import IDLE_TIMEOUT, JOIN_FAILED, PARTICIPANT_LEFT, ROOM_LEFT

if TYPE_CHECKING:
    from pipecat.observers.base_observer import FramePushed
    from pipecat.pipeline.worker import PipelineWorker
    from pipecat.processors.frame_processor import FrameProcessor
    from pipecat.transports.base_transport import BaseTransport

_DAILY_MODULE = "pipecat.transports.daily.transport"


class SessionControl(Protocol):
    """What a watch reports to the session it watches."""

    def joined(self) -> None:
        """The bot is in its room (or its peer is connected): the user can be heard."""

    def record(self, reason: str) -> None:
        """Remember why the session is ending, unless a reason is already known."""

    def stop(self, reason: str) -> None:
        """End the session for `reason` (the runtime's own decision)."""


class SessionWatch:
    """The runners and workers of one session, and the events the runtime hooks on them."""

    def __init__(self, control: SessionControl) -> None:
        self._control = control
        self._joined = False
        self.ending = False
        self.runners: list[Any] = []
        self.workers: list[PipelineWorker] = []
        self._transports: list[BaseTransport] = []

    @property
    def has_joined(self) -> bool:
        """Whether the bot has joined (or its peer connected)."""
        return self._joined

    def joined(self) -> None:
        """Mark the session ready, once."""
        if not self._joined:
            self._joined = True
            self._control.joined()

    def add_runner(self, runner: Any) -> None:
        """A `WorkerRunner` the bot started."""
        self.runners.append(runner)

    def add_worker(self, worker: PipelineWorker) -> None:
        """A `PipelineWorker` the bot started: observe it and hook its transports."""
        from pipecat.observers.base_observer import BaseObserver

        watch = self

        class SessionObserver(BaseObserver):
            """Sees the bot join its room, and the pipeline start to end (its own doing)."""

            async def on_push_frame(self, data: FramePushed) -> None:
                from pipecat.frames.frames import BotConnectedFrame, CancelFrame, EndFrame

                if isinstance(data.frame, BotConnectedFrame):
                    watch.joined()
                elif isinstance(data.frame, EndFrame | CancelFrame):
                    watch.ending = True

        self.workers.append(worker)
        worker.add_observer(SessionObserver())
        worker.add_event_handler("on_idle_timeout", self._on_idle_timeout)
        for transport in _transports(worker):
            if transport not in self._transports:
                self._transports.append(transport)
                self._hook(transport)

    async def end(self) -> None:
        """End every root worker gracefully: an `EndFrame` after what it has queued."""
        from pipecat.frames.frames import EndFrame

        for worker in self.workers:
            if worker.parent is None and not worker.has_finished():
                await worker.queue_frame(EndFrame())

    async def cancel(self, reason: str | None) -> None:
        """Cancel the bot's runners: their `run()` cancels every worker and returns."""
        for runner in self.runners:
            await runner.cancel(reason=reason)

    def _hook(self, transport: BaseTransport) -> None:
        transport.add_event_handler("on_client_disconnected", self._on_client_disconnected)
        daily = sys.modules.get(_DAILY_MODULE)
        if daily is not None and isinstance(transport, daily.DailyTransport):
            transport.add_event_handler("on_error", self._on_daily_error)
            transport.add_event_handler("on_call_state_updated", self._on_call_state_updated)

    async def _on_idle_timeout(self, _worker: Any) -> None:
        self._control.record(IDLE_TIMEOUT)

    async def _on_client_disconnected(self, _transport: Any, _client: Any) -> None:
        self._control.record(PARTICIPANT_LEFT)

    async def _on_daily_error(self, _transport: Any, error: Any) -> None:
        if not self._joined:
            logger.error(f"The bot could not join its room: {error}")
            self._control.stop(JOIN_FAILED)

    async def _on_call_state_updated(self, _transport: Any, state: str) -> None:
        if state == "left" and self._joined:
            self._control.stop(ROOM_LEFT)


def _transports(worker: PipelineWorker) -> Iterator[BaseTransport]:
    """The transports whose input or output processors are in the worker's pipeline.

    Pipecat's transport processors keep their transport in `_transport` (Daily's do); one
    without it is simply not hooked (its session still works, with fewer end reasons).
    """
    from pipecat.transports.base_transport import BaseTransport

    for processor in _processors(worker.pipeline):
        transport = getattr(processor, "_transport", None)
        if isinstance(transport, BaseTransport):
            yield transport


def _processors(processor: FrameProcessor) -> Iterator[FrameProcessor]:
    yield processor
    for child in processor.processors:
        yield from _processors(child)


SETUP_FILES = "PIPECAT_SETUP_FILES"
HOOKS_FILE = str(Path(__file__).resolve().parent / "pipecat_hooks.py")

_current: SessionWatch | None = None


def register_hooks() -> None:
    """Add the runtime's hooks to PIPECAT_SETUP_FILES (after any of the bot's own)."""
    files = [f for f in os.environ.get(SETUP_FILES, "").split(os.pathsep) if f]
    if HOOKS_FILE not in files:
        os.environ[SETUP_FILES] = os.pathsep.join([*files, HOOKS_FILE])


def current() -> SessionWatch | None:
    """The watch of the session this process runs, if one runs."""
    return _current


def install(watch: SessionWatch | None) -> None:
    """Make `watch` the process's current one (None: no session runs); Pipecat's setup hooks
    hand it the runners and workers started from now on."""
    global _current
    _current = watch
    if watch is not None:
        register_hooks()
