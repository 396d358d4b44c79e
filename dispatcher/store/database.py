"""The connection to the database: opening it (tables made, columns added), reads and writes."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Self

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from dispatcher.store.schema import add_missing_columns, engine_url, metadata

if TYPE_CHECKING:
    from dispatcher.store.locks import HeldLock

_SCHEMA_LOCK = 0x5E55_5C4E


class Database:
    """An engine on SQLite or PostgreSQL; the store's parts each add their queries to it."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._sqlite = engine.dialect.name == "sqlite"
        self._write_lock = asyncio.Lock()
        # Locks from `try_lock` still held: their connections are checked out of the pool,
        # which `dispose()` alone would leave open (and the lock held) after `close()`.
        self._held: weakref.WeakSet[HeldLock] = weakref.WeakSet()

    @classmethod
    async def open(cls, database_url: str, *, schema: str | None = None) -> Self:
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
            await conn.run_sync(add_missing_columns)
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

    def skip_locked(self, pick: sa.Select[Any]) -> sa.Select[Any]:
        """`pick` as a claim's choice of row: on PostgreSQL FOR UPDATE SKIP LOCKED (a concurrent
        claim takes the next row instead of waiting); SQLite serialises writes anyway."""
        return pick if self._sqlite else pick.with_for_update(skip_locked=True)

    @property
    def sqlite(self) -> bool:
        """Whether the database is SQLite (one writer; no row locks)."""
        return self._sqlite
