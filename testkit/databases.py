"""The PostgreSQL server tests and benches use (TEST_DATABASE_URL), whether it answers, and fresh
databases on it."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from dispatcher.store import engine_url

PG_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


async def pg_problem() -> str | None:
    """Why PostgreSQL at PG_URL cannot be used (None when it answers `SELECT 1`)."""
    engine = create_async_engine(engine_url(PG_URL))
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        await engine.dispose()
    return None


@contextlib.asynccontextmanager
async def fresh_database(server_url: str = PG_URL, prefix: str = "t_") -> AsyncIterator[str]:
    """The URL of a PostgreSQL database created on `server_url`'s server (`<prefix><hex>`),
    dropped on the way out (its connections closed first)."""
    name = prefix + secrets.token_hex(6)
    # CREATE/DROP DATABASE cannot run inside a transaction
    engine = create_async_engine(engine_url(server_url), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
        finally:
            async with engine.connect() as conn:
                await conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await engine.dispose()
