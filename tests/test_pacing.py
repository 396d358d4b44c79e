"""The pacer: a token bucket whose debt is a queue bounded by time, on a fake clock (its bucket
in memory); its bucket in the store, on SQLite and PostgreSQL, timed by the database's clock."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import pytest

from dispatcher.errors import RetryLater, error_body, http_status
from dispatcher.pacing import Pacer
from dispatcher.store import Store, StoreBucket


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def test_burst_passes_then_waits_spread_in_arrival_order() -> None:
    """The first `burst` reservations wait nothing; the next ones wait 1/rate more each."""
    clock = FakeClock()
    pacer = Pacer(2.0, 3, clock=clock)
    assert [await pacer.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert await pacer.queued() == 0
    waits = [await pacer.reserve() for _ in range(4)]
    assert waits == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert await pacer.queued() == 4


async def test_tokens_refill_over_time_up_to_the_burst() -> None:
    """Time refills the bucket at `rate`, but never beyond `burst` saved up."""
    clock = FakeClock()
    pacer = Pacer(1.0, 2, clock=clock)
    assert await pacer.reserve() == 0.0 and await pacer.reserve() == 0.0
    clock.advance(1.0)
    assert await pacer.reserve() == 0.0  # one token came back
    assert await pacer.reserve() == pytest.approx(1.0)
    clock.advance(100.0)  # a long idle time saves up `burst` tokens, not 100
    assert [await pacer.reserve() for _ in range(2)] == [0.0, 0.0]
    assert await pacer.reserve() == pytest.approx(1.0)


async def test_queued_counts_reservations_still_waiting() -> None:
    """`queued` drops as the clock reaches each waiting reservation's turn."""
    clock = FakeClock()
    pacer = Pacer(1.0, 1, clock=clock)
    await pacer.reserve()
    assert await pacer.queued() == 0
    assert await pacer.reserve() == pytest.approx(1.0)
    assert await pacer.reserve() == pytest.approx(2.0)
    assert await pacer.queued() == 2
    clock.advance(0.5)
    assert await pacer.queued() == 2
    clock.advance(0.5)
    assert await pacer.queued() == 1
    clock.advance(1.0)
    assert await pacer.queued() == 0


async def test_wait_over_max_is_refused_at_once_without_taking_a_token() -> None:
    """A reservation that would wait over `max_wait_s` raises RetryLater (429 queue-full)."""
    clock = FakeClock()
    pacer = Pacer(1.0, 1, max_wait_s=1.5, what="machine creates", clock=clock)
    assert await pacer.reserve() == 0.0
    assert await pacer.reserve() == pytest.approx(1.0)
    with pytest.raises(RetryLater) as refused:
        await pacer.reserve()  # would wait 2.0 s
    exc = refused.value
    assert http_status(exc) == 429
    assert exc.code == "queue-full"
    assert error_body(exc)["code"] == "queue-full"
    assert "machine creates" in exc.detail
    assert exc.retry_after >= 1
    assert int(exc.headers()["Retry-After"]) >= 1
    assert await pacer.queued() == 1  # the refusal took nothing
    with pytest.raises(RetryLater):
        await pacer.reserve()  # still 2.0 s: refusing again shows no token went
    clock.advance(0.5)
    assert await pacer.reserve() == pytest.approx(1.5)  # the next turn, exactly at the limit


async def test_retry_after_is_how_long_until_the_queue_has_room() -> None:
    """Retry-After is the time past `max_wait_s` the refused reservation would have waited."""
    clock = FakeClock()
    pacer = Pacer(0.5, 1, max_wait_s=2.0, clock=clock)
    await pacer.reserve()
    assert await pacer.reserve() == pytest.approx(2.0)
    with pytest.raises(RetryLater) as refused:
        await pacer.reserve()  # would wait 4.0 s: 2.0 s past the bound
    assert refused.value.retry_after == pytest.approx(2.0)
    assert refused.value.headers() == {"Retry-After": "2"}


async def test_cancel_gives_a_token_back() -> None:
    """A cancelled reservation shortens the queue, so the next caller waits one turn less."""
    clock = FakeClock()
    pacer = Pacer(1.0, 1, max_wait_s=1.0, clock=clock)
    await pacer.reserve()
    assert await pacer.reserve() == pytest.approx(1.0)
    assert await pacer.queued() == 1
    await pacer.cancel()
    assert await pacer.queued() == 0
    assert await pacer.reserve() == pytest.approx(1.0)  # without the cancel: 2.0, refused
    await pacer.cancel()
    await pacer.cancel()
    await pacer.cancel()  # more cancels than reservations never save up beyond `burst`
    assert await pacer.reserve() == 0.0
    assert await pacer.reserve() == pytest.approx(1.0)


def test_bad_parameters_are_refused() -> None:
    """A rate that is not positive or a burst under 1 is a programming error."""
    with pytest.raises(ValueError):
        Pacer(0, 1)
    with pytest.raises(ValueError):
        Pacer(1.0, 0)


async def test_default_queue_is_unbounded() -> None:
    """Without `max_wait_s` the queue only grows: nothing is refused."""
    clock = FakeClock()
    pacer = Pacer(10.0, 1, clock=clock)
    waits = [await pacer.reserve() for _ in range(101)]
    assert waits[-1] == pytest.approx(10.0)
    assert pacer.max_wait_s == math.inf


