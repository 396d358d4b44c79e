"""The dispatcher's database, on SQLite or PostgreSQL: sessions and their event log,
idempotency keys, rate buckets, webhook ids, leadership locks and the warm pool's rows."""

from __future__ import annotations

from dispatcher.lifecycle import ACTIVE_STATES, TERMINAL_STATES, State
from dispatcher.store.buckets import RateBuckets, StoreBucket, db_now
from dispatcher.store.keys import IdempotencyKeys, IdempotencyRecord
from dispatcher.store.locks import HeldLock, Locks, lock_key
from dispatcher.store.pool import (
    AVAILABLE,
    CLAIMED,
    RECYCLING,
    RETIRED,
    WARMING,
    PoolMachine,
    PoolRows,
)
from dispatcher.store.schema import (
    engine_url,
    events,
    idempotency_keys,
    metadata,
    pool_machines,
    rate_buckets,
    sessions,
    webhook_events,
)
from dispatcher.store.sessions import Event, Session, SessionRows, iso
from dispatcher.store.webhook_ids import WebhookIds

# The session states under their former names here (dispatcher/lifecycle.py has them).
STARTING = State.STARTING
DISPATCHED = State.DISPATCHED
READY = State.READY
ENDING = State.ENDING
ENDED = State.ENDED
FAILED = State.FAILED


class Store(SessionRows, IdempotencyKeys, RateBuckets, WebhookIds, Locks):
    """Sessions and their event log, idempotency keys, rate buckets, webhook ids and locks, on
    one database (the warm pool's rows are `PoolRows` on the same store)."""


__all__ = [
    "ACTIVE_STATES",
    "AVAILABLE",
    "CLAIMED",
    "DISPATCHED",
    "ENDED",
    "ENDING",
    "FAILED",
    "READY",
    "RECYCLING",
    "RETIRED",
    "STARTING",
    "TERMINAL_STATES",
    "WARMING",
    "Event",
    "HeldLock",
    "IdempotencyRecord",
    "PoolMachine",
    "PoolRows",
    "Session",
    "Store",
    "StoreBucket",
    "db_now",
    "engine_url",
    "events",
    "idempotency_keys",
    "iso",
    "lock_key",
    "metadata",
    "pool_machines",
    "rate_buckets",
    "sessions",
    "webhook_events",
]
