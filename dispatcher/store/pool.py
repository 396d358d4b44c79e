"""The warm pool's rows: which pre-made machines exist, and which session claimed which.

A claim is one UPDATE of one `available` row, so two dispatcher instances never claim the same
machine: on PostgreSQL the row is picked `FOR UPDATE SKIP LOCKED` (a concurrent claim takes the
next one instead of waiting), on SQLite writes are serialised.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa

from dispatcher.lifecycle import State
from dispatcher.store.database import Database
from dispatcher.store.schema import events, pool_machines, sessions

WARMING = "warming"
AVAILABLE = "available"
CLAIMED = "claimed"
# Being destroyed (another image, never warm): its bot is told so (410) if it asks.
RETIRED = "retired"
# Its session ended (POOL_RECYCLE): waiting for its machine to stop and take a new POOL_TOKEN,
# then `available` again (or `warming`, for a pool that boots its machines ahead).
RECYCLING = "recycling"


@dataclass(frozen=True)
class PoolMachine:
    """One pool machine as stored."""

    machine_id: str
    dispatcher: str
    region: str
    image: str
    state: str
    token_hash: str
    version: str | None
    created_at: float
    updated_at: float
    session_id: str | None = None
    body: str | None = None


class PoolRows:
    """The pool's queries, on the dispatcher's store."""

    def __init__(self, store: Database, dispatcher: str) -> None:
        self._store = store
        self._dispatcher = dispatcher

    async def add(
        self,
        machine_id: str,
        *,
        region: str,
        image: str,
        state: str,
        token_hash: str,
        version: str | None,
    ) -> None:
        """Record a machine just made for the pool."""
        now = time.time()
        async with self._store.write() as conn:
            await conn.execute(
                pool_machines.insert().values(
                    machine_id=machine_id,
                    dispatcher=self._dispatcher,
                    region=region,
                    image=image,
                    state=state,
                    token_hash=token_hash,
                    version=version,
                    created_at=now,
                    updated_at=now,
                )
            )

    async def get(self, machine_id: str) -> PoolMachine | None:
        """The row of a pool machine."""
        async with self._store.read() as conn:
            row = (
                await conn.execute(
                    pool_machines.select().where(pool_machines.c.machine_id == machine_id)
                )
            ).first()
        return PoolMachine(**row._asdict()) if row else None

    async def all(self) -> list[PoolMachine]:
        """Every row of this dispatcher's pool, oldest first."""
        async with self._store.read() as conn:
            rows = await conn.execute(
                pool_machines.select()
                .where(pool_machines.c.dispatcher == self._dispatcher)
                .order_by(pool_machines.c.created_at)
            )
        return [PoolMachine(**r._asdict()) for r in rows]

    async def claim(
        self, *, region: str, image: str, session_id: str, body: str, state: str = AVAILABLE
    ) -> PoolMachine | None:
        """Claim the oldest machine of `image` in `region` in `state` (available, or warming:
        a running pool's machine still loading) for a session, or None."""
        pick = (
            sa.select(pool_machines.c.machine_id)
            .where(
                pool_machines.c.dispatcher == self._dispatcher,
                pool_machines.c.state == state,
                pool_machines.c.region == region,
                pool_machines.c.image == image,
            )
            .order_by(pool_machines.c.created_at)
            .limit(1)
        )
        pick = self._store.skip_locked(pick)
        async with self._store.write() as conn:
            row = (
                await conn.execute(
                    pool_machines.update()
                    .where(
                        pool_machines.c.machine_id == pick.scalar_subquery(),
                        pool_machines.c.state == state,
                    )
                    .values(state=CLAIMED, session_id=session_id, body=body, updated_at=time.time())
                    .returning(*pool_machines.c)
                )
            ).first()
        return PoolMachine(**row._asdict()) if row else None

    async def move(
        self, machine_id: str, to: str, *, from_states: Iterable[str], **values: object
    ) -> bool:
        """Move a row to state `to` if it is in one of `from_states`; whether it moved."""
        async with self._store.write() as conn:
            result = await conn.execute(
                pool_machines.update()
                .where(
                    pool_machines.c.machine_id == machine_id,
                    pool_machines.c.state.in_(tuple(from_states)),
                )
                .values(state=to, updated_at=time.time(), **values)
            )
        return bool(result.rowcount)

    async def forget(self, machine_id: str) -> None:
        """Drop a row (its machine is destroyed, or serves its session now)."""
        async with self._store.write() as conn:
            await conn.execute(
                pool_machines.delete().where(pool_machines.c.machine_id == machine_id)
            )

    async def dispatches(self, since: float) -> tuple[int, int]:
        """Sessions of this dispatcher dispatched since a time: (from the pool, created)."""
        async with self._store.read() as conn:
            rows = await conn.execute(
                sa.select(events.c.details)
                .join(sessions, sessions.c.id == events.c.session_id)
                .where(
                    sessions.c.dispatcher == self._dispatcher,
                    events.c.kind == "state",
                    events.c.state == State.DISPATCHED,
                    events.c.at >= since,
                )
            )
            pooled = [json.loads(r[0]).get("pooled") is True for r in rows]
        return sum(pooled), len(pooled) - sum(pooled)

    async def counts(self, image: str) -> dict[tuple[str, str], int]:
        """Rows of `image` not yet claimed (recycling ones included), by (region, state)."""
        async with self._store.read() as conn:
            rows = await conn.execute(
                sa.select(pool_machines.c.region, pool_machines.c.state, sa.func.count())
                .where(
                    pool_machines.c.dispatcher == self._dispatcher,
                    pool_machines.c.image == image,
                    pool_machines.c.state.in_((WARMING, AVAILABLE, RECYCLING)),
                )
                .group_by(pool_machines.c.region, pool_machines.c.state)
            )
        return {(r[0], r[1]): int(r[2]) for r in rows}
