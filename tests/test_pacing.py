"""The create pacer: a token bucket whose debt is a queue bounded by time, on a fake clock."""

from __future__ import annotations

import asyncio
import math

import pytest

from dispatcher.errors import RetryLater, error_body, http_status
from dispatcher.pacing import Pacer


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_burst_passes_then_waits_spread_in_arrival_order() -> None:
    """The first `burst` reservations wait nothing; the next ones wait 1/rate more each."""
    clock = FakeClock()
    pacer = Pacer(2.0, 3, clock=clock)
    assert [pacer.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert pacer.queued == 0
    waits = [pacer.reserve() for _ in range(4)]
    assert waits == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert pacer.queued == 4


def test_tokens_refill_over_time_up_to_the_burst() -> None:
    """Time refills the bucket at `rate`, but never beyond `burst` saved up."""
    clock = FakeClock()
    pacer = Pacer(1.0, 2, clock=clock)
    assert pacer.reserve() == 0.0 and pacer.reserve() == 0.0
    clock.advance(1.0)
    assert pacer.reserve() == 0.0  # one token came back
    assert pacer.reserve() == pytest.approx(1.0)
    clock.advance(100.0)  # a long idle time saves up `burst` tokens, not 100
    assert [pacer.reserve() for _ in range(2)] == [0.0, 0.0]
    assert pacer.reserve() == pytest.approx(1.0)


def test_queued_counts_reservations_still_waiting() -> None:
    """`queued` drops as the clock reaches each waiting reservation's turn."""
    clock = FakeClock()
    pacer = Pacer(1.0, 1, clock=clock)
    pacer.reserve()
    assert pacer.queued == 0
    assert pacer.reserve() == pytest.approx(1.0)
    assert pacer.reserve() == pytest.approx(2.0)
    assert pacer.queued == 2
    clock.advance(0.5)
    assert pacer.queued == 2
    clock.advance(0.5)
    assert pacer.queued == 1
    clock.advance(1.0)
    assert pacer.queued == 0


def test_wait_over_max_is_refused_at_once_without_taking_a_token() -> None:
    """A reservation that would wait over `max_wait_s` raises RetryLater (429 queue-full)."""
    clock = FakeClock()
    pacer = Pacer(1.0, 1, max_wait_s=1.5, what="machine creates", clock=clock)
    assert pacer.reserve() == 0.0
    assert pacer.reserve() == pytest.approx(1.0)
    with pytest.raises(RetryLater) as refused:
        pacer.reserve()  # would wait 2.0 s
    exc = refused.value
    assert http_status(exc) == 429
    assert exc.code == "queue-full"
    assert error_body(exc)["code"] == "queue-full"
    assert "machine creates" in exc.detail
    assert exc.retry_after >= 1
    assert int(exc.headers()["Retry-After"]) >= 1
    assert pacer.queued == 1  # the refusal took nothing
    with pytest.raises(RetryLater):
        pacer.reserve()  # still 2.0 s: refusing again shows no token went
    clock.advance(0.5)
    assert pacer.reserve() == pytest.approx(1.5)  # the next turn, exactly at the limit


def test_retry_after_is_how_long_until_the_queue_has_room() -> None:
    """Retry-After is the time past `max_wait_s` the refused reservation would have waited."""
    clock = FakeClock()
    pacer = Pacer(0.5, 1, max_wait_s=2.0, clock=clock)
    pacer.reserve()
    assert pacer.reserve() == pytest.approx(2.0)
    with pytest.raises(RetryLater) as refused:
        pacer.reserve()  # would wait 4.0 s: 2.0 s past the bound
    assert refused.value.retry_after == pytest.approx(2.0)
    assert refused.value.headers() == {"Retry-After": "2"}


def test_cancel_gives_a_token_back() -> None:
    """A cancelled reservation shortens the queue, so the next caller waits one turn less."""
    clock = FakeClock()
    pacer = Pacer(1.0, 1, max_wait_s=1.0, clock=clock)
    pacer.reserve()
    assert pacer.reserve() == pytest.approx(1.0)
    assert pacer.queued == 1
    pacer.cancel()
    assert pacer.queued == 0
    assert pacer.reserve() == pytest.approx(1.0)  # without the cancel: 2.0, refused
    pacer.cancel()
    pacer.cancel()
    pacer.cancel()  # more cancels than reservations never save up beyond `burst`
    assert pacer.reserve() == 0.0
    assert pacer.reserve() == pytest.approx(1.0)


def test_bad_parameters_are_refused() -> None:
    """A rate that is not positive or a burst under 1 is a programming error."""
    with pytest.raises(ValueError):
        Pacer(0, 1)
    with pytest.raises(ValueError):
        Pacer(1.0, 0)


def test_default_queue_is_unbounded() -> None:
    """Without `max_wait_s` the queue only grows: nothing is refused."""
    clock = FakeClock()
    pacer = Pacer(10.0, 1, clock=clock)
    waits = [pacer.reserve() for _ in range(101)]
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


def test_unbounded_reservation_waits_past_the_bound() -> None:
    """A retry of a call already under way is not refused: it waits for its turn, however far."""
    clock = FakeClock()
    pacer = Pacer(1.0, 1, max_wait_s=0.5, clock=clock)
    assert pacer.reserve() == 0.0
    with pytest.raises(RetryLater):
        pacer.reserve()
    assert pacer.reserve(bounded=False) == pytest.approx(1.0)
    assert pacer.reserve(bounded=False) == pytest.approx(2.0)
