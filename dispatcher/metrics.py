"""Prometheus metrics: one registry per app, the instruments, and what is read at scrape time."""

from __future__ import annotations

import logging
from collections import Counter as Counter_
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from dispatcher.lifecycle import ACTIVE_STATES

if TYPE_CHECKING:
    from dispatcher.pacing import Pacer
    from dispatcher.store import Session, Store

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds: a join URL takes about a second, a bot a few seconds to tens (READY_TIMEOUT_S), a
# session minutes to hours (SESSION_MAX_DURATION_S).
JOIN_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60)
READY_BUCKETS = (0.5, 1, 2, 3, 5, 10, 15, 20, 30, 45, 60, 90, 120)
DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400)


class Metrics:
    """The dispatcher's instruments, in a registry of their own (never the global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions = Gauge(
            "dispatcher_sessions", "Active sessions by state, from the store", ["state"], registry=r
        )
        self.join_url = Histogram(
            "dispatcher_join_url_seconds",
            "Time to answer a /start with a join URL (200 answers)",
            buckets=JOIN_BUCKETS,
            registry=r,
        )
        self.ready = Histogram(
            "dispatcher_ready_seconds",
            "Time from a session's creation to its bot's ready callback",
            buckets=READY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "dispatcher_session_duration_seconds",
            "Time from a session's creation to its end",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.ends = Counter(
            "dispatcher_session_ends",
            "Sessions ended, by final state and end reason",
            ["state", "reason"],
            registry=r,
        )
        self.start_failures = Counter(
            "dispatcher_start_failures",
            "Non-200 answers to /start, by error code",
            ["code"],
            registry=r,
        )
        self.upstream_calls = Counter(
            "dispatcher_upstream_calls",
            "Requests to Fly and Daily, by API, operation and HTTP status (`error`: no answer)",
            ["api", "operation", "status"],
            registry=r,
        )
        self.upstream_retries = Counter(
            "dispatcher_upstream_retries",
            "Upstream calls retried, by API and operation",
            ["api", "operation"],
            registry=r,
        )
        self.create_queue = Gauge(
            "dispatcher_create_queue_depth",
            "Machine creates waiting for their turn under the create pacing",
            registry=r,
        )
        self.room_delete_queue = Gauge(
            "dispatcher_room_delete_queue_depth", "Room deletes queued and not done", registry=r
        )
        self.paced_queue = Gauge(
            "dispatcher_paced_queue",
            "Paced upstream calls (fly_create, daily_room_create, daily_room_delete) waiting for "
            "their turn on every instance, from the store's shared buckets",
            ["call"],
            registry=r,
        )
        self.rooms_awaiting_delete = Gauge(
            "dispatcher_rooms_awaiting_delete",
            "Rooms of ended sessions neither deleted nor expired yet, from the store",
            registry=r,
        )
        self.leader = Gauge(
            "dispatcher_reconciler_leader",
            "1 when this instance runs the reconciler, else 0",
            registry=r,
        )
        self.repairs = Counter(
            "dispatcher_reconciler_repairs",
            "Repairs made by the reconciler, by kind",
            ["kind"],
            registry=r,
        )
        self.pool_size = Gauge(
            "dispatcher_pool_machines",
            "Warm pool machines by region and state (warming, available, claimed, recycling), "
            "from the store",
            ["region", "state"],
            registry=r,
        )
        self.pool_claims = Counter(
            "dispatcher_pool_claims", "Starts served by a warm pool machine", registry=r
        )
        self.pool_misses = Counter(
            "dispatcher_pool_misses", "Starts that found the pool empty (a cold create)", registry=r
        )
        self.pool_start_failures = Counter(
            "dispatcher_pool_start_failures",
            "Claimed pool machines that failed to start (destroyed; another tried)",
            registry=r,
        )
        self.pool_recycles = Counter(
            "dispatcher_pool_recycled",
            "Pool machines whose session ended returned to the pool (POOL_RECYCLE)",
            registry=r,
        )
        self.pool_recycle_errors = Counter(
            "dispatcher_pool_recycle_failures",
            "Pool machines that could not be recycled (not stopped, or refused their new "
            "config): destroyed",
            registry=r,
        )
        self.pool_replenish_errors = Counter(
            "dispatcher_pool_replenish_errors",
            "Pool machines that could not be made or suspended",
            registry=r,
        )
        self.room_stock = Gauge(
            "dispatcher_room_stock",
            "Daily rooms made ahead that a start can take now (DAILY_ROOM_STOCK), from the store",
            registry=r,
        )
        self.room_stock_misses = Counter(
            "dispatcher_room_stock_misses",
            "Daily starts that found the room stock empty and made their own room",
            registry=r,
        )
        self._store: Store | None = None
        self._room_stock: Callable[[], Awaitable[int]] | None = None
        self._pool: Callable[[], Awaitable[list[tuple[str, str]]]] | None = None
        # (region, state) pairs shown before: shown as 0 once empty rather than vanishing.
        self._pool_seen: set[tuple[str, str]] = set()
        self._dispatcher: str | None = None
        self._paced: Mapping[str, Pacer] = {}

    def watch(
        self,
        store: Store,
        dispatcher: str,
        *,
        create_queue: Callable[[], int],
        room_delete_queue: Callable[[], int],
        leader: Callable[[], bool],
        pool: Callable[[], Awaitable[list[tuple[str, str]]]] | None = None,
        paced: Mapping[str, Pacer] | None = None,
        room_stock: Callable[[], Awaitable[int]] | None = None,
    ) -> None:
        """What is read at scrape time: the store's sessions and rooms to delete, queue
        depths, leadership, the pool's machines as (region, state) pairs, the shared
        queues of the `paced` calls, and the rooms in stock."""
        self._store, self._dispatcher, self._pool = store, dispatcher, pool
        self._room_stock = room_stock
        self._paced = dict(paced or {})
        self.create_queue.set_function(lambda: float(create_queue()))
        self.room_delete_queue.set_function(lambda: float(room_delete_queue()))
        self.leader.set_function(lambda: float(leader()))

    async def render(self) -> bytes:
        """The text exposition, with the sessions gauge counted from the store now."""
        if self._store is not None:
            counts = await self._store.count_by_state(dispatcher=self._dispatcher)
            for active in ACTIVE_STATES:
                self.sessions.labels(state=active).set(counts.get(active, 0))
            self.rooms_awaiting_delete.set(
                await self._store.count_rooms_to_delete(dispatcher=self._dispatcher)
            )
        for call, pacer in self._paced.items():
            try:
                self.paced_queue.labels(call=call).set(await pacer.queued())
            except Exception as exc:  # e.g. Daily's domain, the bucket's key, not known yet
                log.debug("no %s queue to show: %s", call, exc)
        if self._room_stock is not None:
            try:
                self.room_stock.set(await self._room_stock())
            except Exception as exc:  # Daily's domain not known yet
                log.debug("no room stock to show: %s", exc)
        if self._pool is not None:
            machines = Counter_(await self._pool())
            for region, state in {*machines, *self._pool_seen}:
                self.pool_size.labels(region=region or "any", state=state).set(
                    machines.get((region, state), 0)
                )
            self._pool_seen |= set(machines)
        return generate_latest(self.registry)

    def started(self, seconds: float) -> None:
        """A /start answered 200 after `seconds`."""
        self.join_url.observe(seconds)

    def start_failed(self, code: str) -> None:
        """A /start answered an error."""
        self.start_failures.labels(code=code).inc()

    def session_ready(self, session: Session | None) -> None:
        """A session moved to ready (None: it did not)."""
        if session is not None and session.ready_at is not None:
            self.ready.observe(max(0.0, session.ready_at - session.created_at))

    def session_ended(self, session: Session | None) -> None:
        """A session reached its terminal state (None: another instance ended it)."""
        if session is None:
            return
        self.ends.labels(state=session.state, reason=session.end_reason or "unknown").inc()
        if session.ended_at is not None:
            self.duration.observe(max(0.0, session.ended_at - session.created_at))

    def upstream_call(self, api: str, operation: str, status: int | None) -> None:
        """One request sent to an upstream API: its HTTP status, or None for no answer."""
        self.upstream_calls.labels(
            api=api, operation=operation, status=str(status) if status is not None else "error"
        ).inc()

    def pool_claim(self) -> None:
        """A start got a pool machine."""
        self.pool_claims.inc()

    def pool_miss(self) -> None:
        """A start found the pool empty."""
        self.pool_misses.inc()

    def pool_start_failed(self) -> None:
        """A claimed pool machine failed to start."""
        self.pool_start_failures.inc()

    def pool_recycled(self) -> None:
        """A pool machine whose session ended is back in the pool."""
        self.pool_recycles.inc()

    def pool_recycle_failed(self) -> None:
        """A pool machine could not be recycled (and was destroyed)."""
        self.pool_recycle_errors.inc()

    def pool_replenish_failed(self) -> None:
        """A pool machine could not be made or suspended."""
        self.pool_replenish_errors.inc()

    def upstream_retry(self, api: str, operation: str) -> None:
        """A failed upstream call is about to be tried again."""
        self.upstream_retries.labels(api=api, operation=operation).inc()

    def repaired(self, counts: dict[str, int]) -> None:
        """Repairs of a reconciler pass, by kind."""
        for kind, count in counts.items():
            if count:
                self.repairs.labels(kind=kind).inc(count)
