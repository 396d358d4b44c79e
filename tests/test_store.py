"""The session store on SQLite and PostgreSQL: capacity, compare-and-set transitions, events,
idempotency keys, leadership locks and the queries of the reconciler."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from dispatcher.errors import RetryLater, http_status
from dispatcher.store import (
    DISPATCHED,
    ENDED,
    ENDING,
    FAILED,
    READY,
    STARTING,
    Session,
    Store,
    engine_url,
    lock_key,
)
from testkit.databases import PG_URL


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


# -- per-user caps --------------------------------------------------------------------------


async def test_per_user_cap(store: Store) -> None:
    """Past max_per_user a user gets RetryLater user-at-capacity while another user still fits;
    a session that ended frees its user's slot."""
    cap = {"max_sessions": 10, "max_per_user": 2}
    await store.create_session(new_session("s-u1", user="ann"), **cap)
    await store.create_session(new_session("s-u2", user="ann"), **cap)
    with pytest.raises(RetryLater) as refused:
        await store.create_session(new_session("s-u3", user="ann"), **cap)
    assert refused.value.code == "user-at-capacity"
    assert http_status(refused.value) == 429
    assert int(refused.value.headers()["Retry-After"]) >= 1
    assert await store.get("s-u3") is None
    assert [e.kind for e in await store.events("s-u3")] == []
    await store.create_session(new_session("s-u4", user="bob"), **cap)
    await store.transition("s-u1", ENDED, from_states=(STARTING,))
    await store.create_session(new_session("s-u3", user="ann"), **cap)
    await store.transition("s-u2", FAILED, from_states=(STARTING,))
    await store.create_session(new_session("s-u5", user="ann"), **cap)
    with pytest.raises(RetryLater) as again:
        await store.create_session(new_session("s-u6", user="ann"), **cap)
    assert again.value.code == "user-at-capacity"


async def test_total_cap_is_at_capacity_and_counts_every_user(store: Store) -> None:
    """max_sessions counts all users' active sessions; its refusal is code at-capacity."""
    await store.create_session(new_session("s-m1", user="ann"), max_sessions=2, max_per_user=2)
    await store.create_session(new_session("s-m2", user="bob"), max_sessions=2, max_per_user=2)
    with pytest.raises(RetryLater) as refused:
        await store.create_session(new_session("s-m3", user="cid"), max_sessions=2, max_per_user=2)
    assert refused.value.code == "at-capacity"
    assert http_status(refused.value) == 429
    assert await store.count_active() == 2


async def test_concurrent_creates_across_instances_never_exceed_the_caps(
    pg_store: Store,
) -> None:
    """Two stores on one PostgreSQL schema (two dispatcher instances) racing 20 creates keep
    both the total and the per-user cap exactly."""
    async with second_store(pg_store) as other:
        stores = (pg_store, other)
        outcomes = await asyncio.gather(
            *(
                stores[i % 2].create_session(new_session(f"s-p{i}"), max_sessions=5)
                for i in range(20)
            ),
            return_exceptions=True,
        )
        assert sum(o is None for o in outcomes) == 5
        assert all(isinstance(o, RetryLater) for o in outcomes if o is not None)
        assert await pg_store.count_active() == 5
        assert await other.count_active() == 5

        users = [f"user-{i % 4}" for i in range(20)]
        outcomes = await asyncio.gather(
            *(
                stores[i % 2].create_session(
                    new_session(f"s-q{i}", user=user), max_sessions=100, max_per_user=2
                )
                for i, user in enumerate(users)
            ),
            return_exceptions=True,
        )
        refused = [o for o in outcomes if o is not None]
        assert len(refused) == 12
        assert all(isinstance(o, RetryLater) and o.code == "user-at-capacity" for o in refused)
        for i in range(4):
            assert len(await pg_store.list_sessions(user=f"user-{i}")) == 2


# -- idempotency keys -----------------------------------------------------------------------


