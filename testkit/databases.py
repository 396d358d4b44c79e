"""The PostgreSQL server tests and benches use (TEST_DATABASE_URL), and whether it answers."""

from __future__ import annotations

import os

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
