"""The tables, the columns added since the first release, and the database URL."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

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
    # The room's `exp` when it is not the session's (a room made ahead, dispatcher/rooms/stock.py).
    sa.Column("room_expires_at", sa.Float),
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

# Rate limits as token buckets (dispatcher/store/buckets.py). No row is a full bucket.
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

# The warm pool (dispatcher/pool/): machines made ahead of sessions. `state` is `warming`
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

# Daily rooms made ahead of their sessions (dispatcher/rooms/stock.py), each named as the id of
# the session that will claim it; a claim deletes the row. `domain` is the Daily domain that
# holds the room, `exp` its `exp` (unix seconds).
room_stock = sa.Table(
    "room_stock",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("dispatcher", sa.String(128), nullable=False),
    sa.Column("domain", sa.String(128), nullable=False),
    sa.Column("made_at", sa.Float, nullable=False),
    sa.Column("exp", sa.Float, nullable=False),
    sa.Index("ix_room_stock_claim", "dispatcher", "domain", "exp"),
)

# Columns added after the first release, with their DDL type: added on open when missing.
_ADDED_COLUMNS = {
    "sessions": {
        "room_deleted_at": "FLOAT",
        "end_requested_at": "FLOAT",
        "traceparent": "VARCHAR(64)",
        "error": "TEXT",
        "room_expires_at": "FLOAT",
    }
}


def engine_url(url: str) -> str:
    """The SQLAlchemy async URL for a DATABASE_URL (sqlite:/// or postgresql://)."""
    scheme, rest = url.split(":", 1)
    if scheme == "sqlite":
        return "sqlite+aiosqlite:" + rest
    parts = urlsplit("postgresql+asyncpg:" + rest)
    query = [("ssl" if k == "sslmode" else k, v) for k, v in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def add_missing_columns(sync_conn: sa.Connection) -> None:
    """Add the columns of `_ADDED_COLUMNS` that a database made by an older release lacks."""
    inspector = sa.inspect(sync_conn)
    for table, columns in _ADDED_COLUMNS.items():
        present = {c["name"] for c in inspector.get_columns(table)}
        for name, ddl in columns.items():
            if name not in present:
                sync_conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}")


def upsert(dialect: str, table: sa.Table) -> Any:
    """An INSERT of the dialect, which has ON CONFLICT clauses."""
    if dialect == "postgresql":
        return pg_insert(table)
    return sqlite_insert(table)