async def test_idempotency_key_claim_settle_release(store: Store) -> None:
    """The first claim of a key wins; later claims see its record, then its settled answer;
    only the holder's session id releases it."""
    assert await store.claim_key("ann", "k-1", "hash-a", "s-1") is None
    held = await store.claim_key("ann", "k-1", "hash-b", "s-2")
    assert held is not None
    assert (held.user_id, held.key, held.request_hash, held.session_id, held.answer) == (
        "ann",
        "k-1",
        "hash-a",
        "s-1",
        None,
    )
    assert held.created_at == pytest.approx(time.time(), abs=60)
    assert await store.claim_key("bob", "k-1", "hash-a", "s-3") is None  # keys are per user

    answer = {"dailyRoom": "https://x.daily.co/s-1", "dailyToken": "t", "sessionId": "s-1"}
    await store.settle_key("ann", "k-1", "s-2", {"sessionId": "s-2"})  # not the holder
    unsettled = await store.claim_key("ann", "k-1", "hash-a", "s-4")
    assert unsettled is not None and unsettled.answer is None
    await store.settle_key("ann", "k-1", "s-1", answer)
    settled = await store.claim_key("ann", "k-1", "hash-a", "s-5")
    assert settled is not None and settled.answer == answer and settled.session_id == "s-1"

    await store.release_key("ann", "k-1", "s-2")  # not the holder: nothing happens
    still = await store.claim_key("ann", "k-1", "hash-a", "s-6")
    assert still is not None and still.session_id == "s-1"
    await store.release_key("ann", "k-1", "s-1")
    assert await store.claim_key("ann", "k-1", "hash-c", "s-7") is None
    retaken = await store.claim_key("ann", "k-1", "hash-c", "s-8")
    assert retaken is not None and retaken.session_id == "s-7" and retaken.answer is None
    other_user = await store.claim_key("bob", "k-1", "hash-a", "s-9")
    assert other_user is not None and other_user.session_id == "s-3"


async def test_concurrent_claims_of_one_key_have_one_winner(store: Store) -> None:
    """Of many racing claims of one key exactly one wins; the others all see the winner."""
    results = await asyncio.gather(
        *(store.claim_key("ann", "k-race", "h", f"s-r{i}") for i in range(10))
    )
    winners = [f"s-r{i}" for i, r in enumerate(results) if r is None]
    assert len(winners) == 1
    assert {r.session_id for r in results if r is not None} == set(winners)


async def test_purge_keys_forgets_old_keys(store: Store) -> None:
    """purge_keys removes keys created before the cutoff and says how many."""
    await store.claim_key("ann", "k-a", "h", "s-1")
    await store.claim_key("bob", "k-b", "h", "s-2")
    assert await store.purge_keys(created_before=time.time() - 3600) == 0
    assert (await store.claim_key("ann", "k-a", "h", "s-3")) is not None
    assert await store.purge_keys(created_before=time.time() + 1) == 2
    assert await store.claim_key("ann", "k-a", "h", "s-4") is None
    assert await store.claim_key("bob", "k-b", "h", "s-5") is None


# -- queries of the reconciler and the janitor ----------------------------------------------


async def test_active_sessions_oldest_first(store: Store) -> None:
    """active_sessions lists every non-terminal session, oldest first."""
    now = time.time()
    ages = {"s-o3": 30, "s-o1": 50, "s-o2": 40, "s-o4": 20, "s-o5": 10}
    for sid, age in ages.items():  # created out of age order
        session = replace(new_session(sid), created_at=now - age, updated_at=now - age)
        await store.create_session(session, max_sessions=10)
    await store.transition("s-o2", ENDED, from_states=(STARTING,))
    await store.transition("s-o4", FAILED, from_states=(STARTING,))
    await store.transition("s-o5", ENDING, from_states=(STARTING,))
    await store.transition("s-o3", READY, from_states=(STARTING,))
    assert [s.id for s in await store.active_sessions()] == ["s-o1", "s-o3", "s-o5"]


async def test_get_many(store: Store) -> None:
    """get_many returns the sessions that exist among the ids, by id, across large id lists."""
    await store.create_session(new_session("s-g1"), max_sessions=10)
    await store.create_session(new_session("s-g2", user="bob"), max_sessions=10)
    assert await store.get_many([]) == {}
    missing = [f"s-none{i}" for i in range(1200)]
    found = await store.get_many([*missing[:700], "s-g2", *missing[700:], "s-g1", "s-g2"])
    assert set(found) == {"s-g1", "s-g2"}
    assert found["s-g2"].user_id == "bob" and found["s-g1"].state == STARTING


