"""Token buckets (GCRA) in the store: the start rate limits, and the pacing of upstream calls.

A bucket is full again at `full_at`; each token taken moves that `interval` later, and a bucket
whose `full_at` would pass `now + window` is empty. No row is a full bucket, so rows whose
`full_at` is past are deleted freely.

The start limits (`take_tokens`) are timed by the caller's clock. The pacing buckets
(`pace_take`, keys `pace:...`) are timed by the database's own clock, read inside the statement
that takes the token, so that instances whose clocks disagree still share one pace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement

from dispatcher.store.database import Database
from dispatcher.store.schema import rate_buckets, upsert

# Absorbs float rounding: `count` tokens of `window / count` fill the window.
_RATE_SLACK_S = 0.001
# Float rounding of times near 1.7e9 s (doubles resolve about 2e-7 s there).
_PACE_SLACK_S = 1e-6
# SQLite's julianday() of the unix epoch.
_UNIX_EPOCH_JULIAN_DAY = 2440587.5


def db_now(dialect: str) -> ColumnElement[float]:
    """The database's clock in unix seconds, one value for the whole statement: PostgreSQL's
    `statement_timestamp()`, SQLite's `'now'` (fixed for one step of a statement)."""
    if dialect == "postgresql":
        return sa.cast(sa.extract("epoch", sa.func.statement_timestamp()), sa.Float)
    return sa.cast((sa.func.julianday("now") - _UNIX_EPOCH_JULIAN_DAY) * 86400.0, sa.Float)


class RateBuckets(Database):
    """Token buckets by key, shared by every instance on the database."""

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
                    statement = (
                        upsert(self.dialect, rate_buckets)
                        .values(key=key, full_at=now + interval)
                        .on_conflict_do_update(
                            index_elements=[rate_buckets.c.key],
                            set_={"full_at": taken},
                            where=taken <= now + window + _RATE_SLACK_S,
                        )
                        .returning(full_at)
                    )
                    if (await conn.execute(statement)).first() is None:
                        held = await conn.scalar(
                            sa.select(full_at).where(rate_buckets.c.key == key)
                        )
                        waits[key] = max(0.001, float(held or now) + interval - window - now)
                if waits:
                    raise _Refused
        except _Refused:
            pass
        return waits

    async def pace_take(
        self, key: str, interval_s: float, limit_s: float | None
    ) -> tuple[bool, float]:
        """Take a token of the pacing bucket `key`: move its `full_at` to `max(full_at, now) +
        interval_s` unless that passes `now + limit_s` (None: no limit), on the database's
        clock. One UPSERT ... RETURNING, atomic on its own (PostgreSQL's row lock orders
        concurrent takes from every instance; SQLite has one writer). (taken, how far past
        now `full_at` is, or would have been, after the take)."""
        now = db_now(self.dialect)
        full_at = rate_buckets.c.full_at
        interval = sa.literal(interval_s, sa.Float)
        after = sa.case((full_at > now, full_at), else_=now) + interval
        statement = (
            upsert(self.dialect, rate_buckets)
            .values(key=key, full_at=now + interval)
            .on_conflict_do_update(
                index_elements=[rate_buckets.c.key],
                set_={"full_at": after},
                where=(
                    None
                    if limit_s is None
                    else after <= now + sa.literal(limit_s + _PACE_SLACK_S, sa.Float)
                ),
            )
            .returning((full_at - now).label("ahead"))
        )
        async with self.write() as conn:
            row = (await conn.execute(statement)).first()
        if row is not None:
            return True, float(row.ahead)
        # Refused (nothing changed): how far off a turn is, for the caller's Retry-After.
        return False, await self.pace_ahead(key) + interval_s

    async def pace_give_back(self, key: str, interval_s: float) -> None:
        """Move the pacing bucket's `full_at` `interval_s` earlier, never before now."""
        now = db_now(self.dialect)
        earlier = rate_buckets.c.full_at - sa.literal(interval_s, sa.Float)
        async with self.write() as conn:
            await conn.execute(
                rate_buckets.update()
                .where(rate_buckets.c.key == key)
                .values(full_at=sa.case((earlier > now, earlier), else_=now))
            )

    async def pace_ahead(self, key: str) -> float:
        """How far past the database's now the pacing bucket's `full_at` is (0: full)."""
        now = db_now(self.dialect)
        async with self.read() as conn:
            ahead = await conn.scalar(
                sa.select(rate_buckets.c.full_at - now).where(rate_buckets.c.key == key)
            )
        return max(0.0, float(ahead or 0.0))

    async def purge_tokens(self, *, now: float) -> int:
        """Forget buckets that are full again (as good as no row) by both `now` and the
        database's clock; how many were removed."""
        full_at = rate_buckets.c.full_at
        async with self.write() as conn:
            result = await conn.execute(
                rate_buckets.delete().where(full_at <= now, full_at <= db_now(self.dialect))
            )
        return int(result.rowcount or 0)


class StoreBucket:
    """A pacer's bucket (dispatcher/pacing.py) in the store, shared by every instance: the row
    `key`, or the key `key()` gives when it is a function (e.g. of a domain learnt later)."""

    def __init__(self, store: RateBuckets, key: str | Callable[[], str]) -> None:
        self._store = store
        self._key = key

    @property
    def key(self) -> str:
        """The bucket's row."""
        return self._key if isinstance(self._key, str) else self._key()

    async def take(self, interval_s: float, limit_s: float | None) -> tuple[bool, float]:
        return await self._store.pace_take(self.key, interval_s, limit_s)

    async def give_back(self, interval_s: float) -> None:
        await self._store.pace_give_back(self.key, interval_s)

    async def ahead(self) -> float:
        return await self._store.pace_ahead(self.key)


class _Refused(Exception):
    """Rolls back the tokens taken when one bucket was empty."""
