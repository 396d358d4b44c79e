"""Leadership: session-level advisory locks, held by a connection of their own."""

from __future__ import annotations

import contextlib
import hashlib

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from dispatcher.store.database import Database


class Locks(Database):
    """Named locks (PostgreSQL advisory locks; always granted on SQLite)."""

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


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for a name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