async def test_rooms_to_delete(store: Store) -> None:
    """Rooms to delete: terminal sessions with a room not yet deleted, ended before the cutoff,
    oldest update first (a session without ended_at counts from its last update)."""
    now = time.time()

    def row(sid: str, state: str, age: float, **values: object) -> Session:
        base = new_session(sid, state=state)
        return replace(base, updated_at=now - age, **values)  # type: ignore[arg-type]

    rows = [
        row("s-d1", ENDED, 150, ended_at=now - 150),
        row("s-d2", FAILED, 200),  # no ended_at: its update time counts
        row("s-d3", ENDED, 300, ended_at=now - 300, room_deleted_at=now - 290),
        row("s-d4", ENDED, 300, ended_at=now - 300, room_name=None, room_url=None),
        row("s-d5", READY, 300),
        row("s-d6", ENDED, 10, ended_at=now - 10),  # ended after the cutoff
        row("s-d7", FAILED, 500, ended_at=now - 20),  # ended after the cutoff
    ]
    for session in rows:
        await store.create_session(session, max_sessions=10)
    due = await store.rooms_to_delete(ended_before=now - 100)
    assert [s.id for s in due] == ["s-d2", "s-d1"]
    assert [s.id for s in await store.rooms_to_delete(ended_before=now - 100, limit=1)] == ["s-d2"]
    await store.update("s-d2", room_deleted_at=time.time())
    assert [s.id for s in await store.rooms_to_delete(ended_before=now - 100)] == ["s-d1"]
    later = await store.rooms_to_delete(ended_before=now)
    assert {s.id for s in later} == {"s-d1", "s-d6", "s-d7"}


async def test_open_adds_missing_columns(tmp_path: Path) -> None:
    """A sessions table from before room_deleted_at gets the column on open, rows intact."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE sessions (id VARCHAR(64) PRIMARY KEY, user_id VARCHAR(256) NOT NULL, "
            "state VARCHAR(16) NOT NULL, transport VARCHAR(16) NOT NULL, region VARCHAR(16), "
            "machine_id VARCHAR(64), machine_version VARCHAR(64), room_name VARCHAR(128), "
            "room_url VARCHAR(512), callback_hash VARCHAR(64), dispatcher VARCHAR(128) NOT NULL,"
            " end_reason VARCHAR(64), exit_code INTEGER, created_at FLOAT NOT NULL, "
            "updated_at FLOAT NOT NULL, ready_at FLOAT, ended_at FLOAT, expires_at FLOAT NOT NULL)"
        )
        db.execute(
            "INSERT INTO sessions (id, user_id, state, transport, room_name, dispatcher, "
            "created_at, updated_at, ended_at, expires_at) "
            "VALUES ('s-old', 'ann', 'ended', 'daily', 's-old', 'test', 1, 2, 2, 3)"
        )
    store = await Store.open(f"sqlite:///{path}")
    try:
        old = await store.get("s-old")
        assert old is not None and old.room_deleted_at is None and old.state == ENDED
        assert [s.id for s in await store.rooms_to_delete(ended_before=time.time())] == ["s-old"]
        await store.update("s-old", room_deleted_at=5.0)
        assert (await store.get("s-old")).room_deleted_at == 5.0  # type: ignore[union-attr]
        assert await store.rooms_to_delete(ended_before=time.time()) == []
        await store.create_session(new_session("s-new"), max_sessions=10)
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        columns = [r[1] for r in db.execute("PRAGMA table_info(sessions)")]
    assert columns.count("room_deleted_at") == 1
    reopened = await Store.open(f"sqlite:///{path}")  # a second open adds nothing twice
    try:
        assert (await reopened.get("s-old")).room_deleted_at == 5.0  # type: ignore[union-attr]
    finally:
        await reopened.close()


async def test_open_adds_the_error_column(store: Store) -> None:
    """A database from before the bot's `error` (SQLite and PostgreSQL) gets the column on
    open, its sessions intact and without one; opening it again adds nothing twice."""
    async with store.write() as conn:
        await conn.exec_driver_sql("ALTER TABLE sessions DROP COLUMN error")
        await conn.exec_driver_sql(
            "INSERT INTO sessions (id, user_id, state, transport, dispatcher, created_at, "
            "updated_at, expires_at, end_reason, exit_code) "
            "VALUES ('s-old', 'ann', 'ending', 'daily', 'test', 1, 2, 3, 'crashed', 1)"
        )
    assert "error" not in await session_columns(store)
    async with second_store(store) as upgraded:
        old = await upgraded.get("s-old")
        assert old is not None and old.error is None and old.end_reason == "crashed"
        await upgraded.fill("s-old", error="ValueError: no such voice")
        await upgraded.create_session(new_session("s-new"), max_sessions=10)
    async with second_store(store) as reopened:
        assert (await reopened.get("s-old")).error == "ValueError: no such voice"  # type: ignore[union-attr]
        assert (await reopened.get("s-new")).error is None  # type: ignore[union-attr]
    assert (await session_columns(store)).count("error") == 1


async def test_fill_keeps_what_is_stored(store: Store) -> None:
    """`fill` sets only the fields still unset: a stored error or exit code is never
    overwritten, and None values are skipped."""
    await store.create_session(new_session("s-f"), max_sessions=10)
    await store.fill("s-f", error="ValueError: no such voice", exit_code=None)
    await store.fill("s-f", error="another error", exit_code=1)
    await store.fill("s-f", error=None, exit_code=2)
    got = await store.get("s-f")
    assert got is not None and got.error == "ValueError: no such voice" and got.exit_code == 1


async def session_columns(store: Store) -> list[str]:
    """The columns of the sessions table as the database has them."""
    async with store.read() as conn:
        found = await conn.run_sync(lambda c: sa.inspect(c).get_columns("sessions"))
    return [c["name"] for c in found]


# -- leadership locks -----------------------------------------------------------------------


async def test_try_lock_on_sqlite_is_always_granted(tmp_path: Path) -> None:
    """SQLite serves one instance: every try_lock is granted and stays alive until released."""
    store = await Store.open(f"sqlite:///{tmp_path}/lock.db")
    try:
        first = await store.try_lock("leader")
        second = await store.try_lock("leader")
        assert first is not None and second is not None
        assert await first.alive() and await second.alive()
        await first.release()
        assert not await first.alive()
    finally:
        await store.close()


async def test_try_lock_is_exclusive_across_instances(pg_store: Store) -> None:
    """On PostgreSQL a held lock is refused to another store until released."""
    name = "test-lock-" + secrets.token_hex(6)
    async with second_store(pg_store) as other:
        held = await pg_store.try_lock(name)
        assert held is not None and await held.alive()
        assert await other.try_lock(name) is None
        assert await pg_store.try_lock(name) is None  # a session-level lock per connection
        another = await other.try_lock("another-" + name)
        assert another is not None  # locks of other names are independent
        await another.release()
        await held.release()
        assert not await held.alive()
        taken = await other.try_lock(name)
        assert taken is not None and await taken.alive()
        assert await pg_store.try_lock(name) is None
        await taken.release()


async def test_lock_is_freed_when_its_holder_closes(pg_store: Store) -> None:
    """Closing the holder's store frees its locks for another instance."""
    name = "test-lock-" + secrets.token_hex(6)
    async with second_store(pg_store) as holder:
        held = await holder.try_lock(name)
        assert held is not None
        assert await pg_store.try_lock(name) is None
        await holder.close()
        assert not await held.alive()
        taken = await pg_store.try_lock(name)
        assert taken is not None
        await taken.release()


