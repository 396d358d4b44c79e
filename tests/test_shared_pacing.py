"""Pacing shared through the store: four dispatcher instances on one PostgreSQL database keep,
together, to Fly's machine create limit and to Daily's room delete limit as the emulators
enforce them, with no per-instance arithmetic.

Four real dispatcher processes (testkit/procs.py) share a fresh database and the emulators
served in this process, whose limits are Fly's and Daily's own (reference: 1 create a second
per app with a burst of 3; about 2 room deletes a second with a burst of 2). Each instance
alone paces under those limits; before the pacing was shared, four of them together overran
them. The checks are on what the emulators recorded (the 429s they answered, the most requests
that arrived within any one second), never on how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import httpx
import pytest

from dispatcher.lifecycle import State
from dispatcher.metrics import Metrics
from dispatcher.pacing import Pacer
from dispatcher.store import Store, StoreBucket
from testkit.fakes.daily import RATE_LIMITS as DAILY_LIMITS
from testkit.fakes.daily import DailyEmulator
from testkit.fakes.fly import DEFAULT_LIMITS, FlyEmulator
from testkit.harness import (
    daily_emulator,
    dispatcher_process,
    emulators,
    fly_emulator,
)
from testkit.waits import eventually
from tests.test_instances import Instance, headers
from tests.test_janitor import ended_session

ENDED = State.ENDED
INSTANCES = 4
SESSIONS = 12  # three per instance
# Sessions wait up to 12 s for their create turn and are ready well after that: no timeout
# of the start or of the bot's readiness may end one meanwhile. FLY_CREATE_BURST is one under
# Fly's burst of 3, the margin docs/operations.md advises for creates that travel unevenly
# (on a busy machine, one sent late and the next on time).
ENV = {
    "FLY_CREATE_BURST": "2",
    "CREATE_QUEUE_WAIT_S": "60",
    "READY_TIMEOUT_S": "120",
    "MAX_SESSIONS": "100",
    "MAX_SESSIONS_PER_USER": "100",
}


def most_in_any_second(times: Sequence[float]) -> int:
    """The most of `times` (seconds) that fall within any one second."""
    ordered = sorted(times)
    most, first = 0, 0
    for last, at in enumerate(ordered):
        while ordered[first] <= at - 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


def creates(fly: FlyEmulator) -> list[float]:
    """When each machine create reached Fly (refused ones too)."""
    return [
        at
        for r, at in zip(fly.requests, fly.arrivals, strict=True)
        if r.method == "POST" and r.path.endswith("/machines")
    ]


def room_deletes(daily: DailyEmulator) -> list[float]:
    """When each room delete call reached Daily, batch or not (refused ones too): Daily's
    delete limit counts a batch call as one delete (testkit/fakes/daily.py)."""
    return [
        at
        for r, at in zip(daily.requests, daily.arrivals, strict=True)
        if r.method == "DELETE" and r.path.startswith(("/rooms/", "/batch/rooms"))
    ]


@contextlib.asynccontextmanager
async def instances(
    tmp_path: Path, database_url: str, fly: FlyEmulator, daily: DailyEmulator
) -> AsyncIterator[list[Instance]]:
    """INSTANCES dispatcher processes on `database_url`, wired to the emulators (served here);
    stopped with SIGTERM on the way out."""
    async with (
        emulators(fly=fly, daily=daily) as urls,
        contextlib.AsyncExitStack() as stack,
    ):
        started: list[Instance] = []
        for _ in range(INSTANCES):
            proc = await stack.enter_async_context(
                dispatcher_process(urls, tmp_path, db=database_url, env=ENV)
            )
            # No keep-alive: the deletes come after a wait longer than uvicorn keeps an idle
            # connection (5 s), and a request sent as the server closes one is lost.
            http = await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=proc.url,
                    timeout=60,
                    trust_env=False,
                    limits=httpx.Limits(max_keepalive_connections=0),
                )
            )
            # One after the other: the first creates the tables.
            await proc.start()
            started.append(Instance(proc, http))
        yield started
        for instance in started:
            instance.proc.terminate()
        for instance in started:
            assert await instance.proc.wait(30) == -signal.SIGTERM


@pytest.mark.slow
async def test_four_instances_together_keep_to_flys_create_limit_and_dailys_delete_limit(
    tmp_path: Path, pg_database_url: str
) -> None:
    """Twelve starts at once, three on each of four instances: Fly never answers a create
    429, and no more creates reached it within any one second than its bucket holds (1 a
    second plus a burst of 3). Then the twelve sessions are deleted at once: their rooms go
    (in batch calls, at most one a room) without a 429 from Daily, and no more delete calls
    reached it within any second than its bucket holds (2 a second plus a burst of 2)."""
    fly, daily = fly_emulator(), daily_emulator()
    async with instances(tmp_path, pg_database_url, fly, daily) as group:
        users = [f"user-{i}" for i in range(SESSIONS)]
        answers = await asyncio.gather(
            *(group[i % INSTANCES].start(user) for i, user in enumerate(users))
        )
        assert [a.status_code for a in answers] == [200] * SESSIONS, [a.text for a in answers]
        owners = {a.json()["sessionId"]: u for a, u in zip(answers, users, strict=True)}

        made = creates(fly)
        rate, burst = DEFAULT_LIMITS["create"]
        print(  # the figures, for `pytest -s`
            f"creates: {len(made)} sent, {fly.limiter.refused.get('create', 0)} refused (429), "
            f"at most {most_in_any_second(made)} within one second (Fly allows {rate + burst:g})"
        )
        assert fly.limiter.refused.get("create", 0) == 0, (
            f"Fly refused {fly.limiter.refused['create']} creates; "
            f"{most_in_any_second(made)} reached it within one second"
        )
        assert len(made) == SESSIONS
        assert most_in_any_second(made) <= rate + burst

        store = await Store.open(pg_database_url)
        try:

            async def all_ready() -> bool:
                sessions = await store.get_many(owners)
                assert all(s.state != "failed" for s in sessions.values()), sessions
                return all(s.state == "ready" for s in sessions.values())

            await eventually(all_ready, timeout=120, what="every session ready")

            ends = await asyncio.gather(
                *(
                    group[i % INSTANCES].http.delete(f"/sessions/{sid}", headers=headers(user))
                    for i, (sid, user) in enumerate(owners.items())
                )
            )
            assert [e.status_code for e in ends] == [202] * SESSIONS, [e.text for e in ends]

            async def rooms_deleted() -> bool:
                sessions = await store.get_many(owners)
                return all(s.room_deleted_at is not None for s in sessions.values())

            await eventually(rooms_deleted, timeout=120, what="every room deleted")
        finally:
            await store.close()

        assert not set(owners) & set(daily.rooms)
        deleted = room_deletes(daily)
        rate, burst = DAILY_LIMITS["delete_room"]
        print(
            f"room delete calls: {len(deleted)} sent, "
            f"{daily.limiter.refused.get('delete_room', 0)} "
            f"refused (429), at most {most_in_any_second(deleted)} within one second (Daily "
            f"allows {rate + burst:g})"
        )
        assert daily.limiter.refused.get("delete_room", 0) == 0, (
            f"Daily refused {daily.limiter.refused['delete_room']} room deletes; "
            f"{most_in_any_second(deleted)} reached it within one second"
        )
        assert 1 <= len(deleted) <= SESSIONS
        assert most_in_any_second(deleted) <= rate + burst
        assert daily.limiter.refused.get("api", 0) == 0


# -- metrics -----------------------------------------------------------------------------------


async def test_metrics_show_the_rooms_awaiting_delete_and_the_shared_queues(store: Store) -> None:
    """`/metrics` reads from the store the rooms awaiting a delete and, for each paced call,
    the turns taken and not yet come on every instance."""
    await ended_session(store, "s-waiting", exp_in_s=3600)
    fly = Pacer(1 / 3600, 1, bucket=StoreBucket(store, "pace:fly-create:bots"))
    other = Pacer(1 / 3600, 1, bucket=StoreBucket(store, "pace:fly-create:bots"))
    await fly.reserve()
    await fly.reserve()
    await other.reserve()
    metrics = Metrics()
    metrics.watch(
        store,
        "test",
        create_queue=lambda: fly.waiting,
        room_delete_queue=lambda: 0,
        leader=lambda: True,
        paced={"fly_create": fly},
    )
    text = (await metrics.render()).decode()
    assert "dispatcher_rooms_awaiting_delete 1.0" in text
    assert 'dispatcher_paced_queue{call="fly_create"} 2.0' in text
    assert "dispatcher_create_queue_depth 1.0" in text
