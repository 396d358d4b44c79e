"""The runtime's PIPECAT_SETUP_FILES entry: Pipecat calls these for each runner and worker.

Pipecat imports this file by its path (not as `bot_runtime.pipecat_hooks`), so it reaches the
session through `bot_runtime.watch`, a regular import shared with the runtime.
"""

from __future__ import annotations

from typing import Any

from bot_runtime import watch


async def setup_worker_runner(runner: Any) -> None:
    """A `WorkerRunner` is about to start its workers."""
    session = watch.current()
    if session is not None:
        session.add_runner(runner)


async def setup_pipeline_worker(worker: Any) -> None:
    """A `PipelineWorker` is setting up its pipeline."""
    session = watch.current()
    if session is not None:
        session.add_worker(worker)
