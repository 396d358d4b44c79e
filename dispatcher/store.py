"""The session store: a sessions table and an append-only event log, on SQLite or PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import weakref
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from dispatcher.errors import RetryLater
from dispatcher.lifecycle import ACTIVE_STATES as ACTIVE_STATES
from dispatcher.lifecycle import TERMINAL_STATES as TERMINAL_STATES
from dispatcher.lifecycle import State

STARTING = State.STARTING
DISPATCHED = State.DISPATCHED
READY = State.READY
ENDING = State.ENDING
ENDED = State.ENDED
FAILED = State.FAILED
_CAPACITY_LOCK = 0x5E55_1011
_SCHEMA_LOCK = 0x5E55_5C4E

metadata = sa.MetaData()

sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.String(256), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("transport", sa.String(16), nullable=False),
    sa.Column("region", sa.String(16)),
    sa.Column("machine_id", sa.String(64)),
    sa.Column("machine_version", sa.String(64)),
    sa.Column("room_name", sa.String(128)),
    sa.Column("room_url", sa.String(512)),
    sa.Column("callback_hash", sa.String(64)),
    sa.Column("dispatcher", sa.String(128), nullable=False),
    sa.Column("end_reason", sa.String(64)),
    sa.Column("exit_code", sa.Integer),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("ready_at", sa.Float),
    sa.Column("ended_at", sa.Float),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("room_deleted_at", sa.Float),
    sa.Column("end_requested_at", sa.Float),
    sa.Column("traceparent", sa.String(64)),
    sa.Column("error", sa.Text),
    sa.Index("ix_sessions_state", "state"),
    sa.Index("ix_sessions_user_state", "user_id", "state"),
)

events = sa.Table(
    "session_events",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("session_id", sa.String(64), nullable=False, index=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("state", sa.String(16)),
    sa.Column("details", sa.Text, nullable=False),
)


idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("user_id", sa.String(256), primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("session_id", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("answer", sa.Text),
)

# Rate limits as token buckets (GCRA): a bucket is full again at `full_at`; each token taken
# moves that `interval` later, and a bucket whose `full_at` would pass `now + window` is empty.
# No row is a full bucket, so rows whose `full_at` is past are deleted freely.
# `_RATE_SLACK_S` absorbs float rounding: `count` tokens of `window / count` fill the window.
_RATE_SLACK_S = 0.001
rate_buckets = sa.Table(
    "rate_buckets",
    metadata,
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("full_at", sa.Float, nullable=False),
)

# Ids of the Daily webhook events handled (dispatcher/webhooks.py), so that a replayed or
# re-delivered event has no second effect; the reconciler forgets them after a day.
webhook_events = sa.Table(
    "webhook_events",
    metadata,
    sa.Column("id", sa.String(160), primary_key=True),
    sa.Column("received_at", sa.Float, nullable=False, index=True),
)

# The warm pool (dispatcher/pool.py): machines made ahead of sessions. `state` is `warming`
# (made, not claimable yet), `available`, or `claimed` (by `session_id`, whose bot fetches its
# assignment with the machine's token; `body` is that session's SESSION_BODY until then).
pool_machines = sa.Table(
    "pool_machines",
    metadata,
    sa.Column("machine_id", sa.String(64), primary_key=True),
    sa.Column("dispatcher", sa.String(128), nullable=False),
    sa.Column("region", sa.String(16), nullable=False),
    sa.Column("image", sa.String(512), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False),
    sa.Column("version", sa.String(64)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("session_id", sa.String(64)),
    sa.Column("body", sa.Text),
    sa.Index("ix_pool_claim", "dispatcher", "state", "region", "image"),
)

# Columns added after the first release, with their DDL type: added on open when missing.
_ADDED_COLUMNS = {
    "sessions": {
        "room_deleted_at": "FLOAT",
        "end_requested_at": "FLOAT",
        "traceparent": "VARCHAR(64)",
        "error": "TEXT",
    }
}


@dataclass(frozen=True)
class Session:
    """One session as stored."""

    id: str
    user_id: str
    state: str
    transport: str
    dispatcher: str
    created_at: float
    updated_at: float
    expires_at: float
    region: str | None = None
    machine_id: str | None = None
    machine_version: str | None = None
    room_name: str | None = None
    room_url: str | None = None
    callback_hash: str | None = None
    end_reason: str | None = None
    exit_code: int | None = None
    ready_at: float | None = None
    ended_at: float | None = None
    room_deleted_at: float | None = None
    # When it moved to `ending` (the end asked for: DELETE, a limit, the bot leaving).
    end_requested_at: float | None = None
    # The W3C traceparent of its start: its bot's parent span, and the parent of the spans
    # made later for its readiness and its end (dispatcher/telemetry.py).
    traceparent: str | None = None
    # Why its bot failed, in the bot's words: its ended report's `error` (dispatcher/callbacks.py).
    error: str | None = None

    @property
    def active(self) -> bool:
        """Whether the session has not reached a terminal state."""
        return self.state in ACTIVE_STATES

    def public(self) -> dict[str, Any]:
        """The session as the HTTP API shows it (no secrets, timestamps in ISO 8601)."""
        return {
            "sessionId": self.id,
            "state": self.state,
            "user": self.user_id,
            "transport": self.transport,
            "region": self.region,
            "machineId": self.machine_id,
            "roomUrl": self.room_url,
            "endReason": self.end_reason,
            "exitCode": self.exit_code,
            "error": self.error,
            "createdAt": iso(self.created_at),
            "readyAt": iso(self.ready_at),
            "endedAt": iso(self.ended_at),
            "expiresAt": iso(self.expires_at),
        }


@dataclass(frozen=True)
class IdempotencyRecord:
    """A `/start` made under an Idempotency-Key: its session, and its answer once it has one."""

    user_id: str
    key: str
    request_hash: str
    session_id: str
    created_at: float
    answer: dict[str, Any] | None


@dataclass(frozen=True)
class Event:
    """One row of a session's event log."""

    session_id: str
    at: float
    kind: str
    state: str | None
    details: dict[str, Any]