async def test_lock_is_freed_when_its_connection_dies(pg_store: Store) -> None:
    """A holder whose connection is killed loses the lock: alive() says so, another takes it."""
    name = "test-lock-" + secrets.token_hex(6)
    async with second_store(pg_store) as holder:
        held = await holder.try_lock(name)
        assert held is not None and await held.alive()
        key = lock_key(name) & 0xFFFF_FFFF_FFFF_FFFF
        engine = create_async_engine(engine_url(PG_URL))
        try:
            async with engine.connect() as conn:
                pid = await conn.scalar(
                    sa.text(
                        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                        "AND classid::bigint = :hi AND objid::bigint = :lo AND objsubid = 1"
                    ),
                    {"hi": key >> 32, "lo": key & 0xFFFF_FFFF},
                )
                assert pid is not None
                killed = await conn.scalar(
                    sa.text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid}
                )
                assert killed is True
        finally:
            await engine.dispose()
        assert not await held.alive()
        assert not await held.alive()  # and stays dead
        taken = await pg_store.try_lock(name)
        assert taken is not None and await taken.alive()
        await taken.release()


@contextlib.asynccontextmanager
async def second_store(store: Store) -> AsyncIterator[Store]:
    """Another Store on the same database as `store` (its SQLite file, or its PostgreSQL
    schema): a second dispatcher instance."""
    if store.sqlite:
        other = await Store.open(f"sqlite:///{store._engine.url.database}")
    else:
        async with store._engine.connect() as conn:
            schema = await conn.scalar(sa.text("SELECT current_schema()"))
        other = await Store.open(PG_URL, schema=schema)
    try:
        yield other
    finally:
        await other.close()
