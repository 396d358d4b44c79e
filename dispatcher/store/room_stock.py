"""The rows of the Daily room stock: rooms made ahead, each named as a future session id.

A claim deletes one row, so two instances never claim the same room: on PostgreSQL the row is
picked `FOR UPDATE SKIP LOCKED` (a concurrent claim takes the next one instead of waiting), on
SQLite writes are serialised. The room is then the session's, recorded in its row.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from dispatcher.store.database import Database
from dispatcher.store.schema import room_stock


@dataclass(frozen=True)
class StockRoom:
    """A room of the stock: its name (the id of the session that claims it) and `exp`."""

    name: str
    exp: float


class RoomStockRows:
    """The stock's queries, for one dispatcher and one Daily domain."""

    def __init__(self, store: Database, dispatcher: str) -> None:
        self._store = store
        self._dispatcher = dispatcher

    async def add(self, domain: str, names: Sequence[str], exp: float) -> None:
        """Record rooms just made in `domain`, all with `exp`."""
        row = {"dispatcher": self._dispatcher, "domain": domain, "made_at": time.time(), "exp": exp}
        rows = [{"name": n, **row} for n in names]
        async with self._store.write() as conn:
            await conn.execute(room_stock.insert(), rows)

    async def claim(self, domain: str, min_exp: float) -> StockRoom | None:
        """Take the oldest room of `domain` whose `exp` is at least `min_exp`, or None."""
        pick = (
            sa.select(room_stock.c.name)
            .where(*self._of(domain), room_stock.c.exp >= min_exp)
            .order_by(room_stock.c.exp)
            .limit(1)
        )
        pick = self._store.skip_locked(pick)
        async with self._store.write() as conn:
            row = (
                await conn.execute(
                    room_stock.delete()
                    .where(room_stock.c.name == pick.scalar_subquery())
                    .returning(room_stock.c.name, room_stock.c.exp)
                )
            ).first()
        return StockRoom(row.name, row.exp) if row else None

    async def put_back(self, domain: str, room: StockRoom) -> None:
        """Return a claimed room that no session took (a start refused before it stored one)."""
        now = time.time()
        async with self._store.write() as conn:
            await conn.execute(
                room_stock.insert().values(
                    name=room.name,
                    dispatcher=self._dispatcher,
                    domain=domain,
                    made_at=now,
                    exp=room.exp,
                )
            )

    async def count(self, domain: str, min_exp: float) -> int:
        """Rooms of `domain` that a claim could take (`exp` at least `min_exp`)."""
        async with self._store.read() as conn:
            value = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(room_stock)
                .where(*self._of(domain), room_stock.c.exp >= min_exp)
            )
        return int(value or 0)

    async def stale(self, domain: str, min_exp: float, limit: int) -> list[str]:
        """Rooms of `domain` no claim will take any more: too close to their `exp`."""
        async with self._store.read() as conn:
            rows = await conn.execute(
                sa.select(room_stock.c.name)
                .where(*self._of(domain), room_stock.c.exp < min_exp)
                .order_by(room_stock.c.exp)
                .limit(limit)
            )
        return [r[0] for r in rows]

    async def forget_other_domains(self, domain: str) -> int:
        """Drop the rows of rooms in another Daily domain (the API key changed): this key
        cannot delete them, and no one holds a token for them; they go at their `exp`."""
        async with self._store.write() as conn:
            result = await conn.execute(
                room_stock.delete().where(
                    room_stock.c.dispatcher == self._dispatcher, room_stock.c.domain != domain
                )
            )
        return int(result.rowcount or 0)

    async def forget(self, names: Sequence[str]) -> None:
        """Drop rows (their rooms are deleted)."""
        async with self._store.write() as conn:
            await conn.execute(room_stock.delete().where(room_stock.c.name.in_(tuple(names))))

    def _of(self, domain: str) -> tuple[sa.ColumnElement[bool], ...]:
        return (room_stock.c.dispatcher == self._dispatcher, room_stock.c.domain == domain)