async def test_acquire_sleeps_the_reserved_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    """`acquire()` sleeps exactly the delay of its reservation, and not at all within burst."""
    slept: list[float] = []

    async def fake_sleep(delay: float) -> None:
        slept.append(delay)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    clock = FakeClock()
    pacer = Pacer(4.0, 2, clock=clock)
    await pacer.acquire()
    await pacer.acquire()
    assert slept == []
    await pacer.acquire()
    await pacer.acquire()
    assert slept == pytest.approx([0.25, 0.5])
    clock.advance(0.5)
    await pacer.acquire()
    assert slept[-1] == pytest.approx(0.25)


async def test_acquire_refused_raises_and_does_not_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """An `acquire()` past the queue bound raises RetryLater instead of sleeping."""
    slept: list[float] = []

    async def fake_sleep(delay: float) -> None:
        slept.append(delay)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    pacer = Pacer(1.0, 1, max_wait_s=0.5, clock=FakeClock())
    await pacer.acquire()
    with pytest.raises(RetryLater) as refused:
        await pacer.acquire()
    assert refused.value.code == "queue-full"
    assert slept == []


async def test_unbounded_reservation_waits_past_the_bound() -> None:
    """A retry of a call already under way is not refused: it waits for its turn, however far."""
    clock = FakeClock()
    pacer = Pacer(1.0, 1, max_wait_s=0.5, clock=clock)
    assert await pacer.reserve() == 0.0
    with pytest.raises(RetryLater):
        await pacer.reserve()
    assert await pacer.reserve(bounded=False) == pytest.approx(1.0)
    assert await pacer.reserve(bounded=False) == pytest.approx(2.0)


async def test_waiting_counts_this_instances_reservations_until_their_turn() -> None:
    """`waiting` (this instance's queue) drops as each reservation's turn comes, and a
    cancel takes the last one off."""
    clock = FakeClock()
    pacer = Pacer(1.0, 1, clock=clock)
    await pacer.reserve()
    await pacer.reserve()
    await pacer.reserve()
    assert pacer.waiting == 2
    await pacer.cancel()
    assert pacer.waiting == 1
    clock.advance(1.0)
    assert pacer.waiting == 0


# -- the bucket in the store ------------------------------------------------------------------

# A turn an hour apart: the time a test takes is small beside it, so that waits are checked
# without timing anything.
HOUR = 3600.0


def hourly(store: Store, key: str = "pace:test", burst: int = 2, **kwargs: Any) -> Pacer:
    """A pacer of one call an hour whose bucket is the store's row `key`."""
    return Pacer(1 / HOUR, burst, bucket=StoreBucket(store, key), **kwargs)


def turns(waits: list[float]) -> list[int]:
    """Each wait as the number of whole turns it is (a little under, by the time that passed)."""
    return [math.ceil(w / HOUR - 0.01) for w in waits]


async def test_store_bucket_paces_like_the_memory_bucket(store: Store) -> None:
    """The bucket in the store gives the same turns as the one in memory: `burst` at once,
    then one an interval apart; a refusal takes nothing; a cancel gives a turn back."""
    pacer = hourly(store, max_wait_s=2 * HOUR, what="machine creates")
    waits = [await pacer.reserve() for _ in range(4)]
    assert turns(waits) == [0, 0, 1, 2]
    assert HOUR - 60 < waits[2] <= HOUR
    assert await pacer.queued() == 2 and pacer.waiting == 2
    with pytest.raises(RetryLater) as refused:
        await pacer.reserve()  # three turns away: past the two-hour bound
    assert refused.value.code == "queue-full"
    assert HOUR - 60 < refused.value.retry_after <= HOUR
    assert await pacer.queued() == 2  # the refusal took nothing
    assert not await pacer.take_now()
    await pacer.cancel()
    assert await pacer.queued() == 1
    assert turns([await pacer.reserve()]) == [2]
    assert turns([await pacer.reserve(bounded=False)]) == [3]


async def test_store_bucket_gives_each_concurrent_reservation_its_own_turn(store: Store) -> None:
    """Twenty reservations at once (on PostgreSQL, each on its own connection): each turn is
    given exactly once, as if they had come one after the other."""
    pacer = hourly(store, burst=3)
    waits = await asyncio.gather(*(pacer.reserve() for _ in range(20)))
    assert sorted(turns(list(waits))) == [0, 0, 0, *range(1, 18)]
    assert await pacer.queued() == 17


async def test_instances_on_one_database_share_a_bucket(store: Store) -> None:
    """Two pacers of two instances (two stores on one database) take turns from one row: the
    second instance's first reservation queues behind the first's burst. Other keys are
    buckets of their own."""
    other = Store(store._engine)  # the same database, as another instance opens it
    a = hourly(store, "pace:fly-create:bots")
    b = hourly(other, "pace:fly-create:bots")
    assert turns([await a.reserve(), await a.reserve()]) == [0, 0]
    assert turns([await b.reserve()]) == [1]
    assert await a.queued() == await b.queued() == 1
    assert a.waiting == 0 and b.waiting == 1
    assert turns([await hourly(other, "pace:fly-create:others").reserve()]) == [0]


async def test_pacing_rows_stay_until_full_by_the_databases_clock(store: Store) -> None:
    """The reconciler's purge forgets a pacing row only once it is full again by the
    database's clock as well as its own: a clock far ahead does not reset a queue."""
    pacer = hourly(store)
    for _ in range(3):
        await pacer.reserve()
    assert await store.purge_tokens(now=time.time() + 100 * HOUR) == 0
    assert await pacer.queued() == 1
