"""Sessions and their append-only event log: every state change is a compare-and-set plus an
event (which changes are allowed is dispatcher/lifecycle.py's table)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from dispatcher.errors import ErrorCode, RetryLater
from dispatcher.lifecycle import ACTIVE_STATES, TERMINAL_STATES, State
from dispatcher.store.database import Database
from dispatcher.store.schema import events, sessions

_CAPACITY_LOCK = 0x5E55_1011


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
    # Its room's `exp` (unix seconds) when the room was made ahead (dispatcher/rooms/stock.py);
    # None: the room's `exp` follows from `expires_at` (dispatcher/rooms/daily.py `room_exp`).
    room_expires_at: float | None = None

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
class Event:
    """One row of a session's event log."""

    session_id: str
    at: float
    kind: str
    state: str | None
    details: dict[str, Any]


def iso(ts: float | None) -> str | None:
    """A unix timestamp as ISO 8601 UTC with milliseconds."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


class SessionRows(Database):
    """The sessions table and the event log."""

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
                    code=ErrorCode.USER_AT_CAPACITY,
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
        if to == State.ENDING:
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

    async def update_many(self, session_ids: Sequence[str], **values: Any) -> None:
        """Set the same fields of several sessions in one statement (a batch of room deletes)."""
        if not session_ids:
            return
        async with self.write() as conn:
            await conn.execute(
                sessions.update()
                .where(sessions.c.id.in_(list(session_ids)))
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
        async with self.read() as conn:
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
        async with self.read() as conn:
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
        async with self.read() as conn:
            rows = (await conn.execute(query)).all()
        return [Event(r.session_id, r.at, r.kind, r.state, json.loads(r.details)) for r in rows]

    async def active_sessions(self) -> list[Session]:
        """Every session not in a terminal state, oldest first."""
        query = (
            sessions.select()
            .where(sessions.c.state.in_(ACTIVE_STATES))
            .order_by(sessions.c.created_at)
        )
        async with self.read() as conn:
            rows = (await conn.execute(query)).all()
        return [Session(**row._asdict()) for row in rows]

    async def get_many(self, session_ids: Iterable[str]) -> dict[str, Session]:
        """The sessions among `session_ids` that exist, by id."""
        ids = list(dict.fromkeys(session_ids))
        found: dict[str, Session] = {}
        async with self.read() as conn:
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
        async with self.read() as conn:
            rows = (await conn.execute(query)).all()
        return [Session(**row._asdict()) for row in rows]

    async def count_rooms_to_delete(self, *, dispatcher: str | None = None) -> int:
        """How many terminal sessions (of one dispatcher app when named) have a room not
        known to be deleted (nor marked expired)."""
        query = (
            sa.select(sa.func.count())
            .select_from(sessions)
            .where(
                sessions.c.state.in_(TERMINAL_STATES),
                sessions.c.room_name.is_not(None),
                sessions.c.room_deleted_at.is_(None),
            )
        )
        if dispatcher is not None:
            query = query.where(sessions.c.dispatcher == dispatcher)
        async with self.read() as conn:
            count = await conn.scalar(query)
        return int(count or 0)

    async def count_active(self) -> int:
        """How many sessions are not in a terminal state."""
        async with self.read() as conn:
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
        async with self.read() as conn:
            rows = (await conn.execute(query)).all()
        return {str(state): int(count) for state, count in rows}


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
