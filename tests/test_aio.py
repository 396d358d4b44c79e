"""The async helpers: cancel-and-wait, and the periodic step runner."""

from __future__ import annotations

import asyncio
import logging

import pytest

from dispatcher.aio import cancel_and_wait, every

LONG_S = 3600.0
WAIT_S = 30.0
log = logging.getLogger("tests.aio")


async def test_cancel_and_wait_cancels_and_waits_for_each_task() -> None:
    """Every running task is cancelled and has finished (its cleanup run) when the call returns;
    a task that already failed or finished raises nothing."""
    cleaned: list[str] = []

    async def sleeper(name: str) -> None:
        try:
            await asyncio.sleep(LONG_S)
        finally:
            await asyncio.sleep(0)
            cleaned.append(name)

    async def failing() -> None:
        raise ValueError("failed before the cancel")

    running = [asyncio.create_task(sleeper(n)) for n in ("a", "b")]
    failed = asyncio.create_task(failing())
    finished = asyncio.create_task(asyncio.sleep(0))
    await asyncio.wait({failed, finished})

    await cancel_and_wait(*running, failed, finished)

    assert sorted(cleaned) == ["a", "b"]
    assert all(t.cancelled() for t in running)
    assert isinstance(failed.exception(), ValueError) and finished.done()


async def test_cancel_and_wait_of_nothing_returns() -> None:
    """No tasks: nothing to wait for."""
    await cancel_and_wait()


async def test_every_runs_the_step_again_after_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    """A step that raises is logged on the given logger as `<what> failed`, with its traceback,
    and the loop goes on."""
    calls = 0
    third = asyncio.Event()

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            third.set()
        if calls == 1:
            raise RuntimeError("first pass broke")

    task = asyncio.create_task(every(0.0, step, log=log, what="test pass"))
    try:
        await asyncio.wait_for(third.wait(), WAIT_S)
    finally:
        await cancel_and_wait(task)

    failures = [r for r in caplog.records if r.name == "tests.aio"]
    assert [r.getMessage() for r in failures] == ["test pass failed"]
    assert failures[0].exc_info is not None and failures[0].levelno == logging.ERROR


async def test_every_pauses_for_what_the_step_returns() -> None:
    """A step that returns a pause is run again after that pause instead of the interval."""
    calls = 0
    again = asyncio.Event()

    async def step() -> float:
        nonlocal calls
        calls += 1
        if calls == 2:
            again.set()
        return 0.0

    task = asyncio.create_task(every(LONG_S, step, log=log, what="test pass"))
    try:
        await asyncio.wait_for(again.wait(), WAIT_S)
    finally:
        await cancel_and_wait(task)


async def test_every_ends_when_cancelled_mid_step() -> None:
    """A cancel during a step ends the loop (it is not taken for the step's failure)."""
    started = asyncio.Event()

    async def step() -> None:
        started.set()
        await asyncio.sleep(LONG_S)

    task = asyncio.create_task(every(0.0, step, log=log, what="test pass"))
    await asyncio.wait_for(started.wait(), WAIT_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
