"""The session store on SQLite and PostgreSQL: capacity, compare-and-set transitions, events."""

from __future__ import annotations

import asyncio
import time

import pytest

from dispatcher.errors import RetryLater
from dispatcher.store import DISPATCHED, ENDED, READY, STARTING, Session, Store, engine_url


def new_session(sid: str, user: str = "u1", state: str = STARTING) -> Session:
    now = time.time()
    return Session(
        id=sid,
        user_id=user,
        state=state,
        transport="daily",
        dispatcher="test",
        created_at=now,
        updated_at=now,
        expires_at=now + 60,
        room_name=sid,
    )


async def test_create_get_and_event_log(store: Store) -> None:
    """A created session reads back whole, with a first event for its state."""
    await store.create_session(new_session("s-1"), max_sessions=10)
    got = await store.get("s-1")
    assert got is not None and got.state == STARTING and got.room_name == "s-1"
    events = await store.events("s-1")
    assert [(e.kind, e.state) for e in events] == [("state", STARTING)]
    assert await store.get("s-missing") is None


async def test_transition_is_compare_and_set(store: Store) -> None:
    """A transition happens only from the listed states, and each one appends an event."""
    await store.create_session(new_session("s-2"), max_sessions=10)
    moved = await store.transition(
        "s-2", DISPATCHED, from_states=(STARTING,), machine_id="m1", details={"region": "iad"}
    )
    assert moved is not None and moved.state == DISPATCHED and moved.machine_id == "m1"
    assert await store.transition("s-2", READY, from_states=(STARTING,)) is None
    assert (await store.get("s-2")).state == DISPATCHED  # type: ignore[union-attr]
    events = await store.events("s-2")
    assert [e.state for e in events] == [STARTING, DISPATCHED]
    assert events[1].details == {"region": "iad"}


async def test_concurrent_transitions_have_one_winner(store: Store) -> None:
    """Of many racing transitions out of the same state, exactly one succeeds."""
    await store.create_session(new_session("s-3", state=DISPATCHED), max_sessions=10)
    results = await asyncio.gather(
        *(store.transition("s-3", READY, from_states=(DISPATCHED,)) for _ in range(10))
    )
    assert sum(r is not None for r in results) == 1


async def test_capacity_is_enforced_atomically(store: Store) -> None:
    """Concurrent creates never exceed max_sessions; the rest get RetryLater."""
    outcomes = await asyncio.gather(
        *(store.create_session(new_session(f"s-c{i}"), max_sessions=3) for i in range(8)),
        return_exceptions=True,
    )
    assert sum(o is None for o in outcomes) == 3
    assert all(isinstance(o, RetryLater) for o in outcomes if o is not None)
    assert await store.count_active() == 3


async def test_terminal_sessions_free_capacity(store: Store) -> None:
    """A session that ended no longer counts against max_sessions."""
    await store.create_session(new_session("s-t1"), max_sessions=1)
    with pytest.raises(RetryLater):
        await store.create_session(new_session("s-t2"), max_sessions=1)
    await store.transition("s-t1", ENDED, from_states=(STARTING,))
    await store.create_session(new_session("s-t2"), max_sessions=1)


async def test_list_filters_and_records(store: Store) -> None:
    """Sessions list newest first, by state and by user; records are events without a state."""
    await store.create_session(new_session("s-a", user="ann"), max_sessions=10)
    await store.create_session(new_session("s-b", user="bob"), max_sessions=10)
    await store.transition("s-b", DISPATCHED, from_states=(STARTING,))
    assert [s.id for s in await store.list_sessions(user="ann")] == ["s-a"]
    assert [s.id for s in await store.list_sessions(state=DISPATCHED)] == ["s-b"]
    await store.record("s-a", "room_created", {"room": "s-a"})
    await store.update("s-a", exit_code=3)
    assert (await store.get("s-a")).exit_code == 3  # type: ignore[union-attr]
    assert (await store.events("s-a"))[-1].kind == "room_created"


def test_engine_urls() -> None:
    """DATABASE_URL forms map to the async drivers."""
    assert engine_url("sqlite:///x.db") == "sqlite+aiosqlite:///x.db"
    assert engine_url("postgresql://u@h/db") == "postgresql+asyncpg://u@h/db"
    assert engine_url("postgres://u@h/db?sslmode=require") == (
        "postgresql+asyncpg://u@h/db?ssl=require"
    )
