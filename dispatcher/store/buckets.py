"""Rate limits as token buckets (GCRA).

A bucket is full again at `full_at`; each token taken moves that `interval` later, and a bucket
whose `full_at` would pass `now + window` is empty. No row is a full bucket, so rows whose
`full_at` is past are deleted freely.
"""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa

from dispatcher.store.database import Database
from dispatcher.store.schema import rate_buckets, upsert

# Absorbs float rounding: `count` tokens of `window / count` fill the window.
_RATE_SLACK_S = 0.001


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

    async def purge_tokens(self, *, now: float) -> int:
        """Forget buckets that are full again (as good as no row); how many were removed."""
        async with self.write() as conn:
            result = await conn.execute(rate_buckets.delete().where(rate_buckets.c.full_at <= now))
        return int(result.rowcount or 0)


class _Refused(Exception):
    """Rolls back the tokens taken when one bucket was empty."""
