"""The session store: a sessions table and an append-only event log, on SQLite or PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from dispatcher.errors import RetryLater

STARTING = "starting"
DISPATCHED = "dispatched"
READY = "ready"
ENDING = "ending"
ENDED = "ended"
FAILED = "failed"
ACTIVE_STATES = (STARTING, DISPATCHED, READY, ENDING)
TERMINAL_STATES = (ENDED, FAILED)
_CAPACITY_LOCK = 0x5E55_1011

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
            "createdAt": iso(self.created_at),
            "readyAt": iso(self.ready_at),
            "endedAt": iso(self.ended_at),
            "expiresAt": iso(self.expires_at),
        }


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
            elif schema:
                await conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.run_sync(metadata.create_all)
        return store

    @property
    def dialect(self) -> str:
        """`sqlite` or `postgresql`."""
        return str(self._engine.dialect.name)

    async def close(self) -> None:
        """Release every connection."""
        await self._engine.dispose()

    async def ping(self) -> None:
        """Raise if the database cannot be reached."""
        async with self._engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction; on SQLite writes are serialised in-process to avoid lock errors."""
        if self._sqlite:
            async with self._write_lock, self._engine.begin() as conn:
                yield conn
        else:
            async with self._engine.begin() as conn:
                yield conn

    async def create_session(self, session: Session, *, max_sessions: int) -> None:
        """Insert a new session unless `max_sessions` are active (then RetryLater), atomically."""
        async with self._write() as conn:
            if not self._sqlite:
                await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_CAPACITY_LOCK)))
            active = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(sessions)
                .where(sessions.c.state.in_(ACTIVE_STATES))
            )
            if (active or 0) >= max_sessions:
                raise RetryLater(f"at capacity: {max_sessions} sessions are active", retry_after=5)
            await conn.execute(sessions.insert().values(**asdict(session)))
            await _add_event(conn, session.id, session.created_at, "state", session.state, {})

    async def transition(
        self,
        session_id: str,
        to: str,
        *,
        from_states: Iterable[str],
        details: dict[str, Any] | None = None,
        **values: Any,
    ) -> Session | None:
        """Move a session to `to` if it is in one of `from_states`; None if it was not."""
        now = time.time()
        async with self._write() as conn:
            result = await conn.execute(
                sessions.update()
                .where(sessions.c.id == session_id, sessions.c.state.in_(tuple(from_states)))
                .values(state=to, updated_at=now, **values)
                .returning(*sessions.c)
            )
            row = result.first()
            if row is None:
                return None
            await _add_event(conn, session_id, now, "state", to, details or {})
        return Session(**row._asdict())

    async def update(self, session_id: str, **values: Any) -> None:
        """Set fields of a session without a state change."""
        async with self._write() as conn:
            await conn.execute(
                sessions.update()
                .where(sessions.c.id == session_id)
                .values(updated_at=time.time(), **values)
            )

    async def record(self, session_id: str, kind: str, details: dict[str, Any]) -> None:
        """Append an event that is not a state change."""
        async with self._write() as conn:
            await _add_event(conn, session_id, time.time(), kind, None, details)

    async def get(self, session_id: str) -> Session | None:
        """The session, or None."""
        async with self._engine.connect() as conn:
            row = (await conn.execute(sessions.select().where(sessions.c.id == session_id))).first()
        return Session(**row._asdict()) if row else None

    async def list_sessions(
        self, *, state: str | None = None, user: str | None = None, limit: int = 100
    ) -> list[Session]:
        """Sessions, newest first, filtered by state and user."""
        query = sessions.select().order_by(sessions.c.created_at.desc()).limit(limit)
        if state:
            query = query.where(sessions.c.state == state)
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

    async def count_active(self) -> int:
        """How many sessions are not in a terminal state."""
        async with self._engine.connect() as conn:
            count = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(sessions)
                .where(sessions.c.state.in_(ACTIVE_STATES))
            )
        return int(count or 0)


async def _add_event(
    conn: AsyncConnection,
    session_id: str,
    at: float,
    kind: str,
    state: str | None,
    details: dict[str, Any],
) -> None:
    await conn.execute(
        events.insert().values(
            session_id=session_id,
            at=at,
            kind=kind,
            state=state,
            details=json.dumps(details, separators=(",", ":"), default=str),
        )
    )