_SESSION_COLUMNS = tuple(f.name for f in fields(Session))


def iso(ts: float | None) -> str | None:
    """A unix timestamp as ISO 8601 UTC with milliseconds."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


def engine_url(url: str) -> str:
    """The SQLAlchemy async URL for a DATABASE_URL (sqlite:/// or postgresql://)."""
    scheme, rest = url.split(":", 1)
    if scheme == "sqlite":
        return "sqlite+aiosqlite:" + rest
    parts = urlsplit("postgresql+asyncpg:" + rest)
    query = [("ssl" if k == "sslmode" else k, v) for k, v in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(query=urlencode(query)))


class Store:
    """Sessions and their event log; every state change is a compare-and-set plus an event."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._sqlite = engine.dialect.name == "sqlite"
        self._write_lock = asyncio.Lock()
        # Locks from `try_lock` still held: their connections are checked out of the pool,
        # which `dispose()` alone would leave open (and the lock held) after `close()`.
        self._held: weakref.WeakSet[HeldLock] = weakref.WeakSet()

    @classmethod
    async def open(cls, database_url: str, *, schema: str | None = None) -> Store:
        """Connect and create the tables if missing (`schema`: a PostgreSQL schema, for tests)."""
        url = engine_url(database_url)
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30}
        elif schema:
            kwargs["connect_args"] = {"server_settings": {"search_path": schema}}
        engine = create_async_engine(url, **kwargs)
        store = cls(engine)
        async with engine.begin() as conn:
            if store._sqlite:
                await conn.exec_driver_sql("PRAGMA journal_mode=WAL")
            else:
                # Instances starting together must not race on CREATE TABLE.
                await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
                if schema:
                    await conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.run_sync(metadata.create_all)
            await conn.run_sync(_add_missing_columns)
        return store

    @property
    def dialect(self) -> str:
        """`sqlite` or `postgresql`."""
        return str(self._engine.dialect.name)

    async def close(self) -> None:
        """Release every connection, those holding locks included (which frees the locks)."""
        for lock in list(self._held):
            await lock.release()
        await self._engine.dispose()

    async def ping(self) -> None:
        """Raise if the database cannot be reached."""
        async with self._engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction; on SQLite writes are serialised in-process to avoid lock errors."""
        if self._sqlite:
            async with self._write_lock, self._engine.begin() as conn:
                yield conn
        else:
            async with self._engine.begin() as conn:
                yield conn

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads."""
        async with self._engine.connect() as conn:
            yield conn

    @property
    def sqlite(self) -> bool:
        """Whether the database is SQLite (one writer; no row locks)."""
        return self._sqlite

    async def create_session(
        self,
        session: Session,
        *,
        max_sessions: int,
        max_per_user: int | None = None,
        events: Sequence[tuple[str, dict[str, Any]]] = (),
    ) -> None:
        """Insert a new session unless `max_sessions` are active, or `max_per_user` of its
        user's (then RetryLater), atomically: on PostgreSQL under an advisory lock, so the caps
        hold across every dispatcher instance sharing the database."""
        async with self.write() as conn:
            if not self._sqlite:
                await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_CAPACITY_LOCK)))
            # Both counts in one statement: the active sessions, and the user's among them.
            mine = sa.func.coalesce(
                sa.func.sum(sa.case((sessions.c.user_id == session.user_id, 1), else_=0)), 0
            )
            counts = (
                await conn.execute(
                    sa.select(sa.func.count(), mine).where(sessions.c.state.in_(ACTIVE_STATES))
                )
            ).one()
            if counts[0] >= max_sessions:
                raise RetryLater(f"at capacity: {max_sessions} sessions are active", retry_after=5)
            if max_per_user is not None and counts[1] >= max_per_user:
                raise RetryLater(
                    f"this user already has {max_per_user} active sessions (the most "
                    "allowed): end one first",
                    retry_after=30,
                    code="user-at-capacity",
                )
            await conn.execute(sessions.insert().values(**asdict(session)))
            now = time.time()
            await _add_events(
                conn,
                session.id,
                [(session.created_at, "state", session.state, {})]
                + [(now, kind, None, details) for kind, details in events],
            )

    async def transition(
        self,
        session_id: str,
        to: str,
        *,
        from_states: Iterable[str],
        details: dict[str, Any] | None = None,
        events: Sequence[tuple[str, dict[str, Any]]] = (),
        **values: Any,
    ) -> Session | None:
        """Move a session to `to` if it is in one of `from_states`; None if it was not.
        Moving to `ending` records when (`end_requested_at`)."""
        now = time.time()
        if to == ENDING:
            values.setdefault("end_requested_at", now)
        async with self.write() as conn:
            result = await conn.execute(
                sessions.update()
                .where(sessions.c.id == session_id, sessions.c.state.in_(tuple(from_states)))
                .values(state=to, updated_at=now, **values)
                .returning(*sessions.c)
            )
            row = result.first()
            if row is None:
                return None
            await _add_events(
                conn,
                session_id,
                [(now, kind, None, extra) for kind, extra in events]
                + [(now, "state", to, details or {})],
            )
        return Session(**row._asdict())

    async def update(self, session_id: str, **values: Any) -> None:
        """Set fields of a session without a state change."""
        async with self.write() as conn:
            await conn.execute(
                sessions.update()
                .where(sessions.c.id == session_id)
                .values(updated_at=time.time(), **values)
            )

    async def fill(self, session_id: str, **values: Any) -> None:
        """Set fields of a session that are still unset, in one statement: a value already
        stored is kept (None values are skipped)."""
        given = {name: value for name, value in values.items() if value is not None}
        if not given:
            return
        filled = {
            name: sa.func.coalesce(sessions.c[name], sa.literal(value, sessions.c[name].type))
            for name, value in given.items()
        }
        async with self.write() as conn:
            await conn.execute(
                sessions.update()
                .where(sessions.c.id == session_id)
                .values(updated_at=time.time(), **filled)
            )

    async def record(self, session_id: str, kind: str, details: dict[str, Any]) -> None:
        """Append an event that is not a state change."""
        async with self.write() as conn:
            await _add_events(conn, session_id, [(time.time(), kind, None, details)])

    async def get(self, session_id: str) -> Session | None:
        """The session, or None."""
        async with self._engine.connect() as conn:
            row = (await conn.execute(sessions.select().where(sessions.c.id == session_id))).first()
        return Session(**row._asdict()) if row else None

    async def list_sessions(
        self,
        *,
        state: str | None = None,
        user: str | None = None,
        limit: int = 100,
        states: Iterable[str] | None = None,
        created_after: float | None = None,
    ) -> list[Session]:
        """Sessions, newest first, filtered by state (or any of `states`), user and creation."""
        query = sessions.select().order_by(sessions.c.created_at.desc()).limit(limit)
        if created_after is not None:
            query = query.where(sessions.c.created_at >= created_after)
        if state:
            query = query.where(sessions.c.state == state)
        if states is not None:
            query = query.where(sessions.c.state.in_(tuple(states)))
        if user:
            query = query.where(sessions.c.user_id == user)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [Session(**row._asdict()) for row in rows]

    async def events(self, session_id: str) -> list[Event]:
        """The session's event log, oldest first."""
        query = (
            sa.select(
                events.c.session_id, events.c.at, events.c.kind, events.c.state, events.c.details
            )
            .where(events.c.session_id == session_id)
            .order_by(events.c.id)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [Event(r.session_id, r.at, r.kind, r.state, json.loads(r.details)) for r in rows]

    async def active_sessions(self) -> list[Session]:
        """Every session not in a terminal state, oldest first."""
        query = (
            sessions.select()
            .where(sessions.c.state.in_(ACTIVE_STATES))
            .order_by(sessions.c.created_at)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [Session(**row._asdict()) for row in rows]

    async def get_many(self, session_ids: Iterable[str]) -> dict[str, Session]:
        """The sessions among `session_ids` that exist, by id."""
        ids = list(dict.fromkeys(session_ids))
        found: dict[str, Session] = {}
        async with self._engine.connect() as conn:
            for i in range(0, len(ids), 500):
                query = sessions.select().where(sessions.c.id.in_(ids[i : i + 500]))
                for row in (await conn.execute(query)).all():
                    found[row.id] = Session(**row._asdict())
        return found

    async def rooms_to_delete(self, *, ended_before: float, limit: int = 100) -> list[Session]:
        """Terminal sessions whose room is not known to be deleted, ended before a time."""
        query = (
            sessions.select()
            .where(
                sessions.c.state.in_(TERMINAL_STATES),
                sessions.c.room_name.is_not(None),
                sessions.c.room_deleted_at.is_(None),
                sa.func.coalesce(sessions.c.ended_at, sessions.c.updated_at) < ended_before,
            )
            .order_by(sessions.c.updated_at)
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [Session(**row._asdict()) for row in rows]

    # -- idempotency keys -------------------------------------------------------------------

    async def claim_key(
        self, user_id: str, key: str, request_hash: str, session_id: str
    ) -> IdempotencyRecord | None:
        """Claim an Idempotency-Key for a new start: None if this call claimed it, else the
        record of the start that holds it."""
        now = time.time()
        async with self.write() as conn:
            insert = _insert(self.dialect, idempotency_keys).values(
                user_id=user_id,
                key=key,
                request_hash=request_hash,
                session_id=session_id,
                created_at=now,
            )
            result = await conn.execute(insert.on_conflict_do_nothing())
            if result.rowcount == 1:
                return None
            row = (
                await conn.execute(
                    idempotency_keys.select().where(
                        idempotency_keys.c.user_id == user_id, idempotency_keys.c.key == key
                    )
                )
            ).first()
        if row is None:  # released between the insert and the select: try again
            return await self.claim_key(user_id, key, request_hash, session_id)
        return IdempotencyRecord(
            user_id=row.user_id,
            key=row.key,
            request_hash=row.request_hash,
            session_id=row.session_id,
            created_at=row.created_at,
            answer=json.loads(row.answer) if row.answer else None,
        )

    async def settle_key(
        self, user_id: str, key: str, session_id: str, answer: dict[str, Any]
    ) -> None:
        """Store the answer of the start that holds a key."""
        async with self.write() as conn:
            await conn.execute(
                idempotency_keys.update()
                .where(
                    idempotency_keys.c.user_id == user_id,
                    idempotency_keys.c.key == key,
                    idempotency_keys.c.session_id == session_id,
                )
                .values(answer=json.dumps(answer, separators=(",", ":")))
            )

    async def release_key(self, user_id: str, key: str, session_id: str) -> None:
        """Free a key whose start failed or was abandoned, so that a retry starts afresh."""
        async with self.write() as conn:
            await conn.execute(
                idempotency_keys.delete().where(
                    idempotency_keys.c.user_id == user_id,
                    idempotency_keys.c.key == key,
                    idempotency_keys.c.session_id == session_id,
                )
            )

    async def purge_keys(self, *, created_before: float) -> int:
        """Forget idempotency keys older than a time; how many were removed."""
        async with self.write() as conn:
            result = await conn.execute(
                idempotency_keys.delete().where(idempotency_keys.c.created_at < created_before)
            )
        return int(result.rowcount or 0)

    # -- rate limits ------------------------------------------------------------------------

    async def take_tokens(
        self, buckets: Iterable[tuple[str, float, float]], now: float
    ) -> dict[str, float]:
        """Take a token from each bucket `(key, interval_s, window_s)`, all or none: {} when
        each had one, else the seconds until each empty bucket has one. Each bucket is one
        UPSERT ... RETURNING (refused by its WHERE when empty), all in one transaction, keys in
        order; on PostgreSQL the row lock makes each atomic across instances."""
        waits: dict[str, float] = {}
        try:
            async with self.write() as conn:
                for key, interval, window in sorted(buckets):
                    full_at = rate_buckets.c.full_at
                    taken = sa.case((full_at > now, full_at), else_=now) + interval
                    upsert = (
                        _insert(self.dialect, rate_buckets)
                        .values(key=key, full_at=now + interval)
                        .on_conflict_do_update(
                            index_elements=[rate_buckets.c.key],
                            set_={"full_at": taken},
                            where=taken <= now + window + _RATE_SLACK_S,
                        )
                        .returning(full_at)
                    )
                    if (await conn.execute(upsert)).first() is None:
                        held = await conn.scalar(
                            sa.select(full_at).where(rate_buckets.c.key == key)
                        )
                        waits[key] = max(0.001, float(held or now) + interval - window - now)
                if waits:
                    raise _Refused
        except _Refused:
            pass
        return waits

    async def purge_tokens(self, *, now: float) -> int:
        """Forget buckets that are full again (as good as no row); how many were removed."""
        async with self.write() as conn:
            result = await conn.execute(rate_buckets.delete().where(rate_buckets.c.full_at <= now))
        return int(result.rowcount or 0)

    # -- webhook events ---------------------------------------------------------------------

    async def claim_webhook(self, event_id: str, *, at: float | None = None) -> bool:
        """Record a webhook event id as handled: False if it already was (a replay)."""
        async with self.write() as conn:
            insert = _insert(self.dialect, webhook_events).values(
                id=event_id, received_at=time.time() if at is None else at
            )
            result = await conn.execute(insert.on_conflict_do_nothing())
        return result.rowcount == 1

    async def release_webhook(self, event_id: str) -> None:
        """Forget an event id whose handling failed, so that its re-delivery is handled."""
        async with self.write() as conn:
            await conn.execute(webhook_events.delete().where(webhook_events.c.id == event_id))

    async def purge_webhooks(self, *, received_before: float) -> int:
        """Forget webhook event ids older than a time; how many were removed."""
        async with self.write() as conn:
            result = await conn.execute(
                webhook_events.delete().where(webhook_events.c.received_at < received_before)
            )
        return int(result.rowcount or 0)

    # -- leadership -------------------------------------------------------------------------

    async def try_lock(self, name: str) -> HeldLock | None:
        """Take the session-level lock `name` if no one holds it (PostgreSQL advisory lock, held
        by a connection of its own until released or the connection dies). On SQLite, which
        serves one instance, the lock is always granted."""
        if self._sqlite:
            return HeldLock(None)
        conn = await self._engine.connect()
        try:
            got = await conn.scalar(sa.select(sa.func.pg_try_advisory_lock(lock_key(name))))
            await conn.commit()
        except BaseException:
            await conn.close()
            raise
        if not got:
            await conn.close()
            return None
        lock = HeldLock(conn)
        self._held.add(lock)
        return lock

    async def count_active(self) -> int:
        """How many sessions are not in a terminal state."""
        async with self._engine.connect() as conn:
            count = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(sessions)
                .where(sessions.c.state.in_(ACTIVE_STATES))
            )
        return int(count or 0)

    async def count_by_state(self, *, dispatcher: str | None = None) -> dict[str, int]:
        """How many active sessions are in each state (of one dispatcher app when named)."""
        query = (
            sa.select(sessions.c.state, sa.func.count())
            .where(sessions.c.state.in_(ACTIVE_STATES))
            .group_by(sessions.c.state)
        )
        if dispatcher is not None:
            query = query.where(sessions.c.dispatcher == dispatcher)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {str(state): int(count) for state, count in rows}


class HeldLock:
    """A lock taken by `Store.try_lock`: held while its connection lives."""

    def __init__(self, conn: AsyncConnection | None) -> None:
        self._conn = conn
        self._released = False

    async def alive(self) -> bool:
        """Whether the lock is still held (its connection still answers; not released)."""
        if self._released:
            return False
        if self._conn is None:
            return True
        try:
            await self._conn.execute(sa.text("SELECT 1"))
            await self._conn.commit()
        except Exception:
            await self.release()
            return False
        return True

    async def release(self) -> None:
        """Give the lock up (closing its connection releases it on the server)."""
        conn, self._conn = self._conn, None
        self._released = True
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()


class _Refused(Exception):
    """Rolls back the tokens taken when one bucket was empty."""


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for a name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def _insert(dialect: str, table: sa.Table) -> Any:
    if dialect == "postgresql":
        return pg_insert(table)
    return sqlite_insert(table)


def _add_missing_columns(sync_conn: sa.Connection) -> None:
    inspector = sa.inspect(sync_conn)
    for table, columns in _ADDED_COLUMNS.items():
        present = {c["name"] for c in inspector.get_columns(table)}
        for name, ddl in columns.items():
            if name not in present:
                sync_conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}")


async def _add_events(
    conn: AsyncConnection,
    session_id: str,
    rows: Sequence[tuple[float, str, str | None, dict[str, Any]]],
) -> None:
    """Append events `(at, kind, state, details)` to a session's log, in one statement."""
    await conn.execute(
        events.insert(),
        [
            {
                "session_id": session_id,
                "at": at,
                "kind": kind,
                "state": state,
                "details": json.dumps(details, separators=(",", ":"), default=str),
            }
            for at, kind, state, details in rows
        ],
    )
